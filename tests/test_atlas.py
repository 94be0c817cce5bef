"""Atlas-scale inputs and runs: SOMA experiments, zarr and dask, sharded resumable runs and their merge."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.resources import files
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import transcriptformer.scanpy as tfs
from transcriptformer.data.tokenizer import TokenizeOptions
from transcriptformer.inference.engine import Engine
from transcriptformer.inference.options import RunOptions
from transcriptformer.inference.pipeline import infer, infer_sharded
from transcriptformer.inference.shards import Destination, OutputSpec, ShardStore

TINY_H5AD = Path(str(files("transcriptformer") / "_data" / "tiny_human.h5ad"))
HEADS = ("embeddings", "llh")


def _soma():
    return pytest.importorskip("tiledbsoma")


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The in-memory run of the bundled 21 cells: what every other input must give."""
    return infer(tfs.datasets.tiny_human(), tiny_model, heads=HEADS).result


@pytest.fixture(scope="module")
def soma_uri(tmp_path_factory):
    """A SOMA experiment made from the package's own h5ad file (X layer 'data', as from_h5ad writes it)."""
    soma = _soma()
    pytest.importorskip("dask")
    import tiledbsoma.io

    uri = str(tmp_path_factory.mktemp("soma") / "tiny")
    tiledbsoma.io.from_h5ad(uri, str(TINY_H5AD), measurement_name="RNA")
    assert soma.Experiment.exists(uri)
    return uri


def _read_soma(uri, **kw):
    from transcriptformer.data.soma import read_soma

    return read_soma(uri, **{"layer": "data", "var_id": "ensembl_id", **kw})


# -- SOMA experiments -------------------------------------------------------------------------------------------


def test_soma_experiment_equals_the_in_memory_run(tiny_model, reference, soma_uri):
    adata = _read_soma(soma_uri, chunk_size=4)
    assert type(adata.X).__module__.startswith("dask")
    assert adata.obs.index.name == "soma_joinid" and list(adata.obs_names) == [str(i) for i in range(21)]
    assert list(adata.obs.columns) == ["assay"]
    assert adata.var_names[0].startswith("ENSG") and adata.uns["soma"]["layer"] == "data"
    got = infer(adata, tiny_model, heads=HEADS).result
    np.testing.assert_allclose(got.embeddings, reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.llh, reference.llh, atol=1e-6, rtol=0)


def test_soma_filter_and_query_select_cells_in_joinid_order(tiny_model, reference, soma_uri):
    soma = _soma()
    adata = _read_soma(soma_uri, obs_filter="assay == 'Smart-seq2'", obs_columns=["cell_type", "assay"])
    tiny = tfs.datasets.tiny_human()
    expected = np.flatnonzero(tiny.obs["assay"].to_numpy() == "Smart-seq2")
    assert [int(i) for i in adata.obs_names] == expected.tolist()
    assert list(adata.obs.columns) == ["cell_type", "assay"]
    np.testing.assert_array_equal(adata.obs["cell_type"].astype(str), tiny.obs["cell_type"].astype(str).iloc[expected])
    got = infer(adata, tiny_model, heads=HEADS).result
    np.testing.assert_allclose(got.embeddings, reference.embeddings[expected], atol=1e-6, rtol=0)
    with soma.Experiment.open(soma_uri) as exp:  # an ExperimentAxisQuery: its cells, in joinid order
        query = exp.axis_query("RNA", obs_query=soma.AxisQuery(coords=([17, 3, 9],)))
        adata = _read_soma(query)
        assert list(adata.obs_names) == ["3", "9", "17"]
        got = infer(adata, tiny_model, heads=HEADS).result
        np.testing.assert_allclose(got.embeddings, reference.embeddings[[3, 9, 17]], atol=1e-6, rtol=0)


