"""``tl.umap``: neighbours and a UMAP of a TranscriptFormer embedding, of cells or of genes."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from anndata import AnnData

from ...inference.options import check_bool, check_key, check_positive_int
from ...inference.record import provenance
from .._utils import Update, check_adata, check_writable, fingerprint, use_rep_or_deprecated

logger = logging.getLogger("transcriptformer")

__all__ = ["MIN_UMAP_POINTS", "umap"]

#: Fewest cells (or genes) :func:`umap` accepts (scanpy's neighbour graph and spectral layout fail below it).
MIN_UMAP_POINTS = 4


def umap(
    adata: AnnData,
    *,
    use_rep: str = "X_transcriptformer",
    axis: Literal["obs", "var"] = "obs",
    n_neighbors: int = 15,
    random_state: int = 0,
    key_added: str | None = None,
    copy: bool = False,
    rep: str | None = None,
) -> AnnData | None:
    """Neighbours and a UMAP of an embedding, under keys of its own (the user's ``X_umap`` is left alone).

    :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap` on ``obsm[use_rep]`` (cells), or on
    ``varm[use_rep]`` with ``axis="var"`` (genes, e.g. from :func:`gene_embeddings`; genes without an
    embedding are left out). The record keeps a fingerprint of every value of the embedding, so the plots can
    tell when the UMAP no longer matches it.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]`` (or ``varm[use_rep]``).
    use_rep
        The embedding.
    axis
        ``"obs"``: a UMAP of the cells; ``"var"``: of the genes.
    n_neighbors, random_state
        Passed to :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap` (``n_neighbors`` at least 2).
    key_added
        Base name of the keys written; default ``f"umap_{base}"`` with ``base`` the embedding's name without
        ``X_`` (``"umap_transcriptformer"``).
    copy
        Return a modified copy instead of writing into ``adata``.
    rep
        Deprecated spelling of ``use_rep``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with ``obsm[f"X_{key_added}"]`` (``varm`` with
    ``axis="var"``; NaN rows for genes without an embedding), ``uns[key_added]["params"]`` and, for cells, the
    neighbour graph (``uns[f"{key_added}_neighbors"]``, ``obsp[f"{key_added}_neighbors_distances"]`` and
    ``obsp[f"{key_added}_neighbors_connectivities"]``).
    """
    import scanpy as sc  # lazily: start-up time

    use_rep = check_key(use_rep_or_deprecated(rep, use_rep, "umap"), "use_rep")
    if axis not in ("obs", "var"):
        raise ValueError(f"axis={axis!r}; expected 'obs' (cells) or 'var' (genes).")
    n_neighbors = check_positive_int(n_neighbors, "n_neighbors", allow_none=False)
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be at least 2 (a point and one neighbour), got {n_neighbors}.")
    copy = check_bool(copy, "copy")
    check_adata(adata)
    check_writable(adata, copy)
    key = check_key(key_added) if key_added is not None else f"umap_{use_rep.removeprefix('X_')}"
    store = adata.obsm if axis == "obs" else adata.varm
    if use_rep not in store:
        made_by = "tfs.tl.embed(adata, ...)" if axis == "obs" else "tfs.tl.gene_embeddings(adata, ...)"
        raise KeyError(f"adata.{axis}m has no {use_rep!r}; run {made_by} first (or pass use_rep=<{axis}m key>).")
    if f"X_{key}" == use_rep:
        raise ValueError(
            f"key_added={key!r} would write the UMAP to {axis}m[{use_rep!r}], over the embedding it is computed from; "
            f"pass another key_added (e.g. {f'umap_{key}'!r})."
        )
    X = np.asarray(store[use_rep], dtype=np.float32)
    finite = np.isfinite(X).all(axis=1)
    if axis == "obs" and not finite.all():
        raise ValueError(
            f"adata.obsm[{use_rep!r}] has NaN or infinite values in {int((~finite).sum())} cell(s); embed them again "
            "or leave them out."
        )
    if finite.sum() < MIN_UMAP_POINTS:
        raise ValueError(
            f"a UMAP needs at least {MIN_UMAP_POINTS} {'cells' if axis == 'obs' else 'genes'} with an "
            f"embedding; adata has {int(finite.sum())}."
        )
    params = provenance(
        "umap",
        None,
        use_rep=use_rep,
        axis=axis,
        n_neighbors=n_neighbors,
        random_state=random_state,
        fingerprint=fingerprint(X),
    )
    # computed on an AnnData holding only the embedding: nothing of adata is copied or touched until the end
    points = AnnData(obsm={"X": X[finite]})
    k = min(n_neighbors, int(finite.sum()) - 1)
    logger.info("computing neighbours and a UMAP of %sm[%r] (keys: %r)", axis, use_rep, key)
    neighbors = f"{key}_neighbors"
    sc.pp.neighbors(points, use_rep="X", n_neighbors=k, random_state=random_state, key_added=neighbors)
    sc.tl.umap(points, neighbors_key=neighbors, random_state=random_state)
    coords = points.obsm["X_umap"]
    update = Update("umap", record=key)
    if axis == "obs":
        update.set("obsm", f"X_{key}", coords)
        graph = dict(points.uns[neighbors])
        graph["params"] = {**graph["params"], "use_rep": use_rep}
        update.set("uns", neighbors, graph)
        for what in ("distances", "connectivities"):
            update.set("obsp", f"{neighbors}_{what}", points.obsp[f"{neighbors}_{what}"])
    else:
        full = np.full((adata.n_vars, 2), np.nan, dtype=np.float32)
        full[finite] = coords
        update.set("varm", f"X_{key}", full)
    update.set("uns", key, {"params": params})
    return update.apply(adata, copy=copy)
