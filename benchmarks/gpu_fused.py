"""GPU run 2: does compiling the code around attention (``Engine(fuse=True)``) pay off, and where does time go?

Builds the TF-Sapiens-shape random checkpoint (as ``bench.py`` workload b), embeds synthetic cells in bf16
with flex attention, without and with fusion (cold = with compilation, then warm), measures the deviation
of each from a float32 run, and profiles one warm batch sequence with ``torch.profiler`` (top CUDA kernels).
Writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoint as mc  # noqa: E402
import synthetic  # noqa: E402
from bench import _flops, compare, matmul_rate  # noqa: E402
from transcriptformer.checkpoint import build_model  # noqa: E402
from transcriptformer.engine import Engine  # noqa: E402
from transcriptformer.tokenizer import prepare_cells  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=2048)
    p.add_argument("--fp32-cells", type=int, default=256)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    rep: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}

    def save():
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))

    t0 = time.perf_counter()
    rep["matmul_bf16"] = matmul_rate(*((8192,) * 3 if dev == "cuda" else (256,) * 3), dtype="bfloat16", device=dev)
    shape = mc.PRESETS["smoke_sapiens" if args.smoke else "sapiens"]
    tmp = Path(tempfile.mkdtemp(prefix="tf-sapiens-"))
    mc.make_checkpoint(tmp / "ckpt", shape, device=dev, verify=False)
    loaded = build_model(tmp / "ckpt")
    n = 24 if args.smoke else args.cells
    prof = synthetic.Profile(median_genes=120, small_median=40, min_genes=5) if args.smoke else synthetic.Profile()
    ids = mc.gene_ids(shape.n_genes)
    adata = synthetic.MiniAnnData(
        synthetic.synthetic_counts(n, len(ids), seed=0, profile=prof),
        synthetic.synthetic_obs(n, 0),
        synthetic.synthetic_var(ids),
    )
    source = prepare_cells(adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
    rep["setup_seconds"] = time.perf_counter() - t0
    save()
    ref_rate = rep["matmul_bf16"]["flops_per_s"]
    embs = {}
    for name, fuse in (("bf16_flex", False), ("bf16_flex_fused", True)):
        entry = rep.setdefault(name, {})
        try:
            eng = Engine(loaded, device=dev, precision="bf16", attention="auto", fuse=fuse, progress=False)
            cold = eng.run(source, ("embeddings",))
            res = eng.run(source, ("embeddings",))
            tokens, flops = _flops(res.n_genes, loaded, llh=False)
            entry.update(
                attention=eng.attention,
                fuse=eng.fuse,
                cold_seconds=cold.seconds,
                seconds=res.seconds,
                cells_per_s=n / res.seconds,
                tokens_per_s=tokens / res.seconds,
                flops_per_s=flops / res.seconds,
                fraction_of_bf16_matmul=flops / res.seconds / ref_rate,
            )
            if dev == "cuda":
                entry["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            embs[name] = res.embeddings
        except Exception as e:  # noqa: BLE001 - report and go on
            entry["error"] = f"{type(e).__name__}: {e}"[:3000]
        print(name, entry, flush=True)
        save()
    k = min(args.fp32_cells, n)
    sub = prepare_cells(
        synthetic.MiniAnnData(adata.X[:k], adata.obs.iloc[:k], adata.var),
        loaded.vocab,
        loaded.aux_vocabs,
        seq_len=loaded.seq_len,
    )
    for name, att in (("fp32_chunked", "chunked"), ("fp32_flex", "auto")):
        r = Engine(loaded, device=dev, precision="32", attention=att, fuse=False, progress=False).run(
            sub, ("embeddings",)
        )
        embs[name] = r.embeddings
        rep[name] = {"seconds": r.seconds, "attention": r.stats["attention"], "cells": k}
    rep["fp32_flex_vs_fp32_chunked"] = compare(embs["fp32_flex"], embs["fp32_chunked"])
    for name in ("bf16_flex", "bf16_flex_fused"):
        if name in embs:
            rep[f"{name}_vs_fp32"] = compare(embs[name][:k], embs["fp32_chunked"])
    if "bf16_flex" in embs and "bf16_flex_fused" in embs:
        rep["fused_vs_unfused_bf16"] = compare(embs["bf16_flex_fused"], embs["bf16_flex"])
    save()
    # where the time goes: one warm run of the faster configuration, profiled
    best = max(
        (x for x in ("bf16_flex", "bf16_flex_fused") if "seconds" in rep.get(x, {})),
        key=lambda x: rep[x]["cells_per_s"],
        default=None,
    )
    if best is not None:
        from torch.profiler import ProfilerActivity, profile

        eng = Engine(
            loaded, device=dev, precision="bf16", attention="auto", fuse=best.endswith("fused"), progress=False
        )
        eng.run(sub, ("embeddings",))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            eng.run(sub, ("embeddings",))
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
        rep["profile_config"] = best
        rep["profile_table"] = table
        print(table)
    rep["total_seconds"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
