"""Issue 11: no silent wrong results, no lost files, every bad input a clear error before any compute.

Each test names the item it covers. The same class of problem is checked across the Python API (``tfs.tl``),
the ``pp`` functions and the command line (``transcriptformer.cli.main``, run in-process).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import transcriptformer
import transcriptformer.scanpy as tfs
from conftest import assert_unchanged, snapshot
from transcriptformer import cli
from transcriptformer.cli import inference as cli_inference
from transcriptformer.cli._common import CLIError
from transcriptformer.config import TranscriptFormerConfig
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.errors import TranscriptFormerWarning
from transcriptformer.inference.options import RunOptions
from transcriptformer.weights import checkpoint


@pytest.fixture
def no_model_load(monkeypatch):
    """Records every attempt to load a model (the checks under test must come before)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded")

    from transcriptformer.scanpy.tl import _common

    for module in (checkpoint, _common, tfs.pp):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(checkpoint, "build_model", refuse)
    return calls


@pytest.fixture
def h5ad(tmp_path, tiny_adata) -> Path:
    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("transcriptformer: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def infer_args(tiny_path, data, out, *extra):
    return (
        "inference",
        "--checkpoint-path",
        tiny_path,
        "--data-file",
        *([data] if not isinstance(data, list) else data),
        "--output-path",
        out,
        "--no-progress",
        "--precision",
        "32",
        *extra,
    )


# ----------------------------------------------------------------------------- 1. output is an input


@pytest.mark.parametrize("how", ["same-path", "hard-link", "symlink", "relative"])
def test_cli_refuses_an_output_that_is_an_input(tmp_path, tiny_path, h5ad, capsys, no_model_load, how):
    before = h5ad.read_bytes()
    out, name = tmp_path, h5ad.name
    if how == "hard-link":
        out = tmp_path / "o"
        out.mkdir()
        os.link(h5ad, out / "x.h5ad")
        name = "x.h5ad"
    elif how == "symlink":
        out = tmp_path / "o"
        out.mkdir()
        (out / "x.h5ad").symlink_to(h5ad)
        name = "x.h5ad"
    elif how == "relative":
        os.chdir(tmp_path)
        out = Path(".")
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, out, "--output-filename", name))
    assert code == 1
    assert "is the input file" in error_line(err) and "would replace the input" in err
    assert h5ad.read_bytes() == before
    assert no_model_load == []


# ----------------------------------------------------------------------------- 2. local folder vs registry name


def test_an_existing_folder_wins_over_a_registry_name(tmp_path, tiny_path, monkeypatch, caplog, capsys, h5ad):
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")  # offline
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_path, tmp_path / "tf_sapiens")  # what `download tf-sapiens --checkpoint-dir .` makes
    transcriptformer.clear_cache()
    with caplog.at_level(logging.INFO, logger="transcriptformer"):
        loaded = transcriptformer.load_model("tf_sapiens")
    assert loaded.path == (tmp_path / "tf_sapiens").resolve()
    assert "using the local folder" in caplog.text and "wins over the registry name tf-sapiens" in caplog.text
    adata = tfs.tl.embed(tfs.datasets.tiny_human(), model="tf_sapiens", copy=True)
    assert adata.uns["transcriptformer"]["params"]["model_path"] == str(loaded.path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transcriptformer"):
        code, err = run_cli(capsys, "-v", *infer_args("tf_sapiens", h5ad, tmp_path / "out"))  # INFO with -v
    assert code == 0, err
    assert "using the local folder" in caplog.text
    # an existing file of that name wins too: a clear error, not a download
    shutil.rmtree(tmp_path / "tf_sapiens")
    (tmp_path / "tf_sapiens").write_text("not a checkpoint")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        transcriptformer.load_model("tf_sapiens")
    transcriptformer.clear_cache()


def test_an_existing_file_wins_over_a_species_name(tmp_path, tiny_path, tiny_adata, monkeypatch):
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")  # offline
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_path / "vocabs" / "homo_sapiens_gene.h5", tmp_path / "homo_sapiens")
    out = tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding="homo_sapiens", copy=True)
    assert out.uns["transcriptformer"]["params"]["species_embedding"] == ["homo_sapiens"]
    (tmp_path / "homo_sapiens").unlink()
    (tmp_path / "homo_sapiens").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding="homo_sapiens")


# ----------------------------------------------------------------------------- 3. non-finite values


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


