"""What the command line's sub-commands share: user errors, strict value parsers, atomic output, torchrun."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import parse_bool

__all__ = [
    "GENE_COL_HELP",
    "VAR_NAMES",
    "CLIError",
    "add_counts_flags",
    "counts_options",
    "gene_column",
    "init_distributed",
    "write_atomic",
]


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def _parse_value(text: str) -> Any:
    """The published override parsing: true/false/none/null and plain integers convert, the rest is a string.

    Numbers with a decimal point or exponent become floats here (the published tool kept them as strings).
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _bool_or_auto(text: str) -> bool | None:
    low = text.strip().lower()
    if low in ("auto", "none", "null"):
        return None
    try:
        return parse_bool(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected True, False or auto, got {text!r}") from None


def add_counts_flags(parser: Any) -> None:
    """``--use-raw`` and ``--remove-duplicate-genes``: where the counts come from, and duplicate gene ids."""
    parser.add_argument(
        "--use-raw",
        type=_bool_or_auto,
        default="auto",
        metavar="{True,False,auto}",
        help="counts from .raw (True), from X (False), or .raw if present (auto)",
    )
    parser.add_argument("--remove-duplicate-genes", action="store_true", help="keep the first of duplicate gene ids")


def counts_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options of :func:`add_counts_flags`' flags (``layer``, ``duplicate_genes``)."""
    return {
        "layer": {True: "raw", False: "X", None: None}[args.use_raw],
        "duplicate_genes": "first" if args.remove_duplicate_genes else "raise",
    }


# -- strict parsers of --config-override values: each returns the value or raises ValueError(what it expects)


def _as_bool(text: str) -> bool:
    return parse_bool(text)


def _as_positive_int(text: str) -> int | None:
    value = _parse_value(text)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer (or null), got {text!r}")
    return value


def _as_number(minimum: float, *, zero_ok: bool = False) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        value = _parse_value(text)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number (or null), got {text!r}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        if value < minimum or (value == minimum and not zero_ok):
            raise ValueError(f"expected a number {'>=' if zero_ok else '>'} {minimum:g}, got {text!r}")
        return float(value)

    return parse


def _as_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices and value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value if value in choices else value.lower()

    return parse


def _as_text(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


def _as_text_or_none(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null") else _as_text(text)


#: ``--gene-col-name`` value that reads the gene ids from ``var_names`` (the API's ``gene_key=None``)
VAR_NAMES = "var_names"
GENE_COL_HELP = f"var column with Ensembl gene ids, or {VAR_NAMES!r} for the var index"


def gene_column(text: str) -> str | None:
    """The ``gene_key`` of a ``--gene-col-name`` value: ``var_names`` (or none/null) means the var index."""
    return None if text.strip() == VAR_NAMES else _as_text_or_none(text)


def _as_use_raw(text: str) -> bool | None:
    try:
        return _bool_or_auto(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


#: ``--config-override`` keys this command implements: the argument they set and how their value is parsed.


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def temporary_beside(path: Path) -> str:
    """A new empty file next to ``path`` with the permissions a plain ``open(path, "w")`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".h5ad.tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
    return tmp


def write_atomic(adata, path: Path) -> None:
    tmp = temporary_beside(path)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The command line's flag for each run option (for messages of the shared validation).
