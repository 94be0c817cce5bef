"""Preprocessing helpers: check an AnnData against a model before spending compute (``tfs.pp``)."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from ..checkpoint import LoadedModel, load_model
from ..tokenizer import TokenizeOptions, gene_ids, prepare_cells, strip_version
from ._utils import check_adata

__all__ = ["check_input", "match_genes"]


def check_input(
    adata: AnnData,
    model: str | os.PathLike | LoadedModel = "tf-sapiens",
    *,
    gene_key: str | None = "ensembl_id",
    layer: str | None = None,
    duplicate_genes: Literal["raise", "first"] = "raise",
    filter_to_vocab: bool = True,
    window: int = 4096,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Validate ``adata`` for a model and summarise what the model will see. Reads the counts once.

    Raises the same errors (with the same fixes suggested) as :func:`transcriptformer.scanpy.tl.embed`.

    Parameters
    ----------
    adata, model, gene_key, layer, duplicate_genes, filter_to_vocab, cache_dir
        As in :func:`~transcriptformer.scanpy.tl.embed`.
    window
        Cells read at a time.

    Returns
    -------
    dict
        A summary: ``model``, ``counts_source``, ``n_obs``, ``n_genes``, ``n_genes_matched``,
        ``genes_per_cell`` (min / median / max genes each cell is given), ``n_cells_without_genes``,
        ``n_cells_truncated`` (cells with more expressed genes than ``seq_len``; the model sees the first
        ``seq_len`` in column order) and ``fraction_unknown_aux`` (per auxiliary column, the fraction of
        cells whose label is unknown to the model).
    """
    check_adata(adata)
    loaded = load_model(model, cache_dir=cache_dir)
    options = TokenizeOptions(
        gene_key=gene_key, layer=layer, duplicate_genes=duplicate_genes, filter_to_vocab=filter_to_vocab
    )
    src = prepare_cells(
        adata,
        loaded.vocab,
        loaded.aux_vocabs,
        seq_len=loaded.seq_len,
        pad_zeros=loaded.config.data.pad_zeros,
        options=options,
        model_name=loaded.name,
    )
    expressed = _expressed_counts(src, window)
    S = loaded.seq_len
    lengths = np.minimum(expressed, S) if src.pad_zeros else np.full(len(expressed), min(len(src.columns), S))
    unknown = {
        voc.column: float(np.mean(src.aux[:, i] == voc.unknown)) if len(src.aux) else 0.0
        for i, voc in enumerate(loaded.aux_vocabs)
    }
    return {
        "model": loaded.name,
        "counts_source": src.source,
        "n_obs": src.n_obs,
        "n_genes": src.n_genes,
        "n_genes_matched": src.n_matched,
        "genes_per_cell": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "n_cells_without_genes": int((lengths == 0).sum()),
        "n_cells_truncated": int((expressed > loaded.seq_len).sum()),
        "fraction_unknown_aux": unknown,
    }


def _expressed_counts(src, window: int) -> np.ndarray:
    """Number of expressed genes the model can use, per cell, before truncation (one pass over the counts)."""
    return np.concatenate([src.count_expressed(s, min(s + window, src.n_obs)) for s in range(0, src.n_obs, window)])


def match_genes(
    adata: AnnData,
    model: str | os.PathLike | LoadedModel = "tf-sapiens",
    *,
    gene_key: str | None = "ensembl_id",
    key_added: str = "transcriptformer_in_vocab",
    copy: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData | None:
    """Mark the genes of ``adata.var`` that are in a model's vocabulary.

    Parameters
    ----------
    adata, model, gene_key, cache_dir
        As in :func:`~transcriptformer.scanpy.tl.embed` (ids are taken from ``adata.var``, not ``raw.var``).
    key_added
        ``var`` column to write.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    anndata.AnnData | None
        ``None`` or a copy, with ``adata.var[key_added]`` (bool): whether the gene id (version suffix
        removed) is in the vocabulary.
    """
    loaded = load_model(model, cache_dir=cache_dir)
    ids, _ = gene_ids(adata.var, gene_key, "X")
    hits = loaded.vocab.lookup(list(strip_version(ids))) >= loaded.vocab.n_special
    if copy:
        adata = adata.copy()
    adata.var[key_added] = hits
    return adata if copy else None