def test_soma_reads_one_window_at_a_time(tiny_model, soma_uri, monkeypatch):
    """The experiment is read window by window (never the whole X): each SOMA read is at most one window."""
    from transcriptformer.data import soma as soma_module

    reads = []
    original = soma_module.SomaRows.__getitem__

    def spy(self, key):
        out = original(self, key)
        reads.append(out.shape[0])
        return out

    monkeypatch.setattr(soma_module.SomaRows, "__getitem__", spy)
    adata = _read_soma(soma_uri, chunk_size=5)
    Engine(tiny_model, window=5).run(tiny_model.cells(adata, TokenizeOptions()), ("embeddings",))
    assert sum(reads) == 21 and max(reads) <= 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"measurement": "ATAC"}, KeyError, r"measurement 'ATAC' not found .* it has \['RNA'\]"),
        ({"layer": "raw"}, KeyError, r"X layer 'raw' not found in measurement 'RNA'; it has \['data'\]"),
        ({"obs_filter": "assay == 'nothing'"}, ValueError, "selects no cell"),
        ({"obs_filter": "assy == 'x'"}, ValueError, "cannot be applied.*obs columns are"),
        ({"obs_columns": ["tissue"]}, KeyError, r"obs column\(s\) \['tissue'\] not found"),
        ({"var_id": "feature_name"}, ValueError, "does not hold Ensembl gene ids.*var_id='ensembl_id'"),
        ({"var_id": "feature_id"}, KeyError, "var column 'feature_id' not found.*pass var_id='ensembl_id'"),
    ],
)
def test_soma_bad_input_says_what_to_fix(soma_uri, kwargs, error, match):
    with pytest.raises(error, match=match):
        _read_soma(soma_uri, **kwargs)


