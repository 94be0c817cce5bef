#!/usr/bin/env python
r"""The published TranscriptFormer README's LoRA example, run by this package.

The published README fine-tunes with::

    python finetune_lora.py \
      --checkpoint-path ./checkpoints/tf_sapiens \
      --train-files path/to/train.h5ad \
      --lora-r 4 --lora-alpha 16 --lora-dropout 0.0 \
      --lora-target-modules linear1 linear2 linears

This script is that command's entry point here: it runs ``transcriptformer finetune`` (see ``docs/cli.md``) and,
like the published example, trains and saves only the LoRA adapter. It takes the published script's flags:

``--checkpoint-path``, ``--train-files``, ``--lora-r``, ``--lora-alpha``, ``--lora-dropout``,
``--lora-target-modules``, ``--epochs``, ``--batch-size``, ``--dry-run``
    As ``transcriptformer finetune`` takes them.
``--output-path FILE`` (default ``lora_weights.pt``, in the current folder, as published)
    The adapter's tensors in one file (``torch.save`` of a name -> tensor dict; the names are PEFT's). The
    adapter folder that this package loads (``--adapter`` on the command line, ``load_model(base,
    adapter=...)``) is written beside it, named as the file without its suffix (``lora_weights/``), unless
    ``--output-dir`` names it. A path without a suffix names the folder, and no single file is written.
``--devices``
    ``cpu`` or ``0``: the CPU; ``1``: one CUDA GPU; any other name (``auto``, ``cuda:1``, ``mps``) is the
    device. Unset, the device is chosen as everywhere in this package (``auto``: a CUDA GPU if there is one;
    the published script defaults to the CPU). A number above 1 runs on one GPU and logs that several GPUs
    need ``torchrun --nproc-per-node N finetune_lora.py ...``.
``--precision``
    Passed on when given (``16-mixed``, ``bf16-mixed``, ``32``, ...); unset, ``auto`` (float32 on CPU,
    bfloat16 on CUDA) instead of the published script's ``16-mixed``.

Every other flag of ``transcriptformer finetune`` (``--val-files``, ``--learning-rate``, ``--seed``, ...) is
passed on as it is. ``-v`` logs progress.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("transcriptformer")

#: The published script's default output file, in the current folder.
DEFAULT_OUTPUT = "lora_weights.pt"


def build_parser() -> argparse.ArgumentParser:
    """The published example's flags; anything else is passed on to ``transcriptformer finetune``."""
    p = argparse.ArgumentParser(
        prog="finetune_lora.py",
        description=(
            "LoRA fine-tuning as in the published TranscriptFormer README's example: runs `transcriptformer "
            "finetune` and saves only the adapter. Other flags of `transcriptformer finetune` are passed on."
        ),
    )
    p.add_argument("--checkpoint-path", required=True, help="base checkpoint folder or registry name")
    p.add_argument("--train-files", nargs="+", required=True, metavar="H5AD", help="training cells (h5ad files)")
    p.add_argument(
        "--output-path",
        default=DEFAULT_OUTPUT,
        help=f"the adapter's tensors in one file (default: {DEFAULT_OUTPUT}, in the current folder); a path without "
        "a suffix names the adapter folder instead",
    )
    p.add_argument("--output-dir", default=None, help="the adapter folder (default: --output-path without its suffix)")
    p.add_argument("--batch-size", type=int, default=None, help="most cells per micro-batch (default: a token budget)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training cells (default: 1)")
    p.add_argument("--devices", default=None, help="cpu or 0 (CPU), 1 (one GPU), or a device name (default: auto)")
    p.add_argument("--precision", default=None, help="16-mixed, bf16-mixed, 32, ... (default: auto)")
    p.add_argument("--lora-r", type=int, default=4, help="adapter rank (default: 4)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale, alpha / r (default: 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    p.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=["linear1", "linear2", "linears"],
        help="layers to adapt (default: linear1 linear2 linears)",
    )
    p.add_argument("--dry-run", action="store_true", help="check the model and the data, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def _device(devices: str) -> str:
    """The ``--device`` of ``transcriptformer finetune`` for the published script's ``--devices``."""
    text = devices.strip().lower()
    if text in ("cpu", "0"):
        return "cpu"
    if text.isdigit():
        if int(text) > 1:
            logger.warning(
                "--devices %s: this script runs on one GPU; for %s GPUs run it under torchrun "
                "(torchrun --nproc-per-node %s finetune_lora.py ...).",
                text,
                text,
                text,
            )
        return "cuda"
    return devices


def outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The adapter folder and the single file (``None`` when ``--output-path`` has no suffix)."""
    path = Path(args.output_path).expanduser()
    file = path if path.suffix else None
    folder = Path(args.output_dir).expanduser() if args.output_dir else path.with_suffix("") if file else path
    if file is not None and file.resolve() == folder.resolve():
        raise SystemExit(f"finetune_lora.py: error: --output-path and --output-dir are the same path ({file}).")
    return folder, file


def finetune_argv(args: argparse.Namespace, folder: Path, extra: Sequence[str]) -> list[str]:
    """The ``transcriptformer finetune`` command line for the parsed flags."""
    argv = ["finetune", "--checkpoint-path", args.checkpoint_path, "--train-files", *args.train_files]
    argv += ["--output-dir", str(folder), "--epochs", str(args.epochs)]
    argv += ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    argv += ["--lora-dropout", str(args.lora_dropout)]
    argv += ["--lora-target-modules", *args.lora_target_modules]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if args.devices is not None:
        argv += ["--device", _device(args.devices)]
    if args.precision is not None:
        argv += ["--precision", args.precision]
    if args.dry_run:
        argv.append("--dry-run")
    return [*(["-v"] if args.verbose else []), *argv, *extra]


def write_weights_file(folder: Path, file: Path) -> None:
    """The adapter's tensors from ``folder`` saved to ``file`` in one piece (written under a temporary name)."""
    import torch
    from safetensors.torch import load_file

    from transcriptformer.weights.adapter import WEIGHTS_FILE

    tensors = load_file(folder / WEIGHTS_FILE)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the published example's command line; returns the exit status (as ``transcriptformer`` does)."""
    args, extra = build_parser().parse_known_args(argv)
    folder, file = outputs(args)
    if folder.is_dir() and any(folder.iterdir()) and "--resume" not in extra and not args.dry_run:
        print(
            f"finetune_lora.py: error: {folder} holds an earlier run (kept); pass another --output-path (or "
            "--output-dir), or --resume to continue it.",
            file=sys.stderr,
        )
        return 1
    from transcriptformer.cli import main as cli_main

    code = cli_main(finetune_argv(args, folder, extra))
    if code != 0 or args.dry_run or int(os.environ.get("RANK", "0")) != 0:
        return code
    if file is not None:
        write_weights_file(folder, file)
    print(f"LoRA adapter: {folder}/" + (f" (its tensors in one file: {file})" if file is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
