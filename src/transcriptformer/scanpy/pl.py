"""Plots of TranscriptFormer results (``tfs.pl``).

As in scanpy, ``tl`` computes and writes and ``pl`` draws. Every function takes ``ax`` (draw into existing
axes), ``show`` (``False``: return the axes instead of showing), ``save`` (``True`` or a file-name suffix:
write the figure to ``sc.settings.figdir`` in ``sc.settings.file_format_figs``, as scanpy's plots do) and
``return_fig`` (return the figure). A plot that needs something not yet computed (a UMAP of the embedding)
computes it with the matching ``tfs.tl`` function under the package's own keys, says so in the log, and
never overwrites the user's keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import fingerprint

logger = logging.getLogger("transcriptformer")

__all__ = ["celltype_similarity", "gene_embeddings", "label_transfer", "llh", "species_umap", "umap"]


def _finish(fig, axes, name: str, show: bool | None, save: bool | str | None, return_fig: bool):
    """Scanpy's ending of a plot: save to the figure directory, then figure / axes / show."""
    import matplotlib.pyplot as plt

    if save:
        import scanpy as sc

        suffix = save if isinstance(save, str) else ""
        ext = suffix.rsplit(".", 1)[1] if "." in suffix else sc.settings.file_format_figs
        stem = suffix.rsplit(".", 1)[0] if "." in suffix else suffix
        path = Path(sc.settings.figdir) / f"{name}{stem}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")  # dpi: matplotlib's savefig.dpi, which sc.set_figure_params sets
        logger.info("saved figure %s", path)
    if return_fig:
        return fig
    if show is False:
        return axes
    if show is None and save:  # scanpy does not show a figure it saved unless asked
        return None
    plt.show()
    return None


def _axes(ax, figsize=(6, 4.5)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _require(adata: AnnData, rep: str) -> None:
    if rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {rep!r}; run tfs.tl.embed(adata, ...) first (or pass rep=<obsm key>). "
            f"obsm has {list(adata.obsm.keys())}."
        )


def _point_size(n: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Scanpy's default (120,000 / n) is huge for small data: cap it."""
    return {"size": min(120000 / max(n, 1), 60.0), **kwargs}


def umap(
    adata: AnnData,
    *,
    rep: str = "X_transcriptformer",
    color: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    **kwargs: Any,
):
    """UMAP of the TranscriptFormer cell embeddings.

    Uses ``obsm[f"X_umap_{rep without X_}"]`` from :func:`transcriptformer.scanpy.tl.umap`, computing it first
    when it is missing or was made from another embedding or other settings (logged; the user's ``X_umap``
    is never touched). Then plots with :func:`scanpy.pl.embedding`.

    Parameters
    ----------
    adata
        AnnData with ``obsm[rep]``.
    rep
        The embedding to plot.
    color
        ``obs`` columns or genes to colour by.
    n_neighbors, random_state
        Passed to :func:`~transcriptformer.scanpy.tl.umap`.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``size`` defaults to at most 60).

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    import scanpy as sc

    from . import tl

    _require(adata, rep)
    basis = tl.umap(adata, rep=rep, n_neighbors=n_neighbors, random_state=random_state)
    kwargs = _point_size(adata.n_obs, kwargs)
    if ax is None:
        fig = sc.pl.embedding(adata, basis=basis, color=color, show=False, return_fig=True, **kwargs)
        axes = fig.axes[0] if len(fig.axes) == 1 or color is None or isinstance(color, str) else fig.axes
    else:
        sc.pl.embedding(adata, basis=basis, color=color, ax=ax, show=False, **kwargs)
        fig, axes = ax.figure, ax
    return _finish(fig, axes, "umap_transcriptformer", show, save, return_fig)


def species_umap(
    adatas: Mapping[str, AnnData],
    *,
    rep: str = "X_transcriptformer",
    color: str | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    **kwargs: Any,
):
    """Joint UMAP of cells from several species embedded by the same cross-species model.

    Cells of all datasets share TranscriptFormer's embedding space (genes meet through their ESM2
    protein embeddings), so a joint UMAP shows whether matching cell types co-locate.

    Parameters
    ----------
    adatas
        ``{species or dataset label: AnnData with obsm[rep]}``.
    rep
        The embedding to use (must have the same width in every dataset).
    color
        An ``obs`` column present in every dataset (e.g. ``"cell_type"``); drawn in a second panel.
    n_neighbors, random_state
        Passed to :func:`scanpy.pp.neighbors` / :func:`scanpy.tl.umap`.
    ax
        One axis (species panel only) or a sequence of two.
    show, save, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``).

    Returns
    -------
    The list of axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import tl

    if not adatas:
        raise ValueError("adatas is empty.")
    widths = set()
    for label, a in adatas.items():
        _require(a, rep)
        widths.add(a.obsm[rep].shape[1])
        if color is not None and color not in a.obs:
            raise KeyError(f"dataset {label!r} has no obs column {color!r}.")
    if len(widths) > 1:
        raise ValueError(f"the embeddings have different widths {sorted(widths)}: embed all datasets with one model.")
    obs = pd.concat(
        [
            pd.DataFrame(
                {"species": label, **({color: a.obs[color].astype(str).to_numpy()} if color else {})},
                index=[f"{label}:{n}" for n in a.obs_names],
            )
            for label, a in adatas.items()
        ]
    )
    joint = AnnData(obs=obs, obsm={rep: np.concatenate([np.asarray(a.obsm[rep]) for a in adatas.values()])})
    basis = tl.umap(joint, rep=rep, n_neighbors=n_neighbors, random_state=random_state)
    panels = ["species"] + ([color] if color else [])
    if ax is None:
        fig, grid = plt.subplots(
            1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, gridspec_kw={"wspace": 0.7}
        )
        axes = list(grid[0])
    else:
        axes = list(ax) if isinstance(ax, Sequence) else [ax]
        if len(axes) < len(panels):
            raise ValueError(f"pass {len(panels)} axes (one per panel: {panels}).")
        fig = axes[0].figure
    kwargs = _point_size(joint.n_obs, kwargs)
    for a, key in zip(axes, panels, strict=False):
        sc.pl.embedding(joint, basis=basis, color=key, ax=a, show=False, **kwargs)
    return _finish(fig, axes, "species_umap_transcriptformer", show, save, return_fig)


