"""Plots of genes: the UMAP of per-gene embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ...data.gene_ids import SPECIES, map_symbols
from .._utils import deprecated_argument
from ._base import axes, check_fresh, finish, made_from, umap_call

__all__ = ["gene_embeddings"]


def gene_embeddings(
    adata: AnnData,
    *,
    key: str = "transcriptformer_genes",
    umap_key: str | None = None,
    color: str | None = None,
    genes: Sequence[str] | None = None,
    label: bool | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    size: float | None = None,
    **deprecated: Any,
) -> Any:
    """UMAP of the per-gene embeddings (:func:`~transcriptformer.scanpy.tl.gene_embeddings`).

    Draws ``varm[f"X_{umap_key}"]`` as computed by ``tfs.tl.umap(adata, use_rep=f"X_{key}", axis="var")``;
    genes without an embedding (never read) are left out. Warns when the gene embeddings the UMAP was computed
    from (the ``use_rep`` recorded in ``uns[umap_key]["params"]``) changed since.

    Parameters
    ----------
    adata
        AnnData after :func:`~transcriptformer.scanpy.tl.gene_embeddings` and ``tl.umap(..., axis="var")``.
    key
        The ``key_added`` of :func:`~transcriptformer.scanpy.tl.gene_embeddings`.
    umap_key
        The ``key_added`` of :func:`~transcriptformer.scanpy.tl.umap` (default ``f"umap_{key}"``).
    color
        A ``var`` column to colour the genes by (e.g. a gene family or ``highly_variable``).
    genes
        Genes to mark with their names: ``var_names``, or gene symbols / Ensembl ids found through
        ``var["ensembl_id"]`` (human and mouse symbols, through the Ensembl tables).
    label
        Write every gene's name next to its point (default: for at most 40 genes).
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    size
        Point size.
    **deprecated
        ``n_neighbors`` and ``random_state`` (now options of ``tl.umap``), accepted with a warning.

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    unknown = set(deprecated) - {"n_neighbors", "random_state"}
    if unknown:
        raise TypeError(f"gene_embeddings() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if deprecated:
        deprecated_argument("pl.gene_embeddings(n_neighbors=..., random_state=...)", "tfs.tl.umap(..., axis='var')")
    if key.startswith("X_") and f"X_{key}" not in adata.varm and key in adata.varm:
        deprecated_argument(f"pl.gene_embeddings(key={key!r}) (a varm key)", f"key={key.removeprefix('X_')!r}")
        key = key.removeprefix("X_")
    umap_key = umap_key or f"umap_{key}"
    source = made_from(adata, umap_key, f"X_{key}")  # the embedding tl.umap recorded: the one to compare with
    made_by = umap_call(source, umap_key, axis="var")
    if f"X_{umap_key}" not in adata.varm:
        if source not in adata.varm:
            base = source.removeprefix("X_")
            named = "" if base == "transcriptformer_genes" else f", key_added={base!r}"
            raise KeyError(
                f"adata.varm has no {source!r}; run tfs.tl.gene_embeddings(adata, model{named}), then {made_by}."
            )
        raise KeyError(f"adata.varm has no {'X_' + umap_key!r}: compute the UMAP first, {made_by}.")
    if source in adata.varm:
        check_fresh(adata, umap_key, adata.varm[source], made_by)
    coords = np.asarray(adata.varm[f"X_{umap_key}"], dtype=np.float32)
    drawn = np.isfinite(coords).all(axis=1)
    coords, names = coords[drawn], np.asarray(adata.var_names)[drawn]
    fig, ax = axes(ax, figsize=(5.5, 5))
    s = size if size is not None else min(120000 / max(len(coords), 1), 30.0)
    if color is not None:
        if color not in adata.var:
            raise KeyError(f"adata.var has no column {color!r}.")
        values = adata.var[color].to_numpy()[drawn]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            points = ax.scatter(coords[:, 0], coords[:, 1], c=values.astype(float), s=s, cmap="viridis")
            fig.colorbar(points, ax=ax, label=color, shrink=0.8)
        else:
            for cat in pd.unique(values.astype(str)):
                m = values.astype(str) == cat
                ax.scatter(coords[m, 0], coords[m, 1], s=s, label=cat)
            ax.legend(title=color, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=s, color="grey")
    marked = _var_names(adata, genes or [])
    if label or (label is None and len(coords) <= 40):
        marked |= set(names)
    for name, (x, y) in zip(names, coords, strict=True):
        if name in marked:
            ax.annotate(name, (x, y), fontsize=7)
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(coords)} genes ({key})")
    return finish(fig, ax, "gene_embeddings", show, save, return_fig)


def _var_names(adata: AnnData, genes: Sequence[str]) -> set[str]:
    """The ``var_names`` of genes named as users name them (var names, Ensembl ids or symbols)."""
    names = set(map(str, adata.var_names))
    found = {g for g in genes if g in names}
    rest = [g for g in genes if g not in names]
    if rest and "ensembl_id" in adata.var:
        by_id = {
            str(i): str(n) for n, i in zip(adata.var_names, adata.var["ensembl_id"], strict=True) if isinstance(i, str)
        }
        for g in rest:
            hits = [by_id.get(g.split(".", 1)[0])]
            if hits[0] is None:
                for species in SPECIES:
                    ensembl = map_symbols([g], species, check=False)["ensembl_id"].iloc[0]
                    hits.append(by_id.get(ensembl) if ensembl else None)
            found |= {h for h in hits if h is not None}
    return found