def test_soma_unreadable_experiment(tmp_path, soma_uri):
    _soma()
    from transcriptformer.data.soma import read_soma

    with pytest.raises(ValueError, match=r"cannot read the SOMA experiment.*Pass the URI of a SOMA Experiment"):
        read_soma(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot read the SOMA experiment"):
        read_soma(f"{soma_uri}/ms/RNA")  # a SOMA object, but not an experiment
    with pytest.raises(TypeError, match="takes a SOMA experiment"):
        read_soma(42)


# -- zarr and dask ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("zarr") / "tiny.zarr"
    tfs.datasets.tiny_human().write_zarr(path)
    return path


@pytest.mark.parametrize("kind", ["read_lazy zarr", "read_lazy h5ad", "sparse_dataset zarr", "dense dask"])
def test_lazy_inputs_equal_the_in_memory_run(tiny_model, reference, zarr_store, kind):
    da = pytest.importorskip("dask.array")
    tiny = tfs.datasets.tiny_human()
    if kind.startswith("read_lazy"):
        pytest.importorskip("xarray")
        if kind.endswith("zarr"):
            adata = ad.experimental.read_lazy(zarr_store)
        else:
            import h5py

            adata = ad.experimental.read_lazy(h5py.File(TINY_H5AD, "r"))
        assert type(adata.X).__module__.startswith("dask")
    elif kind == "sparse_dataset zarr":
        import zarr

        X = ad.io.sparse_dataset(zarr.open_group(str(zarr_store), mode="r")["X"])
        adata = ad.AnnData(X=X, obs=tiny.obs, var=tiny.var)
    else:
        adata = ad.AnnData(X=da.from_array(tiny.X.toarray(), chunks=(4, 50)), obs=tiny.obs, var=tiny.var)
    got = infer(adata, tiny_model, heads=HEADS).result
    np.testing.assert_allclose(got.embeddings, reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.llh, reference.llh, atol=1e-6, rtol=0)


def test_the_other_tools_read_lazy_inputs_as_in_memory_ones(tiny_model, zarr_store):
    """obs and var of read_lazy are xarray-backed: every tool reads their columns as the in-memory ones."""
    pytest.importorskip("xarray")
    memory = tfs.datasets.tiny_human()

    def both(call):
        lazy = ad.experimental.read_lazy(zarr_store)
        return call(memory.copy()), call(lazy)

    a, b = both(lambda x: tfs.pp.check_input(x, tiny_model))
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    a, b = both(lambda x: tfs.pp.match_genes(x, tiny_model, copy=True).var["transcriptformer_in_vocab"].to_numpy())
    np.testing.assert_array_equal(a, b)
    a, b = both(lambda x: tfs.tl.gene_embeddings_by_group(x, tiny_model, groupby="cell_type"))
    np.testing.assert_allclose(a.X, b.X, atol=1e-6, rtol=0)
    assert list(a.obs_names) == list(b.obs_names)
    gene = str(memory.var_names[memory.var["ensembl_id"].isin(tiny_model.vocab.genes)][0])
    a, b = both(lambda x: tfs.tl.gene_embeddings(x, tiny_model, genes=[gene], copy=True).varm)
    np.testing.assert_allclose(a["X_transcriptformer_genes"], b["X_transcriptformer_genes"], atol=1e-6, equal_nan=True)

    def embedded(x):
        tfs.tl.embed(x, tiny_model)
        return x

    query = embedded(memory.copy())
    a, b = both(lambda x: tfs.tl.transfer_labels(query, embedded(x), labels_key="cell_type", copy=True).obs)
    pd.testing.assert_frame_equal(a, b)
    a, b = both(lambda x: tfs.tl.celltype_similarity(embedded(x), groupby="cell_type", batch_key="donor_id"))
    pd.testing.assert_frame_equal(a, b)


def test_dask_raw_and_layers_are_read_window_by_window(tiny_model, reference, monkeypatch):
    """Counts in .raw.X or a layer as dask arrays (sparse chunks): only windows are computed, never all of X."""
    da = pytest.importorskip("dask.array")
    tiny = tfs.datasets.tiny_human()
    counts = da.from_array(tiny.X, chunks=(4, tiny.n_vars), asarray=False)
    normalised = ad.AnnData(X=np.zeros(tiny.shape, np.float32), obs=tiny.obs, var=tiny.var)
    normalised.layers["counts"] = counts
    with_raw = normalised.copy()
    with_raw.raw = ad.AnnData(X=counts, obs=tiny.obs, var=tiny.var)
    computed = []
    original = type(counts).compute

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        computed.append(out.shape[0])
        return out

    monkeypatch.setattr(type(counts), "compute", spy)
    for adata, layer in ((normalised, "counts"), (with_raw, None), (with_raw, "raw")):
        computed.clear()
        got = infer(adata, tiny_model, heads=HEADS, tokenize=TokenizeOptions(layer=layer)).result
        np.testing.assert_allclose(got.embeddings, reference.embeddings, atol=1e-6, rtol=0)
        assert computed and sum(computed) == 21 and max(computed) <= 4096


# -- sharded, resumable runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cells():
    """105 cells (the tiny data five times, shuffled), so shards and windows cut through mixed lengths."""
    reps = ad.concat([tfs.datasets.tiny_human()] * 5, index_unique="-", merge="same")
    return reps[np.random.default_rng(3).permutation(reps.n_obs)].copy()


@pytest.fixture(scope="module")
def cells_reference(tiny_model, cells):
    return infer(cells, tiny_model, heads=HEADS).result


def _describe(path, loaded):
    def describe(run):
        params = run.params(loaded, RunOptions(), "embed")
        return OutputSpec(
            path=str(path),
            destinations=(
                Destination("obsm", "embeddings", "X_transcriptformer"),
                Destination("obs", "llh", "transcriptformer_llh"),
                Destination("obs", "n_genes", "transcriptformer_n_genes"),
                Destination("uns", "llh", "transcriptformer/llh"),
            ),
            uns={"transcriptformer": {"params": params}},
            params_key="transcriptformer",
        )

    return describe


def _sharded(adata, loaded, folder, out, **kw):
    return infer_sharded(
        adata,
        loaded,
        folder,
        describe=_describe(out, loaded),
        obs=adata.obs[["cell_type"]],
        heads=HEADS,
        options=RunOptions().record(),
        shard_size=kw.pop("shard_size", 10),
        progress=False,
        **kw,
    )


class _Stop(Exception):
    pass


def _stop_after(monkeypatch, n):
    """ShardStore.write raises after ``n`` shards (an interruption between two shards)."""
    original = ShardStore.write
    calls = []

    def write(self, *args, **kwargs):
        if len(calls) == n:
            raise _Stop
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "write", write)
    return calls


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_interrupted_run_resumes_and_merges_in_input_order(
    tiny_model, cells, cells_reference, tmp_path, monkeypatch, suffix
):
    folder, out = tmp_path / "run.shards", tmp_path / f"run{suffix}"
    _stop_after(monkeypatch, 4)
    with pytest.raises(_Stop):
        _sharded(cells, tiny_model, folder, out)
    monkeypatch.undo()
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [f"part-{i:06d}.npz" for i in range(4)]
    assert not out.exists()
    run = _sharded(cells, tiny_model, folder, out)
    assert run.skipped == 4 and run.computed == list(range(4, 11)) and run.output == out
    assert not folder.exists()  # merged, then removed
    merged = ad.read_zarr(out) if suffix == ".zarr" else ad.read_h5ad(out)
    assert list(merged.obs_names) == list(cells.obs_names)
    np.testing.assert_array_equal(merged.obs["cell_type"].astype(str), cells.obs["cell_type"].astype(str))
    np.testing.assert_allclose(merged.obsm["X_transcriptformer"], cells_reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(merged.obs["transcriptformer_llh"], cells_reference.llh, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(merged.obs["transcriptformer_n_genes"], cells_reference.n_genes)
    np.testing.assert_allclose(merged.uns["transcriptformer"]["llh"], cells_reference.llh, atol=1e-6, rtol=0)
    params = merged.uns["transcriptformer"]["params"]
    assert params["n_shards"] == 11 and params["shard_size"] == 10 and params["counts_look_raw"]
    assert params["weights_sha256"] == tiny_model.weights_sha256 and params["device"] == "cpu"


def test_a_run_over_a_soma_experiment_resumes(tiny_model, reference, soma_uri, tmp_path, monkeypatch):
    adata = _read_soma(soma_uri, obs_columns=["cell_type", "assay"])
    _stop_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        _sharded(adata, tiny_model, tmp_path / "s", tmp_path / "out.h5ad", shard_size=8)
    monkeypatch.undo()
    run = _sharded(
        _read_soma(soma_uri, obs_columns=["cell_type", "assay"]),
        tiny_model,
        tmp_path / "s",
        run_out := tmp_path / "out.h5ad",
        shard_size=8,
    )
    assert run.skipped == 1
    merged = ad.read_h5ad(run_out)
    assert merged.obs.index.name == "soma_joinid" and list(merged.obs_names) == [str(i) for i in range(21)]
    np.testing.assert_allclose(merged.obsm["X_transcriptformer"], reference.embeddings, atol=1e-6, rtol=0)


def test_another_run_is_refused_with_what_differs(tiny_model, cells, tmp_path, monkeypatch):
    folder, out = tmp_path / "run.shards", tmp_path / "run.zarr"
    _stop_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        _sharded(cells, tiny_model, folder, out)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"holds the shards of another run.*clip_counts: 10\.0 \(this run\) vs 30\.0"):
        _sharded(cells, tiny_model, folder, out, tokenize=TokenizeOptions(clip_counts=10.0))
    with pytest.raises(ValueError, match=r"another run.*shard_size: 5 \(this run\) vs 10"):
        _sharded(cells, tiny_model, folder, out, shard_size=5)
    other = cells.copy()
    other.obs_names = [f"x{i}" for i in range(other.n_obs)]
    with pytest.raises(ValueError, match=r"another run.*input\.obs_names_sha256"):
        _sharded(other, tiny_model, folder, out)
    with pytest.raises(ValueError, match=r"another run.*input\.n_obs: 104"):
        _sharded(cells[:104].copy(), tiny_model, folder, out)
    # what the tokeniser reads changed, the matrix and names did not: other gene ids, other assay labels
    ids = cells.copy()
    ids.var["ensembl_id"] = ids.var["ensembl_id"].astype(object).where(np.arange(ids.n_vars) % 2 == 1, None)
    with pytest.raises(ValueError, match=r"another run.*input\.tokens_sha256"):
        _sharded(ids, tiny_model, folder, out)
    assays = cells.copy()
    assays.obs["assay"] = assays.obs["assay"].astype(str).str.upper()
    with pytest.raises(ValueError, match=r"another run.*input\.tokens_sha256"):
        _sharded(assays, tiny_model, folder, out)
    # a shard of another run (same name, another fingerprint) is refused, never merged
    _sharded(cells[:50].copy(), tiny_model, tmp_path / "other.shards", tmp_path / "o.zarr", merge=False)
    os.replace(tmp_path / "other.shards" / "shards" / "part-000002.npz", folder / "shards" / "part-000002.npz")
    with pytest.raises(ValueError, match=r"part-000002\.npz was written by another run"):
        _sharded(cells, tiny_model, folder, out)
    with pytest.raises(ValueError, match="written by another run"):
        ShardStore.open(folder).read(2)
    assert not out.exists()


def test_the_merge_has_the_obs_of_the_call_that_makes_it(tiny_model, cells, tmp_path, monkeypatch):
    folder, out = tmp_path / "run.shards", tmp_path / "run.h5ad"
    _stop_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        _sharded(cells, tiny_model, folder, out)
    monkeypatch.undo()
    relabelled = cells.copy()
    relabelled.obs["cell_type"] = relabelled.obs["cell_type"].astype(str) + " (checked)"
    _sharded(relabelled, tiny_model, folder, out)
    merged = ad.read_h5ad(out)
    np.testing.assert_array_equal(merged.obs["cell_type"].astype(str), relabelled.obs["cell_type"].to_numpy())


def test_a_start_that_fails_leaves_no_folder_and_a_retry_runs(tiny_model, cells, tmp_path):
    folder, out = tmp_path / "run.shards", tmp_path / "run.h5ad"
    bad = cells.copy()
    bad.obs["cell_type"] = [1 if i % 2 else "a" for i in range(bad.n_obs)]  # h5ad cannot write a mixed column
    with pytest.raises(ValueError, match=r"obs cannot be written to an h5ad file .*make such obs columns strings"):
        _sharded(bad, tiny_model, folder, out)
    assert not folder.exists()
    folder.mkdir()
    (folder / "shards").mkdir()  # what an earlier version left after such a failure: no shard file in it
    run = _sharded(cells, tiny_model, folder, out)
    assert run.output == out and out.exists()
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "part-000000.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has shard files but no manifest\.json"):
        _sharded(cells, tiny_model, folder, out)


