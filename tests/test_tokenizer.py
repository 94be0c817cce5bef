"""Reading cells (data/tokenizer.py): every input kind, where counts and ids come from, the checks of values and ids.

Most tests go through ``tfs.tl.embed`` (the embeddings must equal those of the plain input) or ``prepare_cells``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, embed_fails, snapshot
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.errors import TranscriptFormerWarning

# --- matrix kinds and layouts ---------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("dense", [False, True])
def test_views_of_backed_data_are_read_in_windows(tiny_path, tiny_adata, ref_embedding, tmp_path, dense, monkeypatch):
    from transcriptformer.data.tokenizer import BackedRows

    if dense:
        tiny_adata.X = tiny_adata.X.toarray()
    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    backed, in_memory = ad.read_h5ad(path, backed="r"), ad.read_h5ad(path)
    m = transcriptformer.load_model(tiny_path)
    genes = backed.var_names[::-1][:-3]  # some genes, in another order
    for rows in (slice(2, 17), np.array([9, 3, 3, 14, 0, 20]), backed.obs_names[5:1:-1]):
        view = backed[rows, genes]
        opts = TokenizeOptions()
        expected = prepare_cells(in_memory[rows, genes], m.vocab, m.aux_vocabs, seq_len=m.seq_len, options=opts)
        # anndata's view.X would load every row of the view: the tokeniser must not ask for it
        monkeypatch.setattr(type(view), "X", property(lambda self: pytest.fail("view.X was read")), raising=True)
        src = prepare_cells(view, m.vocab, m.aux_vocabs, seq_len=m.seq_len, options=TokenizeOptions())
        monkeypatch.undo()
        assert isinstance(src.matrix, BackedRows)
        for a, b in [(0, view.n_obs), (1, 3)]:
            got, want = src.read(a, b), expected.read(a, b)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.counts, want.counts)
    out = tfs.tl.embed(backed[::2], model=tiny_path, copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], ref_embedding[0][::2], atol=1e-6)
    backed.file.close()


class _LazyRows:
    """What a dask array looks like to the tokenizer: slicing gives a block with ``.compute()``."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.dtype = matrix, matrix.shape, matrix.dtype

    def __getitem__(self, rows):
        block = self.matrix[rows]

        class Pending:
            def compute(self):
                return block

        return Pending()


def test_lazy_arrays_with_sparse_chunks_are_read(tiny_model, tiny_adata):
    """The tokenizer computes lazy blocks (dask) whatever their chunks hold (sparse or dense)."""

    class Holder:
        raw, layers, obs, var, n_obs = None, {}, tiny_adata.obs, tiny_adata.var, tiny_adata.n_obs

    kwargs = dict(seq_len=tiny_model.seq_len, options=TokenizeOptions())
    expected = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, **kwargs).read(0, 21)
    for matrix in (sp.csr_matrix(tiny_adata.X), tiny_adata.X.toarray()):
        holder = Holder()
        holder.X = _LazyRows(matrix)
        window = prepare_cells(holder, tiny_model.vocab, tiny_model.aux_vocabs, **kwargs).read(0, 21)
        np.testing.assert_array_equal(window.tokens, expected.tokens)
        np.testing.assert_array_equal(window.counts, expected.counts)
    bad = tiny_adata.X.toarray()
    bad[4, 7] = -1
    holder = Holder()
    holder.X = _LazyRows(sp.csr_matrix(bad))
    with pytest.raises(ValueError, match="negative values"):
        prepare_cells(holder, tiny_model.vocab, tiny_model.aux_vocabs, **kwargs).read(0, 21)


def test_dask_arrays_of_sparse_chunks(tiny_path, tiny_adata):
    da = pytest.importorskip("dask.array")
    expected = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True).obsm["X_transcriptformer"]
    for X in (sp.csr_matrix(tiny_adata.X), tiny_adata.X.toarray()):
        lazy = ad.AnnData(
            X=da.from_array(X, chunks=(5, X.shape[1]), asarray=False), obs=tiny_adata.obs, var=tiny_adata.var
        )
        out = tfs.tl.embed(lazy, model=tiny_path, copy=True)
        np.testing.assert_allclose(out.obsm["X_transcriptformer"], expected, atol=1e-6)


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


# --- where the counts and the gene ids come from --------------------------------------------------------------------


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


