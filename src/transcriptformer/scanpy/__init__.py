"""TranscriptFormer for scanpy users.

>>> import transcriptformer.scanpy as tfs
>>> tfs.tl.embed(adata, model="tf-sapiens")  # doctest: +SKIP

The submodules ``pp``, ``tl``, ``pl``, ``datasets`` and ``models`` are imported on first use; none of them
imports torch or scanpy before a model runs or a plot is drawn. :func:`read_soma` opens a SOMA experiment (the
CELLxGENE Census, or one of your own) as an AnnData read window by window, as ``sc.read_h5ad`` opens a file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .. import _meta  # noqa: F401 - the check for a published `transcriptformer` installed over this package

if TYPE_CHECKING:
    from ..data.soma import read_soma
    from . import datasets, models, pl, pp, tl

__all__ = ["datasets", "models", "pl", "pp", "read_soma", "tl"]


def __getattr__(name: str) -> Any:
    if name == "read_soma":  # a reader, at the top level as scanpy's sc.read_h5ad (tiledbsoma imported when called)
        from ..data.soma import read_soma

        return read_soma
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
