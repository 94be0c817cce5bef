"""The published training objective: the loss of a batch, and its per-cell terms evaluated on held-out cells.

The objective is the published one (the training forward, ``embed=False``): the count bias on strictly
earlier keys only, dropout active, and the loss

``count NLL sum / genes + gene_id_loss_weight x gene cross-entropy sum / (cells x seq_len)``

over the cells of a batch (the published reduction: a token-weighted mean for the count term; for the gene
term a mean over all ``cells x seq_len`` slots, padding included).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import pandas as pd
import torch

from ..data.tokenizer import CellSource
from ..errors import deprecated
from ..inference.options import RunKwargs, RunOptions, documents_run_options, run_options
from ..inference.pipeline import infer
from ..weights import registry
from ..weights.checkpoint import load_model
from ..weights.loaded import LoadedModel

__all__ = ["batch_loss", "cell_losses", "evaluate", "looks_like_model", "open_cells"]


def batch_loss(
    count_sum: torch.Tensor,
    gene_sum: torch.Tensor,
    n_genes: int | torch.Tensor,
    n_cells: int,
    seq_len: int,
    gene_weight: float,
) -> torch.Tensor:
    """The published training loss of a batch from the sums :meth:`TranscriptFormer.forward` returns."""
    return count_sum / n_genes + gene_weight * gene_sum / (n_cells * seq_len)


def read_h5ad(path: str | os.PathLike, what: str) -> Any:
    """An h5ad file opened backed, or an error naming the file and what it was given as."""
    import anndata as ad  # lazily: start-up time
    import h5py

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist.")
    if not h5py.is_hdf5(p):
        raise ValueError(
            f"{what} file {str(path)!r} is not an h5ad file (not HDF5). Convert it with anndata first, e.g. "
            "anndata.read_csv(...).write_h5ad('cells.h5ad')."
        )
    try:
        return ad.read_h5ad(p, backed="r")
    except Exception as e:  # noqa: BLE001 - anndata raises many kinds for a damaged or foreign HDF5 file
        raise ValueError(f"{what} file {str(path)!r} cannot be read as an AnnData ({type(e).__name__}: {e}).") from None


def open_cells(data: Any, loaded: LoadedModel, options: RunOptions, what: str) -> list[tuple[str, CellSource, Any]]:
    """``(label, source, handle)`` for an AnnData, an h5ad path, or a list of either (files are opened backed).

    A file's label is its resolved path (the same file named relatively, absolutely or from another working
    directory has one label); an AnnData's is ``what[i]``.
    """
    import anndata as ad

    items = data if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError(f"{what} is empty: pass an AnnData, an h5ad path or a list of them.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str | os.PathLike):
            adata, label = read_h5ad(item, what), str(Path(item).expanduser().resolve())
        elif isinstance(item, ad.AnnData):
            adata, label = item, f"{what}[{i}]"
        else:
            raise TypeError(f"{what} must hold AnnData objects or h5ad paths, got {type(item).__name__}.")
        if adata.n_obs == 0:
            raise ValueError(f"{label} has no cells.")
        out.append((label, loaded.cells(adata, options.tokenize()), adata))
    return out


def looks_like_model(value: Any) -> bool:
    """Whether ``value`` is a model (a loaded one, a registry name, a checkpoint folder, or ``(model, adapter)``)."""
    if isinstance(value, LoadedModel | tuple):
        return True
    if isinstance(value, str) and registry.is_registered(value):
        return True
    return isinstance(value, str | os.PathLike) and Path(value).expanduser().is_dir()


@documents_run_options
def cell_losses(adata: Any, model: Any, **options: Unpack[RunKwargs]) -> pd.DataFrame:
    """The training objective's per-cell terms, evaluated (no dropout, no gradients).

    The training-mode forward (the count bias on strictly earlier keys) and, per cell, the mean over its
    genes of the zero-truncated-Poisson count NLL and of the gene-identity cross-entropy (targets as the
    published objective has them: the genes, and ``[END]`` at the last slot of a full-length cell). This is
    how fine-tuning and training are evaluated.

    Parameters
    ----------
    adata
        Cells (raw counts) as for :func:`~transcriptformer.scanpy.tl.embed`: an AnnData (in memory, a view or
        backed), or the path of an h5ad file (opened backed, as ``finetune`` and ``train`` open theirs).
    model
        A checkpoint folder, registry name, loaded model or ``(model, adapter)``, as everywhere.
    {run_options}

    Returns
    -------
    pandas.DataFrame
        Indexed by ``adata.obs_names`` in input order: ``count_nll``, ``gene_nll`` (NaN without a
        gene-identity head) and ``n_genes`` (the genes read). A cell without any gene of the vocabulary gets NaN
        in both, as the published objective gives it; the other cells are unaffected.
    """
    import anndata as ad

    if looks_like_model(adata) and not looks_like_model(model):
        deprecated("cell_losses(model, adata)", "cell_losses(adata, model), the order of every tool")
        adata, model = model, adata
    own = {"species_embedding": "the loss is over the model's own vocabulary"}
    opts = run_options(options, "cell_losses", unsupported=own)
    opened = None
    if isinstance(adata, str | os.PathLike):
        adata = opened = read_h5ad(adata, "adata")
    elif not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData or the path of an h5ad file, got {type(adata).__name__}.")
    try:
        loaded = load_model(model, cache_dir=opts.cache_dir)
        heads = ("llh", "gene_ce") if loaded.model.gene_id_head is not None else ("llh",)
        run = infer(adata, loaded, heads=heads, tokenize=opts.tokenize(), mode="train", **opts.engine())
        cells = run.result.cells
        gene = cells["gene_ce"] if "gene_ce" in cells else np.full(adata.n_obs, np.nan, dtype=np.float32)
        return pd.DataFrame(
            {"count_nll": cells["llh"], "gene_nll": gene, "n_genes": run.result.n_genes},
            index=pd.Index(adata.obs_names, name=adata.obs_names.name),
        )
    finally:
        if opened is not None:
            opened.file.close()


def evaluate(view: LoadedModel, sources: list, options: RunOptions, device: str, precision: str) -> dict[str, float]:
    """Mean per-cell terms over validation sources, and the loss of the published weighting."""
    run = {**{k: getattr(options, k) for k in RunKwargs.__annotations__}, "device": device, "precision": precision}
    run["progress"] = False
    df = pd.concat([cell_losses(adata, view, **run) for _, _, adata in sources])
    weight = view.config.loss.gene_id_loss_weight if view.model.gene_id_head is not None else 0.0
    count = float(np.nanmean(df["count_nll"]))
    gene = float(np.nanmean(df["gene_nll"])) if weight else 0.0
    return {"count_nll": count, "gene_nll": gene, "loss": count + weight * gene, "cells": len(df)}
