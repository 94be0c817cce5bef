"""Gene embeddings: ``tfs.tl.contextual_gene_embeddings``, ``gene_embeddings`` and ``gene_embeddings_by_group``."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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


def test_gene_embeddings_groupby_is_deprecated_but_works(tiny_path, tiny_adata):
    genes = ["ENSG00000900164", "ENSG00000900109"]
    expected = tfs.tl.gene_embeddings_by_group(tiny_adata, tiny_path, groupby="cell_type", genes=genes)
    with pytest.warns(FutureWarning, match=r"gene_embeddings_by_group\(adata, groupby=\.\.\.\)"):
        old = tfs.tl.gene_embeddings(tiny_adata, tiny_path, groupby="cell_type", genes=genes)
    assert old.obs.equals(expected.obs)
    np.testing.assert_array_equal(old.X, expected.X)
    assert "X_transcriptformer_genes" not in tiny_adata.varm  # the by-group result is returned, not written


def _spy_groups(monkeypatch) -> list:
    from transcriptformer.scanpy.tl import _genes

    calls: list = []
    original = _genes.run_model

    def spy(*args, **kwargs):
        calls.append(kwargs.get("n_groups"))
        return original(*args, **kwargs)

    monkeypatch.setattr(_genes, "run_model", spy)
    return calls


def test_groups_are_the_categories_that_have_cells(tiny_path, tiny_adata, monkeypatch):
    import time

    used = ["B cell", "T cell", "NK cell"]
    declared = [f"unused type {i}" for i in range(1997)] + used
    labels = [used[i % 3] for i in range(tiny_adata.n_obs)]
    compact = tiny_adata.copy()
    compact.obs["group"] = pd.Categorical(labels, categories=used)
    tiny_adata.obs["group"] = pd.Categorical(labels, categories=declared)
    assert len(tiny_adata.obs["group"].cat.categories) == 2000
    n_groups = _spy_groups(monkeypatch)
    start = time.perf_counter()
    out = tfs.tl.gene_embeddings_by_group(tiny_adata, tiny_path, groupby="group")
    seconds = time.perf_counter() - start
    assert n_groups == [3]  # the sums are allocated for the 3 groups with cells, not the 2,000 declared
    assert list(out.obs["group"].cat.categories) == used and set(out.obs["group"]) == set(used)
    reference = tfs.tl.gene_embeddings_by_group(compact, tiny_path, groupby="group")
    assert out.obs.equals(reference.obs)
    np.testing.assert_array_equal(out.X, reference.X)
    assert seconds < 5, f"{seconds:.1f} s"  # as quick as the 3 groups' run (well under a second here when idle)


def test_an_unreasonable_request_by_group_is_refused_with_the_numbers(tiny_path, tiny_adata, monkeypatch):
    n = 200_000  # cells, each its own group: 200,000 x 205 genes x 32 x 8 bytes = 9.8 GiB of sums
    many = ad.AnnData(
        X=sp.csr_matrix((n, tiny_adata.n_vars), dtype=np.float32),
        obs=pd.DataFrame({"cell": [f"c{i}" for i in range(n)]}, index=[f"c{i}" for i in range(n)]),
        var=tiny_adata.var,
    )
    n_groups = _spy_groups(monkeypatch)
    with pytest.raises(ValueError, match=r"has 200,000 groups with cells: their sums over up to 205 genes") as info:
        tfs.tl.gene_embeddings_by_group(many, tiny_path, groupby="cell")
    assert "would take 9.8 GiB (limit 8 GiB)" in str(info.value) and "genes=[...]" in str(info.value)
    assert n_groups == []  # refused before any compute


@pytest.fixture(scope="module")
def pbmc_by_ids():
    """10 PBMCs (pbmc68k_counts) expressing CD3E or MS4A1, 40 genes, Ensembl ids as var_names (no symbol in var)."""
    pbmc = tfs.datasets.pbmc68k_counts()
    pbmc = pbmc[:, pbmc.var["ensembl_id"].notna().to_numpy()]
    X = pbmc[:, ["CD3E", "MS4A1"]].X
    rows = np.flatnonzero(np.asarray((X > 0).sum(axis=1)).ravel() > 0)[:10]
    common = np.argsort(-np.asarray((pbmc.X > 0).sum(axis=0)).ravel())[:38]
    cols = sorted({*common.tolist(), pbmc.var_names.get_loc("CD3E"), pbmc.var_names.get_loc("MS4A1")})
    out = pbmc[rows, cols].copy()
    out.var_names = out.var["ensembl_id"].astype(str).to_numpy()
    out.var = out.var[[]].assign(ensembl_id=out.var_names)
    return out


def test_genes_can_be_named_by_their_symbols(pbmc_by_ids):
    cd3e, ms4a1 = "ENSG00000198851", "ENSG00000156738"
    assert "CD3E" not in pbmc_by_ids.var_names and cd3e in pbmc_by_ids.var_names
    cge = tfs.tl.contextual_gene_embeddings(pbmc_by_ids, "tf-demo", genes=["CD3E", "MS4A1"])
    assert set(cge.obs["gene_id"].astype(str)) == {cd3e, ms4a1}
    tfs.tl.gene_embeddings(pbmc_by_ids, "tf-demo", genes=["CD3E", "MS4A1"])
    read = np.isfinite(pbmc_by_ids.varm["X_transcriptformer_genes"]).all(axis=1)
    assert sorted(pbmc_by_ids.var_names[read]) == sorted([cd3e, ms4a1])


def _known_name(tiny_path, adata, index=0):
    """A var_name whose id the model knows (the ``index``-th of them)."""
    import transcriptformer

    vocab = transcriptformer.load_model(tiny_path).vocab
    ids = [str(i).split(".", 1)[0] for i in adata.var["ensembl_id"]]
    return str(adata.var_names[np.flatnonzero(vocab.lookup_genes(ids) >= 0)[index]])


def test_genes_are_looked_up_where_the_counts_come_from(tiny_path, tiny_adata):
    """With the counts in .raw, genes= names are raw.var's (ids in raw.var), even a gene adata.var lacks."""
    name = _known_name(tiny_path, tiny_adata)
    expected = tfs.tl.contextual_gene_embeddings(tiny_adata, tiny_path, genes=[name])
    assert expected.n_obs > 0
    hvg = tiny_adata.copy()
    hvg.raw = tiny_adata.copy()  # raw.var holds the ids, adata.var neither the ids nor the gene
    hvg = hvg[:, hvg.var_names != name].copy()
    del hvg.var["ensembl_id"]
    for layer in (None, "raw"):
        got = tfs.tl.contextual_gene_embeddings(hvg, tiny_path, genes=[name], layer=layer)
        np.testing.assert_allclose(got.X, expected.X, atol=1e-6)
        assert list(got.obs["gene_id"].astype(str)) == list(expected.obs["gene_id"].astype(str))
    # a gene of adata.var that raw.var lacks: said so, not called a gene the vocabulary lacks
    other = tiny_adata.copy()
    other.raw = tiny_adata[:, tiny_adata.var_names != name].copy()
    with pytest.raises(ValueError, match=r"var_names of adata\.var but not of adata\.raw\.var: \['" + name):
        tfs.tl.gene_embeddings(other, tiny_path, genes=[name])
    assert "X_transcriptformer_genes" not in other.varm


def test_group_labels_equal_as_strings_are_one_group(tiny_path, tiny_adata):
    """1 and "1" in one column are the group "1" (as in tl.rank_regulators), not a crash after the run."""
    genes = ["ENSG00000900164", "ENSG00000900109"]
    n = tiny_adata.n_obs
    mixed = tiny_adata.copy()
    mixed.obs["cluster"] = pd.Series([1] * 10 + ["1"] * 5 + [2] * (n - 15), index=mixed.obs_names, dtype=object)
    strings = tiny_adata.copy()
    strings.obs["cluster"] = ["1"] * 15 + ["2"] * (n - 15)
    got = tfs.tl.gene_embeddings_by_group(mixed, tiny_path, groupby="cluster", genes=genes)
    expected = tfs.tl.gene_embeddings_by_group(strings, tiny_path, groupby="cluster", genes=genes)
    assert list(got.obs["group"].cat.categories) == ["1", "2"]
    pd.testing.assert_frame_equal(got.obs, expected.obs)
    np.testing.assert_allclose(got.X, expected.X, atol=1e-6)