def test_merge_refuses_missing_shards_and_ignores_temporary_files(tiny_model, cells, tmp_path, monkeypatch):
    folder, out = tmp_path / "run.shards", tmp_path / "run.h5ad"
    _stop_after(monkeypatch, 3)
    with pytest.raises(_Stop):
        _sharded(cells, tiny_model, folder, out)
    monkeypatch.undo()
    half = folder / "shards" / ".part-000003.npz.1234.tmp"
    half.write_bytes(b"half-written")  # what a killed writer leaves: never read as a shard
    store = ShardStore.open(folder)
    assert store.pending() == list(range(3, 11))
    with pytest.raises(ValueError, match=r"8 of 11 shards .* not computed yet \(cells \[30, 40\), \[40, 50\)"):
        store.merge()
    assert not out.exists() and not list(tmp_path.glob(".run.h5ad*"))
    run = _sharded(cells, tiny_model, folder, out, merge=False)
    assert run.output is None and not half.exists()  # removed when the run resumed
    (folder / "shards" / "part-000005.npz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"part-000005.npz cannot be read .* delete it and run the same command"):
        ShardStore.open(folder).merge()
    assert not out.exists()


def test_merge_never_writes_over_a_folder_or_the_input(tiny_model, cells, tmp_path):
    source = tmp_path / "input.h5ad"
    cells.write_h5ad(source)
    folder = tmp_path / "run.shards"
    _sharded(cells, tiny_model, folder, tmp_path / "run.h5ad", merge=False, info={"input": str(source)})
    store = ShardStore.open(folder)
    for name, match in (("results.h5ad", "is an existing folder: the merge"), ("results.zarr", "not a zarr store")):
        precious = tmp_path / name
        precious.mkdir()
        (precious / "notes.txt").write_text("precious")
        with pytest.raises(ValueError, match=match):
            store.merge(precious, keep=True)
        assert (precious / "notes.txt").read_text() == "precious"
    (tmp_path / "file.zarr").write_text("not a store")
    with pytest.raises(ValueError, match="is an existing file, not a zarr store"):
        store.merge(tmp_path / "file.zarr", keep=True)
    before = source.read_bytes()
    for same in (source, tmp_path / "." / "input.h5ad"):
        with pytest.raises(ValueError, match=r"is the run's input .*: writing it would replace the input"):
            store.merge(same, keep=True)
    assert source.read_bytes() == before
    store.merge(tmp_path / "m.zarr", keep=True)  # a store an earlier merge wrote is replaced
    merged = store.merge(tmp_path / "m.zarr", keep=True)
    assert ad.read_zarr(merged).n_obs == cells.n_obs


def test_shards_of_gene_outputs_are_refused(tiny_model, cells, tmp_path):
    with pytest.raises(ValueError, match=r"\['cge'\] cannot be written in shards"):
        infer_sharded(cells, tiny_model, tmp_path / "x", describe=None, obs=cells.obs, heads=("cge",))  # type: ignore[arg-type]


def test_run_ranges_equals_run(tiny_model, cells, cells_reference):
    engine = Engine(tiny_model, window=7)
    parts = list(engine.run_ranges(tiny_model.cells(cells, TokenizeOptions()), HEADS, [(0, 30), (30, 30), (30, 105)]))
    assert [(p.stats["start"], p.stats["stop"]) for p in parts] == [(0, 30), (30, 30), (30, 105)]
    emb = np.concatenate([p.embeddings for p in parts])
    np.testing.assert_allclose(emb, cells_reference.embeddings, atol=1e-6, rtol=0)


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_soma_resumable_sigterm_then_resume_and_merge(cli, tiny_path, reference, soma_uri, tmp_path, monkeypatch):
    args = [
        "inference", "--checkpoint-path", tiny_path, "--soma-uri", soma_uri, "--soma-layer", "data",
        "--var-id", "ensembl_id", "--obs-columns", "assay", "cell_type", "--output-path", tmp_path,
        "--output-filename", "cells.zarr", "--resumable", "--shard-size", "7", "--llh", "--no-progress",
        "--device", "cpu",
    ]  # fmt: skip
    original = ShardStore.write
    calls = []

    def terminated_at_the_third(self, *a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # what SLURM sends at the time limit
        return original(self, *a, **k)

    monkeypatch.setattr(ShardStore, "write", terminated_at_the_third)
    proc = cli(*args, check=False)
    assert proc.returncode == 143, proc.stderr
    monkeypatch.undo()
    folder = tmp_path / "cells.zarr.shards"
    assert len(list((folder / "shards").glob("part-*.npz"))) == 1 and not list(folder.rglob("*.tmp"))
    cli(*args, "--keep-shards")
    out = ad.read_zarr(tmp_path / "cells.zarr")
    assert list(out.obs_names) == [str(i) for i in range(21)] and list(out.obs.columns) == ["assay", "cell_type"]
    np.testing.assert_allclose(out.obsm["embeddings"], reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out.uns["llh"]["llh"], reference.llh, atol=1e-6, rtol=0)
    assert out.uns["transcriptformer"]["params"]["soma_uri"] == soma_uri
    # the kept shards merge again by hand, into another file
    proc = cli("merge", folder, "--output", tmp_path / "again.h5ad", "--no-progress")
    again = ad.read_h5ad(tmp_path / "again.h5ad")
    np.testing.assert_array_equal(again.obsm["embeddings"], out.obsm["embeddings"])
    assert not folder.exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--data-file", "x.h5ad", "--soma-uri", "u"], "either --data-file or --soma-uri"),
        ([], "pass the cells"),
        (["--data-file", str(TINY_H5AD), "--obs-filter", "a == 1"], "--obs-filter select cells of a SOMA"),
        (["--data-file", str(TINY_H5AD), "--output-filename", "o.zarr"], "a .zarr output is written by --resumable"),
        (["--data-file", str(TINY_H5AD), str(TINY_H5AD), "--resumable"], "--resumable takes one input"),
        (["--data-file", str(TINY_H5AD), "--resumable", "--emb-type", "cge"], "cge .* is not sharded"),
        (["--data-file", str(TINY_H5AD), "--resumable", "--output-filename", "o.csv"], "is neither"),
    ],
)
def test_cli_atlas_flag_errors(cli, tiny_path, tmp_path, extra, match):
    proc = cli("inference", "--checkpoint-path", tiny_path, "--output-path", tmp_path, *extra, check=False)
    assert proc.returncode == 1 and match.split(" .* ")[0] in proc.stderr, proc.stderr


