"""Is reading cells the bottleneck? Cells/s of ``CellSource.read`` on a backed h5ad, with 1, 2 and 4 threads.

The engine reads and tokenises the next window of cells (4,096) on one background thread while the model
runs on the current one, so reading costs nothing as long as one thread reads faster than the model embeds.
This measures how fast that is, and whether more reader threads (what the published tool's
``--n-data-workers`` would suggest) read faster: each round reads every window of the file serially, then
with a pool of 2 and of 4 threads (windows in parallel), the configurations interleaved round by round.

Cells come from ``synthetic.write_h5ad_chunked`` (realistic lengths: median ~1,450 expressed genes,
CSR ``X``) over a 20,000-gene vocabulary with the released sequence length (2,047; ``stream`` preset);
compare the cells/s with what the model embeds per second (``RESULTS.md``: TF-Sapiens shape on an H200,
339 cells/s fused, 135 with the chunked kernel).

Usage::

    python benchmarks/reader_threads.py --cells 16384 --rounds 3 --json benchmarks/out/reader_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_checkpoint as mc  # noqa: E402
import synthetic as syn  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--out", type=Path, default=HERE / "out" / "reader_threads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import anndata as ad

    from transcriptformer.data.tokenizer import prepare_cells
    from transcriptformer.weights.checkpoint import load_model

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "ckpt_stream"
    if not (ckpt / "config.json").exists():
        mc.main([str(ckpt), "--preset", "stream"])
    loaded = load_model(ckpt)
    h5 = args.out / f"cells_{args.cells}.h5ad"
    if not h5.exists():
        genes = list(loaded.vocab.genes)
        syn.write_h5ad_chunked(h5, args.cells, genes, verbose=False)
    adata = ad.read_h5ad(h5, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic assay labels the model does not know
        source = prepare_cells(adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
    bounds = [(s, min(s + args.window, args.cells)) for s in range(0, args.cells, args.window)]

    def read_all(threads: int) -> float:
        t = time.perf_counter()
        if threads == 1:
            for b in bounds:
                source.read(*b)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda b: source.read(*b), bounds))
        return args.cells / (time.perf_counter() - t)

    results: dict[str, list[float]] = {"1": [], "2": [], "4": []}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for threads in results:
            results[threads].append(read_all(int(threads)))
    load.append(os.getloadavg()[0])
    report = {
        "cells": args.cells,
        "window": args.window,
        "cpus": os.cpu_count(),
        "load_average_before_after": load,
        "cells_per_s": results,
        "median_cells_per_s": {k: sorted(v)[len(v) // 2] for k, v in results.items()},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
