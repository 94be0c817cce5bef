"""Models and example data (``tfs.datasets``).

The published weights are downloaded on demand through :mod:`transcriptformer.registry`. A
tiny checkpoint in the published layout (random weights, 2 layers, 364 genes) and a tiny
dataset ship with the package, so examples and tests run offline.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import anndata as ad
import pandas as pd

from .. import registry

__all__ = ["available_models", "download", "tiny_human", "tiny_model_path"]


def available_models(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """What can be downloaded and what is already cached (see :func:`transcriptformer.registry.available`)."""
    return registry.available(cache_dir)


def download(
    name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Download, verify and unpack a model or the gene tables; return the folder.

    Parameters
    ----------
    name
        ``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"`` or ``"all-embeddings"``.
    cache_dir
        Cache folder (default ``$TRANSCRIPTFORMER_CACHE`` or the user cache).
    progress
        Show progress bars.
    force
        Download again even if cached.
    """
    return registry.fetch(name, cache_dir=cache_dir, progress=progress, force=force)


def tiny_model_path() -> Path:
    """Folder of the bundled tiny checkpoint (random weights; for examples and tests, not for biology)."""
    return Path(str(files("transcriptformer") / "_data" / "tf_tiny"))


def tiny_human() -> ad.AnnData:
    """21 cells x 205 genes of synthetic human counts matching :func:`tiny_model_path`.

    ``var["ensembl_id"]`` holds Ensembl ids (some with version suffixes, some mouse, some in no
    vocabulary), ``obs["assay"]`` assay labels, ``obs["cell_type"]`` a label.
    """
    return ad.read_h5ad(Path(str(files("transcriptformer") / "_data" / "tiny_human.h5ad")))
