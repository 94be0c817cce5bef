"""Issue 12, section 1: does a batch of cells of very different lengths cost more than the cells alone?

Three synthetic cells of 500, 1,500 and 2,047 expressed genes (default) on a checkpoint of the TF-Sapiens
shape (``make_checkpoint.py DIR --preset sapiens``), all in ONE process, measured interleaved round by round:

* ``one_call``      -- one default ``tfs.tl.embed(adata, model=loaded)`` call with the three cells
  (the engine's cost-model planner, :meth:`transcriptformer.inference.engine.Engine.plan_batches`);
* ``single_calls``  -- three ``tfs.tl.embed`` calls of one cell each; the time is their sum;
* ``one_call_padded`` -- the same single call with the planner of before the cost model: every batch is
  filled greedily up to the token budget and padded to its longest cell (emulated by replacing
  ``transcriptformer.inference.batching._optimal_cuts`` with the greedy rule for that call only).

Reported per round and as medians: seconds of each, the ratios ``one_call / single_calls`` (target
<= 1.15) and ``one_call_padded / single_calls``, the batches each plan makes (cells and width), the
max abs difference of the embeddings between the three, the load average and the CPU time other
processes used during each measurement (the machine is shared).

Usage::

    python benchmarks/make_checkpoint.py benchmarks/out/ckpt_sapiens --preset sapiens
    python benchmarks/padding.py benchmarks/out/ckpt_sapiens --rounds 3 --json benchmarks/out/padding.json
    python benchmarks/padding.py benchmarks/out/ckpt_smoke --genes 20,60,254 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import _jsonable, contention, cpu_snapshot, machine_info  # noqa: E402


def greedy_cuts(widths: np.ndarray, cap: np.ndarray, *_cost) -> list[int]:
    """The planner before the cost model: from the longest cell on, fill each batch to its cell budget."""
    cuts, i, n = [0], 0, len(widths)
    while i < n:
        i = min(n, i + int(cap[i]))
        cuts.append(i)
    return cuts


def make_cells(gene_ids: list[str], n_genes: list[int], seed: int):
    """One cell per entry of ``n_genes`` expressing exactly that many distinct genes, counts 1 + NB(0.6, mean 1.5)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i, k in enumerate(n_genes):
        genes = np.sort(rng.choice(len(gene_ids), size=k, replace=False))
        counts = 1 + rng.negative_binomial(0.6, 0.6 / (0.6 + 1.5), size=k)
        rows += [i] * k
        cols += genes.tolist()
        vals += counts.tolist()
    X = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(len(n_genes), len(gene_ids)))
    obs = pd.DataFrame({"assay": ["10x 3' v3"] * len(n_genes)}, index=[f"cell{k}" for k in n_genes])
    var = pd.DataFrame({"ensembl_id": gene_ids}, index=gene_ids)
    return ad.AnnData(X=X, obs=obs, var=var)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder (e.g. make_checkpoint.py --preset sapiens)")
    p.add_argument("--genes", default="500,1500,2047", help="expressed genes of each cell")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", type=float, default=0.10, help="a round is quiet if other processes used less than this")
    p.add_argument("--json")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import transcriptformer.engine as engine_mod

    import transcriptformer
    import transcriptformer.scanpy as tfs
    from transcriptformer.inference.engine import Engine

    report: dict = {"machine": machine_info(), "args": vars(a), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(_jsonable(report), indent=1))

    t0 = time.perf_counter()
    loaded = transcriptformer.load_model(a.checkpoint)
    report["load_seconds"] = time.perf_counter() - t0
    c = loaded.config.model
    report["shape"] = {
        "E": c.embed_dim,
        "F": c.model_dim,
        "L": c.num_layers,
        "H": c.num_heads,
        "S": loaded.seq_len,
        "V": len(loaded.vocab),
        "parameters": sum(t.numel() for t in loaded.model.parameters()),
    }
    n_genes = [int(x) for x in a.genes.split(",")]
    ids = [g for g in loaded.vocab.genes]
    adata = make_cells(ids, n_genes, a.seed)
    report["cells_genes"] = n_genes

    # the plans, as the engine makes them for the one call (new and greedy)
    eng = Engine(loaded, device="cpu", progress=False)
    lengths = np.asarray(n_genes)
    real = int(np.minimum(lengths + 1, loaded.seq_len).sum())
    plans = {}
    for name, cuts in (("cost_model", engine_mod._optimal_cuts), ("greedy", greedy_cuts)):
        saved, engine_mod._optimal_cuts = engine_mod._optimal_cuts, cuts
        try:
            plan = eng.plan_batches(lengths)
        finally:
            engine_mod._optimal_cuts = saved
        widths = [eng._width(int(lengths[b].max())) for b in plan]
        plans[name] = {
            "batches": [{"cells": [n_genes[i] for i in b], "width": w} for b, w in zip(plan, widths, strict=True)],
            "token_slots": int(sum(len(b) * w for b, w in zip(plan, widths, strict=True))),
            "real_tokens": real,
        }
    report["plans"] = plans
    print(json.dumps(plans), flush=True)

    # warm-up (threads, allocator, first-call costs) on a short cell, not timed
    tfs.tl.embed(make_cells(ids, [50], a.seed + 1), model=loaded, progress=False)

    def one_call() -> tuple[float, np.ndarray]:
        x = adata.copy()
        t = time.perf_counter()
        tfs.tl.embed(x, model=loaded)
        return time.perf_counter() - t, x.obsm["X_transcriptformer"]

    def single_calls() -> tuple[float, np.ndarray, list[float]]:
        parts, embs = [], []
        for i in range(adata.n_obs):
            x = adata[i : i + 1].copy()
            t = time.perf_counter()
            tfs.tl.embed(x, model=loaded)
            parts.append(time.perf_counter() - t)
            embs.append(x.obsm["X_transcriptformer"])
        return sum(parts), np.concatenate(embs), parts

    def one_call_padded() -> tuple[float, np.ndarray]:
        saved, engine_mod._optimal_cuts = engine_mod._optimal_cuts, greedy_cuts
        try:
            return one_call()
        finally:
            engine_mod._optimal_cuts = saved

    runs = report.setdefault("rounds", [])
    embs: dict[str, np.ndarray] = {}
    conditions = [("one_call", one_call), ("single_calls", single_calls), ("one_call_padded", one_call_padded)]
    for r in range(a.rounds):
        entry: dict = {}
        # the order rotates from round to round (A B C, B C A, C A B, ...) so that no condition always
        # follows the same one
        order = conditions[r % 3 :] + conditions[: r % 3]
        entry["order"] = [name for name, _ in order]
        for name, fn in order:
            load_before = os.getloadavg()
            snap = cpu_snapshot()
            out = fn()
            entry[name] = {
                "seconds": out[0],
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "contention": contention(snap, cpu_snapshot()),
            }
            if name == "single_calls":
                entry[name]["parts"] = out[2]
            if name in embs and not np.array_equal(embs[name], out[1]):
                entry[name]["max_abs_vs_round0"] = float(np.abs(embs[name] - out[1]).max())
            embs.setdefault(name, out[1])
            print(f"round {r} {name}: {out[0]:.2f} s (load {load_before[0]:.2f})", file=sys.stderr, flush=True)
        entry["ratio_one_call"] = entry["one_call"]["seconds"] / entry["single_calls"]["seconds"]
        entry["ratio_one_call_padded"] = entry["one_call_padded"]["seconds"] / entry["single_calls"]["seconds"]
        # the process's own CPU time (user + system), less sensitive to other processes than wall time
        own = {k: entry[k]["contention"]["own_cpu_s"] for k in ("one_call", "single_calls", "one_call_padded")}
        entry["cpu_ratio_one_call"] = own["one_call"] / own["single_calls"]
        entry["cpu_ratio_one_call_padded"] = own["one_call_padded"] / own["single_calls"]
        runs.append(entry)
        save()

    def med(key: str) -> float:
        return float(np.median([e[key]["seconds"] for e in runs]))

    ref = embs["single_calls"]

    def quiet(e: dict) -> bool:
        return all(e[k]["contention"]["other_cpu_fraction_of_machine"] < a.quiet for k in e if isinstance(e[k], dict))

    calm = [e for e in runs if quiet(e)]
    report["summary"] = {
        "median_own_cpu_seconds": {
            k: float(np.median([e[k]["contention"]["own_cpu_s"] for e in runs]))
            for k in ("one_call", "single_calls", "one_call_padded")
        },
        "cpu_ratio_one_call_median_of_rounds": float(np.median([e["cpu_ratio_one_call"] for e in runs])),
        "cpu_ratio_one_call_padded_median_of_rounds": float(np.median([e["cpu_ratio_one_call_padded"] for e in runs])),
        "quiet_rounds": len(calm),
        "quiet_threshold_other_cpu_fraction": a.quiet,
        "ratio_one_call_median_of_quiet_rounds": float(np.median([e["ratio_one_call"] for e in calm]))
        if calm
        else None,
        "ratio_one_call_padded_median_of_quiet_rounds": (
            float(np.median([e["ratio_one_call_padded"] for e in calm])) if calm else None
        ),
        "median_seconds": {k: med(k) for k in ("one_call", "single_calls", "one_call_padded")},
        "ratio_one_call_median_of_rounds": float(np.median([e["ratio_one_call"] for e in runs])),
        "ratio_one_call_rounds": [e["ratio_one_call"] for e in runs],
        "ratio_one_call_padded_median_of_rounds": float(np.median([e["ratio_one_call_padded"] for e in runs])),
        "ratio_one_call_padded_rounds": [e["ratio_one_call_padded"] for e in runs],
        "target_1.15_met": float(np.median([e["ratio_one_call"] for e in runs])) <= 1.15,
        "max_abs_one_call_vs_single": float(np.abs(embs["one_call"] - ref).max()),
        "max_abs_padded_vs_single": float(np.abs(embs["one_call_padded"] - ref).max()),
        "max_abs_embedding_value": float(np.abs(ref).max()),
        "max_other_cpu_fraction": max(
            e[k]["contention"]["other_cpu_fraction_of_machine"] for e in runs for k in e if isinstance(e[k], dict)
        ),
    }
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps(_jsonable(report["summary"]), indent=1))


if __name__ == "__main__":
    main()
