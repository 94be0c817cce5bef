"""TranscriptFormer single-cell foundation models in plain PyTorch, for the scverse ecosystem.

Most users want :mod:`transcriptformer.scanpy` (``import transcriptformer.scanpy as tfs``).

Importing the package is cheap: torch, anndata and scanpy are imported when something that needs them is
first used (``transcriptformer.load_model``, ``tfs.tl.embed``, ...), not before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._meta import __version__

if TYPE_CHECKING:
    from ._meta import show_versions, versions
    from .config import TranscriptFormerConfig
    from .model import TranscriptFormer
    from .training.fit import finetune, train
    from .training.objective import cell_losses
    from .weights.checkpoint import clear_cache, load_model, new_model, save_checkpoint
    from .weights.loaded import LoadedModel

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "LoadedModel": ".weights.loaded",
    "clear_cache": ".weights.checkpoint",
    "load_model": ".weights.checkpoint",
    "new_model": ".weights.checkpoint",
    "save_checkpoint": ".weights.checkpoint",
    "cell_losses": ".training.objective",
    "finetune": ".training.fit",
    "train": ".training.fit",
    "TranscriptFormer": ".model",
    "TranscriptFormerConfig": ".config",
    "show_versions": "._meta",
    "versions": "._meta",
}
#: The sub-packages, bottom layer first (each imports only from those before it).
_SUBMODULES = ("config", "vocab", "errors", "model", "data", "weights", "inference", "training", "scanpy", "cli")

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
