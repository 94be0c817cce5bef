"""`tfs.tl.embed`: scanpy conventions, input kinds, and bad input (clear error, AnnData unchanged)."""

from __future__ import annotations

import json
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, snapshot
from transcriptformer.data.tokenizer import TranscriptFormerWarning


@pytest.fixture(scope="module")
def ref_embedding(tiny_path):
    a = tfs.datasets.tiny_human()
    tfs.tl.embed(a, model=tiny_path, llh=True)
    return a.obsm["X_transcriptformer"], a.obs["transcriptformer_llh"].to_numpy()


def test_outputs_and_params(tiny_path, tiny_adata, tiny_model, tmp_path):
    assert tfs.tl.embed(tiny_adata, model=tiny_path, llh=True) is None
    emb = tiny_adata.obsm["X_transcriptformer"]
    assert emb.shape == (tiny_adata.n_obs, 32)
    assert emb.dtype == np.float32
    entry = tiny_adata.uns["transcriptformer"]
    params = entry["params"]
    assert params["weights_sha256"] == tiny_model.weights_sha256
    assert params["model_path"] == str(tiny_path)
    assert params["transcriptformer_version"] == transcriptformer.__version__
    assert params["clip_counts"] == 30
    assert params["n_genes_matched"] == 165
    assert params["precision"] == "32"
    assert params["llh"] is True and params["tool"] == "embed"
    assert tiny_adata.obs["transcriptformer_llh"].shape == (tiny_adata.n_obs,)
    # the likelihoods in uns, as the design asks: n_obs floats in input order, the same as the obs column
    np.testing.assert_array_equal(entry["llh"], tiny_adata.obs["transcriptformer_llh"].to_numpy())
    assert sorted(params["keys"]) == [
        "obs/transcriptformer_llh",
        "obs/transcriptformer_n_genes",
        "obsm/X_transcriptformer",
        "uns/transcriptformer",
    ]
    # everything written is h5ad-serialisable
    tiny_adata.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["transcriptformer"]["params"]["weights_sha256"] == tiny_model.weights_sha256
    np.testing.assert_array_equal(back.uns["transcriptformer"]["llh"], entry["llh"])


def test_alias_and_key_added_and_copy(tiny_path, tiny_adata, ref_embedding):
    assert tfs.tl.transcriptformer is tfs.tl.embed
    before = snapshot(tiny_adata)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, key_added="tf2", copy=True)
    assert_unchanged(tiny_adata, before)
    np.testing.assert_allclose(out.obsm["X_tf2"], ref_embedding[0], atol=1e-6)
    assert "params" in out.uns["tf2"] and "llh" in out.uns["tf2"]  # keys derive from the base name "tf2"
    assert "tf2_llh" in out.obs and "tf2_n_genes" in out.obs


def test_neighbors_downstream(tiny_path, tiny_adata):
    # exact neighbours with Gaussian weights: no numba compilation of pynndescent / umap for 21 cells
    # (the README quickstart test runs the default umap method on the same embedding)
    tfs.tl.embed(tiny_adata, model=tiny_path)
    sc.pp.neighbors(tiny_adata, use_rep="X_transcriptformer", n_neighbors=5, method="gauss", transformer="sklearn")
    assert tiny_adata.obsp["connectivities"].shape == (21, 21)


def test_keyword_only_options(tiny_path, tiny_adata):
    with pytest.raises(TypeError):
        tfs.tl.embed(tiny_adata, tiny_path, "ensembl_id")


def test_loaded_models_are_cached(tiny_path):
    a = transcriptformer.load_model(tiny_path)
    b = transcriptformer.load_model(str(tiny_path))
    assert a is b
    assert transcriptformer.load_model(a) is a


@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
def test_matrix_kinds(tiny_path, tiny_adata, ref_embedding, kind):
    X = tiny_adata.X
    tiny_adata.X = {"dense": X.toarray(), "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[kind]
    tfs.tl.embed(tiny_adata, model=tiny_path)
    np.testing.assert_allclose(tiny_adata.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)


def test_explicit_zeros_in_sparse_are_zero_counts(tiny_path, tiny_adata, ref_embedding):
    X = tiny_adata.X.tocoo()
    rows = np.r_[X.row, np.arange(10)]
    cols = np.r_[X.col, np.full(10, 7)]
    data = np.r_[X.data, np.zeros(10, np.float32)]
    keep = ~pd.DataFrame({"r": rows, "c": cols}).duplicated(keep="first").to_numpy()
    M = sp.csr_matrix((data[keep], (rows[keep], cols[keep])), shape=X.shape)
    M.sum_duplicates()
    M2 = sp.csr_matrix((M.data, M.indices, M.indptr), shape=M.shape)  # explicit zeros kept
    assert M2.nnz > X.nnz and (M2.data == 0).sum() > 0
    tiny_adata.X = M2
    tfs.tl.embed(tiny_adata, model=tiny_path)
    np.testing.assert_allclose(tiny_adata.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)


def test_view_input(tiny_path, tiny_adata, ref_embedding):
    view = tiny_adata[::2]
    out = tfs.tl.embed(view, model=tiny_path, copy=True)
    assert not out.is_view
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0][::2], atol=1e-6)


