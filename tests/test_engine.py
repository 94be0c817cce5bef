"""Inference (inference/devices.py, batching.py, outputs.py, engine.py): order, batching, streaming, out-of-memory
retries, devices and precisions, heads, non-finite results, progress, torch.distributed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anndata as ad
import h5py
import numpy as np
import pytest
import torch

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, error_line, flex_unavailable, infer_args, run_cli, snapshot
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.inference.devices import resolve_device, resolve_precision
from transcriptformer.inference.engine import Engine
from transcriptformer.inference.options import RunOptions


@pytest.fixture(scope="module")
def big_adata():
    """105 cells: the tiny data five times, rows shuffled, so windows and batches mix lengths."""
    reps = ad.concat([tfs.datasets.tiny_human()] * 5, index_unique="-", merge="same")
    perm = np.random.default_rng(1).permutation(reps.n_obs)
    return reps[perm].copy()


@pytest.fixture(scope="module")
def one_at_a_time(tiny_model, big_adata):
    src = prepare_cells(big_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    return Engine(tiny_model, batch_size=1, window=1).run(src, ("embeddings", "llh", "cge"))


def _src(tiny_model, adata):
    return prepare_cells(adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())


# --- batching and order ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 7, "window": 16},
        {"max_tokens": 300, "window": 1000},
        {"max_tokens": 10**6, "window": 33},
        {"batch_size": 1000, "max_tokens": 10**6, "window": 105},
    ],
)
def test_batching_strategies_are_exact_and_keep_input_order(tiny_model, big_adata, one_at_a_time, settings):
    res = Engine(tiny_model, **settings).run(_src(tiny_model, big_adata), ("embeddings", "llh", "cge"))
    np.testing.assert_allclose(res.embeddings, one_at_a_time.embeddings, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.llh, one_at_a_time.llh, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(res.genes["cell"], one_at_a_time.genes["cell"])
    np.testing.assert_array_equal(res.genes["token"], one_at_a_time.genes["token"])
    # unpooled hidden states reach |x| ~ 3: a few float32 ulps of that is 1e-6
    np.testing.assert_allclose(res.genes["cge"], one_at_a_time.genes["cge"], atol=2e-6, rtol=0)
    assert np.all(np.diff(res.genes["cell"]) >= 0)


def test_plan_batches_sorts_by_length_under_budget(tiny_model):
    eng = Engine(tiny_model, max_tokens=100)
    lengths = np.array([5, 60, 3, 62, 30, 0, 62])
    batches = eng.plan_batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        width = min(int(lengths[b].max()) + 1, 63)
        assert len(b) == 1 or len(b) * width <= 100
    firsts = [int(lengths[b].max()) for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_plan_batches_splits_where_padding_costs_more_than_a_batch(tiny_model):
    """The cost model: few cells of very different lengths run apart, many similar cells share a batch."""
    import dataclasses

    planner = Engine(tiny_model, max_tokens=10**6).planner()
    # a batch costs as much as 10 tokens: three cells of very different lengths run separately
    costly = dataclasses.replace(planner, overhead=10 * planner.per_token)
    assert [len(b) for b in costly.plan(np.array([5, 62, 30]))] == [1, 1, 1]
    # similar lengths (3 padded tokens in all): one batch
    assert len(costly.plan(np.array([60, 61, 62, 62]))) == 1
    # with the real (CPU) overhead the tiny model's batches are cheap to pad: one batch
    assert len(planner.plan(np.array([5, 62, 30]))) == 1


def test_out_of_memory_halves_and_retries_without_losing_cells(tiny_model, big_adata, one_at_a_time, monkeypatch):
    """Simulated memory budget: a batch holding more than 40 tokens raises torch.OutOfMemoryError."""
    original = Engine._forward
    seen = []

    def budgeted(self, window, idx, *args, **kwargs):
        width = self.planner().width(int(window.lengths[idx].max()))
        seen.append(len(idx))
        if len(idx) > 1 and len(idx) * width > 40:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(self, window, idx, *args, **kwargs)

    monkeypatch.setattr(Engine, "_forward", budgeted)
    eng = Engine(tiny_model, max_tokens=4000)
    res = eng.run(_src(tiny_model, big_adata), ("embeddings", "llh"))
    assert res.stats["oom_retries"] > 0 and res.stats["max_tokens"] < 4000
    assert eng.max_tokens == 4000  # the engine's own settings do not change; the next run starts afresh
    np.testing.assert_allclose(res.embeddings, one_at_a_time.embeddings, atol=1e-6)
    np.testing.assert_allclose(res.llh, one_at_a_time.llh, atol=1e-6)


def test_out_of_memory_on_a_single_cell_is_raised(tiny_model, tiny_adata, monkeypatch):
    def always(self, *a, **k):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(Engine, "_forward", always)
    with pytest.raises(torch.OutOfMemoryError):
        Engine(tiny_model).run(_src(tiny_model, tiny_adata), ("embeddings",))


@pytest.mark.parametrize("sink", ["memmap", "h5py"])
def test_streaming_backed_input_to_disk_output(tiny_model, big_adata, one_at_a_time, tmp_path, sink):
    path = tmp_path / "cells.h5ad"
    big_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    if sink == "memmap":
        out = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float32, shape=(backed.n_obs, 32))
    else:
        f = h5py.File(tmp_path / "emb.h5", "w")
        out = f.create_dataset("emb", shape=(backed.n_obs, 32), dtype="f4")
    res = Engine(tiny_model, window=10).run(_src(tiny_model, backed), ("embeddings",), embeddings_out=out)
    assert res.embeddings is out
    np.testing.assert_allclose(np.asarray(out[:]), one_at_a_time.embeddings, atol=1e-6)
    if sink == "h5py":
        f.close()
    backed.file.close()


def test_background_reader_overlaps_windows(tiny_model, big_adata, monkeypatch):
    """The next window is read on another thread while the current one is computed."""
    import threading

    from transcriptformer.data.tokenizer import CellSource

    threads = set()
    original = CellSource.read

    def spy(self, start, stop):
        threads.add(threading.current_thread().name)
        return original(self, start, stop)

    monkeypatch.setattr(CellSource, "read", spy)
    Engine(tiny_model, window=10).run(_src(tiny_model, big_adata), ("embeddings",))
    assert threads and all(t.startswith("transcriptformer-reader") for t in threads)


def test_freed_memory_goes_back_to_the_system_once_it_piles_up(tiny_model, big_adata, monkeypatch):
    """On the CPU a long run trims the C heap when its resident memory has grown by the slack since the last trim
    (glibc keeps freed memory: RSS grew by ~80 MB per 16,384 cells of tf-demo); never more often (trimming after
    every window cost 10% of the time)."""
    from transcriptformer.inference import engine as engine_module

    trims, rss = [], iter([100, 150, 90, 395, 200, 300, 460, 470])
    heap = engine_module.HeapTrim(256, trim=trims.append, rss=lambda: next(rss))
    for _ in range(6):
        heap()
    # floor 100; 150 within the slack; 90 lowers the floor; 395 > 90 + 256: trim, floor 200 (after the trim);
    # 300 within; 460 > 456: trim
    assert trims == [0, 0] and heap.trims == 2
    real = engine_module.HeapTrim(-1, rss=lambda: 0)  # the C library's trim, wherever it has one (glibc here)
    real(), real()
    assert real.trims == (0 if engine_module._malloc_trim() is None else 1)
    calls = []

    class Counting(engine_module.HeapTrim):
        def __call__(self):
            calls.append(1)

    monkeypatch.setattr(engine_module, "HeapTrim", Counting)
    Engine(tiny_model, window=10).run(_src(tiny_model, big_adata), ("embeddings",))
    assert len(calls) == -(-big_adata.n_obs // 10)  # asked once per window of 10 cells


# --- devices, precisions, kernels -----------------------------------------------------------------------------------


def test_device_and_precision_resolution(monkeypatch):
    from transcriptformer.inference import devices

    # a CPU with native bfloat16 (elsewhere bf16 runs as float32: tests/test_performance.py)
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: devices.CpuBf16Support(True, "AVX512", "test"))
    cuda = torch.cuda.is_available()
    assert resolve_device("auto").type == ("cuda" if cuda else "cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("16-mixed", torch.device("cpu")) == "bf16"  # as Lightning does on CPU
    assert resolve_precision("16-mixed", torch.device("cuda")) == "16"
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("64", torch.device("cpu"))


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


def test_bf16_on_cpu_is_close_to_fp32(tiny_path, tiny_adata, reference):
    out = tfs.tl.embed(tiny_adata, model=tiny_path, precision="bf16", copy=True)
    ref = reference["cell"].obsm["embeddings"]
    emb = out.obsm["X_transcriptformer"]
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999
    assert np.abs(emb - ref).max() < 1e-2


def test_flex_failure_falls_back_to_chunked(tiny_model, tiny_adata, reference, monkeypatch, caplog):
    import transcriptformer.model as model_module

    def broken(*args, **kwargs):
        raise RuntimeError("compiled kernel failed for this shape")

    monkeypatch.setattr(model_module.FlexAttention, "__call__", broken)
    eng = Engine(tiny_model, attention="flex")
    with caplog.at_level("WARNING", logger="transcriptformer"):
        res = eng.run(_src(tiny_model, tiny_adata), ("embeddings",))
    assert "continuing with chunked attention" in caplog.text
    assert res.stats["attention"] == "chunked" and "flex failed" in res.stats["attention_fallback"]
    assert eng.attention == "flex"  # decided for that run only, and recorded in its stats
    np.testing.assert_allclose(res.embeddings, reference["cell"].obsm["embeddings"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["flex", "flex-dynamic"])
def test_compiled_flex_matches_references(tiny_model, tiny_adata, reference, attention):
    """Compiled flex_attention (CPU inductor here; the CUDA path in tests/test_gpu.py): same numbers.

    Skips only when the flex kernel itself cannot compile on this platform (probed up front, outside the
    engine); if it can, an engine that falls back to another kernel, or raises, fails the test.
    """
    why = flex_unavailable(attention, "cpu", tiny_model)
    if why is not None:
        pytest.skip(f"{attention} cannot compile on this platform ({why})")
    res = Engine(tiny_model, attention=attention, batch_size=8).run(_src(tiny_model, tiny_adata), ("embeddings", "llh"))
    assert res.stats["attention"] == attention, (
        f"the engine fell back to {res.stats['attention']} although {attention} compiles here: "
        f"{res.stats.get('attention_fallback')}"
    )
    np.testing.assert_allclose(res.embeddings, reference["cell"].obsm["embeddings"], atol=1e-5)
    np.testing.assert_allclose(res.llh, reference["llh"].obsm["llh"].ravel(), atol=1e-5)


# --- heads and outputs ----------------------------------------------------------------------------------------------


def test_heads_run_only_when_requested(tiny_model, tiny_adata, monkeypatch):
    calls = {"mu": 0, "gene": 0, "widths": []}
    model = tiny_model.model
    h1 = model.mu.register_forward_hook(lambda *a: calls.__setitem__("mu", calls["mu"] + 1))
    h2 = model.gene_id_head.register_forward_hook(lambda *a: calls.__setitem__("gene", calls["gene"] + 1))
    original = type(model).encode

    def spy(self, tokens, *args, **kwargs):
        calls["widths"].append(tokens.shape[1])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(model), "encode", spy)
    src = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    try:
        eng = Engine(tiny_model, batch_size=4)
        eng.run(src, ("embeddings",))
        assert calls["mu"] == 0 and calls["gene"] == 0
        widths = list(calls["widths"])
        eng.run(src, ("embeddings", "llh"))
        assert calls["mu"] > 0 and calls["gene"] == 0
        eng.run(src, ("gene_llh",))
        assert calls["gene"] > 0
    finally:
        h1.remove()
        h2.remove()
    # batches are trimmed to their longest cell (+1 slot for the position after the last gene)
    w = src.read(0, 21)
    plan = eng.plan_batches(w.lengths)
    assert widths == [min(int(w.lengths[b].max()) + 1, 63) for b in plan]


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


# --- progress -------------------------------------------------------------------------------------------------------


def test_progress_bar(tiny_path, tiny_adata, capsys):
    tfs.tl.embed(tiny_adata, model=tiny_path, progress=True)
    assert "cell" in capsys.readouterr().err


def _slow_batches(monkeypatch, seconds: float) -> None:
    """Every batch of the engine takes at least ``seconds`` (a long run, made on purpose)."""
    import time

    original = Engine._forward

    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_forward", slow)


def test_a_run_shows_a_progress_bar_once_it_has_taken_the_delay(tiny_path, tiny_adata, capsys, monkeypatch):
    from transcriptformer.inference import engine

    tfs.tl.embed(tiny_adata, model=tiny_path, batch_size=4)  # a quick run: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(engine, "PROGRESS_DELAY_S", 0.2)
    _slow_batches(monkeypatch, 0.1)  # 6 batches of 4 cells: 0.6 s, past the delay
    tfs.tl.embed(tiny_adata, model=tiny_path, batch_size=4)
    err = capsys.readouterr().err
    assert "TranscriptFormer (tf_tiny)" in err and "21/21" in err and "cell" in err, err
    tfs.tl.embed(tiny_adata, model=tiny_path, batch_size=4, progress=False)  # never, however long
    assert capsys.readouterr().err == ""


# --- several processes ----------------------------------------------------------------------------------------------


DIST_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch.distributed as dist
    import transcriptformer.scanpy as tfs
    import anndata as ad
    dist.init_process_group("gloo")
    adata = ad.read_h5ad(sys.argv[1])
    tfs.tl.embed(adata, model=tfs.models.path("tf-tiny"), llh=True, batch_size=4)
    assert adata.uns["transcriptformer"]["params"]["device"] == "cpu"
    result = np.c_[adata.obsm["X_transcriptformer"], adata.obs["transcriptformer_llh"]]
    np.save(f"{sys.argv[2]}.rank{dist.get_rank()}.npy", result)
    dist.destroy_process_group()
    """
)


