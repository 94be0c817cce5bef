"""A/B of several ``src/`` trees of this package, each in fresh processes, interleaved round by round.

Each run starts a new Python with ``PYTHONPATH`` set to one tree's ``src/``, loads a checkpoint, and times
``tfs.tl.embed(..., precision="32", copy=True)`` ``--reps`` times (the first call includes nothing but the run:
the model is loaded before the clock starts). Reported per run: the fastest repetition's wall and CPU time, the
load average, and the first 8 columns of the embeddings (compared across trees). The order of the trees rotates
every round, so that a change of the machine's load does not favour one of them.

Used for the restructure of the package (issue 16): the tree before it (``git worktree add old 2f1ad4f``), the
restructured tree and ``main``, on workload (a)'s medium checkpoint and the TF-Sapiens shape::

    python benchmarks/make_checkpoint.py benchmarks/out/ckpt_medium --preset medium
    python benchmarks/make_checkpoint.py benchmarks/out/ckpt_sapiens --preset sapiens
    python benchmarks/ab_trees.py --tree before=old/src --tree after=src \\
        --workload medium=benchmarks/out/ckpt_medium:cells_medium.h5ad:64:3 \\
        --workload sapiens=benchmarks/out/ckpt_sapiens:sapiens_cells.h5ad:2:2 --threads 1 --rounds 3 --json ab.json

A workload is ``name=checkpoint:cells.h5ad:number_of_cells:repetitions`` (0 cells: all of the file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, os, sys, time
import anndata as ad, torch
import transcriptformer, transcriptformer.scanpy as tfs
ckpt, data, n, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
adata = ad.read_h5ad(data)
if n:
    adata = adata[:n].copy()
t0 = time.perf_counter(); transcriptformer.load_model(ckpt); load = time.perf_counter() - t0
walls, cpus = [], []
for _ in range(reps):
    c0 = time.process_time(); t0 = time.perf_counter()
    out = tfs.tl.embed(adata, model=ckpt, precision="32", copy=True, progress=False)
    walls.append(time.perf_counter() - t0); cpus.append(time.process_time() - c0)
emb = out.obsm["X_transcriptformer"]
print("RESULT", json.dumps({"load": load, "walls": walls, "cpus": cpus, "file": transcriptformer.__file__,
      "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "emb_head": emb[:, :8].tolist()}))
"""


def run(src: str, ckpt: str, data: str, cells: int, reps: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = src
    args = [sys.executable, "-c", WORKER, ckpt, data, str(cells), str(reps), str(threads)]
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(lines[0][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="name=path/to/src (two or more)")
    p.add_argument("--workload", action="append", required=True, help="name=checkpoint:cells.h5ad:cells:reps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    trees = [t.split("=", 1) for t in a.tree]
    workloads = []
    for w in a.workload:
        name, spec = w.split("=", 1)
        ckpt, data, cells, reps = spec.rsplit(":", 3)
        workloads.append((name, ckpt, data, int(cells), int(reps)))
    out = []
    for r in range(a.rounds):
        order = trees[r % len(trees) :] + trees[: r % len(trees)]
        for wname, ckpt, data, cells, reps in workloads:
            for name, src in order:
                res = run(src, ckpt, data, cells, reps, a.threads)
                res.update(round=r, workload=wname, side=name)
                out.append(res)
                print(
                    f"round {r} {wname:12} {name:22} wall {min(res['walls']):7.2f} s "
                    f"cpu {min(res['cpus']):7.2f} s load {res['loadavg'][0]:.1f}",
                    flush=True,
                )
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