def test_backed_input(tiny_path, tiny_adata, ref_embedding, tmp_path):
    path = tmp_path / "backed.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    tfs.tl.embed(backed, model=tiny_path)
    np.testing.assert_allclose(backed.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)
    backed.file.close()


def test_backed_dense_input_is_read_in_windows(tiny_path, tiny_adata, ref_embedding, tmp_path, monkeypatch):
    tiny_adata.X = tiny_adata.X.toarray()
    path = tmp_path / "dense.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    reads = []
    from transcriptformer.data.tokenizer import CellSource

    original = CellSource._read_block

    def spy(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(CellSource, "_read_block", spy)
    from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
    from transcriptformer.inference.engine import Engine

    m = transcriptformer.load_model(tiny_path)
    src = prepare_cells(backed, m.vocab, m.aux_vocabs, seq_len=m.seq_len, options=TokenizeOptions())
    res = Engine(m, window=5).run(src, ("embeddings",))
    assert max(reads) == 5 and sum(reads) == 21
    np.testing.assert_allclose(res.embeddings, ref_embedding[0], atol=1e-6)
    backed.file.close()


def test_layer_choice(tiny_path, tiny_adata, ref_embedding):
    tiny_adata.layers["counts"] = tiny_adata.X.copy()
    tiny_adata.X = tiny_adata.X * 0.5  # not counts
    out = tfs.tl.embed(tiny_adata, model=tiny_path, layer="counts", copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)
    assert out.uns["transcriptformer"]["params"]["counts_source"] == "layers['counts']"


def test_raw_rule(tiny_path, tiny_raw_adata, ref_embedding):
    # layer=None prefers .raw; layer="X" refuses X here because var has no id column
    out = tfs.tl.embed(tiny_raw_adata, model=tiny_path, layer="raw", copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)
    with pytest.raises(KeyError, match="ensembl_id"):
        tfs.tl.embed(tiny_raw_adata, model=tiny_path, layer="X")


def test_var_names_as_ids(tiny_path, tiny_adata, ref_embedding):
    tiny_adata.var_names = tiny_adata.var["ensembl_id"].to_numpy()
    del tiny_adata.var["ensembl_id"]
    out = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)  # default column absent, var_names are Ensembl ids
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, gene_key=None, copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)


def test_normalize_to_scale_and_clip(tiny_path, tiny_adata, tiny_model):
    out = tfs.tl.embed(tiny_adata, model=tiny_path, normalize_to_scale=100, llh=True, copy=True)
    base = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, copy=True)
    assert not np.allclose(out.obsm["X_transcriptformer"], base.obsm["X_transcriptformer"])
    from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells

    w = prepare_cells(
        tiny_adata,
        tiny_model.vocab,
        tiny_model.aux_vocabs,
        seq_len=63,
        options=TokenizeOptions(normalize_to_scale=100, clip_counts=None),
    ).read(0, 21)
    np.testing.assert_allclose(w.counts.sum(1), 100, rtol=1e-5)
    w = prepare_cells(
        tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions(clip_counts=5)
    ).read(0, 21)
    assert w.counts.max() == 5


def test_counts_not_raw_warns(tiny_path, tiny_adata):
    tiny_adata.X = sc.pp.log1p(tiny_adata.X.copy(), copy=True)
    with pytest.warns(TranscriptFormerWarning, match="do not look like raw counts"):
        tfs.tl.embed(tiny_adata, model=tiny_path)


def test_progress_bar(tiny_path, tiny_adata, capsys):
    tfs.tl.embed(tiny_adata, model=tiny_path, progress=True)
    assert "cell" in capsys.readouterr().err


def test_logs_matched_genes(tiny_path, tiny_adata, caplog):
    with caplog.at_level("INFO", logger="transcriptformer"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
    assert "matched 165 of 205 genes" in caplog.text


# -- bad input ------------------------------------------------------------------------------


def _fails(adata, exc, match, **kwargs):
    before = snapshot(adata)
    with pytest.raises(exc, match=match):
        tfs.tl.embed(adata, **kwargs)
    assert_unchanged(adata, before)


def test_missing_gene_column(tiny_path, tiny_adata):
    _fails(tiny_adata, KeyError, r"'gene_id'.*ensembl_id.*feature_name", model=tiny_path, gene_key="gene_id")


def test_no_gene_in_vocabulary_symbols(tiny_path, tiny_adata):
    tiny_adata.var["symbol"] = [f"CD{i}" for i in range(tiny_adata.n_vars)]
    _fails(
        tiny_adata,
        ValueError,
        r"none of the 205 genes.*CD0.*ENSG00000900100.*look like gene symbols",
        model=tiny_path,
        gene_key="symbol",
    )


def test_no_gene_in_vocabulary_other_ids(tiny_path, tiny_adata):
    tiny_adata.var["other"] = [f"ENSDARG{i:011d}" for i in range(tiny_adata.n_vars)]
    before = snapshot(tiny_adata)
    with pytest.raises(ValueError, match="none of the 205 genes") as e:
        tfs.tl.embed(tiny_adata, model=tiny_path, gene_key="other")
    assert "symbols" not in str(e.value)
    assert_unchanged(tiny_adata, before)


@pytest.mark.parametrize("bad", [-1.0, np.nan])
@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_negative_or_nan_counts(tiny_path, tiny_adata, bad, kind):
    X = tiny_adata.X.toarray()
    X[3, 0] = bad
    tiny_adata.X = X if kind == "dense" else sp.csr_matrix(X)
    _fails(tiny_adata, ValueError, "NaN" if np.isnan(bad) else "negative", model=tiny_path)


def test_negative_counts_backed(tiny_path, tiny_adata, tmp_path):
    X = tiny_adata.X.toarray()
    X[20, 0] = -3
    tiny_adata.X = sp.csr_matrix(X)
    tiny_adata.write_h5ad(tmp_path / "neg.h5ad")
    backed = ad.read_h5ad(tmp_path / "neg.h5ad", backed="r")
    with pytest.raises(ValueError, match="negative"):
        tfs.tl.embed(backed, model=tiny_path)
    assert "X_transcriptformer" not in backed.obsm
    backed.file.close()


def test_duplicate_ids(tiny_path, tiny_adata, ref_embedding):
    ids = tiny_adata.var["ensembl_id"].astype(str).to_numpy().copy()
    ids[-1] = ids[0] + ".2"  # the same id once the version is cut
    tiny_adata.var["ensembl_id"] = ids
    _fails(tiny_adata, ValueError, r"1 gene id\(s\).*more than once.*duplicate_genes='first'", model=tiny_path)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, duplicate_genes="first", copy=True)
    assert out.obsm["X_transcriptformer"].shape == (21, 32)


