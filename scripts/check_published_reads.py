"""Check that the published TranscriptFormer reads a checkpoint this package trained and saved.

The demo model ``tf-demo`` that ships with the package was trained with :func:`transcriptformer.train` and
written by :func:`transcriptformer.save_checkpoint`. This script runs the published command line (PyPI
``transcriptformer`` 0.6.1, in its own environment) on that folder and on real cells, computes the same
embeddings with this package, and reports how far apart they are. It needs the published package, so it is
not part of the test suite::

    bash benchmarks/setup_published_venv.sh /tmp/published-venv
    python scripts/check_published_reads.py --published /tmp/published-venv/bin/python

``--published`` also takes a folder to put on ``PYTHONPATH`` (a ``pip install --target`` of the published
wheel) for the current interpreter. ``--checkpoint`` checks another folder (for example one written by
``transcriptformer train``); ``--data`` other cells (default: the 1,000 bundled mouse MERFISH cells).
Exit status 0 when the embeddings agree within ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np


def published_command(published: str) -> tuple[list[str], dict[str, str]]:
    """The command that starts the published CLI, and its environment (this repository's src/ never on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = Path(published)
    if path.is_dir():  # a pip --target folder for this interpreter
        env["PYTHONPATH"] = str(path)
        return [sys.executable, "-c", "from transcriptformer.cli import main; main()"], env
    return [str(path), "-c", "from transcriptformer.cli import main; main()"], env


def run_published(published: str, checkpoint: Path, data: Path, work: Path) -> ad.AnnData:
    cmd, env = published_command(published)
    probe = [
        cmd[0],
        "-c",
        "import importlib.metadata as m, transcriptformer as t; print(m.version('transcriptformer'), t.__file__)",
    ]
    found = subprocess.run(probe, env=env, capture_output=True, text=True).stdout.split()
    if len(found) != 2 or found[0] != "0.6.1" or Path(found[1]).is_relative_to(Path(__file__).resolve().parents[1]):
        raise SystemExit(f"--published does not give the published transcriptformer 0.6.1 (found {found}).")
    cmd += [
        "inference",
        "--checkpoint-path",
        str(checkpoint),
        "--data-file",
        str(data),
        "--output-path",
        str(work),
        "--output-filename",
        "published.h5ad",
        "--batch-size",
        "8",
        "--precision",
        "32",
        "--device",
        "cpu",
        "--disable-compile-block-mask",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"the published CLI failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return ad.read_h5ad(work / "published.h5ad")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", required=True, help="python of the published venv, or a --target folder")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the bundled tf-demo)")
    parser.add_argument("--data", type=Path, help="h5ad of raw counts (default: the bundled mouse MERFISH cells)")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest absolute difference allowed")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)

    import transcriptformer
    import transcriptformer.scanpy as tfs

    checkpoint = args.checkpoint or tfs.models.path("tf-demo")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "mouse_val.h5ad"
            tfs.datasets.mouse_val().write_h5ad(data)
        published = run_published(args.published, checkpoint, data, work)
        ours = ad.read_h5ad(data)
        tfs.tl.embed(ours, model=checkpoint, precision="32", progress=False)
    a, b = np.asarray(published.obsm["embeddings"]), ours.obsm["X_transcriptformer"]
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: published {a.shape}, ours {b.shape}")
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result = {
        "checkpoint": str(checkpoint),
        "data": str(args.data or "tfs.datasets.mouse_val()"),
        "cells": int(a.shape[0]),
        "embed_dim": int(a.shape[1]),
        "max_abs_difference": float(np.abs(a - b).max()),
        "largest_value": float(np.abs(b).max()),
        "min_cosine": float(cos.min()),
        "transcriptformer": transcriptformer.__version__,
        "weights_sha256": ours.uns["transcriptformer"]["params"]["weights_sha256"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["max_abs_difference"] <= args.atol else 1


if __name__ == "__main__":
    raise SystemExit(main())