def llh(
    adata: AnnData,
    *,
    groupby: str | None = None,
    key: str = "transcriptformer_llh",
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    **kwargs: Any,
):
    """Violin plot of the per-cell negative log-likelihood, like :func:`scanpy.pl.violin` (one per group).

    Parameters
    ----------
    adata
        AnnData with ``obs[key]`` (from :func:`~transcriptformer.scanpy.tl.likelihood` or
        ``tl.embed(..., llh=True)``).
    groupby
        An ``obs`` column: one violin per group (atypical groups stand out).
    key
        The ``obs`` column holding the likelihood.
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.violin` (e.g. ``rotation``, ``stripplot``).

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    import scanpy as sc

    if key not in adata.obs:
        raise KeyError(
            f"adata.obs has no {key!r}; run tfs.tl.likelihood(adata, ...) (or tl.embed(..., llh=True)) first."
        )
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"adata.obs has no column {groupby!r}.")
    fig, ax = _axes(ax)
    kwargs = {"stripplot": adata.n_obs <= 2000, "size": 1.5, **kwargs}
    if groupby is not None:
        kwargs.setdefault("rotation", 90)
    sc.pl.violin(adata, keys=key, groupby=groupby, ax=ax, show=False, **kwargs)
    ax.set_ylabel("negative log-likelihood per gene")
    return _finish(fig, ax, "llh_transcriptformer", show, save, return_fig)


def label_transfer(
    adata: AnnData,
    *,
    true_key: str,
    key: str,
    normalize: bool = True,
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    cmap: str = "Blues",
):
    """Confusion matrix of transferred labels against the true ones, with accuracy and macro-F1 in the title.

    Parameters
    ----------
    adata
        Cells with both label columns (e.g. after :func:`~transcriptformer.scanpy.tl.transfer_labels`).
    true_key
        ``obs`` column with the true labels.
    key
        ``obs`` column with the transferred labels (e.g. ``"cell_type_transferred"``).
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

    for k in (true_key, key):
        if k not in adata.obs:
            raise KeyError(f"adata.obs has no column {k!r}.")
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
    fig, ax = _axes(ax, figsize=(0.45 * len(cols) + 3, 0.4 * len(rows) + 2))
    image = ax.imshow(cm, cmap=cmap, vmin=0, vmax=1 if normalize else None, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"transferred ({key})")
    ax.set_ylabel(f"true ({true_key})")
    unscored = int((~labelled).sum())
    note = f"\n({unscored} cells without a true label left out)" if unscored else ""
    ax.set_title(f"accuracy {accuracy:.3f}, macro-F1 {macro_f1:.3f}{note}")
    fig.colorbar(image, ax=ax, label="share of the row" if normalize else "cells", shrink=0.8)
    return _finish(fig, ax, "label_transfer_transcriptformer", show, save, return_fig)