def test_missing_assay_column_warns_and_means_unknown(tiny_path, tiny_adata):
    unknown = tiny_adata.copy()
    unknown.obs["assay"] = "unknown"
    expected = tfs.tl.embed(unknown, model=tiny_path, copy=True).obsm["X_transcriptformer"]
    del tiny_adata.obs["assay"]
    with pytest.warns(TranscriptFormerWarning, match="no 'assay' column"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
    np.testing.assert_allclose(tiny_adata.obsm["X_transcriptformer"], expected, atol=1e-6)


def test_cells_without_genes(tiny_path, tiny_adata, ref_embedding):
    X = tiny_adata.X.toarray()
    X[[2, 5]] = 0
    tiny_adata.X = sp.csr_matrix(X)
    with pytest.warns(TranscriptFormerWarning, match="2 of 21 cells have no expressed gene"):
        tfs.tl.embed(tiny_adata, model=tiny_path, llh=True)
    emb = tiny_adata.obsm["X_transcriptformer"]
    assert np.isfinite(emb).all()
    llh = tiny_adata.obs["transcriptformer_llh"].to_numpy()
    assert np.isnan(llh[[2, 5]]).all() and np.isfinite(np.delete(llh, [2, 5])).all()
    others = np.setdiff1d(np.arange(21), [2, 5])
    np.testing.assert_allclose(emb[others], ref_embedding[0][others], atol=1e-6)


def test_checkpoint_folder_missing_files(tiny_path, tiny_adata, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_path, broken)
    (broken / "vocabs" / "mus_musculus_gene.h5").unlink()
    _fails(tiny_adata, FileNotFoundError, r"incomplete: missing vocabs/mus_musculus_gene.h5", model=broken)
    (broken / "model_weights.pt").unlink()
    _fails(tiny_adata, FileNotFoundError, r"incomplete: missing model_weights.pt", model=broken)
    _fails(tiny_adata, FileNotFoundError, r"does not exist", model=tmp_path / "nowhere")


def test_weights_do_not_fit_config(tiny_path, tiny_adata, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model"]["model_config"]["model_dim"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    _fails(tiny_adata, ValueError, r"do not fit.*shape differences.*linear1.weight", model=broken)
    shutil.copy(tiny_path / "config.json", broken / "config.json")
    state = torch.load(broken / "model_weights.pt", weights_only=True)
    state["extra.weight"] = state.pop("mu.gene_embedding.weight")
    torch.save(state, broken / "model_weights.pt")
    _fails(
        tiny_adata,
        ValueError,
        r"missing keys \(1\): mu.gene_embedding.weight.*unexpected keys \(1\): extra.weight",
        model=broken,
    )


def test_bad_options(tiny_path, tiny_adata):
    _fails(tiny_adata, ValueError, "precision", model=tiny_path, precision="8")
    if not torch.cuda.is_available():
        _fails(tiny_adata, ValueError, "CUDA is not available", model=tiny_path, device="cuda")
    _fails(tiny_adata, KeyError, "layer 'nope' not found", model=tiny_path, layer="nope")
    _fails(tiny_adata, ValueError, "duplicate_genes", model=tiny_path, duplicate_genes="last")
    _fails(tiny_adata, ValueError, "batch_size", model=tiny_path, batch_size=0)
    with pytest.raises(TypeError, match="AnnData"):
        tfs.tl.embed(np.zeros((3, 3)), model=tiny_path)


def test_input_unchanged_when_model_fails_midway(tiny_path, tiny_adata, monkeypatch):
    from transcriptformer.inference.engine import Engine

    calls = {"n": 0}
    original = Engine._forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_forward", flaky)
    _fails(tiny_adata, RuntimeError, "boom", model=tiny_path, batch_size=4, llh=True)


def test_no_warning_on_clean_input(tiny_path, tiny_adata):
    tiny_adata.obs["assay"] = tiny_adata.obs["assay"].astype(str).replace({"MERFISH": "unknown"})  # not in vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error", TranscriptFormerWarning)
        tfs.tl.embed(tiny_adata, model=tiny_path)


@pytest.mark.parametrize("method", ["knn", "logreg"])
def test_transfer_labels(tiny_path, tiny_adata, method):
    tfs.tl.embed(tiny_adata, model=tiny_path)
    ref, query = tiny_adata[::2].copy(), tiny_adata[1::2].copy()
    before = snapshot(ref)
    tfs.tl.transfer_labels(query, ref, labels_key="cell_type", method=method, n_neighbors=3)
    assert_unchanged(ref, before)
    pred = query.obs["cell_type_transferred"]
    assert set(pred.cat.categories) <= set(tiny_adata.obs["cell_type"].astype(str))
    conf = query.obs["cell_type_transferred_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    assert query.uns["cell_type_transferred"]["params"]["method"] == method
    # a reference transferred onto itself with one neighbour recovers its own labels
    self_copy = tfs.tl.transfer_labels(ref, ref, labels_key="cell_type", n_neighbors=1, key_added="again", copy=True)
    np.testing.assert_array_equal(self_copy.obs["again"].astype(str), ref.obs["cell_type"].astype(str))


def test_transfer_labels_errors(tiny_path, tiny_adata):
    with pytest.raises(KeyError, match="embed it first"):
        tfs.tl.transfer_labels(tiny_adata, tiny_adata, labels_key="cell_type")
    tfs.tl.embed(tiny_adata, model=tiny_path)
    with pytest.raises(KeyError, match="no column 'nope'"):
        tfs.tl.transfer_labels(tiny_adata, tiny_adata, labels_key="nope")
    other = tiny_adata.copy()
    other.obsm["X_transcriptformer"] = other.obsm["X_transcriptformer"][:, :5]
    with pytest.raises(ValueError, match="differ in width"):
        tfs.tl.transfer_labels(tiny_adata, other, labels_key="cell_type")


def test_non_canonical_csr_and_float64_are_read_like_dense(tiny_path, tiny_adata, ref_embedding):
    X = tiny_adata.X.tocsr()
    # split every stored value into two duplicate entries (a non-canonical CSR whose dense form is X)
    indptr = X.indptr * 2
    indices = np.repeat(X.indices, 2)
    data = np.repeat(X.data / 2, 2)
    dup = sp.csr_matrix((data, indices, indptr), shape=X.shape)
    assert not dup.has_canonical_format
    np.testing.assert_array_equal(dup.toarray(), X.toarray())
    tiny_adata.X = dup
    out = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)
    # float64 values that are 0 in float32 are zero counts (the published pipeline casts first)
    dense = X.toarray().astype(np.float64)
    dense[dense == 0] = 1e-50
    tiny_adata.X = dense
    out = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0], atol=1e-6)


