"""What the tools that run a model share: loading it, running the pipeline, naming genes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from anndata import AnnData

from ...data.gene_ids import names_to_ids
from ...inference.options import RunOptions, check_genes
from ...weights.checkpoint import load_model
from ...weights.loaded import LoadedModel
from .._utils import check_adata

if TYPE_CHECKING:
    from ...inference.pipeline import Inference

__all__ = ["ModelArg", "genes_to_ids", "load", "run_model"]

#: What ``model=`` accepts: a registry name, a checkpoint folder, a loaded model, or ``(model, adapter_folder)``.
ModelArg = str | os.PathLike | LoadedModel | tuple


def run_model(
    adata: AnnData, model: ModelArg, options: RunOptions, heads: Sequence[str], *, genes: Any = None, **extra: Any
) -> tuple[Inference, LoadedModel]:
    """Validate, load the model and run the pipeline (nothing is written to ``adata``).

    ``genes`` (names as users write them) restricts the per-gene outputs (:func:`genes_to_ids`).
    """
    from ...inference.devices import resolve_device  # lazily: torch (start-up time of `import tfs.tl`)
    from ...inference.pipeline import infer

    check_adata(adata)
    resolve_device(options.device)  # an unavailable device is an error before the model is loaded
    loaded = load_model(model, cache_dir=options.cache_dir)
    ids = genes_to_ids(genes, adata, loaded, options)
    run = infer(adata, loaded, heads=heads, tokenize=options.tokenize(), **options.engine(), genes=ids, **extra)
    return run, loaded


def genes_to_ids(genes: Any, adata: AnnData | None, loaded: LoadedModel, options: RunOptions) -> list[str] | None:
    """Gene names as the user knows them (Ensembl ids, ``var_names``, symbols) -> vocabulary ids (``None``: all)."""
    names = check_genes(genes)
    if names is None:
        return None
    var = None if adata is None else adata.var
    return names_to_ids(names, loaded.vocab, var=var, gene_key=options.gene_key)


def load(model: ModelArg, options: RunOptions) -> LoadedModel:
    """The model, loaded (and kept in memory) before a run, e.g. to check a request against its size."""
    return load_model(model, cache_dir=options.cache_dir)
