"""Plots of TranscriptFormer results (``tfs.pl``). Each takes ``show``, ``ax`` and ``return_fig``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["llh", "species_umap", "umap"]


def _finish(fig, show: bool | None, return_fig: bool):
    import matplotlib.pyplot as plt

    if return_fig:
        return fig
    if show is None or show:
        plt.show()
    return None


def _require(adata: AnnData, rep: str) -> None:
    if rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {rep!r}; run tfs.tl.embed(adata, ...) first (or pass rep=<obsm key>). "
            f"obsm has {list(adata.obsm.keys())}."
        )


def _fingerprint(X) -> str:
    """A cheap digest of an embedding (shape and a sample of rows), to notice that it changed."""
    import hashlib

    X = np.asarray(X)
    sample = np.ascontiguousarray(X[:: max(1, len(X) // 1000)], dtype=np.float32)
    return hashlib.sha1(repr(X.shape).encode() + sample.tobytes()).hexdigest()


def _umap_coordinates(adata: AnnData, rep: str, n_neighbors: int, random_state: int) -> str:
    """Neighbours and a UMAP of ``obsm[rep]``, recomputed when the embedding or the settings changed.

    Returns the UMAP's ``obsm`` key.
    """
    import scanpy as sc

    basis = f"X_umap_{rep.removeprefix('X_')}"
    key = f"{rep.removeprefix('X_')}_neighbors"
    wanted = {"use_rep": rep, "n_neighbors": n_neighbors, "random_state": random_state}
    wanted["fingerprint"] = _fingerprint(adata.obsm[rep])
    params = adata.uns.get(key, {}).get("params", {})
    if basis not in adata.obsm or any(params.get(k) != v for k, v in wanted.items()):
        sc.pp.neighbors(adata, use_rep=rep, n_neighbors=n_neighbors, key_added=key, random_state=random_state)
        coords = sc.tl.umap(adata, neighbors_key=key, random_state=random_state, copy=True).obsm["X_umap"]
        adata.obsm[basis] = coords
        adata.uns[key]["params"]["fingerprint"] = wanted["fingerprint"]
    return basis


def umap(
    adata: AnnData,
    *,
    rep: str = "X_transcriptformer",
    color: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs: Any,
):
    """UMAP of the TranscriptFormer cell embeddings.

    Computes a neighbour graph and UMAP of ``adata.obsm[rep]`` the first time (stored as
    ``uns["transcriptformer_neighbors"]``, ``obsp`` of that key and ``obsm["X_umap_transcriptformer"]``
    for the default ``rep``, so it does not disturb an existing ``X_umap``), then plots with
    :func:`scanpy.pl.embedding`.

    Parameters
    ----------
    adata
        AnnData with ``obsm[rep]``.
    rep
        The embedding to plot.
    color
        ``obs`` columns or genes to colour by.
    n_neighbors, random_state
        Passed to :func:`scanpy.pp.neighbors` / :func:`scanpy.tl.umap`.
    ax, show, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.
    """
    import scanpy as sc

    _require(adata, rep)
    basis = _umap_coordinates(adata, rep, n_neighbors, random_state)
    if ax is None:
        fig = sc.pl.embedding(adata, basis=basis, color=color, show=False, return_fig=True, **kwargs)
    else:
        sc.pl.embedding(adata, basis=basis, color=color, ax=ax, show=False, **kwargs)
        fig = ax.figure
    return _finish(fig, show, return_fig)


def species_umap(
    adatas: Mapping[str, AnnData],
    *,
    rep: str = "X_transcriptformer",
    color: str | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ax=None,
    show: bool | None = None,
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
    show, return_fig
        As in scanpy's plotting functions.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``).
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

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
    basis = _umap_coordinates(joint, rep, n_neighbors, random_state)
    panels = ["species"] + ([color] if color else [])
    if ax is None:
        # room on the right of each panel for its legend
        fig, grid = plt.subplots(
            1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, gridspec_kw={"wspace": 0.7}
        )
        axes = list(grid[0])
    else:
        axes = list(ax) if isinstance(ax, Sequence) else [ax]
        if len(axes) < len(panels):
            raise ValueError(f"pass {len(panels)} axes (one per panel: {panels}).")
        fig = axes[0].figure
    for a, key in zip(axes, panels, strict=False):
        sc.pl.embedding(joint, basis=basis, color=key, ax=a, show=False, **kwargs)
    return _finish(fig, show, return_fig)


def llh(
    adata: AnnData,
    *,
    groupby: str | None = None,
    key: str = "transcriptformer_llh",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Distribution of the per-cell negative log-likelihood (from ``tfs.tl.embed(..., llh=True)``).

    Parameters
    ----------
    adata
        AnnData with ``obs[key]``.
    groupby
        An ``obs`` column: one box per group (e.g. cell type or batch: atypical groups stand out).
    key
        The ``obs`` column holding the likelihood.
    ax, show, return_fig
        As in scanpy's plotting functions.
    """
    import matplotlib.pyplot as plt

    if key not in adata.obs:
        raise KeyError(f"adata.obs has no {key!r}; run tfs.tl.embed(adata, ..., llh=True) first.")
    values = adata.obs[key].astype(float)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    if groupby is None:
        ax.hist(values.dropna(), bins=50)
        ax.set_xlabel("negative log-likelihood per gene")
        ax.set_ylabel("cells")
    else:
        if groupby not in adata.obs:
            raise KeyError(f"adata.obs has no column {groupby!r}.")
        groups = adata.obs[groupby].astype("category")
        labels = list(groups.cat.categories)
        data = [values[(groups == g).to_numpy()].dropna().to_numpy() for g in labels]
        ax.boxplot(data, tick_labels=[str(g) for g in labels], showfliers=False)
        ax.set_xlabel(groupby)
        ax.set_ylabel("negative log-likelihood per gene")
        ax.tick_params(axis="x", rotation=90)
    return _finish(fig, show, return_fig)
