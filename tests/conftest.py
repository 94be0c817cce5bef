from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import transcriptformer
import transcriptformer.scanpy as tfs

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"


@pytest.fixture(scope="session", autouse=True)
def _cache_outside_home(tmp_path_factory):
    """Loading a checkpoint records its hash in the cache: keep the tests out of the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRANSCRIPTFORMER_CACHE", str(tmp_path_factory.mktemp("transcriptformer-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return tfs.datasets.tiny_model_path()


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    return transcriptformer.load_model(tiny_path)


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    return tfs.datasets.tiny_human()


@pytest.fixture
def tiny_raw_adata() -> ad.AnnData:
    return ad.read_h5ad(DATA / "tiny_human_raw.h5ad")


@pytest.fixture(scope="session")
def stages() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "stages_human.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference():
    return {
        name: ad.read_h5ad(REFERENCE / f"human_{name}.h5ad") for name in ("cell", "llh", "gene_llh", "cge", "raw_cell")
    }


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
