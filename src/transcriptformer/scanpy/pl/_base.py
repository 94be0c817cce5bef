"""What every plot shares: scanpy's ending (save, show, return), axes, and the heatmap of a table."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ...errors import warn
from .._utils import fingerprint

logger = logging.getLogger("transcriptformer")

__all__ = ["axes", "check_fresh", "finish", "heatmap", "light", "made_from", "umap_call"]


def finish(fig: Any, ax: Any, name: str, show: bool | None, save: bool | str | None, return_fig: bool) -> Any:
    """Scanpy's ending of a plot: save to the figure directory, then figure / axes / show.

    ``save=True`` writes ``{figdir}/{name}.{file_format_figs}``; a string is appended to the name, as scanpy
    does (``save="_lt.png"`` writes ``{name}_lt.png``; without an extension, scanpy's format is used).
    """
    import matplotlib.pyplot as plt  # lazily: start-up time

    if save:
        import scanpy as sc

        suffix = save if isinstance(save, str) else ""
        stem, dot, ext = suffix.rpartition(".") if "." in suffix else (suffix, "", "")
        path = Path(sc.settings.figdir) / f"{name}{stem}.{ext if dot else sc.settings.file_format_figs}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")  # dpi: matplotlib's savefig.dpi, which sc.set_figure_params sets
        logger.info("saved figure %s", path)
    if return_fig:
        return fig
    if show is False:
        return ax
    if show is None and save:  # scanpy does not show a figure it saved unless asked
        return None
    plt.show()
    return None


def axes(ax: Any, figsize: tuple[float, float] = (6, 4.5)) -> tuple[Any, Any]:
    """``(figure, axes)``: new ones, or those of ``ax``."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def heatmap(
    ax: Any, fig: Any, values: np.ndarray, rows: list[str], cols: list[str], *, cmap: str, label: str, **kwargs: Any
) -> None:
    """A table as an image with every row and column named, and its colour bar."""
    image = ax.imshow(values, cmap=cmap, aspect="auto", **kwargs)
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)


def check_fresh(adata: AnnData, key: str, X: Any, made_by: str) -> None:
    """Warn when the UMAP under ``uns[key]`` was computed from other values than ``X`` (the embedding now)."""
    made = adata.uns.get(key, {}).get("params", {}).get("fingerprint")
    if made is not None and made != fingerprint(X):
        warn(f"the UMAP in {key!r} was computed from an earlier version of the embedding; run {made_by} again.")


def made_from(adata: AnnData, key: str, default: str) -> str:
    """The embedding the UMAP under ``uns[key]`` was computed from: the ``use_rep`` that ``tl.umap`` recorded.

    ``default`` for a UMAP without a record.
    """
    record = adata.uns.get(key)
    params = record.get("params") if isinstance(record, Mapping) else None
    use_rep = params.get("use_rep") if isinstance(params, Mapping) else None
    return use_rep if isinstance(use_rep, str) else default


def umap_call(use_rep: str, key: str, axis: str = "obs") -> str:
    """The ``tl.umap`` call that writes the UMAP of ``use_rep`` under ``key`` (``key_added`` when not the default)."""
    call = f"tfs.tl.umap(adata, use_rep={use_rep!r}"
    if axis != "obs":
        call += f", axis={axis!r}"
    if key != f"umap_{use_rep.removeprefix('X_')}":
        call += f", key_added={key!r}"
    return call + ")"


def light(adata: AnnData, columns: Iterable[str], obsm: Mapping[str, Any] | None = None) -> AnnData:
    """What a scanpy plot needs of ``adata``, to draw from without writing into it.

    Scanpy's plots store colours in ``uns`` and make string columns categorical in the AnnData they are given;
    this one holds a copy of the ``obs`` columns named (and their ``uns[f"{column}_colors"]``, so the plot keeps
    the user's colours) and the arrays of ``obsm`` (not copied: scanpy only reads them).
    """
    columns = list(dict.fromkeys(columns))
    obs = adata.obs[columns].copy() if columns else pd.DataFrame(index=adata.obs_names.copy())
    uns = {f"{c}_colors": copy.deepcopy(adata.uns[f"{c}_colors"]) for c in columns if f"{c}_colors" in adata.uns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-unique obs names: the user was told about adata's
        return AnnData(obs=obs, obsm=dict(obsm or {}), uns=uns)