def test_bad_values_outside_the_vocabulary_are_ignored_for_every_input_kind(tiny_path, tiny_adata, tiny_model):
    oov = np.flatnonzero(tiny_model.vocab.lookup([i.split(".")[0] for i in tiny_adata.var["ensembl_id"]]) < 0)[0]
    X = tiny_adata.X.toarray()
    X[0, oov] = -1.0  # a column the model never reads
    for M in (X, sp.csr_matrix(X), sp.csc_matrix(X)):
        tiny_adata.X = M
        out = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)
        assert np.isfinite(out.obsm["X_transcriptformer"]).all()


def test_pad_zeros_false_sparse_equals_dense(tiny_path, tiny_adata, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["data_config"]["pad_zeros"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    sparse = tfs.tl.embed(tiny_adata, model=ckpt, llh=True, copy=True)
    tiny_adata.X = tiny_adata.X.toarray()
    dense = tfs.tl.embed(tiny_adata, model=ckpt, llh=True, copy=True)
    np.testing.assert_allclose(sparse.obsm["X_transcriptformer"], dense.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_allclose(sparse.obs["transcriptformer_llh"], dense.obs["transcriptformer_llh"], atol=1e-6)
    from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells

    m = transcriptformer.load_model(ckpt)
    w = prepare_cells(tiny_adata, m.vocab, m.aux_vocabs, seq_len=63, pad_zeros=False, options=TokenizeOptions()).read(
        0, 21
    )
    assert (w.lengths == 63).all()  # 165 genes in the vocabulary: every cell fills its 63 slots
    assert w.tokens.shape[1] == 63
    assert (w.tokens != m.vocab.pad).all()  # zero-count genes stay tokens ...
    assert (w.counts == 0).any()  # ... with count 0


def test_check_input_summary(tiny_path, tiny_adata):
    before = snapshot(tiny_adata)
    info = tfs.pp.check_input(tiny_adata, tiny_path)
    assert_unchanged(tiny_adata, before)
    assert info["n_genes_matched"] == 165 and info["n_obs"] == 21
    assert info["genes_per_cell"] == {"min": 1, "median": 37.0, "max": 63}
    assert info["n_cells_truncated"] == 5  # cells with more than seq_len=63 expressed genes
    assert info["fraction_unknown_aux"]["assay"] == pytest.approx(6 / 21)  # 3 'unknown' + 3 'MERFISH'
    with pytest.raises(ValueError, match="no cells"):
        tfs.pp.check_input(tiny_adata[:0], tiny_path)
    tfs.pp.match_genes(tiny_adata, tiny_path)
    assert tiny_adata.var["transcriptformer_in_vocab"].sum() == 165


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


def test_messages_follow_scanpys_verbosity(tiny_path, tiny_adata):
    import io
    import logging

    ours = logging.getLogger("transcriptformer")
    level, saved = sc.settings.verbosity, ours.level
    stream = io.StringIO()
    shown = logging.StreamHandler(stream)  # stands for scanpy's handler (which writes to the session's stderr)
    sc.settings._root_logger.addHandler(shown)
    try:
        ours.setLevel(logging.NOTSET)
        sc.settings.verbosity = "warning"
        tfs.tl.embed(tiny_adata, model=tiny_path)
        assert "matched 165 of 205 genes" not in stream.getvalue()
        sc.settings.verbosity = "info"
        tfs.tl.embed(tiny_adata, model=tiny_path)
        assert "matched 165 of 205 genes" in stream.getvalue()  # through scanpy's handlers
    finally:
        sc.settings._root_logger.removeHandler(shown)
        sc.settings.verbosity = level
        ours.setLevel(saved)
