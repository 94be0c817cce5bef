"""``transcriptformer finetune`` and ``transcriptformer train``.

``finetune`` takes the flags of the published LoRA example (``--checkpoint-path``, ``--train-files``,
``--lora-r``, ``--lora-alpha``, ``--lora-dropout``, ``--lora-target-modules``, ``--epochs``,
``--batch-size``, ``--dry-run``) plus ``--val-files``, ``--learning-rate``, ``--seed`` and ``--output-dir``;
``train`` trains all weights of an existing checkpoint or of a new model built from gene tables. Both read the
data with inference's flags (``--gene-col-name``, ``--use-raw``, ``--remove-duplicate-genes``,
``--clip-counts``), take ``--adapter`` to start from an adapted model, and ``--dry-run`` makes every check of the
run (through the same preparation) and stops before the first step.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ._common import GENE_COL_HELP, CLIError, add_counts_flags, counts_options, gene_column, init_distributed

logger = logging.getLogger("transcriptformer")


#: Flags of ``train`` that give the shape of a new model (unset: :func:`~transcriptformer.new_model`'s defaults)
NEW_MODEL_FLAGS = {
    "--embed-dim": "residual width (default 256)",
    "--num-layers": "layers (default 4)",
    "--num-heads": "attention heads (default 8)",
    "--model-dim": "feed-forward width (default 4 x embed-dim)",
    "--seq-len": "gene slots per cell (default 2047)",
}


def _new_model_dests() -> list[str]:
    return [flag.removeprefix("--").replace("-", "_") for flag in NEW_MODEL_FLAGS]


def _common(p: argparse.ArgumentParser, *, lr: float, wd: float) -> None:
    p.add_argument("--train-files", nargs="+", required=True, metavar="H5AD", help="training cells (h5ad files)")
    p.add_argument("--val-files", nargs="+", default=None, metavar="H5AD", help="held-out cells, evaluated per epoch")
    p.add_argument("--output-dir", required=True, help="new folder for the result, epoch checkpoints and logs")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training cells")
    p.add_argument("--learning-rate", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=wd, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps with a linear warm-up")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this share of the rate")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--batch-size", type=int, default=None, help="most cells per micro-batch")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per micro-batch")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, dropout, initialisation)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--devices", dest="device", help=argparse.SUPPRESS)  # the published example's spelling
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), 32, bf16, 16")
    p.add_argument(
        "--attention",
        choices=["auto", "dense", "flex", "flex-dynamic"],
        default="auto",
        help="auto: compiled flex_attention on CUDA (needs Triton), dense elsewhere; dense: no compilation",
    )
    p.add_argument("--gene-col-name", type=gene_column, default="ensembl_id", help=GENE_COL_HELP)
    add_counts_flags(p)
    p.add_argument("--clip-counts", type=float, default=30, help="clip counts to this value")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last epoch")
    p.add_argument("--dry-run", action="store_true", help="check the model and the data, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(sub: Any) -> None:
    """Add ``finetune`` and ``train`` to the command line's sub-commands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ft = sub.add_parser(
        "finetune",
        help="LoRA fine-tuning (adapters only)",
        description="Fine-tune a model on h5ad files with LoRA adapters (PEFT format; needs the finetune extra).",
        formatter_class=fmt,
    )
    ft.add_argument("--checkpoint-path", required=True, help="base checkpoint folder or registry name")
    ft.add_argument("--adapter", default=None, help="start from the base with this LoRA adapter (merged)")
    ft.add_argument("--lora-r", type=int, default=4, help="adapter rank")
    ft.add_argument("--lora-alpha", type=float, default=16, help="adapter scale (alpha / r)")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input")
    ft.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=["linear1", "linear2", "linears"],
        help="layers to adapt: linear1/linear2 (feed-forward), linears (Q, K, V, output projections)",
    )
    _common(ft, lr=5e-4, wd=0.0)

    tr = sub.add_parser(
        "train",
        help="train all weights (an existing checkpoint, or a new model)",
        description="Train a TranscriptFormer on h5ad files and save it in the published checkpoint layout.",
        formatter_class=fmt,
    )
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint-path", help="checkpoint folder or registry name to train further")
    source.add_argument("--gene-tables", nargs="+", metavar="H5", help="gene tables (or species names): a new model")
    tr.add_argument("--adapter", default=None, help="with --checkpoint-path: train it with this LoRA adapter merged")
    # the shape of a new model (--gene-tables): unset unless given, so that they can be refused with --checkpoint-path
    tr.add_argument("--assays", nargs="+", default=None, help="new model: assay labels (obs['assay'])")
    for flag, what in NEW_MODEL_FLAGS.items():
        tr.add_argument(flag, type=int, default=argparse.SUPPRESS, help=f"new model: {what}")  # absent unless given
    _common(tr, lr=5.5e-5, wd=0.05)


def _fit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "validation": args.val_files,
        "output_dir": args.output_dir,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio,
        "min_lr_ratio": args.min_lr_ratio,
        "grad_clip": args.grad_clip or None,
        "accumulate": args.accumulate,
        "seed": args.seed,
        "resume": args.resume,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "device": args.device,
        "precision": args.precision,
        "attention": args.attention,
        "gene_key": args.gene_col_name,
        **counts_options(args),
        "clip_counts": args.clip_counts,
        "progress": False if args.no_progress else None,
        "dry_run": args.dry_run,
    }


def _check_files(args: argparse.Namespace) -> None:
    for f in [*args.train_files, *(args.val_files or [])]:
        if Path(f).is_dir():
            raise CLIError(f"data file {f!r} is a folder; pass an .h5ad file.")
        if not Path(f).is_file():
            raise CLIError(f"data file {f!r} does not exist.")


def _dry_run_done() -> None:
    print("dry run: the model, the data and the output folder are ready; nothing was trained.")


def _distributed_device(args: argparse.Namespace) -> None:
    _, world = init_distributed()
    if world > 1 and args.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def run_finetune(args: argparse.Namespace) -> Path | None:
    """Run ``transcriptformer finetune``."""
    from ..training.fit import check_output_dir, finetune
    from ..weights.checkpoint import load_model

    _check_files(args)
    check_output_dir(Path(args.output_dir), args.resume)  # before any model is loaded or cell read
    _distributed_device(args)
    base = load_model(args.checkpoint_path, adapter=args.adapter)
    # --dry-run: the same call, every check of the run, stopped before the first step
    out = finetune(
        list(args.train_files),
        base,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.lora_target_modules),
        **_fit_kwargs(args),
    )
    if args.dry_run:
        _dry_run_done()
        return None
    if args.adapter:  # an adapter trained on an adapted model loads on that adapted model only
        model = f"(({args.checkpoint_path!r}, {args.adapter!r}), {str(out)!r})"
        print(f"wrote a LoRA adapter to {out}, for {args.checkpoint_path} with {args.adapter}; use it as model={model}")
    else:
        print(f"wrote a LoRA adapter to {out}; use it as --checkpoint-path {args.checkpoint_path} --adapter {out}")
    return out


def run_train(args: argparse.Namespace) -> Path | None:
    """Run ``transcriptformer train``."""
    from ..training.fit import check_output_dir, train
    from ..weights.checkpoint import load_model, new_model

    _check_files(args)
    check_output_dir(Path(args.output_dir), args.resume)  # before any model is loaded or cell read
    _distributed_device(args)
    shape = {dest: getattr(args, dest, None) for dest in _new_model_dests()}
    if args.checkpoint_path:
        given = [flag for flag, dest in zip(NEW_MODEL_FLAGS, shape, strict=True) if shape[dest] is not None]
        given += ["--assays"] if args.assays is not None else []
        if given:
            raise CLIError(
                f"{', '.join(given)} describe a new model (with --gene-tables); --checkpoint-path trains the "
                "checkpoint's own architecture and vocabularies. Drop them, or start a new model."
            )
        model = load_model(args.checkpoint_path, adapter=args.adapter)
    else:
        if args.adapter:
            raise CLIError("--adapter applies to a --checkpoint-path; a new model (--gene-tables) has no adapter.")
        model = new_model(
            args.gene_tables,
            assay_vocab=args.assays,
            **{k: v for k, v in shape.items() if v is not None},
            seed=args.seed,
            name=Path(args.output_dir).name,
        )
    out = train(list(args.train_files), model, **_fit_kwargs(args))  # --dry-run: every check, then stops
    if args.dry_run:
        _dry_run_done()
        return None
    print(f"wrote a checkpoint to {out} (training.json: options and losses); use it as --checkpoint-path {out}")
    return out
