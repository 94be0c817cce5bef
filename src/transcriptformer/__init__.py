"""TranscriptFormer single-cell foundation models in plain PyTorch, for the scverse ecosystem.

Most users want :mod:`transcriptformer.scanpy` (``import transcriptformer.scanpy as tfs``).

Importing the package is cheap: torch, anndata and scanpy are imported when something that needs them is
first used (``transcriptformer.load_model``, ``tfs.tl.embed``, ...), not before.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("transcriptformer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from ._versions import show_versions, versions
    from .checkpoint import LoadedModel, clear_cache, load_model, new_model, save_checkpoint
    from .config import TranscriptFormerConfig
    from .model import TranscriptFormer
    from .training import cell_losses, finetune, train

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "LoadedModel": ".checkpoint",
    "clear_cache": ".checkpoint",
    "load_model": ".checkpoint",
    "new_model": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "cell_losses": ".training",
    "finetune": ".training",
    "train": ".training",
    "TranscriptFormer": ".model",
    "TranscriptFormerConfig": ".config",
    "show_versions": "._versions",
    "versions": "._versions",
}
_SUBMODULES = (
    "checkpoint",
    "cli",
    "config",
    "engine",
    "errors",
    "gene_ids",
    "generate",
    "lora",
    "model",
    "options",
    "registry",
    "scanpy",
    "tokenizer",
    "training",
    "vocab",
)

__all__ = [
    "LoadedModel",
    "TranscriptFormer",
    "TranscriptFormerConfig",
    "__version__",
    "cell_losses",
    "clear_cache",
    "finetune",
    "load_model",
    "new_model",
    "save_checkpoint",
    "show_versions",
    "train",
    "versions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
