"""Start-up costs, each in a fresh process: ``import transcriptformer``, ``import transcriptformer.scanpy``, and
``transcriptformer.load_model(DIR)`` split into its parts (gene tables, ``torch.load``, sha256 of the weights,
building the module, ``load_state_dict``), then the first ``Engine`` on the CPU.

Usage::

    python benchmarks/startup_parts.py benchmarks/out/ckpt_sapiens --reps 3 --json benchmarks/out/startup.json

Times are wall seconds of each part; the load average before and after every process is recorded. The first
process may also pay for reading the files from disk into the page cache (its ``cold`` flag says which run
was first); later ones read them from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
what = sys.argv[1]
out = {}
if what == "import":
    import transcriptformer
    out["import_transcriptformer"] = time.perf_counter() - t0
    t = time.perf_counter()
    import transcriptformer.scanpy
    out["import_transcriptformer_scanpy_after"] = time.perf_counter() - t
    out["torch_imported"] = "torch" in sys.modules
    out["scanpy_imported"] = "scanpy" in sys.modules
elif what == "import_scanpy_first":
    import transcriptformer.scanpy
    out["import_transcriptformer_scanpy"] = time.perf_counter() - t0
else:
    import torch
    import transcriptformer
    import transcriptformer.checkpoint as ck
    out["imports"] = time.perf_counter() - t0
    parts = {}
    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return wrapper
    ck.read_gene_tables = timed("read_gene_tables", ck.read_gene_tables)
    ck.sha256_file = timed("sha256_weights", ck.sha256_file)
    ck.TranscriptFormer = timed("build_module", ck.TranscriptFormer)
    torch.load = timed("torch_load", torch.load)
    torch.nn.Module.load_state_dict = timed("load_state_dict", torch.nn.Module.load_state_dict)
    t = time.perf_counter()
    loaded = transcriptformer.load_model(what)
    out["load_model"] = time.perf_counter() - t
    out["load_model_parts"] = parts
    from transcriptformer.inference.engine import Engine
    t = time.perf_counter()
    Engine(loaded, device="cpu", progress=False)
    out["first_engine_cpu"] = time.perf_counter() - t
print("STARTUP " + json.dumps(out))
"""


def child(arg: str, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    la = os.getloadavg()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t
    line = next(x for x in p.stdout.splitlines() if x.startswith("STARTUP "))
    return {"process_wall": wall, "loadavg_before": la, "loadavg_after": os.getloadavg(), **json.loads(line[8:])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--src", default=str(ROOT / "src"))
    p.add_argument("--json")
    a = p.parse_args(argv)
    rep: dict = {"checkpoint": str(Path(a.checkpoint).resolve()), "src": a.src, "runs": {}}
    size = sum(f.stat().st_size for f in Path(a.checkpoint).rglob("*") if f.is_file())
    rep["checkpoint_bytes"] = size
    for r in range(a.reps):
        for what in ("import", "import_scanpy_first", str(Path(a.checkpoint).resolve())):
            key = "load" if what not in ("import", "import_scanpy_first") else what
            res = child(what, a.src)
            res["cold"] = r == 0
            rep["runs"].setdefault(key, []).append(res)
            print(key, json.dumps(res), file=sys.stderr, flush=True)
    summ = {}
    for key, runs in rep["runs"].items():
        for field in ("import_transcriptformer", "import_transcriptformer_scanpy", "load_model", "first_engine_cpu"):
            vals = [x[field] for x in runs if field in x]
            if vals:
                summ[f"{field}_median"] = float(np.median(vals))
        if key == "load":
            for part in runs[0]["load_model_parts"]:
                summ[f"load_part_{part}_median"] = float(np.median([x["load_model_parts"][part] for x in runs]))
    rep["summary"] = summ
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
