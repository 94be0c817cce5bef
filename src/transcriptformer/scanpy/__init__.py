"""TranscriptFormer for scanpy users.

>>> import transcriptformer.scanpy as tfs
>>> tfs.tl.embed(adata, model="tf-sapiens")  # doctest: +SKIP

The submodules ``pp``, ``tl``, ``pl``, ``datasets`` and ``models`` are imported on first use; none of them
imports torch or scanpy before a model runs or a plot is drawn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .. import _meta  # noqa: F401 - the check for a published `transcriptformer` installed over this package

if TYPE_CHECKING:
    from . import datasets, models, pl, pp, tl

__all__ = ["datasets", "models", "pl", "pp", "tl"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