def test_non_finite_options_are_refused_in_the_api_and_the_cli(tiny_path, tiny_adata, h5ad, capsys, no_model_load):
    for name, value in [
        ("normalize_to_scale", np.inf),
        ("normalize_to_scale", np.nan),
        ("clip_counts", np.inf),
        ("clip_counts", np.nan),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            tfs.tl.embed(tiny_adata, model=tiny_path, **{name: value})
    for extra, named in [
        (("--config-override", "model.data_config.normalize_to_scale=inf"), "normalize_to_scale=inf"),
        (("--config-override", "data_config.normalize_to_scale=nan"), "data_config.normalize_to_scale=nan"),
        (("--config-override", "model.data_config.clip_counts=-inf"), "clip_counts=-inf"),
        (("--clip-counts", "inf"), "--clip-counts"),
        (("--clip-counts", "nan"), "--clip-counts"),
    ]:
        code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, h5ad.parent / "out", *extra))
        assert code == 1
        assert named in error_line(err)
    assert no_model_load == []
    assert not (h5ad.parent / "out").exists()


def test_non_finite_results_are_never_written(tiny_path, tiny_adata, h5ad, monkeypatch, capsys):
    from transcriptformer.model import TranscriptFormer

    original = TranscriptFormer.cell_embedding

    def broken(self, hidden, tokens):
        out = original(self, hidden, tokens)
        out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(TranscriptFormer, "cell_embedding", broken)
    before = snapshot(tiny_adata)
    with pytest.raises(ValueError, match=r"NaN or infinite values \(embeddings\).*nothing was written"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
    assert_unchanged(tiny_adata, before)
    for extra in ((), ("--stream-output",)):
        out = h5ad.parent / f"out{len(extra)}"
        code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, out, *extra))
        assert code == 1 and "NaN or infinite values" in error_line(err)
        assert not out.exists() or list(out.iterdir()) == []  # no output, no temporary file


def test_non_finite_gene_results_are_never_returned(tiny_path, tiny_adata, monkeypatch):
    from transcriptformer.model import Encoded, TranscriptFormer

    original = TranscriptFormer.encode

    def broken(self, *args, **kwargs):
        enc = original(self, *args, **kwargs)
        hidden = enc.hidden.clone()
        hidden[0, 0, 0] = float("inf")  # the first gene of the batch's first cell
        return Encoded(hidden, enc.targets)

    monkeypatch.setattr(TranscriptFormer, "encode", broken)
    with pytest.raises(ValueError, match=r"NaN or infinite values \(cge\)"):
        tfs.tl.contextual_gene_embeddings(tiny_adata, model=tiny_path)
    with pytest.raises(ValueError, match=r"NaN or infinite values \(gene_sum\)"):
        tfs.tl.gene_embeddings(tiny_adata, model=tiny_path)
    assert "X_transcriptformer_genes" not in tiny_adata.varm


def test_likelihood_nan_only_for_cells_without_genes(tiny_path, tiny_adata):
    X = tiny_adata.X.toarray()
    X[3] = 0
    tiny_adata.X = sp.csr_matrix(X)
    with pytest.warns(TranscriptFormerWarning, match="no expressed gene"):
        tfs.tl.embed(tiny_adata, model=tiny_path, llh=True)
    llh = tiny_adata.obs["transcriptformer_llh"].to_numpy()
    assert np.isnan(llh[3]) and np.isfinite(np.delete(llh, 3)).all()
    assert np.isfinite(tiny_adata.obsm["X_transcriptformer"]).all()


# ----------------------------------------------------------------------------- 4. results of one run per key


def test_one_run_per_key_embed_and_likelihood(tiny_path, tiny_adata):
    a = tiny_adata
    tfs.tl.embed(a, model=tiny_path, llh=True)
    assert "transcriptformer_llh" in a.obs and a.uns["transcriptformer"]["llh"].shape == (a.n_obs,)
    np.testing.assert_array_equal(a.uns["transcriptformer"]["llh"], a.obs["transcriptformer_llh"])
    tfs.tl.embed(a, model=tiny_path)  # without llh: what the earlier embed wrote goes
    assert "transcriptformer_llh" not in a.obs and "transcriptformer_n_genes" not in a.obs
    assert "llh" not in a.uns["transcriptformer"]
    assert a.uns["transcriptformer"]["params"]["llh"] is False

    tfs.tl.likelihood(a, model=tiny_path, level="gene")
    gene_keys = {"transcriptformer_count_nll", "transcriptformer_gene_nll"}
    assert gene_keys <= set(a.layers) and "transcriptformer_end_nll" in a.obs
    np.testing.assert_array_equal(a.uns["transcriptformer_llh"]["llh"], a.obs["transcriptformer_llh"])
    tfs.tl.embed(a, model=tiny_path)  # likelihoods of tl.likelihood are not embed's: left alone
    assert gene_keys <= set(a.layers) and "transcriptformer_llh" in a.obs
    tfs.tl.embed(a, model=tiny_path, llh=True)  # rewrites obs[..._llh] but never removes likelihood's other keys
    assert gene_keys <= set(a.layers) and "transcriptformer_end_nll" in a.obs
    tfs.tl.likelihood(a, model=tiny_path, level="cell")  # a cell-level run replaces the gene-level one whole
    assert not gene_keys & set(a.layers) and "transcriptformer_end_nll" not in a.obs
    assert a.uns["transcriptformer_llh"]["params"]["level"] == "cell"
    tfs.tl.embed(a, model=tiny_path)  # obs[..._llh] was last written by likelihood: embed leaves it
    assert "transcriptformer_llh" in a.obs
    # another key: independent
    tfs.tl.embed(a, model=tiny_path, key_added="other", llh=True)
    tfs.tl.embed(a, model=tiny_path, key_added="other")
    assert "other_llh" not in a.obs and "transcriptformer_llh" in a.obs and "X_other" in a.obsm


def test_a_run_removes_only_what_it_wrote(tiny_path, tiny_adata):
    a = tiny_adata
    a.layers["transcriptformer_gene_nll"] = a.X.copy()  # the user's own, with a name like ours
    a.obs["transcriptformer_end_nll"] = 1.0
    tfs.tl.embed(a, model=tiny_path, llh=True)
    tfs.tl.likelihood(a, model=tiny_path, level="cell")
    assert "transcriptformer_gene_nll" in a.layers and "transcriptformer_end_nll" in a.obs
    assert sorted(a.uns["transcriptformer_llh"]["params"]["keys"]) == [
        "obs/transcriptformer_llh",
        "obs/transcriptformer_n_genes",
        "uns/transcriptformer_llh",
    ]


def test_embed_key_added_as_an_obsm_key_is_deprecated(tiny_path, tiny_adata):
    with pytest.warns(FutureWarning, match="key_added is now a base name"):
        tfs.tl.embed(tiny_adata, model=tiny_path, key_added="X_mine")
    assert "X_mine" in tiny_adata.obsm and "mine" in tiny_adata.uns


# ----------------------------------------------------------------------------- 5. key_added and every option


@pytest.mark.parametrize("bad", [None, 5, "", "   ", "a/b", ["x"]])
def test_key_added_is_validated_everywhere(tiny_path, tiny_adata, bad, no_model_load):
    before = snapshot(tiny_adata)
    tiny_adata.obsm["X_transcriptformer"] = np.zeros((tiny_adata.n_obs, 32), np.float32)
    reference = tiny_adata.copy()
    calls = [
        lambda: tfs.tl.embed(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.likelihood(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.gene_embeddings(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.transfer_labels(tiny_adata, reference, labels_key="cell_type", key_added=bad or ""),
        lambda: tfs.pp.match_genes(tiny_adata, tiny_path, key_added=bad),
        lambda: tfs.pp.symbols_to_ensembl(tiny_adata, symbol_key="feature_name", key_added=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="key_added"):
            call()
    del tiny_adata.obsm["X_transcriptformer"]
    assert_unchanged(tiny_adata, before)
    assert no_model_load == []


@pytest.mark.parametrize("bad", [None, 5, "", "   "])
def test_model_argument_is_validated(tiny_adata, bad):
    with pytest.raises(ValueError, match="model must be a checkpoint folder, a registry name"):
        tfs.tl.embed(tiny_adata, model=bad)
    with pytest.raises(ValueError, match="model must be"):
        transcriptformer.load_model(bad)


def test_gene_lists_are_validated(tiny_path, tiny_adata, no_model_load):
    for bad in (5, [1, 2], [], [""], ["ENSG1", None]):
        with pytest.raises(ValueError, match="genes must be gene ids"):
            tfs.tl.contextual_gene_embeddings(tiny_adata, model=tiny_path, genes=bad)
        with pytest.raises(ValueError, match="genes must be gene ids"):
            tfs.tl.gene_embeddings(tiny_adata, model=tiny_path, genes=bad)
    assert no_model_load == []


# ----------------------------------------------------------------------------- 6. special-token names


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


# ----------------------------------------------------------------------------- 7. match_genes never overwrites


def test_match_genes_refuses_to_overwrite(tiny_path, tiny_adata):
    before = snapshot(tiny_adata)
    with pytest.raises(ValueError, match="is the column holding the gene ids"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="ensembl_id")
    with pytest.raises(ValueError, match="is the column holding the gene ids"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="ensembl_id", overwrite=True)
    with pytest.raises(ValueError, match=r"already has a column 'feature_name'.*overwrite=True"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="feature_name")
    assert_unchanged(tiny_adata, before)
    tfs.pp.match_genes(tiny_adata, tiny_path)
    first = tiny_adata.var["transcriptformer_in_vocab"].copy()
    with pytest.raises(ValueError, match="already has a column"):
        tfs.pp.match_genes(tiny_adata, tiny_path)
    tfs.pp.match_genes(tiny_adata, tiny_path, overwrite=True)
    assert tiny_adata.var["transcriptformer_in_vocab"].equals(first) and first.dtype == bool and first.any()


# ----------------------------------------------------------------------------- 8. CLI output checked first


def test_cli_checks_the_output_before_loading_the_model(tmp_path, tiny_path, h5ad, capsys, monkeypatch, no_model_load):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir" / "sub").mkdir(parents=True)
    cases = [
        (("--output-filename", ""), "--output-filename is empty"),
        (("--output-filename", "  "), "--output-filename is empty"),
        (("--output-filename", "sub"), "is an existing folder"),
    ]
    for extra, message in cases:
        code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "adir", *extra))
        assert code == 1 and message in error_line(err), err
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "afile" / "deeper"))
    assert code == 1 and "afile is a file" in error_line(err)

    # a folder where nothing can be written (root ignores permission bits, so the write is made to fail)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_inference.tempfile, "mkstemp", denied)
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "adir"))
    assert code == 1 and "cannot write to the output folder" in error_line(err) and "Permission denied" in err
    monkeypatch.undo()
    monkeypatch.setattr(cli_inference.os, "access", lambda *a, **k: False)
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "new" / "deeper"))
    assert code == 1 and "is not writable" in error_line(err)
    assert no_model_load == []
    assert not (tmp_path / "new").exists()


def test_cli_download_checks_its_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "download", "tf-sapiens", "--checkpoint-dir", tmp_path / "afile", "--no-progress")
    assert code == 1 and "is a file" in error_line(err)


# ----------------------------------------------------------------------------- 9. views of backed data


def test_views_of_backed_data(tiny_path, tiny_adata, tmp_path, no_model_load):
    path = tmp_path / "backed.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[3:15]
    for call in (
        lambda: tfs.tl.embed(view, model=tiny_path),
        lambda: tfs.tl.likelihood(view, model=tiny_path),
        lambda: tfs.tl.gene_embeddings(view, model=tiny_path),
        lambda: tfs.pp.match_genes(view, tiny_path),
        lambda: tfs.pp.symbols_to_ensembl(view, symbol_key="feature_name"),
        lambda: tfs.tl.transfer_labels(view, tiny_adata, labels_key="cell_type"),
        lambda: tfs.tl.umap(view),
    ):
        with pytest.raises(ValueError, match=r"view of a backed AnnData.*copy=True"):
            call()
    for call in (  # no copy option: the message offers only loading the subset
        lambda: tfs.tl.celltype_similarity(view, groupby="cell_type"),
    ):
        with pytest.raises(
            ValueError, match=r"view of a backed AnnData.*Load the subset first: adata = adata\[\.\.\.\]\.to_memory"
        ):
            call()
    assert no_model_load == []


def test_copy_of_a_view_of_backed_data_works(tiny_path, tiny_adata, tmp_path):
    path = tmp_path / "backed.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[3:15]
    expected = tfs.tl.embed(tiny_adata[3:15].copy(), model=tiny_path, llh=True, copy=True)
    out = tfs.tl.embed(view, model=tiny_path, llh=True, copy=True)
    assert not out.isbacked and out.n_obs == 12
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], expected.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_allclose(out.obs["transcriptformer_llh"], expected.obs["transcriptformer_llh"], atol=1e-6)
    assert "X_transcriptformer" not in view.obsm and "X_transcriptformer" not in backed.obsm
    marked = tfs.pp.match_genes(view, tiny_path, copy=True)
    assert marked.var["transcriptformer_in_vocab"].sum() > 0 and "transcriptformer_in_vocab" not in backed.var
    assert tfs.pp.check_input(view, tiny_path)["n_obs"] == 12
    backed.file.close()


