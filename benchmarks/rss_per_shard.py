"""Resident memory after every shard of a resumable run, with and without the engine's trimming of the C heap.

A CPU run over many cells frees and allocates batches of changing shapes; glibc keeps what is freed, so without
``transcriptformer.inference.engine.HeapTrim`` (asked by the engine after every window; it trims when the resident
memory has grown by 256 MB since its last trim) the resident memory of a long run grows with the number of cells.
Each variant runs in a fresh process (``no-trim`` makes it a no-op) over the first ``--cells`` cells of a backed
h5ad (or a zarr store, read with ``anndata.experimental.read_lazy``), ``tf-demo`` on the CPU, one thread.

Usage (the cells of ``benchmarks/atlas.py``)::

    python benchmarks/rss_per_shard.py benchmarks/out/atlas/cells_1000000.h5ad --cells 16384 --shard-size 2048
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(path: str, cells: int, shard_size: int, trim: bool) -> dict:
    import anndata as ad
    import pandas as pd
    import torch

    import transcriptformer
    from transcriptformer.inference import engine
    from transcriptformer.inference.options import RunOptions
    from transcriptformer.inference.pipeline import infer_sharded
    from transcriptformer.inference.shards import Destination, OutputSpec, ShardStore

    torch.set_num_threads(1)
    if not trim:
        engine.HeapTrim.__call__ = lambda self: None  # type: ignore[method-assign]

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    loaded = transcriptformer.load_model("tf-demo")
    if path.rstrip("/").endswith(".zarr"):
        adata = ad.experimental.read_lazy(path)[:cells]  # a dask X, as the atlas benchmark reads zarr
    else:
        adata = ad.read_h5ad(path, backed="r")[:cells]
    after_shard: list[float] = []
    write = ShardStore.write

    def spy(self, index, arrays, stats):
        write(self, index, arrays, stats)
        after_shard.append(round(rss_mb(), 1))

    ShardStore.write = spy
    options = RunOptions(device="cpu", progress=False)
    folder = Path(tempfile.mkdtemp())

    def describe(run):
        params = run.params(loaded, options, "embed")
        destinations = (Destination("obsm", "embeddings", "X_transcriptformer"),)
        uns = {"transcriptformer": {"params": params}}
        out = str(folder / "out.zarr")
        return OutputSpec(path=out, destinations=destinations, uns=uns, params_key="transcriptformer")

    t0 = time.perf_counter()
    try:
        infer_sharded(
            adata,
            loaded,
            folder / "shards",
            describe=describe,
            obs=pd.DataFrame(index=pd.Index(adata.obs_names.astype(str))),
            options=options.record(),
            device="cpu",
            progress=False,
            shard_size=shard_size,
            merge=False,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"trim": trim, "cells": cells, "seconds": time.perf_counter() - t0, "rss_mb_after_each_shard": after_shard}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("h5ad")
    p.add_argument("--cells", type=int, default=16384)
    p.add_argument("--shard-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=1, help="each round runs both variants, the order alternating")
    p.add_argument("--json")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print("RESULT", json.dumps(worker(a.h5ad, a.cells, a.shard_size, a._worker == "trim")))
        return
    runs = []
    variants = [v for r in range(a.rounds) for v in (("no-trim", "trim") if r % 2 == 0 else ("trim", "no-trim"))]
    for variant in variants:
        cmd = [sys.executable, __file__, a.h5ad, "--cells", str(a.cells), "--shard-size", str(a.shard_size)]
        out = subprocess.run([*cmd, "--_worker", variant], capture_output=True, text=True, check=True).stdout
        run = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        runs.append(run)
        print(f"{variant:8} {run['seconds']:6.1f} s  RSS after each shard (MB): {run['rss_mb_after_each_shard']}")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
