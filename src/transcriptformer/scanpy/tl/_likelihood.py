"""``tl.likelihood``: how likely the model finds each cell, and each of its genes."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal, Unpack

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ...inference.options import RunKwargs, check_bool, check_key, documents_run_options, run_options
from ...inference.shards import DEFAULT_SHARD_SIZE, Destination
from .._utils import Update, check_adata, check_writable
from ._common import ModelArg, check_out, run_model, run_to_file

logger = logging.getLogger("transcriptformer")

if TYPE_CHECKING:
    from ...inference.pipeline import Inference

__all__ = ["likelihood"]


@documents_run_options
def likelihood(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    level: Literal["cell", "gene"] = "cell",
    key_added: str = "transcriptformer",
    out: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    copy: bool = False,
    **options: Unpack[RunKwargs],
) -> AnnData | None:
    """How likely the model finds each cell, and each of its genes.

    TranscriptFormer is generative: at each gene of a cell it predicts the gene's identity from the genes
    before it (the gene-identity head) and the gene's count (the count head, a zero-truncated Poisson whose
    rate is a softmax over the cell's genes times its total count). These are the negative
    log-likelihoods (NLL, lower = more typical) of what the cell actually contains, exactly as the
    published ``llh`` and ``gene_llh`` outputs compute them (inference mode: each gene's own count enters
    the attention bias).

    Parameters
    ----------
    adata
        Annotated data matrix of raw counts, as in :func:`embed`.
    model
        As in :func:`embed`.
    level
        ``"cell"``: the per-cell count NLL. ``"gene"``: also every read gene's count NLL and gene-identity
        NLL as sparse layers aligned with ``adata.var`` (needs the gene-identity head).
    key_added
        Base name of every key written (below).
    out
        With ``level="cell"``: write the per-cell values into this file (``.zarr`` or ``.h5ad``) as they are
        computed, in resumable shards, as :func:`embed` does with ``out``; ``adata`` receives only
        ``uns[f"{key_added}_llh"]["params"]`` (with ``"out"``).
    shard_size
        Cells per shard, with ``out``.
    copy
        Return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with (with ``out``: in the file ``out``, and only the
    record in ``adata``):

    ``adata.obs[f"{key_added}_llh"]`` : float32
        Mean count NLL over the genes the model read (the published ``llh``; NaN for a cell without any gene
        of the vocabulary). Identical to ``embed(llh=True)``.
    ``adata.uns[f"{key_added}_llh"]["llh"]`` : :class:`numpy.ndarray`
        The same values (n_obs floats, input order), where the design of the package keeps likelihoods.
    ``adata.obs[f"{key_added}_n_genes"]`` : int
        Genes the model read (expressed, in the vocabulary, at most ``seq_len``).
    ``adata.layers[f"{key_added}_count_nll"]`` : :class:`scipy.sparse.csr_matrix` (float32), ``level="gene"``
        The count NLL of each read gene at that gene's column. Entries exist exactly for the genes the model
        read; genes it did not read (not expressed, outside the vocabulary, beyond ``seq_len``) are absent,
        never 0. The row mean over the stored entries is ``obs[f"{key_added}_llh"]``. published: for a cell
        with ``seq_len`` or more genes, the last read gene's count is taken as 1.
    ``adata.layers[f"{key_added}_gene_nll"]`` : :class:`scipy.sparse.csr_matrix` (float32), ``level="gene"``
        The gene-identity cross-entropy of each read gene (the published ``gene_llh`` at the gene's slot).
        At the last slot of a full-length cell the published target is ``[END]``; there this layer holds the
        cross-entropy of the gene itself, and the ``[END]`` value goes to ``obs[f"{key_added}_end_nll"]``.
    ``adata.obs[f"{key_added}_gene_nll"]``, ``adata.obs[f"{key_added}_end_nll"]`` : float32, ``level="gene"``
        The mean of the gene-identity cross-entropy over the cell's read vocabulary genes (NaN for a cell
        without any); the ``[END]`` cross-entropy of full-length cells (NaN for the others).
    ``adata.uns[f"{key_added}_llh"]["params"]`` : :class:`dict`
        How it was computed, and the keys written.

    When the counts come from ``.raw`` and ``raw.var`` has genes that ``adata.var`` lacks (e.g. ``adata`` was
    subset to highly variable genes), those genes' entries cannot be placed in ``adata.layers`` and are left
    out (a warning says how many; ``params["n_genes_not_in_var"]`` records it); the per-cell values in
    ``obs`` still cover them. Likewise, with ``filter_to_vocab=False`` genes outside the vocabulary are read as
    the ``unknown`` token: they count in ``obs`` (as in the published ``llh``) but have no gene identity and no
    entry in the layers (``params["n_genes_read_as_unknown"]``, with a warning). A run replaces what an
    earlier likelihood run under ``key_added`` wrote, and nothing else.

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> adata = tfs.datasets.tiny_human()
    >>> tfs.tl.likelihood(adata, model="tf-tiny", level="gene")
    >>> int(adata.layers["transcriptformer_count_nll"].nnz) == int(adata.obs["transcriptformer_n_genes"].sum())
    True
    """
    opts = run_options(options, "likelihood")
    if level not in ("cell", "gene"):
        raise ValueError(f"level={level!r}; expected 'cell' or 'gene'.")
    key = check_key(key_added)  # always a base name here
    copy = check_bool(copy, "copy")
    path, shard_size = check_out(out, shard_size, adata)
    if path is not None and level == "gene":
        raise ValueError(
            "out= writes per-cell values; level='gene' (one value per read gene of every cell, as sparse layers) "
            "is computed in memory: leave out out=, or use level='cell'."
        )
    check_adata(adata)
    check_writable(adata, copy)
    heads = ("llh", "end_nll", "count_nll", "gene_nll") if level == "gene" else ("llh",)
    if path is not None:
        destinations = [
            Destination("uns", "llh", f"{key}_llh/llh"),
            Destination("obs", "llh", f"{key}_llh"),
            Destination("obs", "n_genes", f"{key}_n_genes"),
        ]
        params = run_to_file(
            adata, model, opts, heads, out=path, shard_size=shard_size, tool="likelihood", key=f"{key}_llh",
            destinations=destinations, level=level,
        )  # fmt: skip
        update = Update("likelihood", record=f"{key}_llh")
        update.set("uns", f"{key}_llh", {"params": {k: v for k, v in params.items() if k != "keys"}})
        return update.apply(adata, copy=copy)
    run, loaded = run_model(adata, model, opts, heads)
    params = run.params(loaded, opts, "likelihood", level=level)
    update = Update("likelihood", record=f"{key}_llh")
    update.set("obs", f"{key}_llh", run.result.llh)
    update.set("obs", f"{key}_n_genes", run.result.n_genes.astype(np.int64))
    if level == "gene":
        _gene_level(update, key, run, adata, params)
    update.set("uns", f"{key}_llh", {"params": params, "llh": run.result.llh})
    return update.apply(adata, copy=copy)


def _gene_level(update: Update, key: str, run: Inference, adata: AnnData, params: dict) -> None:
    """Queue the per-gene outputs: the two layers and the per-cell gene-identity summaries."""
    res = run.result
    genes = res.genes
    update.set("obs", f"{key}_end_nll", res.cells["end_nll"])
    sums = np.bincount(genes["cell"], weights=genes["gene_nll"], minlength=adata.n_obs)
    entries = np.bincount(genes["cell"], minlength=adata.n_obs)  # genes read as 'unknown' have no gene identity
    with np.errstate(invalid="ignore", divide="ignore"):
        update.set("obs", f"{key}_gene_nll", (sums / entries).astype(np.float32))
    cols = run.source.token_positions(adata.var_names)[genes["token"]]
    placed = cols >= 0
    if not placed.all():
        logger.warning(
            "%s read genes (of %s) are in %s but not in adata.var, so the layers cannot hold them; obs %r "
            "still covers them.",
            f"{int((~placed).sum()):,}",
            f"{len(cols):,}",
            run.source.source,
            f"{key}_llh",
        )
    # with filter_to_vocab=False, genes outside the vocabulary are read as the 'unknown' token: they count in
    # obs (as in the published llh) but have no gene identity, so the layers leave them out
    n_unknown = int(res.n_genes.sum()) - len(cols)
    if n_unknown:
        logger.warning(
            "%s read genes (of %s) are outside the vocabulary and were read as the 'unknown' token "
            "(filter_to_vocab=False); the layers hold only vocabulary genes, obs %r covers all.",
            f"{n_unknown:,}",
            f"{int(res.n_genes.sum()):,}",
            f"{key}_llh",
        )
    for what in ("count_nll", "gene_nll"):
        values = genes[what][placed].astype(np.float32)
        layer = sp.csr_matrix(
            (values, (genes["cell"][placed], cols[placed])), shape=(adata.n_obs, adata.n_vars), dtype=np.float32
        )
        layer.sort_indices()
        update.set("layers", f"{key}_{what}", layer)
    params["n_genes_read_as_unknown"] = n_unknown
    params["n_genes_not_in_var"] = int((~placed).sum())