# ----------------------------------------------------------------------------- 10/12. one rule in API and CLI


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("batch_size", 1.5),
        ("batch_size", "8"),
        ("batch_size", True),
        ("batch_size", np.nan),
        ("batch_size", 0),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 2.0),
        ("clip_counts", "30"),
        ("clip_counts", True),
        ("clip_counts", 0),
        ("normalize_to_scale", True),
        ("normalize_to_scale", -1),
        ("normalize_to_scale", "10"),
        ("filter_to_vocab", "no"),
        ("filter_to_vocab", 1),
        ("filter_to_vocab", None),
        ("device", "tpu"),
        ("device", ""),
        ("device", None),
        ("device", 0),
        ("device", "meta"),
        ("device", "cpu:0"),
        ("device", "cuda:x"),
        ("precision", "8"),
        ("precision", None),
        ("gene_key", 5),
        ("layer", ""),
        ("species_embedding", 5),
        ("species_embedding", []),
        ("species_embedding", [3]),
        ("species_embedding", {"a": 1}),
    ],
)
def test_run_options_are_refused_before_the_model_loads(tiny_path, tiny_adata, name, bad, no_model_load):
    with pytest.raises(ValueError, match=name):
        tfs.tl.embed(tiny_adata, model=tiny_path, **{name: bad})
    with pytest.raises(ValueError, match=name):
        RunOptions(**{name: bad})
    assert no_model_load == []


def test_device_names_follow_one_rule(tiny_path, tiny_adata):
    import torch

    from transcriptformer.inference.devices import resolve_device

    for ok in ("CPU", " cpu ", torch.device("cpu"), "auto"):
        RunOptions(device=ok)
        resolve_device(ok)
    tfs.tl.embed(tiny_adata, model=tiny_path, device="CPU")
    with pytest.raises(ValueError, match="device=device"):
        RunOptions(device=torch.device("meta"))
    with pytest.raises(ValueError, match="device=device"):
        resolve_device(torch.device("meta"))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--max-tokens", "0"), "--max-tokens"),
        (("--max-tokens", "-1"), "--max-tokens"),
        (("--batch-size", "0"), "--batch-size"),
        (("--clip-counts", "0"), "--clip-counts"),
        (("--config-override", "model.inference_config.batch_size=0"), "inference_config.batch_size=0"),
        (("--config-override", "model.inference_config.batch_size=1.5"), "inference_config.batch_size=1.5"),
    ],
)
def test_cli_options_follow_the_api_rules(tmp_path, tiny_path, h5ad, capsys, no_model_load, extra, named):
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "out", *extra))
    assert code == 1 and named in error_line(err)
    assert no_model_load == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_zero_cells_are_an_error_in_the_api_and_the_cli(tmp_path, tiny_path, tiny_adata, capsys, stream):
    empty = tiny_adata[:0].copy()
    with pytest.raises(ValueError, match="has no cells"):
        tfs.tl.embed(empty, model=tiny_path)
    path = tmp_path / "empty.h5ad"
    empty.write_h5ad(path)
    code, err = run_cli(capsys, *infer_args(tiny_path, path, tmp_path / "out", *(["--stream-output"] * stream)))
    assert code == 1 and "has no cells" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_check_input_window_is_validated(tiny_path, tiny_adata):
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match="window"):
            tfs.pp.check_input(tiny_adata, tiny_path, window=bad)
    with pytest.raises(ValueError, match="gene_key"):
        tfs.pp.check_input(tiny_adata, tiny_path, gene_key=5)
    with pytest.raises(ValueError, match="filter_to_vocab"):
        tfs.pp.check_input(tiny_adata, tiny_path, filter_to_vocab="no")


@pytest.mark.parametrize(
    "call",
    [
        lambda p: tfs.pp.match_genes("x", p),
        lambda p: tfs.pp.check_input("x", p),
        lambda p: tfs.tl.embed("x", model=p),
        lambda p: tfs.tl.likelihood("x", model=p),
        lambda p: tfs.tl.contextual_gene_embeddings("x", model=p),
        lambda p: tfs.pp.symbols_to_ensembl("x"),
    ],
)
def test_non_anndata_input_is_named(tiny_path, call):
    with pytest.raises(TypeError, match="AnnData, got str"):
        call(tiny_path)


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