def _torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_distributed_two_processes_gloo_python_api(tmp_path, big_adata, one_at_a_time):
    big_adata.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "job.py").write_text(DIST_SCRIPT)
    _torchrun(tmp_path / "job.py", tmp_path / "cells.h5ad", tmp_path / "out", cwd=tmp_path)
    for rank in (0, 1):
        got = np.load(tmp_path / f"out.rank{rank}.npy")
        np.testing.assert_allclose(got[:, :32], one_at_a_time.embeddings, atol=1e-6)
        np.testing.assert_allclose(got[:, 32], one_at_a_time.llh, atol=1e-6)


@pytest.mark.slow
def test_distributed_two_processes_gloo_cli(tmp_path, tiny_path, big_adata, one_at_a_time):
    big_adata.write_h5ad(tmp_path / "cells.h5ad")
    _torchrun(
        "-m",
        "transcriptformer.cli",
        "inference",
        "--checkpoint-path",
        tiny_path,
        "--data-file",
        tmp_path / "cells.h5ad",
        "--output-path",
        tmp_path / "out",
        "--llh",
        "--no-progress",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    out = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    assert out.n_obs == big_adata.n_obs
    np.testing.assert_allclose(out.obsm["embeddings"], one_at_a_time.embeddings, atol=1e-6)
    np.testing.assert_allclose(out.uns["llh"]["llh"], one_at_a_time.llh, atol=1e-6)
    np.testing.assert_array_equal(out.obs["cell_type"].astype(str), big_adata.obs["cell_type"].astype(str))
