"""TranscriptFormer single-cell foundation models in plain PyTorch, for the scverse ecosystem.

Most users want :mod:`transcriptformer.scanpy` (``import transcriptformer.scanpy as tfs``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transcriptformer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from ._versions import show_versions, versions
from .checkpoint import LoadedModel, clear_cache, load_model, new_model, save_checkpoint
from .config import TranscriptFormerConfig
from .model import TranscriptFormer
from .training import cell_losses, finetune, train

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
