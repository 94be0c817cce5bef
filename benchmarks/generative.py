"""Benchmarks of the generative and training side: generation with and without the key/value cache,
training throughput, and the memory of per-gene embeddings streamed from a backed file.

Each measurement runs in a fresh process (``_worker.run_worker``) so peak RSS is its own. Results go to
a JSON file and a table on stdout. Nothing is extrapolated: every figure is a wall-clock measurement of
the stated work.

Usage::

    python benchmarks/generative.py generation --json benchmarks/results/cpu/generation.json
    python benchmarks/generative.py training --json benchmarks/results/cpu/training.json
    python benchmarks/generative.py gene-memory --json benchmarks/results/cpu/gene_memory.json
    python benchmarks/generative.py all --smoke        # tiny sizes, to check the script runs

Checkpoints are made with ``make_checkpoint.py`` under ``benchmarks/out/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402


def _machine() -> dict:
    import torch
    from bench import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def _checkpoint(preset: str) -> Path:
    path = OUT / f"ckpt_{preset}"
    if not (path / "model_weights.pt").exists():
        import subprocess

        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(path), "--preset", preset], check=True)
    return path


def _matmul_rate(n: int = 2048, dtype="float32", clock=time.perf_counter) -> float:
    """FLOP/s of an n x n float32 matrix product on this process's threads (best of 5; wall or CPU ``clock``)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(5):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


# -- workers ---------------------------------------------------------------------------------------


