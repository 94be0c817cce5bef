"""Run one benchmark configuration in a fresh Python process (clean peak RSS, no state carried over)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_worker(script: str | Path, spec: dict, timeout: float | None = None) -> dict:
    """Run ``script --_worker <spec as JSON>``; return the JSON its last line of output holds.

    The worker imports ``transcriptformer`` from ``spec["src"]`` if given (e.g. an older commit's ``src/``
    exported with ``git archive``), else from this checkout's ``src/``.
    """
    env = dict(os.environ)
    src = spec.get("src") or str(ROOT / "src")
    env["TF_BENCH_SRC"] = src  # bench.py puts it first on sys.path
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec.get('name', '')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
