"""``transcriptformer download``: published weights and gene tables, datasets, and the bundled demo model."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .._files import give_default_mode
from ..weights import registry
from ..weights.registry import REGISTRY
from ._common import CLIError

__all__ = ["DOWNLOAD_CHOICES", "add_parser", "run"]

#: ``download`` takes every registry name, or ``all``.
DOWNLOAD_CHOICES = (*REGISTRY, "all")


def add_parser(sub: Any) -> None:
    """Add ``download`` to the sub-commands."""
    dl = sub.add_parser(
        "download",
        help="download and unpack model weights",
        description="Download, verify and unpack published TranscriptFormer artifacts into DIR/<name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dl.add_argument(
        "model",
        choices=DOWNLOAD_CHOICES,
        help="'all': the three published models and the gene tables; datasets by name",
    )
    dl.add_argument("--checkpoint-dir", default="./checkpoints", help="folder that receives <name>/ folders")
    dl.add_argument("--force", action="store_true", help="download again even if present")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> list[Path]:
    """Run the ``download`` command."""
    root = Path(args.checkpoint_dir).expanduser()
    published = [e.name for e in registry.ENTRIES if e.kind in ("model", "tables") and e.bundled is None]
    names = published if args.model == "all" else [args.model]
    entries = [REGISTRY[registry.canonical_name(n)] for n in names]
    # before anything is downloaded; a folder that already holds everything asked for may be read-only
    if args.force or not all(_already_in(root, e) for e in entries):
        _check_checkpoint_dir(root)
    folders = []
    for name in names:
        folder = registry.fetch(name, cache_dir=args.checkpoint_dir, progress=not args.no_progress, force=args.force)
        if registry.REGISTRY[registry.canonical_name(name)].bundled is not None:
            folder = _copy_bundled(folder, Path(args.checkpoint_dir).expanduser(), force=args.force)
        print(folder)
        folders.append(folder)
    return folders


def _already_in(root: Path, entry: registry.Entry) -> bool:
    """Whether ``root`` holds the artifact already (then nothing is written: the folder may be read-only)."""
    if entry.bundled is not None:
        return (root / registry.bundled_path(entry).name).exists()
    return registry.is_complete(root / entry.folder)


def _check_checkpoint_dir(root: Path) -> None:
    """``--checkpoint-dir`` is a folder, or can become one, and can be written to (one line naming the flag)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "is a file, not a folder" if existing == root else f"cannot be created: {existing} is a file"
        raise CLIError(
            f"--checkpoint-dir {root} {problem}; pass a folder (new or existing) to receive the <name>/ folders, "
            "e.g. --checkpoint-dir ./checkpoints."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--checkpoint-dir {root}: {existing} is not writable; pass a writable folder.")


def _copy_bundled(source: Path, root: Path, *, force: bool) -> Path:
    """A copy of an artifact that ships with the package in ``root`` (as a download would put it there)."""
    dest = root / source.name
    if dest.exists() and not force:
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=root))  # complete before it takes the name
    try:
        staged = tmp / source.name
        if source.is_dir():  # contents only: the installed package's read-only modes are not copied
            shutil.copytree(source, staged, copy_function=shutil.copyfile)
            for folder in (staged, *(p for p in staged.rglob("*") if p.is_dir())):
                give_default_mode(folder)  # copytree gives folders the source's modes
        else:
            shutil.copyfile(source, staged)
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        staged.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
