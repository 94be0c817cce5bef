"""The published checkpoint layout: a folder with ``config.json``, ``model_weights.pt`` and ``vocabs/``.

``vocabs/`` holds ``<column>_vocab.json`` per auxiliary column and the ESM2 gene tables named in
``data_config.esm2_mappings``. This module checks a folder against that layout (without reading the weights);
:mod:`.checkpoint` loads it and :mod:`.registry` checks every download with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._files import read_json
from ..config import TranscriptFormerConfig

__all__ = ["CONFIG_FILE", "VOCAB_DIR", "WEIGHTS_FILE", "check_folder", "check_layout", "confined", "read_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model_weights.pt"
VOCAB_DIR = "vocabs"


def read_config(path: Path) -> TranscriptFormerConfig:
    config_path = path / CONFIG_FILE
    fix = "Restore it from the checkpoint's download (`transcriptformer download ... --force`)."
    raw = read_json(config_path, "the checkpoint's config", fix)
    try:
        return TranscriptFormerConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None


def check_layout(path: Path, config: TranscriptFormerConfig | None = None) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint folder {str(path)!r} does not exist. Pass a folder in the published layout "
            "(config.json, model_weights.pt, vocabs/) or a registry name such as 'tf-sapiens'."
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} is a file, not a folder. Pass the folder holding config.json, "
            "model_weights.pt and vocabs/ (or a registry name such as 'tf-sapiens')."
        )
    if (path / "adapter_config.json").is_file() and not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"{str(path)!r} is a LoRA adapter folder, not a checkpoint: pass the model it was trained on with it, "
            f"model=(base, {str(path)!r}) (or load_model(base, adapter=...))."
        )
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_DIR) if not (path / n).exists()]
    if config is not None:
        missing += [f"{VOCAB_DIR}/{f}" for f in config.data.esm2_mappings if not (path / VOCAB_DIR / f).is_file()]
        missing += [
            f"{VOCAB_DIR}/{c}_vocab.json"
            for c in config.data.aux_cols
            if not (path / VOCAB_DIR / f"{c}_vocab.json").is_file()
        ]
    if missing:
        raise FileNotFoundError(
            f"checkpoint folder {str(path)!r} is incomplete: missing {', '.join(missing)}. "
            "Download it again (`transcriptformer download ...`) or check the path."
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is not a file; the checkpoint folder is damaged.")


def confined(path: Path, rel: str, what: str) -> Path:
    """``path / VOCAB_DIR / rel``, refusing names that leave the checkpoint folder (absolute, ``..``, links)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or rel.startswith(("/", "\\", "~")):
        raise ValueError(
            f"{path / CONFIG_FILE}: {what} {rel!r} is not a file name inside {VOCAB_DIR}/; a checkpoint may only "
            "name files in its own folder."
        )
    target = path / VOCAB_DIR / rel
    root = path.resolve()
    if target.exists() and not target.resolve().is_relative_to(root):
        raise ValueError(
            f"{target} is a link to {target.resolve()}, outside the checkpoint folder; a checkpoint may only read "
            "files in its own folder (copy the file in instead of linking it)."
        )
    return target


def check_folder(path: str | os.PathLike, config: TranscriptFormerConfig | None = None) -> TranscriptFormerConfig:
    """Check that ``path`` is a checkpoint folder in the published layout; return its config.

    ``config.json`` must parse, ``model_weights.pt`` and every table ``config.json`` names must be there,
    and every name in ``esm2_mappings`` and ``aux_cols`` must stay inside the folder (no absolute or ``..``
    paths, no links out).

    Raises
    ------
    FileNotFoundError
        The folder or a file is missing.
    ValueError
        ``config.json`` is damaged, or names a file outside the folder.
    """
    path = Path(path)
    check_layout(path)
    config = config or read_config(path)
    for f in config.data.esm2_mappings:
        confined(path, f, "esm2_mappings entry")
    for c in config.data.aux_cols:
        confined(path, f"{c}_vocab.json", "aux_cols entry")
    check_layout(path, config)
    return config
