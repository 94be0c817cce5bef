"""Atlas-scale inputs on the CPU: the same synthetic cells as a backed h5ad, a zarr store and a SOMA experiment.

For each size (default 100,000 and 1,000,000 cells) the cells are written once as an h5ad file
(``synthetic.write_h5ad_chunked``, over the human genes of ``tf-demo``'s vocabulary, so every cell matches
the model), copied chunk by chunk into a zarr store (anndata's layout, CSR), and ingested into a SOMA
experiment (``tiledbsoma.io.from_h5ad``, X layer ``"raw"``). The smaller files are the first cells of the
larger ones. Then, each in a fresh process (peak RSS from ``getrusage``):

* ``read``: open the input the way the package streams it (``anndata.read_h5ad(backed="r")``,
  ``anndata.experimental.read_lazy`` for zarr, ``transcriptformer.data.soma.read_soma``) and read and tokenise
  every cell, window by window, for tf-demo (the data path of a run, without the model);
* ``embed``: the resumable sharded run (``transcriptformer.inference.pipeline.infer_sharded``) of tf-demo on
  the CPU over the first ``--embed-cells`` cells, merged into a zarr store; the three formats' embeddings are
  compared.

Usage::

    nice -n 19 python benchmarks/atlas.py --json benchmarks/results/cpu-atlas/atlas.json
    python benchmarks/atlas.py --sizes 20000 --embed-cells 2000        # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out" / "atlas"
sys.path.insert(0, str(HERE))
SRC = Path(os.environ.get("TF_BENCH_SRC") or ROOT / "src")
if SRC.is_dir():
    sys.path.insert(0, str(SRC))

import synthetic  # noqa: E402
from _worker import run_worker as _run_worker  # noqa: E402

FORMATS = ("h5ad", "zarr", "soma")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``): ``getrusage``'s ``ru_maxrss`` keeps the parent's peak across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def human_genes() -> list[str]:
    import transcriptformer

    loaded = transcriptformer.load_model("tf-demo")
    return [g for g in loaded.vocab.genes if g.startswith("ENSG")]


def h5ad_to_zarr(h5ad: Path, store: Path, block: int = 1 << 24) -> None:
    """Copy an h5ad file (CSR X) into a zarr store of anndata's layout, ``block`` values at a time."""
    import anndata as ad
    import h5py
    import zarr

    try:
        from anndata.io import read_elem, write_elem
    except ImportError:
        from anndata.experimental import read_elem, write_elem

    shutil.rmtree(store, ignore_errors=True)
    root = zarr.open_group(str(store), mode="w", zarr_format=2)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    with h5py.File(h5ad, "r") as f:
        write_elem(root, "obs", read_elem(f["obs"]))
        write_elem(root, "var", read_elem(f["var"]))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(root, key, {})
        src = f["X"]
        X = root.create_group("X")
        X.attrs.update({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in src.attrs.items()})
        for name in ("data", "indices", "indptr"):
            ds = src[name]
            out = X.create_array(name, shape=ds.shape, dtype=ds.dtype, chunks=(min(max(ds.shape[0], 1), 1 << 20),))
            for s in range(0, ds.shape[0], block):
                out[s : s + block] = ds[s : s + block]
    zarr.consolidate_metadata(str(store))
    ad.experimental.read_lazy(str(store))  # readable


