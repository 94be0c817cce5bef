"""Start-up costs: import times, ``transcriptformer --help``, and first vs later checkpoint loads.

Every measurement runs in a fresh Python process (what a user pays per script or per job). Wall times are
medians over ``--repeats`` runs; the load times are measured inside the process around
``transcriptformer.load_model`` and, for the whole process, from outside.

Usage::

    python benchmarks/make_checkpoint.py /tmp/sapiens --preset sapiens     # 1.7 GB
    python benchmarks/startup.py --checkpoint /tmp/sapiens --json benchmarks/out/startup.json

The first load runs with an empty ``$TRANSCRIPTFORMER_CACHE`` (a temporary folder), so nothing about the
checkpoint is known yet; the later loads reuse that folder, as a second job on the same machine would.
The file is in the page cache for every load (it was just written, or read by the run before): the numbers
are the process's own work, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LOAD = """
import json, sys, time
t0 = time.perf_counter()
import transcriptformer
t1 = time.perf_counter()
m = transcriptformer.load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "torch_threads": __import__("torch").get_num_threads()}))
"""

IMPORT = """
import json, sys, time
t0 = time.perf_counter()
import {module}
t1 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "torch": "torch" in sys.modules, "scanpy": "scanpy" in sys.modules}}))
"""


SRC = ROOT / "src"


def _env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cache is not None:
        env["TRANSCRIPTFORMER_CACHE"] = str(cache)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str, float]:
    """Wall time, stdout and CPU time (user + system) of a child process.

    The CPU time hardly depends on what else the machine runs, unlike the wall time on a shared machine.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, proc.stdout, cpu


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure_imports(repeats: int) -> dict:
    """Wall time of a bare interpreter, of the imports, and of ``transcriptformer --help`` / ``--version``."""
    env = _env()
    exe = shutil.which("transcriptformer", path=str(Path(sys.executable).parent)) or "transcriptformer"
    out: dict[str, dict] = {}
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import transcriptformer": [sys.executable, "-c", IMPORT.format(module="transcriptformer")],
        "import transcriptformer.scanpy": [sys.executable, "-c", IMPORT.format(module="transcriptformer.scanpy")],
        "transcriptformer --help": [exe, "--help"],
        "transcriptformer --version": [exe, "--version"],
        "transcriptformer inference --help": [exe, "inference", "--help"],
    }
    for name, cmd in cases.items():
        walls, cpus, inner, info = [], [], [], {}
        for _ in range(repeats):
            wall, stdout, cpu = _run(cmd, env)
            walls.append(wall)
            cpus.append(cpu)
            if name.startswith("import"):
                info = json.loads(stdout.strip().splitlines()[-1])
                inner.append(info["import_s"])
        out[name] = {"wall_s": _median(walls), "cpu_s": _median(cpus), "runs": [round(w, 3) for w in walls]}
        if inner:
            out[name].update(import_s=_median(inner), imports_torch=info["torch"], imports_scanpy=info["scanpy"])
    return out


def measure_loads(checkpoint: Path, loads: int) -> list[dict]:
    """``loads`` processes loading ``checkpoint`` one after the other, sharing one fresh cache folder."""
    cache = Path(tempfile.mkdtemp(prefix="tf-startup-cache-"))
    try:
        env = _env(cache)
        rows = []
        for i in range(loads):
            load_avg = os.getloadavg()[0]
            wall, stdout, cpu = _run([sys.executable, "-c", LOAD, str(checkpoint)], env)
            row = json.loads(stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "load": i + 1,
                    "process_wall_s": round(wall, 3),
                    "process_cpu_s": round(cpu, 3),
                    **{k: round(v, 3) for k, v in row.items()},
                    "load_average": round(load_avg, 2),
                }
            )
            print(rows[-1], file=sys.stderr)
        return rows
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    global SRC
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (e.g. made with --preset sapiens)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per import measurement")
    parser.add_argument("--loads", type=int, default=3, help="loads, each in a new process")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--src", type=Path, default=SRC, help="the package's src/ folder to measure (e.g. an old one)")
    args = parser.parse_args()
    SRC = args.src.resolve()
    result: dict = {"src": str(SRC), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    result["imports"] = measure_imports(args.repeats)
    result["load_average_before"] = round(os.getloadavg()[0], 2)
    for name, row in result["imports"].items():
        print(
            f"{name:40s} {row['wall_s']:.3f} s (cpu {row['cpu_s']:.3f} s) {row.get('imports_torch', '')}",
            file=sys.stderr,
        )
    if args.checkpoint:
        size = (args.checkpoint / "model_weights.pt").stat().st_size
        result["checkpoint"] = {"path": str(args.checkpoint), "weights_bytes": size}
        result["loads"] = measure_loads(args.checkpoint, args.loads)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