def celltype_similarity(
    similarity: pd.DataFrame | AnnData,
    *,
    key: str = "transcriptformer_celltype_similarity",
    rows: str | None = None,
    columns: str | None = None,
    cluster: bool = True,
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    cmap: str = "viridis",
):
    """Clustered heatmap of a cell-type x cell-type table (:func:`~transcriptformer.scanpy.tl.celltype_similarity`).

    Parameters
    ----------
    similarity
        The table, or an AnnData holding it in ``uns[key]["similarity"]``.
    key
        ``uns`` key when ``similarity`` is an AnnData.
    rows, columns
        Datasets to put on each axis (labels are ``"dataset | cell type"``). Default: with two or more
        datasets, the first against the second; otherwise everything against everything.
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
    datasets = list(dict.fromkeys(str(i).split(" | ", 1)[0] for i in table.index))
    if rows is None and columns is None and len(datasets) >= 2:
        rows, columns = datasets[0], datasets[1]

    def pick(labels, dataset):
        return [x for x in labels if dataset is None or str(x).split(" | ", 1)[0] == dataset]

    table = table.loc[pick(table.index, rows), pick(table.columns, columns)]
    if table.empty:
        raise ValueError(f"no rows/columns for rows={rows!r}, columns={columns!r}; datasets: {datasets}.")
    values = table.to_numpy(dtype=float)
    if cluster and min(values.shape) > 2 and np.isfinite(values).all():
        from scipy.cluster.hierarchy import leaves_list, linkage

        r = leaves_list(linkage(values, "average"))
        c = leaves_list(linkage(values.T, "average"))
        table = table.iloc[r, c]
        values = table.to_numpy(dtype=float)
    fig, ax = _axes(ax, figsize=(0.45 * table.shape[1] + 3.5, 0.4 * table.shape[0] + 2))
    image = ax.imshow(values, cmap=cmap, aspect="auto")

    def short(x):
        return str(x).split(" | ", 1)[-1] if (rows or columns) else str(x)

    ax.set_xticks(range(table.shape[1]), [short(x) for x in table.columns], rotation=90)
    ax.set_yticks(range(table.shape[0]), [short(x) for x in table.index])
    ax.set_xlabel(columns or "")
    ax.set_ylabel(rows or "")
    fig.colorbar(image, ax=ax, label="similarity", shrink=0.8)
    return _finish(fig, ax, "celltype_similarity_transcriptformer", show, save, return_fig)


def gene_embeddings(
    adata: AnnData,
    *,
    key: str = "X_transcriptformer_genes",
    color: str | None = None,
    genes: Sequence[str] | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    label: bool | None = None,
    ax=None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
    size: float | None = None,
):
    """UMAP of the per-gene embeddings in ``adata.varm[key]`` (:func:`~transcriptformer.scanpy.tl.gene_embeddings`).

    Genes without an embedding (never read) are left out. The UMAP is computed the first time (logged) and
    kept in ``adata.varm[f"{key}_umap"]`` (its settings and a fingerprint of the embedding in
    ``adata.uns[f"{key}_umap"]``); it is computed again when the embedding or the settings change.

    Parameters
    ----------
    adata
        AnnData with ``varm[key]``.
    key
        The per-gene embedding.
    color
        A ``var`` column to colour the genes by (e.g. a gene family or ``highly_variable``).
    genes
        ``var_names`` to mark with their names.
    n_neighbors, random_state
        UMAP settings.
    label
        Write every gene's name next to its point (default: for at most 40 genes).
    ax, show, save, return_fig
        As in scanpy's plotting functions.
    size
        Point size.

    Returns
    -------
    The axes with ``show=False``, the figure with ``return_fig=True``, else ``None``.
    """
    import scanpy as sc

    if key not in adata.varm:
        raise KeyError(f"adata.varm has no {key!r}; run tfs.tl.gene_embeddings(adata, ...) first.")
    X = np.asarray(adata.varm[key], dtype=np.float32)
    read = np.isfinite(X).all(axis=1)
    if read.sum() < 3:
        raise ValueError(f"only {int(read.sum())} genes have an embedding in varm[{key!r}]: too few for a UMAP.")
    umap_key = f"{key}_umap"
    coords = adata.varm.get(umap_key)
    # recomputed when the embedding or the settings changed since it was made (a fingerprint is kept in uns)
    wanted = {"fingerprint": fingerprint(X), "n_neighbors": n_neighbors, "random_state": random_state}
    made = adata.uns.get(umap_key, {}).get("params", {})
    if coords is None or any(made.get(k) != v for k, v in wanted.items()):
        logger.info("computing a UMAP of %d gene embeddings (kept in adata.varm[%r])", int(read.sum()), umap_key)
        genes_ad = AnnData(X=X[read])
        sc.pp.neighbors(
            genes_ad, n_neighbors=min(n_neighbors, int(read.sum()) - 1), use_rep="X", random_state=random_state
        )
        sc.tl.umap(genes_ad, random_state=random_state)
        coords = np.full((adata.n_vars, 2), np.nan, dtype=np.float32)
        coords[read] = genes_ad.obsm["X_umap"]
        adata.varm[umap_key] = coords
        adata.uns[umap_key] = {"params": wanted}
    coords = np.asarray(coords)[read]
    names = np.asarray(adata.var_names)[read]
    fig, ax = _axes(ax, figsize=(5.5, 5))
    s = size if size is not None else min(120000 / len(coords), 30.0)
    if color is not None:
        if color not in adata.var:
            raise KeyError(f"adata.var has no column {color!r}.")
        values = adata.var[color].to_numpy()[read]
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
    marked = set(genes or [])
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
    return _finish(fig, ax, "gene_embeddings_transcriptformer", show, save, return_fig)
