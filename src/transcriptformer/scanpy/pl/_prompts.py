"""Plots of what the model was asked: the regulators of each group (``tl.rank_regulators``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from ._base import finish

__all__ = ["rank_regulators"]


def rank_regulators(
    adata: AnnData,
    *,
    key: str = "transcriptformer_regulators",
    groups: Sequence[str] | None = None,
    n_genes: int = 5,
    kind: Literal["dotplot", "heatmap"] = "dotplot",
    cmap: str = "RdBu_r",
    ax: Any = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Any:
    """The top candidate genes of each group, as ``sc.pl.rank_genes_groups_dotplot`` draws markers.

    Rows are the groups, columns the ``n_genes`` best genes of each group in turn (a gene among the best of
    several groups appears under each); brackets above name the group each run of columns belongs to. The
    colour is the score ``log2(P_G / P_ref)`` of the gene in every group (centred on 0); in the dot plot the
    dot's size is the group's mean probability ``P_G`` relative to the gene's largest over groups.

    Parameters
    ----------
    adata
        The AnnData :func:`transcriptformer.scanpy.tl.rank_regulators` wrote into.
    key
        Its ``key_added``.
    groups
        Draw these groups only (default all).
    n_genes
        Genes per group.
    kind
        ``"dotplot"`` or ``"heatmap"``.
    cmap
        Colour map of the score.
    ax, show, save, return_fig
        As in scanpy's plots.

    Returns
    -------
    The axes (``show=False``), the figure (``return_fig=True``) or ``None``.
    """
    import matplotlib.pyplot as plt

    result = adata.uns.get(key)
    if not isinstance(result, dict) or "mean_probability" not in result or "names" not in result:
        raise KeyError(
            f"adata.uns[{key!r}] holds no result of tfs.tl.rank_regulators; run "
            f"tfs.tl.rank_regulators(adata, model, groupby=..., candidates=..., key_added={key!r}) first."
        )
    if kind not in ("dotplot", "heatmap"):
        raise ValueError(f"kind={kind!r}; expected 'dotplot' or 'heatmap'.")
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}.")
    mean = result["mean_probability"]  # groups x candidates
    all_groups = [str(g) for g in mean.index]
    chosen = all_groups if groups is None else [str(g) for g in groups]
    missing = [g for g in chosen if g not in all_groups]
    if missing:
        raise ValueError(f"group(s) {missing} are not in adata.uns[{key!r}]; groups: {all_groups}.")
    names = result["names"]
    columns: list[str] = []
    runs: list[tuple[str, int, int]] = []
    for g in chosen:
        start = len(columns)
        columns += [str(name) for name in list(names[g])[:n_genes]]
        runs.append((g, start, len(columns)))
    P = mean.loc[chosen, columns].to_numpy(dtype=np.float64)
    ref = mean.loc[:, columns].to_numpy(dtype=np.float64).mean(axis=0)
    with np.errstate(divide="ignore"):
        score = np.log2(P) - np.log2(ref)[None, :]
    lim = float(np.nanmax(np.abs(score[np.isfinite(score)]))) if np.isfinite(score).any() else 1.0
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(columns) + 2.5), max(2.5, 0.35 * len(chosen) + 1.5)))
    else:
        fig = ax.figure
    if kind == "heatmap":
        image = ax.imshow(score, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    else:
        size = P / np.maximum(P.max(axis=0, keepdims=True), 1e-300)
        yy, xx = np.mgrid[0 : len(chosen), 0 : len(columns)]
        image = ax.scatter(
            xx.ravel(),
            yy.ravel(),
            s=20 + 180 * size.ravel(),
            c=score.ravel(),
            cmap=cmap,
            vmin=-lim,
            vmax=lim,
            edgecolors="grey",
            linewidths=0.3,
        )
        ax.set_xlim(-0.6, len(columns) - 0.4)
        ax.set_ylim(len(chosen) - 0.4, -0.6)
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(len(chosen)), chosen)
    for g, start, stop in runs:  # a bracket over each group's genes, named as scanpy's dot plots name them
        if stop > start:
            ax.annotate(
                "",
                xy=(start - 0.3, 1.02),
                xytext=(stop - 0.7, 1.02),
                xycoords=("data", "axes fraction"),
                arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 1},
            )
            ax.annotate(
                g,
                xy=((start + stop - 1) / 2, 1.04),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                rotation=90,
                fontsize="small",
            )
    fig.colorbar(image, ax=ax, label="log2(P_group / P_ref)", shrink=0.8)
    return finish(fig, ax, "rank_regulators", show, save, return_fig)
