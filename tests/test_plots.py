"""Plots: they draw, honour show/ax/return_fig, and recompute the UMAP when the embedding changes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import transcriptformer.scanpy as tfs


@pytest.fixture(scope="module")
def _embedded_once(tiny_path):
    adata = tfs.datasets.tiny_human()
    tfs.tl.embed(adata, model=tiny_path, llh=True)
    return adata


@pytest.fixture
def embedded(_embedded_once):
    """The tiny data embedded once per module; each test gets its own copy."""
    return _embedded_once.copy()


def test_umap(embedded):
    fig = tfs.pl.umap(embedded, color="cell_type", n_neighbors=5, return_fig=True)
    assert fig is not None and len(fig.axes) >= 1
    first = embedded.obsm["X_umap_transcriptformer"].copy()
    assert "X_umap" not in embedded.obsm  # an existing UMAP of the user's is never overwritten
    fig, ax = plt.subplots()
    assert tfs.pl.umap(embedded, color="cell_type", n_neighbors=5, ax=ax, show=False) is None
    np.testing.assert_array_equal(embedded.obsm["X_umap_transcriptformer"], first)  # cached: same settings
    tfs.pl.umap(embedded, n_neighbors=7, show=False)
    assert embedded.uns["transcriptformer_neighbors"]["params"]["n_neighbors"] == 7  # new settings: recomputed
    embedded.obsm["X_transcriptformer"] = embedded.obsm["X_transcriptformer"][::-1].copy()
    tfs.pl.umap(embedded, n_neighbors=7, show=False)
    assert not np.array_equal(embedded.obsm["X_umap_transcriptformer"], first)  # new embedding: recomputed
    plt.close("all")


def test_llh_and_species_umap(embedded, tiny_path):
    assert tfs.pl.llh(embedded, groupby="cell_type", return_fig=True) is not None
    assert tfs.pl.llh(embedded, show=False) is None
    other = embedded.copy()
    fig = tfs.pl.species_umap(
        {"human": embedded, "copy": other}, color="cell_type", n_neighbors=5, return_fig=True, size=20
    )
    assert len(fig.axes) >= 2
    with pytest.raises(KeyError, match="llh=True"):
        tfs.pl.llh(tfs.datasets.tiny_human())
    with pytest.raises(KeyError, match=r"run tfs\.tl\.embed"):
        tfs.pl.umap(tfs.datasets.tiny_human())
    plt.close("all")