def test_logs_matched_genes(tiny_path, tiny_adata, caplog):
    with caplog.at_level("INFO", logger="transcriptformer"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
    assert "matched 165 of 205 genes" in caplog.text


# --- gene ids -------------------------------------------------------------------------------------------------------


def test_missing_gene_column(tiny_path, tiny_adata):
    embed_fails(tiny_adata, KeyError, r"'gene_id'.*ensembl_id.*feature_name", model=tiny_path, gene_key="gene_id")


def test_no_gene_in_vocabulary_symbols(tiny_path, tiny_adata):
    tiny_adata.var["symbol"] = [f"CD{i}" for i in range(tiny_adata.n_vars)]
    embed_fails(
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


def test_duplicate_ids(tiny_path, tiny_adata, ref_embedding):
    ids = tiny_adata.var["ensembl_id"].astype(str).to_numpy().copy()
    ids[-1] = ids[0] + ".2"  # the same id once the version is cut
    tiny_adata.var["ensembl_id"] = ids
    embed_fails(tiny_adata, ValueError, r"1 gene id\(s\).*more than once.*duplicate_genes='first'", model=tiny_path)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, duplicate_genes="first", copy=True)
    assert out.obsm["X_transcriptformer"].shape == (21, 32)


def test_duplicate_ids_are_refused_before_the_model_is_loaded(tiny_adata, no_model_load):
    """check_readable (run before any model is loaded) refuses duplicate ids, as prepare_cells would."""
    from transcriptformer.data.tokenizer import check_readable

    ids = tiny_adata.var["ensembl_id"].astype(str).to_numpy().copy()
    ids[-1] = ids[0] + ".2"
    tiny_adata.var["ensembl_id"] = ids
    with pytest.raises(ValueError, match=r"1 gene id\(s\) in var\['ensembl_id'\] appear more than once"):
        check_readable(tiny_adata, TokenizeOptions())
    check_readable(tiny_adata, TokenizeOptions(duplicate_genes="first"))
    with pytest.raises(ValueError, match="more than once"):
        tfs.tl.embed(tiny_adata, model="tf-tiny")
    assert no_model_load == []


def test_gene_id_messages_name_raw_var_when_the_counts_come_from_raw(tiny_path, tiny_adata, tiny_model):
    """Ids read from raw.var (the counts come from raw.X) are called raw.var's in the messages, not var's."""
    with_raw = tiny_adata.copy()
    raw_var = tiny_adata.var.copy()
    ids = raw_var["ensembl_id"].astype(str).to_numpy().copy()
    ids[-1] = ids[0] + ".3"  # var stays clean: only raw.var has a duplicate
    raw_var["ensembl_id"] = ids
    with_raw.raw = ad.AnnData(X=tiny_adata.X, obs=tiny_adata.obs, var=raw_var)
    with pytest.raises(ValueError, match=r"in raw\.var\['ensembl_id'\] appear more than once"):
        tfs.tl.embed(with_raw, model=tiny_path)
    other = tiny_adata.copy()
    raw_var = tiny_adata.var.copy()
    raw_var["ensembl_id"] = [f"ENSG{i:011d}" for i in range(800000, 800000 + other.n_vars)]  # none in the vocabulary
    other.raw = ad.AnnData(X=tiny_adata.X, obs=tiny_adata.obs, var=raw_var)
    with pytest.raises(ValueError, match=r"none of the 205 genes in raw\.var\['ensembl_id'\]"):
        prepare_cells(other, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=tiny_model.seq_len)
    plain = ad.AnnData(X=tiny_adata.X, obs=tiny_adata.obs, var=raw_var)  # the same ids in var, no .raw
    with pytest.raises(ValueError, match=r"none of the 205 genes in var\['ensembl_id'\]"):
        prepare_cells(plain, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=tiny_model.seq_len)


def test_gene_id_messages(tiny_path, tiny_adata):
    lower = tiny_adata.copy()
    lower.var["ensembl_id"] = lower.var["ensembl_id"].str.lower()
    with pytest.raises(ValueError, match=r"Ensembl ids in lower case.*str\.upper\(\)") as info:
        tfs.tl.embed(lower, model=tiny_path)
    assert "symbols" not in str(info.value)
    ints = tiny_adata.copy()
    ints.var["ensembl_id"] = np.arange(ints.n_vars)
    with pytest.raises(ValueError, match=r"holds no gene id strings \(int, e\.g\. \[0, 1, 2\]\)"):
        tfs.tl.embed(ints, model=tiny_path)
    with pytest.raises(ValueError, match=r"holds no gene id strings"):
        tfs.pp.check_input(ints, tiny_path)
    symbols = tiny_adata.copy()
    symbols.var["ensembl_id"] = symbols.var["feature_name"]
    with pytest.raises(ValueError, match=r"look like gene symbols.*symbols_to_ensembl"):
        tfs.tl.embed(symbols, model=tiny_path)
    # a missing gene_key column of symbol var_names: the suggested call writes the column that gene_key names
    named = tiny_adata.copy()
    named.var_names = named.var["feature_name"].astype(str).to_numpy()
    named.var = named.var[[]]
    for key, call in (
        (
            "gene_ids",
            r"symbols_to_ensembl\(adata, species=\.\.\., key_added='gene_ids'\), which writes var\['gene_ids'\]",
        ),
        ("ensembl_id", r"symbols_to_ensembl\(adata, species=\.\.\.\), which writes var\['ensembl_id'\]"),
    ):
        with pytest.raises(KeyError, match=call):
            tfs.tl.embed(named, model=tiny_path, gene_key=key)


def test_special_token_names_never_match_as_genes(tiny_path, tiny_adata, tiny_model):
    specials = ["[START]", "unknown", "[END]", "[PAD]", "[MASK]"]
    tagged = tiny_adata.copy()
    ids = tagged.var["ensembl_id"].astype(str).to_numpy().copy()
    in_vocab = np.flatnonzero(tiny_model.vocab.lookup_genes(list(ids)) >= 0)[:5]
    ids[in_vocab] = specials
    tagged.var["ensembl_id"] = ids
    renamed = tagged.copy()
    renamed.var["ensembl_id"] = [f"NOT_A_GENE_{i}" if i in specials else i for i in ids]
    for filter_to_vocab in (True, False):
        a = tfs.tl.embed(tagged, model=tiny_path, filter_to_vocab=filter_to_vocab, copy=True)
        b = tfs.tl.embed(renamed, model=tiny_path, filter_to_vocab=filter_to_vocab, copy=True)
        np.testing.assert_array_equal(a.obsm["X_transcriptformer"], b.obsm["X_transcriptformer"])
    report = tfs.pp.check_input(tagged, tiny_path)
    assert report["n_genes_matched"] == tfs.pp.check_input(renamed, tiny_path)["n_genes_matched"]
    marked = tfs.pp.match_genes(tagged, tiny_path, copy=True).var["transcriptformer_in_vocab"]
    assert not marked.iloc[in_vocab].any()
    with pytest.raises(ValueError, match="none of the 2 requested genes is in the vocabulary"):
        tfs.tl.contextual_gene_embeddings(tiny_adata, model=tiny_path, genes=["[START]", "unknown"])


# --- count values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, np.nan])
@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_negative_or_nan_counts(tiny_path, tiny_adata, bad, kind):
    X = tiny_adata.X.toarray()
    X[3, 0] = bad
    tiny_adata.X = X if kind == "dense" else sp.csr_matrix(X)
    embed_fails(tiny_adata, ValueError, "NaN" if np.isnan(bad) else "negative", model=tiny_path)


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


def _with_value(adata, value, kind, column):
    X = adata.X.toarray().astype(np.float64 if abs(value) > 1e38 and math.isfinite(value) else np.float32)
    X[2, column] = value
    adata.X = sp.csr_matrix(X) if kind == "csr" else X
    return adata


@pytest.mark.parametrize("kind", ["csr", "dense", "backed"])
@pytest.mark.parametrize(("value", "match"), [(np.inf, "infinite values"), (1e40, "too large for float32")])
def test_infinite_or_overflowing_counts_are_refused(tiny_path, tiny_adata, tmp_path, kind, value, match):
    column = int(
        np.flatnonzero(tfs.pp.match_genes(tiny_adata, tiny_path, copy=True).var["transcriptformer_in_vocab"])[0]
    )
    adata = _with_value(tiny_adata, value, "dense" if kind == "backed" else kind, column)
    if kind == "backed":
        adata.write_h5ad(tmp_path / "bad.h5ad")
        adata = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
        match = "infinite values"  # cast to float32 when read
    before = snapshot(adata) if kind != "backed" else None
    with pytest.raises(ValueError, match=match):
        tfs.tl.embed(adata, model=tiny_path)
    if before is not None:
        assert_unchanged(adata, before)


def test_bad_values_outside_the_vocabulary_are_ignored_for_every_input_kind(tiny_path, tiny_adata, tiny_model):
    oov = np.flatnonzero(tiny_model.vocab.lookup([i.split(".")[0] for i in tiny_adata.var["ensembl_id"]]) < 0)[0]
    X = tiny_adata.X.toarray()
    X[0, oov] = -1.0  # a column the model never reads
    for M in (X, sp.csr_matrix(X), sp.csc_matrix(X)):
        tiny_adata.X = M
        out = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)
        assert np.isfinite(out.obsm["X_transcriptformer"]).all()


