"""Issue 21, section 1: how much slower is bfloat16 than float32 on a CPU without native bfloat16?

``tfs.tl.embed`` with ``precision="32"`` and ``precision="bf16!"`` (bf16 insisted on, so it runs even where the
engine would fall back to float32), alternating in one process, on

* ``demo``: the bundled ``tf-demo`` model and the first ``--pbmc`` cells (default 60) of
  ``tfs.datasets.pbmc68k_counts()``;
* ``sapiens`` (with ``--sapiens DIR``): one synthetic cell of ``--sapiens-genes`` genes (default 500) on a
  TF-Sapiens-shaped checkpoint.

Reported per configuration: wall and own CPU seconds per call (median of ``--rounds``), the bf16 / fp32 ratios,
the largest difference of the embeddings, ``torch.mm`` rates in both types, the CPU model, its bfloat16 flags,
torch's CPU capability and the engine's decision (:func:`transcriptformer.inference.devices.cpu_bf16_support`),
and the load average before and after.

To measure an AVX2-class CPU on an AVX-512 machine, lower PyTorch's, oneDNN's and MKL's instruction sets::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bf16_slowdown.py

Usage::

    python benchmarks/bf16_slowdown.py --rounds 3 --json benchmarks/out/bf16_slowdown.json
    python benchmarks/bf16_slowdown.py --sapiens benchmarks/out/ckpt_sapiens --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import _jsonable, cpu_model  # noqa: E402


def _mm(dtype, n: int = 1024, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    ts = []
    for _ in range(reps):
        c = time.process_time()
        a @ b
        ts.append(time.process_time() - c)
    return 2 * n**3 / max(statistics.median(ts), 1e-9) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pbmc", type=int, default=60)
    p.add_argument("--sapiens")
    p.add_argument("--sapiens-genes", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import transcriptformer
    import transcriptformer.scanpy as tfs
    from transcriptformer.inference.devices import _cpu_flags, cpu_bf16_support

    support = cpu_bf16_support()
    report: dict = {
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")},
        "bf16_flags": sorted(f for f in _cpu_flags() if "bf16" in f or f.startswith("amx")),
        "decision": {"native": support.native, "reason": support.reason},
        "matmul_gflops_cpu_time": {"float32": _mm(torch.float32), "bfloat16": _mm(torch.bfloat16)},
        "loadavg_before": os.getloadavg(),
        "configs": {},
    }
    configs = {"demo": ("tf-demo", tfs.datasets.pbmc68k_counts()[: a.pbmc].copy())}
    if a.sapiens:
        from padding import make_cells

        loaded = transcriptformer.load_model(a.sapiens)
        configs["sapiens"] = (loaded, make_cells(list(loaded.vocab.genes), [a.sapiens_genes], 0))
    for name, (model, adata) in configs.items():
        loaded = transcriptformer.load_model(model)
        tfs.tl.embed(adata, model=loaded, precision="32", copy=True, progress=False)  # warm-up
        rows: dict[str, list] = {"32": [], "bf16!": []}
        embs = {}
        for r in range(a.rounds):
            for prec in ("32", "bf16!") if r % 2 == 0 else ("bf16!", "32"):
                la = os.getloadavg()[0]
                t, c = time.perf_counter(), time.process_time()
                out = tfs.tl.embed(adata, model=loaded, precision=prec, copy=True, progress=False)
                rows[prec].append(
                    {"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "load": [la, os.getloadavg()[0]]}
                )
                embs[prec] = out.obsm["X_transcriptformer"]
                assert out.uns["transcriptformer"]["params"]["precision"] == prec.rstrip("!")
                print(name, prec, {k: v for k, v in rows[prec][-1].items()}, flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall", "cpu")} for k, v in rows.items()}
        report["configs"][name] = {
            "cells": adata.n_obs,
            "runs": rows,
            "median": med,
            "bf16_over_fp32_wall": med["bf16!"]["wall"] / med["32"]["wall"],
            "bf16_over_fp32_cpu": med["bf16!"]["cpu"] / med["32"]["cpu"],
            "max_abs_diff": float(np.abs(embs["bf16!"] - embs["32"]).max()),
        }
        print(name, json.dumps(_jsonable(report["configs"][name]["median"])), flush=True)
    report["loadavg_after"] = os.getloadavg()
    summary = {
        k: {m: v[m] for m in ("bf16_over_fp32_wall", "bf16_over_fp32_cpu", "max_abs_diff")}
        for k, v in report["configs"].items()
    }
    print(
        json.dumps(
            _jsonable(
                {
                    **{
                        k: report[k]
                        for k in ("cpu_model", "capability", "decision", "bf16_flags", "matmul_gflops_cpu_time")
                    },
                    **summary,
                }
            ),
            indent=1,
        )
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(_jsonable(report), indent=1))


if __name__ == "__main__":
    main()