def make_data(outdir: Path, sizes: list[int], scale: float, seed: int) -> dict:
    """The h5ad, zarr and SOMA copies of the cells for every size (kept between runs)."""
    import tiledbsoma.io

    ids = human_genes()
    profile = synthetic.Profile(scale_genes=scale)
    full = max(sizes)
    out: dict = {}
    for n in sizes:
        h5ad = outdir / f"cells_{n}.h5ad"
        stats_file = outdir / f"cells_{n}.json"
        if not stats_file.exists():
            t0 = time.perf_counter()
            print(f"writing {n:,} cells ...", file=sys.stderr, flush=True)
            stats = synthetic.write_h5ad_chunked(h5ad, full, ids, seed=seed, profile=profile, verbose=False, head=n)
            t1 = time.perf_counter()
            h5ad_to_zarr(h5ad, outdir / f"cells_{n}.zarr")
            t2 = time.perf_counter()
            soma = outdir / f"cells_{n}.soma"
            shutil.rmtree(soma, ignore_errors=True)
            tiledbsoma.io.from_h5ad(str(soma), str(h5ad), measurement_name="RNA", X_layer_name="raw")
            t3 = time.perf_counter()
            stats.update(
                h5ad_write_s=t1 - t0,
                zarr_write_s=t2 - t1,
                soma_ingest_s=t3 - t2,
                bytes={fmt: _size(outdir / f"cells_{n}.{fmt}") for fmt in FORMATS},
            )
            stats_file.write_text(json.dumps(stats, indent=1))
        out[n] = json.loads(stats_file.read_text())
    return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _open(fmt: str, path: str, n: int | None):
    import anndata as ad

    if fmt == "h5ad":
        adata = ad.read_h5ad(path, backed="r")
        return adata if n is None else adata[:n]
    if fmt == "zarr":
        adata = ad.experimental.read_lazy(path)
        return adata if n is None else adata[:n]
    from transcriptformer.data.soma import read_soma

    return read_soma(
        path, layer="raw", var_id="ensembl_id", obs_filter=None if n is None else f"soma_joinid < {int(n)}"
    )


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from bench import contention, cpu_snapshot

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_mb())
            stop.wait(0.05)

    threading.Thread(target=sample, daemon=True).start()
    import transcriptformer
    from transcriptformer.data.tokenizer import TokenizeOptions

    loaded = transcriptformer.load_model("tf-demo")
    rss_model = _rss_mb()
    load0 = os.getloadavg()
    snap0 = cpu_snapshot()
    t0 = time.perf_counter()
    adata = _open(spec["format"], spec["path"], spec.get("cells"))
    rss_open = _rss_mb()
    t_open = time.perf_counter() - t0
    n = adata.n_obs
    out: dict = {}
    if spec["mode"] == "read":
        source = loaded.cells(adata, TokenizeOptions())
        tokens = 0
        for s in range(0, n, 4096):
            w = source.read(s, min(s + 4096, n))
            tokens += int(w.lengths.sum())
        out["tokens"] = tokens
    else:
        import pandas as pd

        from transcriptformer.inference.options import RunOptions
        from transcriptformer.inference.pipeline import infer_sharded
        from transcriptformer.inference.shards import Destination, OutputSpec

        options = RunOptions(device="cpu", progress=False)

        def describe(run):
            params = run.params(loaded, options, "embed")
            return OutputSpec(
                path=spec["output"],
                destinations=(Destination("obsm", "embeddings", "X_transcriptformer"),),
                uns={"transcriptformer": {"params": params}},
                params_key="transcriptformer",
            )

        from transcriptformer.inference.shards import ShardStore

        write, shards = ShardStore.write, []

        def traced(self, index, arrays, stats):  # the memory after every shard, to compare early and late
            write(self, index, arrays, stats)
            shards.append(
                {
                    "shard": int(index),
                    "seconds": time.perf_counter() - t0,
                    "rss_mb": _rss_mb(),
                    "peak_rss_mb": _peak_rss_mb(),
                }
            )
            with open(str(spec["output"]) + ".trace.jsonl", "a") as f:  # readable while the run goes on
                f.write(json.dumps(shards[-1]) + "\n")

        ShardStore.write = traced  # type: ignore[method-assign]
        out["after_each_shard"] = shards
        shutil.rmtree(spec["shards"], ignore_errors=True)
        run = infer_sharded(
            adata,
            loaded,
            spec["shards"],
            describe=describe,
            obs=pd.DataFrame(index=pd.Index(adata.obs_names.astype(str))),
            options=options.record(),
            device="cpu",
            progress=False,
        )
        out["output"] = str(run.output)
        out["tokens"] = int(run.source.n_obs)
    seconds = time.perf_counter() - t0
    snap1 = cpu_snapshot()
    stop.set()
    return {
        **spec,
        **out,
        "n_obs": n,
        "seconds": seconds,
        "open_seconds": t_open,
        "cells_per_s": n / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_model_mb": rss_model,
        "rss_after_open_mb": rss_open,
        "rss_trace_max_mb": max(samples, default=0.0),
        "load_before": load0,
        "load_after": os.getloadavg(),
        "contention": contention(snap0, snap1),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="cells of the read runs (each a separate copy)")
    p.add_argument("--embed-cells", type=int, default=10000, help="cells of the tf-demo runs (0: none)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--scale-genes", type=float, default=0.1, help="synthetic.Profile.scale_genes")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default=str(OUT_DIR))
    p.add_argument("--json")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print(json.dumps(worker(json.loads(a._worker))))
        return
    from bench import machine_info

    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    formats = [f for f in a.formats.split(",") if f]
    report: dict = {"machine": machine_info(), "scale_genes": a.scale_genes, "runs": [], "nice": os.nice(0)}

    def save() -> None:
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(report, indent=1, default=str))

    report["data"] = make_data(outdir, sizes, a.scale_genes, a.seed)
    save()
    for n in sizes:
        for fmt in formats:
            spec = {"mode": "read", "format": fmt, "path": str(outdir / f"cells_{n}.{fmt}"), "threads": a.threads}
            r = _run_worker(__file__, spec)
            report["runs"].append(r)
            save()
            print(
                f"read  {fmt:5} {n:>9,} cells {r['seconds']:7.1f} s {r['cells_per_s']:9.0f} cells/s "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  load {r['load_before'][0]:.1f}",
                flush=True,
            )
    if a.embed_cells:
        outputs = {}
        for fmt in formats:
            spec = {
                "mode": "embed",
                "format": fmt,
                "path": str(outdir / f"cells_{sizes[0]}.{fmt}"),
                "cells": a.embed_cells,
                "shards": str(outdir / f"embed_{fmt}.shards"),
                "output": str(outdir / f"embed_{fmt}.zarr"),
                "threads": a.threads,
            }
            r = _run_worker(__file__, spec)
            report["runs"].append(r)
            outputs[fmt] = r["output"]
            save()
            print(
                f"embed {fmt:5} {a.embed_cells:>9,} cells {r['seconds']:7.1f} s {r['cells_per_s']:9.1f} cells/s "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  load {r['load_before'][0]:.1f}",
                flush=True,
            )
        import anndata as ad

        embs = {f: ad.read_zarr(o).obsm["X_transcriptformer"] for f, o in outputs.items()}
        first = embs[formats[0]]
        report["embeddings_max_abs_diff"] = {f: float(np.abs(e - first).max()) for f, e in embs.items()}
        save()
        print("max abs difference of the embeddings to", formats[0], report["embeddings_max_abs_diff"])


if __name__ == "__main__":
    main()
