"""``tfs.tl.umap``: neighbours and a UMAP of an embedding, under keys of its own."""

from __future__ import annotations

import numpy as np
import pytest

import transcriptformer.scanpy as tfs


def test_tl_umap_follows_the_conventions(embedded):
    out = tfs.tl.umap(embedded, n_neighbors=5, copy=True)
    assert "X_umap_transcriptformer" in out.obsm and "X_umap_transcriptformer" not in embedded.obsm
    assert tfs.tl.umap(embedded, n_neighbors=5, key_added="mine") is None
    assert "X_mine" in embedded.obsm and embedded.uns["mine"]["params"]["tool"] == "umap"
    with pytest.warns(FutureWarning, match="use_rep"):
        tfs.tl.umap(embedded, rep="X_transcriptformer", n_neighbors=5)
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="n_neighbors"):
            tfs.tl.umap(embedded, n_neighbors=bad)
    broken = embedded.copy()
    broken.obsm["X_transcriptformer"][2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 1 cell"):
        tfs.tl.umap(broken)


def test_umap_needs_a_few_cells(embedded):
    with pytest.raises(ValueError, match="at least 4 cells with an embedding; adata has 3"):
        tfs.tl.umap(embedded[:3].copy())
    few = embedded[:4].copy()
    assert tfs.tl.umap(few) is None and few.obsm["X_umap_transcriptformer"].shape == (4, 2)