def worker_generation(spec: dict) -> dict:
    import torch

    import transcriptformer
    from transcriptformer.inference.generation import sample_cells

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    loaded = transcriptformer.load_model(spec["checkpoint"])
    sample_cells(loaded, 2, max_genes=8, seed=0, use_cache=spec["cached"])  # warm up
    t = time.perf_counter()
    cells = sample_cells(
        loaded,
        spec["n_cells"],
        max_genes=spec["max_genes"],
        seed=spec.get("seed", 1),
        use_cache=spec["cached"],
        batch_size=spec["batch"],
    )
    seconds = time.perf_counter() - t
    return {
        **spec,
        "seconds": seconds,
        "cells_per_s": spec["n_cells"] / seconds,
        "genes_per_s": float(cells.lengths.sum()) / seconds,
        "mean_genes": float(cells.lengths.mean()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_training(spec: dict) -> dict:
    import shutil
    import tempfile

    import numpy as np
    import torch
    from synthetic import Profile, synthetic_adata

    import transcriptformer

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    loaded = transcriptformer.load_model(spec["checkpoint"])
    adata = synthetic_adata(spec["n_cells"], list(loaded.vocab.genes), profile=Profile(scale_genes=spec["scale_genes"]))
    out = Path(tempfile.mkdtemp()) / "run"
    try:
        kwargs = {"epochs": 1, "max_tokens": spec["max_tokens"], "progress": False, "seed": 0}
        c0 = time.process_time()
        if spec["kind"] == "finetune":
            transcriptformer.finetune(adata, loaded, output_dir=out, **kwargs)
        else:
            transcriptformer.train(loaded, adata, output_dir=out, **kwargs)
        cpu = time.process_time() - c0
        record = json.loads((out / "training.json").read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rate = _matmul_rate()
    cpu_rate = _matmul_rate(clock=time.process_time)
    genes = np.diff(adata.X.indptr)
    # the work the objective needs beyond estimate_flops (which fit.py counts, x3 for forward and backward): the
    # gene-identity head (E x Hg, Hg x V), the count head and the targets' gene MLP, also x3
    c = loaded.config.model
    E, Hg, V = c.embed_dim, c.gene_head_hidden_dim, len(loaded.vocab)
    D = loaded.model.gene_embeddings.embedding.weight.shape[1]
    tokens = float(record["tokens_per_s"] * record["seconds"])
    extra = 3 * 2 * tokens * (E * Hg + Hg * V + E * E + D * E + E * E)
    counted = record["train_flops_per_s"] * record["seconds"]
    if record.get("train_flops_counted") == "objective":  # newer records count the heads too
        full, counted = counted, counted - extra
    else:
        full = counted + extra
    return {
        **spec,
        "src": os.environ.get("TF_BENCH_SRC"),
        "seconds": record["seconds"],
        "cpu_seconds": cpu,
        "tokens_per_s": record["tokens_per_s"],
        "cells_per_s": spec["n_cells"] / record["seconds"],
        "train_flops_per_s": record["train_flops_per_s"],
        "matmul_flops_per_s": rate,
        "fraction_of_matmul": record["train_flops_per_s"] / rate,
        "full_flops": full,
        "full_fraction_of_matmul": full / record["seconds"] / rate,
        "matmul_flops_per_cpu_s": cpu_rate,
        "fraction_of_matmul_cpu_time": counted / cpu / cpu_rate,
        "full_fraction_of_matmul_cpu_time": full / cpu / cpu_rate,
        "median_genes": float(np.median(np.minimum(genes, loaded.seq_len))),
        "steps": record["steps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_gene_memory(spec: dict) -> dict:
    import anndata as ad
    from synthetic import Profile, write_h5ad_chunked

    import transcriptformer
    import transcriptformer.scanpy as tfs

    loaded = transcriptformer.load_model(spec["checkpoint"])
    path = OUT / f"gene_memory_cells_{spec['n_cells']}_{Path(spec['checkpoint']).name}.h5ad"
    if not path.exists():
        write_h5ad_chunked(
            path, spec["n_cells"], list(loaded.vocab.genes), profile=Profile(scale_genes=0.2), verbose=False
        )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backed = ad.read_h5ad(path, backed="r")
    t = time.perf_counter()
    tfs.tl.gene_embeddings(backed, loaded, progress=False)
    seconds = time.perf_counter() - t
    n_genes = int((backed.var["X_transcriptformer_genes_n_cells"] > 0).sum())
    backed.file.close()
    return {
        **spec,
        "seconds": seconds,
        "ms_per_cell": 1000 * seconds / spec["n_cells"],
        "genes_with_embedding": n_genes,
        "rss_before_mb": before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


WORKERS = {"generation": worker_generation, "training": worker_training, "gene-memory": worker_gene_memory}


# -- drivers ---------------------------------------------------------------------------------------


def specs(kind: str, smoke: bool) -> list[dict]:
    if kind == "generation":
        ckpt = str(_checkpoint("smoke" if smoke else "medium"))
        lengths = (32, 255) if smoke else (255, 2047)
        out = []
        for n in lengths:
            out.append(
                {"kind": "generation", "checkpoint": ckpt, "cached": True, "max_genes": n, "n_cells": 8, "batch": 8}
            )
            if n <= 255:
                out.append(
                    {
                        "kind": "generation",
                        "checkpoint": ckpt,
                        "cached": False,
                        "max_genes": n,
                        "n_cells": 8,
                        "batch": 8,
                    }
                )
            else:
                # without the cache every step re-reads the prefix: one cell for the long case, run both ways with the
                # same seed and batch, so the two runs sample the same cell (compare their mean_genes)
                for cached in (True, False):
                    out.append(
                        {
                            "kind": "generation",
                            "checkpoint": ckpt,
                            "cached": cached,
                            "max_genes": n,
                            "n_cells": 1,
                            "batch": 1,
                            "seed": 2,  # seed 1 samples [END] after 348 genes; seed 2 runs to 2,047
                        }
                    )
        return out
    if kind == "training":
        ckpt = str(_checkpoint("smoke" if smoke else "medium"))
        n = 16 if smoke else 64
        return [
            {"kind": k, "checkpoint": ckpt, "n_cells": n, "scale_genes": 0.33, "max_tokens": 4096}
            for k in ("train", "finetune")
        ]
    if kind == "gene-memory":
        ckpt = str(_checkpoint("smoke" if smoke else "stream"))
        sizes = (1000, 4000) if smoke else (10_000, 100_000)
        return [{"kind": "gene-memory", "checkpoint": ckpt, "n_cells": n} for n in sizes]
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=[*WORKERS, "all"], default="all")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads in every worker")
    parser.add_argument("--baseline-src", help="also run every configuration with this src/ (interleaved)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["worker"]](spec)))
        return
    results = {"machine": _machine(), "runs": []}
    for what in WORKERS if args.what == "all" else [args.what]:
        todo = []
        for spec in specs(what, args.smoke):
            spec["worker"] = what
            if args.threads:
                spec["threads"] = args.threads
            todo.append(spec)
            if args.baseline_src:
                todo.append({**spec, "src": str(Path(args.baseline_src).resolve())})
        for r in range(args.rounds):
            for spec in todo if r % 2 == 0 else todo[::-1]:
                load_before = os.getloadavg()[0]
                result = run_worker(__file__, {**spec, "round": r})
                result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()[0]
                results["runs"].append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("checkpoint",)}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
