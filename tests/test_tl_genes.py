"""Gene embeddings: ``tfs.tl.contextual_gene_embeddings``, ``gene_embeddings`` and ``gene_embeddings_by_group``."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, read_tokens, snapshot
from transcriptformer.data.tokenizer import TranscriptFormerWarning


def test_contextual_gene_embeddings_gene_filter(tiny_path, tiny_adata, reference):
    ref = reference["cge"].uns
    full = tfs.tl.contextual_gene_embeddings(tiny_adata, tiny_path)
    assert full.n_obs == len(ref["cge_cell_indices"])
    np.testing.assert_allclose(full.X, ref["cge_embeddings"], atol=2e-6)
    np.testing.assert_array_equal(full.obs["gene_id"].astype(str), ref["cge_gene_names"].astype(str))
    # the slot of each gene in its cell's sequence
    for cell in (1, 7):
        rows = full.obs["cell_index"].to_numpy() == cell
        np.testing.assert_array_equal(full.obs["position"].to_numpy()[rows], np.arange(rows.sum()))
    wanted = ["ENSG00000900164", "ENSG00000900109.4"]  # a version suffix is ignored
    with pytest.warns(TranscriptFormerWarning, match="1 of the requested genes"):
        some = tfs.tl.contextual_gene_embeddings(tiny_adata, tiny_path, genes=[*wanted, "nonsense"])
    expected = np.isin(full.obs["gene_id"].astype(str), ["ENSG00000900164", "ENSG00000900109"])
    assert some.n_obs == expected.sum() > 0
    np.testing.assert_allclose(some.X, full.X[expected], atol=1e-6)
    np.testing.assert_array_equal(some.obs["position"], full.obs["position"].to_numpy()[expected])
    with pytest.raises(ValueError, match="none of the 1 requested genes"):
        tfs.tl.contextual_gene_embeddings(tiny_adata, tiny_path, genes=["nonsense"])


def test_cge_count_column(tiny_path, tiny_model, tiny_adata):
    cge = tfs.tl.contextual_gene_embeddings(tiny_adata, tiny_path, normalize_to_scale=100, clip_counts=5)
    _, window = read_tokens(tiny_model, tiny_adata, normalize_to_scale=100, clip_counts=5)
    cells, pos = cge.obs["cell_index"].to_numpy(), cge.obs["position"].to_numpy()
    np.testing.assert_allclose(cge.obs["count"], window.counts[cells, pos], rtol=1e-6)
    assert cge.obs["count"].max() <= 5


@pytest.fixture(scope="module")
def cge_rows(tiny_path):
    return tfs.tl.contextual_gene_embeddings(tfs.datasets.tiny_human(), tiny_path)


def test_gene_embeddings_are_means_of_the_published_cge(tiny_path, tiny_adata, cge_rows):
    before = snapshot(tiny_adata)
    tfs.tl.gene_embeddings(tiny_adata, tiny_path)
    after = tiny_adata.varm["X_transcriptformer_genes"]
    assert after.shape == (tiny_adata.n_vars, 32) and after.dtype == np.float32
    n_cells = tiny_adata.var["transcriptformer_genes_n_cells"].to_numpy()
    ids = tiny_adata.var["ensembl_id"].astype(str).str.split(".").str[0].to_numpy()
    read = cge_rows.obs["gene_id"].astype(str).to_numpy()
    for j, gene in enumerate(ids):
        rows = read == gene
        assert n_cells[j] == rows.sum()
        if rows.any():
            np.testing.assert_allclose(after[j], cge_rows.X[rows].mean(axis=0), atol=1e-6)
        else:  # never read (not expressed where the model read, outside the vocabulary): NaN, never 0
            assert np.isnan(after[j]).all()
    assert (n_cells > 0).sum() == len(np.unique(read))
    assert before["obsm"].keys() == tiny_adata.obsm.keys()  # only varm/var/uns are written
    assert tiny_adata.uns["transcriptformer_genes"]["params"]["tool"] == "gene_embeddings"


def test_gene_embeddings_by_group(tiny_path, tiny_adata, cge_rows):
    before = snapshot(tiny_adata)
    out = tfs.tl.gene_embeddings_by_group(
        tiny_adata, tiny_path, groupby="cell_type", genes=["ENSG00000900164", "ENSG00000900109"]
    )
    assert_unchanged(tiny_adata, before)
    cell_group = tiny_adata.obs["cell_type"].astype(str).to_numpy()[cge_rows.obs["cell_index"].to_numpy()]
    read = cge_rows.obs["gene_id"].astype(str).to_numpy()
    assert set(out.obs["gene_id"].astype(str)) <= {"ENSG00000900164", "ENSG00000900109"}
    for group, gene, n, x in zip(out.obs["group"], out.obs["gene_id"], out.obs["n_cells"], out.X, strict=True):
        rows = (cell_group == group) & (read == gene)
        assert n == rows.sum() > 0
        np.testing.assert_allclose(x, cge_rows.X[rows].mean(axis=0), atol=1e-6)
    expected = {(g, r) for g, r in zip(cell_group, read, strict=True) if r in ("ENSG00000900164", "ENSG00000900109")}
    assert set(zip(out.obs["group"].astype(str), out.obs["gene_id"].astype(str), strict=True)) == expected


def test_gene_embeddings_stream_from_a_backed_file(tiny_path, tiny_adata, tmp_path):
    tiny_adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    mem = tfs.tl.gene_embeddings(tiny_adata, tiny_path, copy=True)
    tfs.tl.gene_embeddings(backed, tiny_path)
    np.testing.assert_allclose(
        backed.varm["X_transcriptformer_genes"], mem.varm["X_transcriptformer_genes"], atol=1e-6, equal_nan=True
    )
    backed.file.close()


def test_gene_embeddings_errors(tiny_path, tiny_adata):
    with pytest.raises(KeyError, match="groupby='nope'"):
        tfs.tl.gene_embeddings_by_group(tiny_adata, tiny_path, groupby="nope")
