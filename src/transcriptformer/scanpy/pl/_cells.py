"""Plots of cells: the UMAP of the embedding, likelihoods, label transfer, and cell-type similarity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import deprecated_argument, use_rep_or_deprecated
from ..tl import umap as tl_umap
from ..tl._labels import SEPARATOR
from ._base import axes, check_fresh, finish, heatmap, light, made_from, umap_call

__all__ = ["celltype_similarity", "label_transfer", "llh", "species_umap", "umap"]


def _point_size(n: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Scanpy's default (120,000 / n) is huge for small data: cap it."""
    return {"size": min(120000 / max(n, 1), 60.0), **kwargs}


def umap(
    adata: AnnData,
    *,
    use_rep: str = "X_transcriptformer",
    key: str | None = None,
    color: str | Sequence[str] | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    rep: str | None = None,
    **kwargs: Any,
) -> Any:
    """UMAP of the TranscriptFormer cell embeddings, computed by :func:`~transcriptformer.scanpy.tl.umap`.

    Draws ``obsm[f"X_{key}"]`` with :func:`scanpy.pl.embedding`; warns when the embedding the UMAP was computed
    from (the ``use_rep`` recorded in ``uns[key]["params"]``) changed since. ``adata`` is not written to: scanpy
    draws from a copy of the columns it colours by and their ``uns[f"{column}_colors"]``, which it uses.

    Parameters
    ----------
    adata
        AnnData after ``tfs.tl.umap(adata)``.
    use_rep
        The embedding the UMAP was made from: gives the default ``key`` (and is the one checked for a UMAP
        without a record).
    key
        The ``key_added`` of :func:`~transcriptformer.scanpy.tl.umap` (default ``f"umap_{base of use_rep}"``).
    color
        ``obs`` columns or genes to colour by.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    rep
        Deprecated spelling of ``use_rep``.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``size`` defaults to at most 60).

    Returns
    -------
    As :func:`scanpy.pl.embedding`: with ``show=False`` the axes (a list of one per panel for several colours,
    without the colour bars), the figure with ``return_fig=True``, else ``None``.
    """
    import scanpy as sc  # lazily: start-up time

    use_rep = use_rep_or_deprecated(rep, use_rep, "pl.umap")
    if "n_neighbors" in kwargs or "random_state" in kwargs:
        deprecated_argument("pl.umap(n_neighbors=..., random_state=...)", "tfs.tl.umap(adata, n_neighbors=...)")
        kwargs.pop("n_neighbors", None), kwargs.pop("random_state", None)
    key = key or f"umap_{use_rep.removeprefix('X_')}"
    source = made_from(adata, key, use_rep)  # the embedding tl.umap recorded: the one to compare with
    made_by = umap_call(source, key)
    if f"X_{key}" not in adata.obsm:
        raise KeyError(f"adata.obsm has no {f'X_{key}'!r}: compute the UMAP first, {made_by}.")
    if source in adata.obsm:
        check_fresh(adata, key, adata.obsm[source], made_by)
    kwargs = _point_size(adata.n_obs, kwargs)
    draw = _umap_data(adata, f"X_{key}", color, kwargs)
    drawn = sc.pl.embedding(draw, basis=f"X_{key}", color=color, ax=ax, show=False, **kwargs)
    fig = (drawn[0] if isinstance(drawn, list) else drawn).figure
    return finish(fig, drawn, "umap", show, save, return_fig)


def _umap_data(adata: AnnData, basis: str, color: str | Sequence[str] | None, kwargs: dict[str, Any]) -> AnnData:
    """What :func:`scanpy.pl.embedding` reads of ``adata`` for :func:`umap`, in an AnnData of its own.

    The ``obs`` columns coloured by (and ``mask_obs``), their colours, the basis and, with ``edges=True``, the
    neighbour graph. A gene is looked up as scanpy looks it up (``gene_symbols``, ``use_raw``, ``layer``, which
    are taken out of ``kwargs``) and its values become a column of the same name: drawn as scanpy draws it.
    """
    names = [color] if isinstance(color, str) else [c for c in (color or []) if c is not None]
    mask = kwargs.get("mask_obs")
    columns = [c for c in names if c in adata.obs.columns] + ([mask] if isinstance(mask, str) else [])
    genes = list(dict.fromkeys(c for c in names if c not in adata.obs.columns))
    gene_symbols, layer = kwargs.pop("gene_symbols", None), kwargs.pop("layer", None)
    use_raw = kwargs.pop("use_raw", None)
    if use_raw is None:  # scanpy's default
        use_raw = layer is None and adata.raw is not None
    if use_raw and layer is not None:
        raise ValueError(f"Cannot use both a layer and the raw representation. Was passed: {use_raw=!r}, {layer=!r}.")
    if use_raw and adata.raw is None:
        raise ValueError("`use_raw` is set to True but AnnData object does not have raw. Please check.")
    values = {}
    for name in genes:
        gene = name
        if gene_symbols is not None and gene not in adata.var_names:
            hits = adata.var.index[adata.var[gene_symbols] == gene]
            if len(hits) == 0:
                raise KeyError(f"{name!r} is neither an obs column nor a gene (var_names or var[{gene_symbols!r}]).")
            gene = hits[0]
        values[name] = adata.raw.obs_vector(gene) if use_raw else adata.obs_vector(gene, layer=layer)
    draw = light(adata, columns, {basis: adata.obsm[basis]})
    for name, vector in values.items():
        draw.obs[name] = np.asarray(vector)
    if kwargs.get("edges"):
        neighbors = kwargs.get("neighbors_key") or "neighbors"
        if neighbors in adata.uns:
            graph = dict(adata.uns[neighbors])
            draw.uns[neighbors] = graph
            for what in ("connectivities_key", "distances_key"):
                if graph.get(what) in adata.obsp:
                    draw.obsp[graph[what]] = adata.obsp[graph[what]]
    return draw


