"""``tl.embed``: cell embeddings (and, with ``llh=True``, each cell's likelihood)."""

from __future__ import annotations

import os
from typing import Any, Unpack

import numpy as np
from anndata import AnnData

from ...inference.options import RunKwargs, check_bool, documents_run_options, run_options
from ...inference.shards import DEFAULT_SHARD_SIZE, Destination
from .._utils import Update, base_key, check_adata, check_writable
from ._common import ModelArg, check_out, run_model, run_to_file

__all__ = ["embed", "transcriptformer"]


@documents_run_options
def embed(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    llh: bool = False,
    key_added: str = "transcriptformer",
    out: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    copy: bool = False,
    **options: Unpack[RunKwargs],
) -> AnnData | None:
    """Embed cells with a TranscriptFormer model.

    Genes are matched to the model's vocabulary by Ensembl id, each cell becomes a sequence of its
    expressed genes (in the data's column order, at most ``seq_len``) with their counts, and the
    cell embedding is the model's pooled hidden state, exactly as the published implementation
    computes it.

    Parameters
    ----------
    adata
        Annotated data matrix of raw counts (cells x genes). In memory, a view, backed
        (``sc.read_h5ad(..., backed="r")``), read lazily (``anndata.experimental.read_lazy``, a dask ``X``) or a
        SOMA experiment (:func:`~transcriptformer.data.soma.read_soma`): anything not in memory is read one
        window of cells at a time.
    model
        A registry name (``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"``; downloaded and verified
        on first use), a checkpoint folder in the published layout, a loaded model, or ``(model, adapter)``.
        An existing folder always wins over a registry name of the same spelling.
    llh
        Also compute each cell's likelihood under the model, exactly what ``likelihood(level="cell")``
        computes: the mean zero-truncated-Poisson negative log-likelihood per gene (lower = more typical),
        as the published ``llh`` output.
    key_added
        Base name of every key written (below), as in :func:`scanpy.tl.umap`.
    out
        Write the results into this file (``.zarr`` store or ``.h5ad`` file) as they are computed instead of
        into ``adata``, for more cells than memory holds embeddings of. The run writes shards of
        ``shard_size`` cells into ``<out>.shards`` beside it and merges them into ``out`` at the end; an
        interrupted call resumes, computing only the missing shards, when made again with the same arguments
        (another model, option or input is refused). ``out`` is an AnnData with ``adata``'s ``obs`` (cells in
        input order) and the keys below; ``adata`` receives only ``uns[key_added]["params"]`` (with ``"out"``).
    shard_size
        Cells per shard, with ``out``.
    copy
        Return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with (with ``out``: in the file ``out``, and only the
    record in ``adata``):

    ``adata.obsm[f"X_{key_added}"]`` : :class:`numpy.ndarray` (float32, ``n_obs x embed_dim``)
        The cell embeddings, in the input's cell order.
    ``adata.uns[key_added]["params"]`` : :class:`dict`
        Model, checkpoint sha256, options, how it ran, the keys written, and the package version.
    ``adata.uns[key_added]["llh"]``, ``adata.obs[f"{key_added}_llh"]``, ``adata.obs[f"{key_added}_n_genes"]``
        With ``llh=True``: the per-cell negative log-likelihood (n_obs floats, input order; NaN for cells
        without any gene of the vocabulary, as the published ``llh``) and the number of genes the model read.

    A run replaces what an earlier ``embed`` under the same ``key_added`` wrote (``embed(llh=False)`` after
    ``embed(llh=True)`` removes the earlier likelihood columns too, unless :func:`likelihood` rewrote them
    since), and nothing else. On any error ``adata`` is left unchanged.

    Examples
    --------
    >>> import scanpy as sc
    >>> import transcriptformer.scanpy as tfs
    >>> adata = tfs.datasets.tiny_human()
    >>> tfs.tl.embed(adata, model="tf-tiny")
    >>> sc.pp.neighbors(adata, use_rep="X_transcriptformer")
    """
    opts = run_options(options, "embed")
    llh = check_bool(llh, "llh")
    key = base_key(key_added, "embed")
    copy = check_bool(copy, "copy")
    path, shard_size = check_out(out, shard_size, adata)
    check_adata(adata)
    check_writable(adata, copy)
    heads = ("embeddings", "llh") if llh else ("embeddings",)
    update = Update("embed", record=key)
    if path is not None:
        destinations = [Destination("obsm", "embeddings", f"X_{key}")]
        if llh:
            destinations += [
                Destination("uns", "llh", f"{key}/llh"),
                Destination("obs", "llh", f"{key}_llh"),
                Destination("obs", "n_genes", f"{key}_n_genes"),
            ]
        params = run_to_file(
            adata, model, opts, heads, out=path, shard_size=shard_size, tool="embed", key=key,
            destinations=destinations, llh=llh,
        )  # fmt: skip
        update.set("uns", key, {"params": {k: v for k, v in params.items() if k != "keys"}})
        return update.apply(adata, copy=copy)
    run, loaded = run_model(adata, model, opts, heads)
    update.set("obsm", f"X_{key}", run.result.embeddings)
    entry: dict[str, Any] = {"params": run.params(loaded, opts, "embed", llh=llh)}
    if llh:
        entry["llh"] = run.result.llh
        update.set("obs", f"{key}_llh", run.result.llh)
        update.set("obs", f"{key}_n_genes", run.result.n_genes.astype(np.int64))
    update.set("uns", key, entry)
    return update.apply(adata, copy=copy)


#: Alias of :func:`embed`, named after the model as ``sc.tl.umap`` is after its method.
transcriptformer = embed