def test_cli_refuses_inputs_that_are_not_h5ad_before_loading(tmp_path, tiny_path, capsys, no_model_load):
    (tmp_path / "folder.h5ad").mkdir()
    (tmp_path / "text.h5ad").write_text("cell,gene\n")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    for data, message in [
        (tmp_path / "folder.h5ad", "is a folder"),
        (tmp_path / "text.h5ad", "is not an h5ad file (not HDF5)"),
        (tmp_path / "other.h5", "not an AnnData"),
        (tmp_path / "missing.h5ad", "does not exist"),
    ]:
        code, err = run_cli(capsys, *infer_args(tiny_path, data, tmp_path / "out"))
        assert code == 1 and message in error_line(err) and str(data) in err
    assert no_model_load == []


# ----------------------------------------------------------------------------- 11. --config-override


def _overrides(*items: str):
    args = cli.build_parser().parse_args(
        [
            "inference",
            "--checkpoint-path",
            "x",
            "--data-file",
            "y",
            *[a for i in items for a in ("--config-override", i)],
        ]
    )
    return args, cli_inference._apply_overrides(args)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False)],
)
def test_config_override_booleans_are_strict(text, value):
    args, _ = _overrides(f"model.data_config.filter_to_vocabs={text}", f"data_config.remove_duplicate_genes={text}")
    assert args.filter_to_vocabs is value and args.remove_duplicate_genes is value
    _, model = _overrides(f"model.model_config.attn_bias={text}")
    assert TranscriptFormerConfig().with_overrides(model).model.attn_bias is value


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.data_config.filter_to_vocabs=off", "expected a boolean"),
        ("model.data_config.remove_duplicate_genes=2", "expected a boolean"),
        ("model.data_config.filter_to_vocabs=", "expected a boolean"),
        ("model.inference_config.emb_type=foo", "expected one of cell, cge"),
        ("model.inference_config.precision=8", "expected one of"),
        ("model.inference_config.device=tpu", "expected one of"),
        ("model.inference_config.output_keys.0=nonsense", "expected one of embeddings, llh, gene_llh"),
        ("model.inference_config.output_keys=[embeddings,llh]", "one item at a time"),
        ("model.inference_config.batch_size=abc", "expected a positive integer"),
        ("model.data_config.normalize_to_scale=-1", "expected a number >= 0"),
        ("model.data_config.normalize_to_scale=ten", "expected a number"),
        ("model.data_config.clip_counts=0", "expected a number > 0"),
        ("model.data_config.use_raw=maybe", "expected True, False or auto"),
        ("model.data_config.sort_genes=maybe", "expected a boolean"),
        ("model.data_config.sort_genes=yes", "only the default"),
        ("model.model_config.softcap=inf", "expected a finite number"),
        ("model.model_config.attn_bias=maybe", "expected a boolean"),
        ("model.model_config.num_layers=2.5", "expected an integer"),
        ("model.model_config.num_layers=true", "expected a number"),
        ("model.model_config.nonexistent=1", "has no key 'nonexistent'"),
        ("model.model_config.mu_link_fn=foo", "mu_link_fn='foo' is not supported"),
        ("model.nowhere.x=1", "unknown configuration key"),
    ],
)
def test_config_override_errors_name_the_key(item, message):
    key = item.split("=", 1)[0]  # as written
    with pytest.raises(CLIError, match=message) as info:
        _overrides(item)
    assert key in str(info.value)


def test_config_override_error_comes_before_the_model(tmp_path, tiny_path, h5ad, capsys, no_model_load):
    code, err = run_cli(
        capsys, *infer_args(tiny_path, h5ad, tmp_path / "o", "--config-override", "data_config.filter_to_vocabs=no!")
    )
    assert code == 1 and "data_config.filter_to_vocabs=no!" in error_line(err)
    assert no_model_load == []


def test_config_override_booleans_change_the_result(tmp_path, tiny_path, h5ad, capsys):
    """`filter_to_vocabs=no` means False (it used to mean True, by truthiness)."""
    outputs = {}
    for text in ("no", "false"):
        out = tmp_path / text
        code, err = run_cli(
            capsys, *infer_args(tiny_path, h5ad, out, "--config-override", f"data_config.filter_to_vocabs={text}")
        )
        assert code == 0, err
        outputs[text] = ad.read_h5ad(out / "embeddings.h5ad").obsm["embeddings"]
    api = tfs.tl.embed(tfs.datasets.tiny_human(), model=tiny_path, filter_to_vocab=False, copy=True)
    np.testing.assert_allclose(outputs["no"], api.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_array_equal(outputs["no"], outputs["false"])


# ----------------------------------------------------------------------------- 13. unknown assay labels


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


# ----------------------------------------------------------------------------- 14. raw counts in every window


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
