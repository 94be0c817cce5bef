"""Models (``tfs.models``): what can be used as ``model=``, downloaded once, verified and cached.

The published TranscriptFormer weights (``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"``) are downloaded on
first use; two small models ship with the package: ``"tf-demo"`` (trained here on real human and mouse cells,
for tutorials) and ``"tf-tiny"`` (random weights, for examples and tests). Any of these names, or a checkpoint
folder, is accepted wherever ``model=`` is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..weights import registry

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["available", "download", "path"]


def available(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """What the registry offers (models, gene tables, datasets) and what is already cached.

    Returns
    -------
    pandas.DataFrame
        One row per name: ``kind``, ``description``, ``url``, ``sha256``, ``cached`` and ``path``.
    """
    return registry.available(cache_dir)


def download(
    name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Download, verify and unpack a model or the gene tables; return the folder.

    Parameters
    ----------
    name
        ``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"`` or ``"all-embeddings"`` (the bundled models need
        no download and are returned from the package).
    cache_dir
        Cache folder (default ``$TRANSCRIPTFORMER_CACHE`` or the user cache).
    progress
        Show progress bars.
    force
        Download again even if cached.
    """
    return registry.fetch(name, cache_dir=cache_dir, progress=progress, force=force)


def path(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a model that ships with the package or is already downloaded (nothing is downloaded).

    Parameters
    ----------
    name
        A registry name: ``"tf-demo"`` and ``"tf-tiny"`` ship with the package; the published models have a
        folder once downloaded (:func:`download`).
    cache_dir
        Cache folder of the downloads.

    Raises
    ------
    FileNotFoundError
        A published model not downloaded yet (the message says how to).
    ValueError
        A dataset's name (datasets are read with :mod:`~transcriptformer.scanpy.datasets`).
    """
    entry = registry.REGISTRY[registry.canonical_name(name)]
    if entry.kind == "dataset":
        raise ValueError(registry.not_a_model(entry.name))
    if entry.bundled is not None:
        return registry.bundled_path(entry)
    folder = registry.cache_path(cache_dir) / entry.folder
    if folder.is_dir() and not registry.is_complete(folder):
        raise FileNotFoundError(
            f"{folder} is incomplete (no record of its download, or files missing: an interrupted download or a "
            f"damaged cache): tfs.models.download({entry.name!r}, force=True) downloads it again."
        )
    if not folder.is_dir():
        use = f"model={entry.name!r}" if entry.kind == "model" else "a species name as species_embedding="
        raise FileNotFoundError(
            f"{entry.name} is not downloaded yet: tfs.models.download({entry.name!r}) (or pass {use} to any tool, "
            "which downloads it on first use)."
        )
    return folder


def __dir__() -> list[str]:
    return __all__
