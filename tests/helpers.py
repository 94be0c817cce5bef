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


def flex_unavailable(attention: str, device: str, loaded) -> str | None:
    """Why compiled flex attention cannot run on ``device`` for ``loaded``'s heads; ``None`` when it runs.

    The up-front probe that tells "cannot compile here" (a flex test may skip) from "the engine fell
    back" (a flex test must fail): the kernel the engine uses, :class:`~transcriptformer.model.FlexAttention`,
    called on its own (no engine, model weights or data) with random inputs of the model's head shape and
    full sequence length, for two batch sizes so that ``flex-dynamic`` recompiles with symbolic sizes as a
    run's batches make it do.
    """
    import torch

    from transcriptformer.model import AttentionInputs, FlexAttention

    config = loaded.model.config
    H, dk = config.num_heads, config.embed_dim // config.num_heads
    A = loaded.model.num_aux
    T = loaded.seq_len + A
    g = torch.Generator().manual_seed(0)
    try:
        kernel = FlexAttention(dynamic=attention == "flex-dynamic")
        for B in (2, 3):
            q, k, v = (torch.randn(B, H, T, dk, generator=g).to(device) for _ in range(3))
            bias = torch.rand(B, T, generator=g).to(device)
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            with torch.inference_mode():
                out = kernel(q, k, v, AttentionInputs(bias, valid, float(config.softcap), num_aux=A))
            if not bool(torch.isfinite(out).all()):
                return "the compiled kernel returned non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure to compile or run is the answer
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return None


def spy_on(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records the positional arguments of every call (returned list)."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls
