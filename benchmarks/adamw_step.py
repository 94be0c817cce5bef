"""CPU time of one AdamW step over the weights that full training updates: PyTorch's loop, ``foreach``, ``fused``.

Full training updates every weight but the frozen ESM2 gene vectors (for the ``medium`` checkpoint 9.2 M of its
60 M weights); on the CPU PyTorch's default AdamW loops over them in Python and passes over each several times.
``--all`` updates every weight (as a model whose gene vectors are trained would). Random gradients; one warm-up
step, then the mean of ``--steps`` steps, each implementation twice, alternating.

Usage::

    python benchmarks/make_checkpoint.py benchmarks/out/ckpt_medium --preset medium
    python benchmarks/adamw_step.py benchmarks/out/ckpt_medium --threads 1 --json adamw.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import transcriptformer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--all", action="store_true", help="every weight, the gene vectors too")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    net = copy.deepcopy(transcriptformer.load_model(a.checkpoint).model).requires_grad_(True)
    if not a.all:
        net.gene_embeddings.embedding.weight.requires_grad_(False)  # as training.fit does
    params = [w for w in net.parameters() if w.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for w in params:
        w.grad = torch.randn(w.shape, generator=gen) * 1e-3
    options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    runs = []
    for kind in [*options, *options]:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **options[kind])
        opt.step()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(a.steps):
            opt.step()
        cpu, wall = (time.process_time() - c0) / a.steps, (time.perf_counter() - t0) / a.steps
        runs.append({"kind": kind, "cpu_s_per_step": cpu, "wall_s_per_step": wall, "load": os.getloadavg()[0]})
        print(f"{kind:8} {cpu:.3f} CPU s per step ({wall:.3f} s wall), load {runs[-1]['load']:.1f}", flush=True)
    report = {"weights": sum(w.numel() for w in params), "all": a.all, "threads": a.threads, "runs": runs}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