def test_counts_not_raw_warns(tiny_path, tiny_adata):
    tiny_adata.X = sc.pp.log1p(tiny_adata.X.copy(), copy=True)
    with pytest.warns(TranscriptFormerWarning, match="do not look like raw counts"):
        tfs.tl.embed(tiny_adata, model=tiny_path)


def test_non_count_values_are_noticed_in_any_window(tiny_model):
    rng = np.random.default_rng(0)
    genes = list(tiny_model.vocab.genes[:150])
    X = rng.poisson(3.0, size=(60, len(genes))).astype(np.float32) + 1  # ~9,000 non-zero integers
    X[55, 140] = 2.5  # one non-integer, far past the first window and the first 1,000 values
    adata = ad.AnnData(X=X, var=pd.DataFrame({"ensembl_id": genes}, index=genes))
    adata.obs["assay"] = "unknown"
    source = prepare_cells(adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=tiny_model.seq_len)
    source.read(0, 30)
    assert source.counts_look_raw
    source.read(30, 60)
    assert not source.counts_look_raw and source.non_integer_count == (2.5, 30)
    assert re.search(r"non-integer values such as 2\.5 in the cells from row 30", source.raw_count_warning())
    # the tools warn once, attributed to the caller's line (not a thread pool), and record it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tfs.tl.embed(adata, model=tiny_model, batch_size=8)
    raw = [w for w in caught if "do not look like raw counts" in str(w.message)]
    assert len(raw) == 1 and raw[0].filename == __file__
    assert adata.uns["transcriptformer"]["params"]["counts_look_raw"] is False
    assert tfs.pp.check_input(adata, tiny_model)["counts_look_raw"] is False


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