def test_cli_soma_errors_and_zarr_input(cli, tiny_path, reference, soma_uri, zarr_store, tmp_path):
    base = ["inference", "--checkpoint-path", tiny_path, "--output-path", tmp_path, "--no-progress", "--device", "cpu"]
    proc = cli(*base, "--soma-uri", soma_uri, "--soma-layer", "raw", check=False)
    assert proc.returncode == 1 and "X layer 'raw' not found" in proc.stderr
    proc = cli(*base, "--soma-uri", soma_uri, "--soma-layer", "data", "--obs-filter", "assay == 'x'", check=False)
    assert proc.returncode == 1 and "selects no cell" in proc.stderr
    pytest.importorskip("xarray")
    cli(*base, "--data-file", zarr_store)
    out = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    np.testing.assert_allclose(out.obsm["embeddings"], reference.embeddings, atol=1e-6, rtol=0)
    proc = cli("merge", tmp_path / "nothing", check=False)
    assert proc.returncode == 1 and "not the shard folder of a resumable run" in proc.stderr


# -- several processes, killed and resumed -------------------------------------------------------------------------

JOB = textwrap.dedent(
    """
    import os, sys, time
    from transcriptformer.inference import shards

    delay = float(os.environ.get("SLOW_SHARDS", "0"))
    if delay:
        original = shards.ShardStore.write

        def slow(self, *args, **kwargs):
            time.sleep(delay)
            return original(self, *args, **kwargs)

        shards.ShardStore.write = slow
    from transcriptformer.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_killed_and_resumed(tmp_path, tiny_path, cells, cells_reference):
    """2 gloo ranks write shards; the whole job is SIGKILLed mid-run; the same command resumes and merges."""
    cells.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "job.py").write_text(JOB)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "job.py",
           "inference", "--checkpoint-path", str(tiny_path), "--data-file", "cells.h5ad", "--output-path", "out",
           "--resumable", "--shard-size", "5", "--llh", "--no-progress", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "SLOW_SHARDS": "0.4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    shards_dir = tmp_path / "out" / "embeddings.h5ad.shards" / "shards"
    deadline = time.monotonic() + 240
    while len(list(shards_dir.glob("part-*.npz"))) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"the job ended before it was killed:\n{proc.communicate()[0].decode()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as when a node is lost
    proc.wait()
    done = sorted(shards_dir.glob("part-*.npz"))
    assert 6 <= len(done) < 21, proc.stdout.read().decode() if proc.stdout else ""
    env.pop("SLOW_SHARDS")
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    out = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    assert list(out.obs_names) == list(cells.obs_names)
    np.testing.assert_allclose(out.obsm["embeddings"], cells_reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out.uns["llh"]["llh"], cells_reference.llh, atol=1e-6, rtol=0)
    assert out.uns["transcriptformer"]["params"]["n_shards"] == 21
    assert not (tmp_path / "out" / "embeddings.h5ad.shards").exists()


def test_manifest_records_the_fingerprint(tiny_model, cells, tmp_path):
    run = _sharded(cells, tiny_model, tmp_path / "m.shards", tmp_path / "m.zarr", merge=False)
    manifest = json.loads((tmp_path / "m.shards" / "manifest.json").read_text())
    fp = manifest["fingerprint"]
    assert fp["model"]["weights_sha256"] == tiny_model.weights_sha256 and fp["heads"] == list(HEADS)
    assert fp["input"]["n_obs"] == 105 and fp["shard_size"] == 10 and "device" not in fp["options"]
    assert manifest["digest"] == run.store.digest and manifest["n_obs"] == 105
    stored = ad.read_h5ad(tmp_path / "m.shards" / "cells.h5ad")
    assert list(stored.obs_names) == list(cells.obs_names)
    assert isinstance(stored.obs, pd.DataFrame) and not sp.issparse(stored.X)


# -- the scanpy face: SOMA input, results streamed into a file ----------------------------------------------------


def test_tl_embed_of_a_soma_experiment_streamed_into_a_file(tiny_path, reference, soma_uri, tmp_path, monkeypatch):
    adata = tfs.read_soma(soma_uri, layer="data", var_id="ensembl_id", obs_columns=["assay", "cell_type"])
    out = tmp_path / "emb.zarr"
    _stop_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        tfs.tl.embed(adata, model=tiny_path, llh=True, out=out, shard_size=7)
    monkeypatch.undo()
    assert "transcriptformer" not in adata.uns and not out.exists()  # all or nothing
    assert tfs.tl.embed(adata, model=tiny_path, llh=True, out=out, shard_size=7) is None
    assert "X_transcriptformer" not in adata.obsm and "transcriptformer_llh" not in adata.obs
    params = adata.uns["transcriptformer"]["params"]
    assert params["out"] == str(out) and params["keys"] == ["uns/transcriptformer"] and params["n_shards"] == 3
    result = ad.read_zarr(out)
    assert list(result.obs_names) == [str(i) for i in range(21)] and list(result.obs.columns[:2]) == [
        "assay",
        "cell_type",
    ]
    np.testing.assert_allclose(result.obsm["X_transcriptformer"], reference.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.obs["transcriptformer_llh"], reference.llh, atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.uns["transcriptformer"]["llh"], reference.llh, atol=1e-6, rtol=0)
    recorded = result.uns["transcriptformer"]["params"]
    assert recorded["tool"] == "embed" and "obsm/X_transcriptformer" in list(recorded["keys"])


def test_tl_out_keeps_the_conventions(tiny_path, tiny_adata, reference, tmp_path):
    tfs.tl.embed(tiny_adata, model=tiny_path)  # in memory first: the file run under the same key replaces it
    before = {k: v.copy() for k, v in tiny_adata.obsm.items()}
    with pytest.raises(ValueError, match=r"out='x\.csv': the results are written to an \.h5ad file or a \.zarr"):
        tfs.tl.embed(tiny_adata, model=tiny_path, out="x.csv")
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        tfs.tl.embed(tiny_adata, model=tiny_path, out=tmp_path / "x.h5ad", shard_size=0)
    assert tiny_adata.obsm.keys() == before.keys()
    copy = tfs.tl.embed(tiny_adata, model=tiny_path, out=tmp_path / "e.h5ad", copy=True)
    assert "X_transcriptformer" in tiny_adata.obsm  # copy=True: adata untouched
    assert "X_transcriptformer" not in copy.obsm and copy.uns["transcriptformer"]["params"]["out"].endswith("e.h5ad")
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_transcriptformer"], reference.embeddings, atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match=r"level='gene' .* is computed in memory"):
        tfs.tl.likelihood(tiny_adata, model=tiny_path, level="gene", out=tmp_path / "l.h5ad")
    tfs.tl.likelihood(tiny_adata, model=tiny_path, out=tmp_path / "l.h5ad", key_added="ll")
    assert tiny_adata.uns["ll_llh"]["params"]["out"] == str(tmp_path / "l.h5ad") and "ll_llh" not in tiny_adata.obs
    lik = ad.read_h5ad(tmp_path / "l.h5ad")
    np.testing.assert_allclose(lik.obs["ll_llh"], reference.llh, atol=1e-6, rtol=0)
    np.testing.assert_allclose(lik.uns["ll_llh"]["llh"], reference.llh, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(lik.obs["ll_n_genes"], reference.n_genes)


def test_tl_out_refuses_the_file_a_backed_input_reads(tiny_path, tiny_adata, tmp_path):
    source = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(source)
    backed = ad.read_h5ad(source, backed="r")
    for tool, kwargs in ((tfs.tl.embed, {}), (tfs.tl.likelihood, {})):
        for same in (source, tmp_path / "." / "cells.h5ad"):
            with pytest.raises(ValueError, match="is the file this AnnData reads its cells from"):
                tool(backed, model=tiny_path, out=same, **kwargs)
    backed.file.close()
    assert ad.read_h5ad(source).shape == tiny_adata.shape  # the input is intact
    # read lazily (no filename for a zarr store): the stores behind the dask arrays count as well
    import dask.array as da
    from anndata.experimental import read_lazy

    dense = tiny_adata.copy()
    dense.X = dense.X.toarray()
    for data, suffix in ((tiny_adata, ".zarr"), (dense, ".zarr"), (tiny_adata, ".h5ad"), (dense, ".h5ad")):
        store = tmp_path / f"lazy_{data is dense}{suffix}"
        data.write_zarr(store) if suffix == ".zarr" else data.write_h5ad(store)
        with pytest.raises(ValueError, match="is the file this AnnData reads its cells from"):
            tfs.tl.embed(read_lazy(store), model=tiny_path, out=store)
        assert (ad.read_zarr(store) if suffix == ".zarr" else ad.read_h5ad(store)).shape == tiny_adata.shape
    from_zarr = ad.AnnData(obs=tiny_adata.obs, var=tiny_adata.var)
    from_zarr.X = da.from_zarr(str(tmp_path / "lazy_True.zarr"), component="X")
    with pytest.raises(ValueError, match="is the file this AnnData reads its cells from"):
        tfs.tl.likelihood(from_zarr, model=tiny_path, out=tmp_path / "lazy_True.zarr")
    tfs.tl.embed(read_lazy(tmp_path / "lazy_True.zarr"), model=tiny_path, out=tmp_path / "elsewhere.zarr")


def test_tl_gene_embeddings_and_likelihood_of_a_soma_experiment(tiny_path, tiny_adata, soma_uri):
    adata = tfs.read_soma(soma_uri, layer="data", var_id="ensembl_id")
    tfs.tl.gene_embeddings(adata, model=tiny_path)
    tfs.tl.gene_embeddings(tiny_adata, model=tiny_path)
    np.testing.assert_allclose(
        adata.varm["X_transcriptformer_genes"], tiny_adata.varm["X_transcriptformer_genes"], atol=1e-6, rtol=0
    )
    np.testing.assert_array_equal(
        adata.var["transcriptformer_genes_n_cells"], tiny_adata.var["transcriptformer_genes_n_cells"]
    )
    tfs.tl.likelihood(adata, model=tiny_path, level="gene")
    tfs.tl.likelihood(tiny_adata, model=tiny_path, level="gene")
    np.testing.assert_allclose(adata.obs["transcriptformer_llh"], tiny_adata.obs["transcriptformer_llh"], atol=1e-6)
    a, b = adata.layers["transcriptformer_count_nll"], tiny_adata.layers["transcriptformer_count_nll"]
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, atol=1e-5, rtol=0)


def test_missing_optional_dependencies_say_what_to_install(monkeypatch):
    from transcriptformer.data.soma import read_soma

    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # as if not installed
    with pytest.raises(ImportError, match=r'tiledbsoma: pip install "transcriptformer-scanpy\[soma\]"'):
        read_soma("any")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    _soma()
    with pytest.raises(ImportError, match=r"read lazily with dask: pip install"):
        read_soma("any")


def test_a_resumed_run_with_a_value_of_another_type_is_refused():
    """10 and 10.0, True and 1, or a key one fingerprint lacks: different runs (their shards' digests differ)."""
    from transcriptformer.inference.shards import _differences

    assert _differences({"a": 10, "b": True}, {"a": 10, "b": True}) == []
    assert _differences({"a": 10}, {"a": 10.0}) == ["a: 10 (this run) vs 10.0 (the folder's)"]
    assert _differences({"b": True}, {"b": 1}) == ["b: true (this run) vs 1 (the folder's)"]
    assert _differences({"a": 1, "c": None}, {"a": 1}) == ["c: present in this run, not in the folder's"]
