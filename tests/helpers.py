"""Helpers shared by the tests (importable as ``helpers``: pyproject puts ``tests/`` on ``sys.path``).

Fixtures live in ``conftest.py``; plain functions and constants live here, because with
``--import-mode=importlib`` a ``conftest`` module is not meant to be imported by tests.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"


def snapshot(adata: ad.AnnData) -> dict:
    """A deep copy of everything a tool could write to, for 'input unchanged' assertions."""
    X = adata.X
    return {
        "X": X.copy() if X is not None else None,
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": set(adata.uns.keys()),
        "layers": set(adata.layers.keys()),
        "raw": None if adata.raw is None else adata.raw.X.copy(),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = snapshot(adata)
    for key in ("X", "raw"):
        a, b = before[key], after[key]
        if a is None:
            assert b is None
            continue
        a = a.toarray() if sp.issparse(a) else np.asarray(a)
        b = b.toarray() if sp.issparse(b) else np.asarray(b)
        np.testing.assert_array_equal(a, b)
    assert before["obs"].equals(after["obs"]), "obs changed"
    assert before["var"].equals(after["var"]), "var changed"
    assert before["obsm"].keys() == after["obsm"].keys(), "obsm keys changed"
    assert before["uns"] == after["uns"], "uns keys changed"
    assert before["layers"] == after["layers"], "layers changed"