# --- assay labels ---------------------------------------------------------------------------------------------------


def test_missing_assay_column_warns_and_means_unknown(tiny_path, tiny_adata):
    unknown = tiny_adata.copy()
    unknown.obs["assay"] = "unknown"
    expected = tfs.tl.embed(unknown, model=tiny_path, copy=True).obsm["X_transcriptformer"]
    del tiny_adata.obs["assay"]
    with pytest.warns(TranscriptFormerWarning, match="no 'assay' column"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
    np.testing.assert_allclose(tiny_adata.obsm["X_transcriptformer"], expected, atol=1e-6)


def test_unknown_assay_labels_are_warned_with_the_closest_known(tiny_path, tiny_adata):
    assays = tiny_adata.obs["assay"].astype(object).to_numpy()
    n_merfish = int((assays[4:] == "MERFISH").sum())
    assays[:4] = ["smart-seq2", " 10x 3' v2", 3, np.nan]
    tiny_adata.obs["assay"] = assays
    with pytest.warns(TranscriptFormerWarning) as record:
        tfs.tl.embed(tiny_adata, model=tiny_path)
    messages = [str(w.message) for w in record if "assay labels" in str(w.message)]
    assert len(messages) == 1
    msg = messages[0]
    n = 4 + n_merfish  # the labels above and 'MERFISH' (not in the tiny vocabulary); 'unknown' is meant
    assert f"{n} of 21 cells ({100 * n / 21:.1f}%)" in msg
    assert "'smart-seq2' (closest known: 'Smart-seq2')" in msg
    assert '" 10x 3\' v2" (closest known: "10x 3\' v2"' in msg
    assert "3" in msg and "missing" in msg and "'MERFISH'" in msg
    report = tfs.pp.check_input(tiny_adata, tiny_path)
    labels = report["unknown_aux_labels"]["assay"]
    assert labels["'smart-seq2'"] == ["Smart-seq2"] and labels["'MERFISH'"] == [] and "missing" in labels
    assert "'unknown'" not in labels


def test_no_warning_on_clean_input(tiny_path, tiny_adata):
    tiny_adata.obs["assay"] = tiny_adata.obs["assay"].astype(str).replace({"MERFISH": "unknown"})  # not in vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error", TranscriptFormerWarning)
        tfs.tl.embed(tiny_adata, model=tiny_path)


def test_the_checks_before_loading_read_no_matrix(tiny_adata, tmp_path, monkeypatch):
    """check_readable and counts_var look at layers, raw and var only: a backed view answers X and raw.X by
    loading its rows."""
    import anndata

    from transcriptformer.data.tokenizer import check_readable, counts_var

    a = tiny_adata.copy()
    a.raw = a
    a.write_h5ad(tmp_path / "raw.h5ad")
    view = anndata.read_h5ad(tmp_path / "raw.h5ad", backed="r")[3:15]

    def no_matrix(self):
        raise AssertionError("a count matrix was read")

    monkeypatch.setattr(anndata.AnnData, "X", property(no_matrix))
    monkeypatch.setattr(anndata.Raw, "X", property(no_matrix))
    for layer in (None, "raw", "X"):
        check_readable(view, TokenizeOptions(layer=layer))
        var, name = counts_var(view, layer)
        assert len(var) == a.n_vars and name == ("var" if layer == "X" else "raw.var")
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        check_readable(view, TokenizeOptions(layer="nope"))