def species_umap(
    adatas: Mapping[str, AnnData],
    *,
    rep: str = "X_transcriptformer",
    color: str | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Any:
    """Deprecated: join the datasets, compute their UMAP with ``tl.umap`` and draw it with :func:`umap`.

    ``joint = anndata.concat(adatas, label="species")``, ``tfs.tl.umap(joint)``,
    ``tfs.pl.umap(joint, color=["species", color])``, which this does (with a ``FutureWarning``).
    """
    import anndata as ad

    deprecated_argument(
        "pl.species_umap(adatas)",
        "joint = anndata.concat(adatas, label='species'); tfs.tl.umap(joint); tfs.pl.umap(joint, color='species')",
    )
    if not adatas:
        raise ValueError("adatas is empty.")
    parts = {
        label: AnnData(obs=a.obs[[color]] if color else a.obs[[]], obsm={rep: np.asarray(a.obsm[rep])})
        for label, a in adatas.items()
    }
    joint = ad.concat(parts, label="species", index_unique=":")
    tl_umap(joint, use_rep=rep, n_neighbors=n_neighbors, random_state=random_state)
    return umap(
        joint,
        use_rep=rep,
        color=["species", color] if color else "species",
        ax=ax,
        show=show,
        save=save,
        return_fig=return_fig,
        **kwargs,
    )


def llh(
    adata: AnnData,
    *,
    groupby: str | None = None,
    key: str = "transcriptformer",
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Any:
    """Violin plot of the per-cell negative log-likelihood, like :func:`scanpy.pl.violin` (one per group).

    Parameters
    ----------
    adata
        AnnData after :func:`~transcriptformer.scanpy.tl.likelihood` (or ``tl.embed(..., llh=True)``).
    groupby
        An ``obs`` column: one violin per group (atypical groups stand out).
    key
        The ``key_added`` of the likelihood run: ``obs[f"{key}_llh"]`` is drawn.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.violin` (e.g. ``rotation``, ``stripplot``).

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    import scanpy as sc

    column = f"{key}_llh"
    if column not in adata.obs and key.endswith("_llh") and key in adata.obs:
        deprecated_argument(f"pl.llh(key={key!r}) (an obs column)", f"key={key.removesuffix('_llh')!r}")
        column = key
    if column not in adata.obs:
        base = column.removesuffix("_llh")
        named = "" if base == "transcriptformer" else f", key_added={base!r}"
        raise KeyError(
            f"adata.obs has no {column!r}; run tfs.tl.likelihood(adata, model{named}) (or "
            f"tfs.tl.embed(adata, model, llh=True{named}))."
        )
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"adata.obs has no column {groupby!r}.")
    fig, ax = axes(ax)
    kwargs = {"stripplot": adata.n_obs <= 2000, "size": 1.5, **kwargs}
    if groupby is not None:
        kwargs.setdefault("rotation", 90)
    # drawn from a copy of the columns: scanpy stores colours and makes string columns categorical
    for option in ("use_raw", "layer"):  # they choose among genes' values; the likelihood is an obs column
        kwargs.pop(option, None)
    draw = light(adata, [column] + ([groupby] if groupby is not None else []))
    sc.pl.violin(draw, keys=column, groupby=groupby, ax=ax, show=False, **kwargs)
    ax.set_ylabel("negative log-likelihood per gene")
    return finish(fig, ax, "llh", show, save, return_fig)


def label_transfer(
    adata: AnnData,
    *,
    true_key: str,
    key: str,
    normalize: bool = True,
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    cmap: str = "Blues",
) -> Any:
    """Confusion matrix of transferred labels against the true ones, with accuracy and macro-F1 in the title.

    Parameters
    ----------
    adata
        Cells with both label columns (e.g. after :func:`~transcriptformer.scanpy.tl.transfer_labels`).
    true_key
        ``obs`` column with the true labels.
    key
        The ``key_added`` of :func:`~transcriptformer.scanpy.tl.transfer_labels` (the transferred labels' column,
        e.g. ``"cell_type_transferred"``).
    normalize
        Each row (true label) sums to 1: the share of its cells given each label.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    cmap
        Colour map.

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``. The accuracy and macro-F1
    are also in ``ax.get_title()``. Cells whose true label is missing are left out of both (the title says how
    many); a missing transferred label counts as wrong.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    if true_key not in adata.obs:
        raise KeyError(f"adata.obs has no column {true_key!r} (true_key).")
    if key not in adata.obs:
        base = key.removesuffix("_transferred")
        labels_key, named = (repr(base), "") if base != key else ("<reference label column>", f", key_added={key!r}")
        raise KeyError(
            f"adata.obs has no column {key!r} (transferred labels); run tfs.tl.transfer_labels(adata, reference, "
            f"labels_key={labels_key}{named}) first."
        )
    labelled = adata.obs[true_key].notna().to_numpy()  # cells without a true label cannot be scored
    if not labelled.any():
        raise ValueError(f"adata.obs[{true_key!r}] has no labels (all missing): nothing to score.")
    truth = adata.obs[true_key][labelled].astype(str).to_numpy()
    pred = adata.obs[key][labelled].astype(str).to_numpy()
    rows = sorted(set(truth))
    cols = rows + sorted(set(pred) - set(rows))
    cm = confusion_matrix(truth, pred, labels=cols)[: len(rows)].astype(float)
    if normalize:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    accuracy = accuracy_score(truth, pred)
    macro_f1 = f1_score(truth, pred, labels=rows, average="macro", zero_division=0)
    fig, ax = axes(ax, figsize=(0.45 * len(cols) + 3, 0.4 * len(rows) + 2))
    label = "share of the row" if normalize else "cells"
    heatmap(ax, fig, cm, rows, cols, cmap=cmap, label=label, vmin=0, vmax=1 if normalize else None)
    ax.set_xlabel(f"transferred ({key})")
    ax.set_ylabel(f"true ({true_key})")
    unscored = int((~labelled).sum())
    note = f"\n({unscored} cells without a true label left out)" if unscored else ""
    ax.set_title(f"accuracy {accuracy:.3f}, macro-F1 {macro_f1:.3f}{note}")
    return finish(fig, ax, "label_transfer", show, save, return_fig)


def celltype_similarity(
    similarity: pd.DataFrame | AnnData,
    *,
    key: str = "transcriptformer_celltype_similarity",
    rows: str | None = None,
    columns: str | None = None,
    cluster: bool = True,
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    cmap: str = "viridis",
) -> Any:
    """Clustered heatmap of a cell-type x cell-type table (:func:`~transcriptformer.scanpy.tl.celltype_similarity`).

    Parameters
    ----------
    similarity
        The table, or an AnnData holding it in ``uns[key]["similarity"]``.
    key
        The ``key_added`` of :func:`~transcriptformer.scanpy.tl.celltype_similarity` when ``similarity`` is an
        AnnData.
    rows, columns
        Datasets to put on each axis (labels are ``"dataset | cell type"``). Default: with two or more
        datasets, the first against the second; otherwise everything against everything. An axis given one
        dataset names it in its axis label and its ticks by cell type alone; an axis left to every dataset keeps
        ``"dataset | cell type"``.
    cluster
        Order rows and columns by hierarchical clustering (average linkage) so similar types sit together.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    cmap
        Colour map.

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    if isinstance(similarity, AnnData):
        if key not in similarity.uns:
            raise KeyError(f"adata.uns has no {key!r}; run tfs.tl.celltype_similarity first.")
        similarity = similarity.uns[key]["similarity"]
    table = pd.DataFrame(similarity)
    datasets = list(dict.fromkeys(str(i).split(SEPARATOR, 1)[0] for i in table.index))
    if rows is None and columns is None and len(datasets) >= 2:
        rows, columns = datasets[0], datasets[1]

    def pick(labels: Any, dataset: str | None) -> list:
        return [x for x in labels if dataset is None or str(x).split(SEPARATOR, 1)[0] == dataset]

    table = table.loc[pick(table.index, rows), pick(table.columns, columns)]
    if table.empty:
        raise ValueError(f"no rows/columns for rows={rows!r}, columns={columns!r}; datasets: {datasets}.")
    values = table.to_numpy(dtype=float)
    if cluster and min(values.shape) > 2 and np.isfinite(values).all():
        from scipy.cluster.hierarchy import leaves_list, linkage

        table = table.iloc[leaves_list(linkage(values, "average")), leaves_list(linkage(values.T, "average"))]
        values = table.to_numpy(dtype=float)

    def short(labels: Any, dataset: str | None) -> list[str]:  # the dataset's name is dropped where the axis has one
        return [str(x).split(SEPARATOR, 1)[-1] if dataset is not None else str(x) for x in labels]

    fig, ax = axes(ax, figsize=(0.45 * table.shape[1] + 3.5, 0.4 * table.shape[0] + 2))
    heatmap(ax, fig, values, short(table.index, rows), short(table.columns, columns), cmap=cmap, label="similarity")
    ax.set_xlabel(columns or "")
    ax.set_ylabel(rows or "")
    return finish(fig, ax, "celltype_similarity", show, save, return_fig)
