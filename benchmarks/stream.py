"""Memory and time scaling of embedding backed h5ad files (CPU): is peak RSS bounded, is time/cell flat?

For each size (default 10k, 50k, 200k cells) a synthetic h5ad is written in chunks
(``synthetic.write_h5ad_chunked``; never held in memory), then embedded in a fresh subprocess from
``anndata.read_h5ad(path, backed="r")`` with either

* ``--mode embed`` (default): ``transcriptformer.scanpy.tl.embed(adata, model=<checkpoint>)``, the
  public API (the embeddings, ``n_obs x E`` float32, are held in memory and written to ``obsm``), or
* ``--mode memmap``: ``Engine.run(..., embeddings_out=np.memmap)`` (nothing of size ``n_obs`` in memory).

Each worker reports its peak RSS (``getrusage``), an RSS trace sampled every 20 ms, the wall time,
and the time of every window of cells (from the timestamps at which the engine asks for windows), so
that flatness of time/cell is visible within a run as well as across sizes.

The model is small (``stream`` preset: E=32, F=64, L=1, H=2, D=16) but has the released sequence
length 2047 and a 20,000-gene vocabulary, so tokenisation, batching and I/O are those of a real run
while the arithmetic stays affordable on a 2-core CPU. ``--scale-genes`` shrinks the number of
expressed genes per cell (default 0.2: median ~300) to make 200k cells finish in minutes; the
data pipeline (reading CSR rows, tokenising, windows) is exercised all the same.

Usage::

    python benchmarks/stream.py --json benchmarks/out/stream.json
    python benchmarks/stream.py --probe 2000        # measure cells/s on 2k cells first
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
sys.path.insert(0, str(HERE))
SRC = Path(os.environ.get("TF_BENCH_SRC") or ROOT / "src")  # a worker of --baseline gets another src/
if SRC.is_dir():
    sys.path.insert(0, str(SRC))

import make_checkpoint as mc  # noqa: E402
import synthetic  # noqa: E402
from _worker import run_worker as _run_worker  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t_start = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t_start, _rss_mb()))
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    import anndata as ad
    from bench import contention, cpu_snapshot

    import transcriptformer

    try:
        from transcriptformer.data import tokenizer as tk
    except ImportError:  # a --baseline src from before the module was renamed
        from transcriptformer import tokenize as tk

    reads: list[tuple[float, int, int]] = []
    snaps: list[tuple[float, float, float]] = []
    orig_read = tk.CellSource.read

    def timed_read(self, start, stop_):
        reads.append((time.perf_counter() - t_start, int(start), int(stop_)))
        snaps.append(cpu_snapshot())
        return orig_read(self, start, stop_)

    tk.CellSource.read = timed_read
    rss_import = _rss_mb()
    loaded = transcriptformer.load_model(spec["checkpoint"])
    rss_model = _rss_mb()
    adata = ad.read_h5ad(spec["data"], backed="r")
    n = adata.n_obs
    t0 = time.perf_counter()
    if spec["mode"] == "embed":
        import transcriptformer.scanpy as tfs

        tfs.tl.embed(adata, model=loaded, device="cpu", progress=False)
        emb = adata.obsm["X_transcriptformer"]
    else:
        from transcriptformer.inference.engine import Engine

        source = tk.prepare_cells(adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
        out = np.lib.format.open_memmap(spec["memmap"], mode="w+", dtype=np.float32, shape=(n, loaded.embed_dim))
        try:
            from transcriptformer.engine import Outputs  # a --baseline src from before head names

            heads = Outputs(embeddings=True)
        except ImportError:
            heads = ("embeddings",)
        Engine(loaded, device="cpu", progress=False).run(source, heads, embeddings_out=out)
        out.flush()
        emb = out
    seconds = time.perf_counter() - t0
    t_end = time.perf_counter() - t_start
    snaps.append(cpu_snapshot())
    # CPU used by other processes while each window was computed (same indexing as per_cell below)
    other = [contention(snaps[k + 1], snaps[k + 2])["other_cpu_fraction_of_machine"] for k in range(len(snaps) - 2)]
    whole = contention(snaps[0], snaps[-1]) if snaps else {}
    stop.set()
    th.join()
    emb_check = {
        "finite": bool(np.isfinite(emb[: min(n, 1000)]).all()),
        "row0_norm": float(np.linalg.norm(emb[0])),
        "last_norm": float(np.linalg.norm(emb[n - 1])),
    }
    # per-window compute time: the engine asks for window k+1 (prefetch) right when it starts computing
    # window k, so request k+2 minus request k+1 is the compute time of window k; the last two windows
    # share the interval from the last request to the end
    t = [r[0] for r in reads] + [t_end]
    cells = [r[2] - r[1] for r in reads]
    per_cell = [(t[k + 2] - t[k + 1]) / cells[k] for k in range(len(reads) - 2)]
    if len(reads) >= 2:
        per_cell.append((t_end - t[-2]) / (cells[-2] + cells[-1]))
    elif reads:
        per_cell.append((t_end - t[0]) / cells[0])
    rss = np.array([s[1] for s in samples]) if samples else np.zeros(1)
    q = len(rss)
    return {
        "cells": n,
        "mode": spec["mode"],
        "seconds": seconds,
        "seconds_per_cell": seconds / n,
        "cells_per_s": n / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss_import,
        "rss_after_model_mb": rss_model,
        "rss_trace_quartiles_mb": [float(rss[min(q - 1, int(f * q))]) for f in (0.1, 0.25, 0.5, 0.75, 0.99)],
        "rss_trace_max_mb": float(rss.max()),
        "rss_trace_argmax_s": float(samples[int(np.argmax(rss))][0]) if samples else 0.0,
        "embed_start_s": t0 - t_start,
        "embed_end_s": t_end,
        "read_times_s": [r[0] for r in reads],
        "windows": len(reads),
        "window_seconds_per_cell": per_cell,
        "window_other_cpu_fraction": other,
        "contention": whole,
        "embeddings_check": emb_check,
        "threads": torch.get_num_threads(),
        "src": str(SRC),
    }


def flatness(per_cell: list[float], other: list[float] | None = None) -> dict:
    """Time/cell over the run: first vs last fifth (windows are in file order), spread, and the same
    over the windows during which other processes used < 5% of the machine."""
    a = np.asarray(per_cell[1:-1] if len(per_cell) > 4 else per_cell)  # first: warm-up; last: two windows
    if len(a) == 0:
        return {}
    if other is not None and len(other) >= len(per_cell):
        o = np.asarray(other[1 : len(per_cell) - 1] if len(per_cell) > 4 else other[: len(per_cell)])
        quiet = a[o < 0.05]
        extra = {
            "windows": len(a),
            "quiet_windows": len(quiet),
            "quiet_median_ms": float(np.median(quiet) * 1e3) if len(quiet) else None,
            "median_ms": float(np.median(a) * 1e3),
            "max_ms": float(a.max() * 1e3),
        }
        if len(quiet) >= 5:
            kq = max(1, len(quiet) // 5)
            extra["quiet_last_over_first"] = float(quiet[-kq:].mean() / quiet[:kq].mean())
    else:
        extra = {"median_ms": float(np.median(a) * 1e3), "max_ms": float(a.max() * 1e3)}
    k = max(1, len(a) // 5)
    return {
        "first_fifth_ms": float(a[:k].mean() * 1e3),
        "last_fifth_ms": float(a[-k:].mean() * 1e3),
        "last_over_first": float(a[-k:].mean() / a[:k].mean()),
        "cv": float(a.std() / a.mean()),
        **extra,
    }


def run_worker(spec: dict) -> dict:
    """Run ``spec`` in a fresh Python process; returns its JSON result."""
    return _run_worker(__file__, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,50000,200000")
    p.add_argument("--probe", type=int, help="only embed this many cells and report cells/s")
    p.add_argument("--mode", choices=["embed", "memmap"], default="embed")
    p.add_argument("--also-memmap-largest", action="store_true", help="also run the largest size with --mode memmap")
    p.add_argument("--scale-genes", type=float, default=0.2)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-data", action="store_true", help="keep the h5ad files (default: delete after use)")
    p.add_argument("--baseline", metavar="REV", help="also run each size with src/ of this git revision, interleaved")
    p.add_argument("--rounds", type=int, default=1, help="runs of each size (and of the baseline), interleaved")
    p.add_argument("--outdir", default=str(OUT_DIR))
    p.add_argument("--json")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print(json.dumps(worker(json.loads(a._worker))))
        return
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    shape = mc.PRESETS["stream"]
    ckpt = mc.ensure_checkpoint(out / "ckpt_stream", shape)
    ids = mc.gene_ids(shape.n_genes)
    profile = synthetic.Profile(scale_genes=a.scale_genes)
    sizes = [a.probe] if a.probe else [int(s) for s in a.sizes.split(",")]
    from bench import baseline_src, git_state, machine_info

    report = {
        "checkpoint": str(ckpt),
        "shape": mc.asdict(shape),
        "scale_genes": a.scale_genes,
        "runs": [],
        "machine": machine_info(),
    }

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))

    for n in sizes:
        data = out / f"stream_{n}_g{a.scale_genes}_s{a.seed}.h5ad"
        if not data.exists():
            print(f"writing {data.name} ...", file=sys.stderr, flush=True)
            stats = synthetic.write_h5ad_chunked(data, n, ids, seed=a.seed, profile=profile, verbose=False)
        else:
            stats = {"file_bytes": data.stat().st_size}
        modes = [a.mode] + (["memmap"] if a.also_memmap_largest and n == max(sizes) and a.mode != "memmap" else [])
        srcs = [None] + ([str(baseline_src(a.baseline, out))] if a.baseline else [])
        for rnd in range(max(1, a.rounds)):
            for mode in modes:
                for src in srcs:
                    label = f"{mode}[{a.baseline}]" if src else mode
                    print(f"embedding {n:,} cells ({label}, round {rnd}) ...", file=sys.stderr, flush=True)
                    spec = {
                        "checkpoint": str(ckpt),
                        "data": str(data),
                        "mode": mode,
                        "threads": a.threads,
                        "memmap": str(out / f"stream_{n}.npy"),
                        "src": src,
                    }
                    r = run_worker(spec)
                    r.update(data=stats, label=label, round=rnd, baseline=a.baseline if src else None)
                    r["flatness"] = flatness(r["window_seconds_per_cell"], r.get("window_other_cpu_fraction"))
                    report["runs"].append(r)
                    save()
                    print(
                        f"  {n:>8,} cells {label:<16} {r['seconds']:8.1f} s  {r['seconds_per_cell'] * 1e3:7.3f} ms/cell"
                        f"  peak RSS {r['peak_rss_mb']:7.0f} MB  windows {r['windows']}  "
                        f"other CPU {r['contention'].get('other_cpu_fraction_of_machine', float('nan')):.2f}",
                        flush=True,
                    )
                    if mode == "memmap":
                        Path(spec["memmap"]).unlink(missing_ok=True)
        if not a.keep_data and not a.probe:
            data.unlink(missing_ok=True)
    report["git_state_at_end"] = git_state()
    save()


if __name__ == "__main__":
    main()
