"""Gene embeddings: contextual (one per gene per cell), per gene, and per gene within groups of cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Unpack

import numpy as np
import pandas as pd
from anndata import AnnData

from ...data.tokenizer import table_column
from ...inference.options import RunKwargs, check_bool, check_genes, documents_run_options, run_options
from .._utils import Update, base_key, check_adata, check_writable, deprecated_argument
from ._common import ModelArg, group_codes, load, run_model

if TYPE_CHECKING:
    from ...inference.pipeline import Inference

__all__ = ["MAX_GROUP_BYTES", "contextual_gene_embeddings", "gene_embeddings", "gene_embeddings_by_group"]

#: Largest accumulator :func:`gene_embeddings_by_group` allocates (groups x genes x embed_dim float64 sums).
MAX_GROUP_BYTES = 8 << 30


@documents_run_options
def contextual_gene_embeddings(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    genes: Sequence[str] | None = None,
    **options: Unpack[RunKwargs],
) -> AnnData:
    """Contextual gene embeddings: one vector per gene per cell, read at the gene's prediction slot.

    The vector of gene ``g`` in a cell is the model's hidden state at the position where it
    predicts ``g`` from the genes before it (the published ``--emb-type cge``). For one vector per gene
    (averaged over cells, or over the cells of each group) use :func:`gene_embeddings`, which streams.

    Parameters
    ----------
    adata, model
        As in :func:`embed`.
    genes
        Keep only these genes: Ensembl ids (version suffixes ignored), ``var_names`` (with ``var[gene_key]``
        holding their ids) or human / mouse gene symbols. The others are dropped as the batches are computed,
        so memory holds only what is kept. The output for a whole atlas is large: one row per expressed gene
        per cell.
    {run_options}

    Returns
    -------
    anndata.AnnData
        A new AnnData with one observation per (cell, gene): ``X`` holds the embeddings (float32),
        ``obs`` has ``cell`` (the input's obs name), ``cell_index`` (its position), ``gene_id``, ``position``
        (slot in the cell's sequence) and ``count`` (the count the model saw for that gene, after
        ``normalize_to_scale`` and clipping); ``uns["transcriptformer_cge"]["params"]`` the run's
        parameters. ``adata`` is not modified.
    """
    opts = run_options(options, "contextual_gene_embeddings")
    genes = check_genes(genes)
    run, loaded = run_model(adata, model, opts, ("cge", "count"), genes=genes)
    res = run.result.genes
    cells = res["cell"]
    obs = pd.DataFrame(
        {
            "cell": pd.Categorical(np.asarray(adata.obs_names)[cells]),
            "cell_index": cells,
            "gene_id": pd.Categorical(run.vocab.names()[res["token"]]),
            "position": res["position"],
            "count": res["count"].astype(np.float32),
        }
    )
    obs.index = obs.index.astype(str)
    out = AnnData(X=res["cge"], obs=obs)
    out.var_names = [f"tf_{i}" for i in range(out.n_vars)]
    params = run.params(loaded, opts, "contextual_gene_embeddings", genes=genes)
    out.uns["transcriptformer_cge"] = {"params": params}
    return out


@documents_run_options
def gene_embeddings(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    genes: Sequence[str] | None = None,
    key_added: str = "transcriptformer_genes",
    copy: bool = False,
    groupby: str | None = None,
    **options: Unpack[RunKwargs],
) -> AnnData | None:
    """One embedding per gene: the mean of its contextual embeddings over the cells where the model read it.

    The contextual embedding of a gene in a cell (:func:`contextual_gene_embeddings`) is the model's
    hidden state where it predicts that gene from the genes before it. Averaging over cells gives a
    vector per gene that reflects the cellular contexts it occurs in (per group of cells:
    :func:`gene_embeddings_by_group`). The sums are accumulated as the batches are computed: memory holds
    ``n_genes x embed_dim`` float64 values, never one row per (cell, gene), so backed files of any size run in
    bounded memory.

    Parameters
    ----------
    adata, model
        As in :func:`embed`.
    genes
        Only these genes (default: every gene of ``adata`` in the vocabulary): Ensembl ids, ``var_names`` or
        human / mouse gene symbols.
    key_added
        Base name of every key written (below).
    copy
        Return a modified copy instead of writing into ``adata``.
    groupby
        Deprecated: use :func:`gene_embeddings_by_group` (this returns its result, a new AnnData).
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with ``adata.varm[f"X_{key_added}"]`` (float32,
    ``n_vars x embed_dim``; NaN rows for genes never read), ``adata.var[f"{key_added}_n_cells"]`` (cells
    that contributed) and ``adata.uns[key_added]["params"]``. Genes read from ``.raw`` that ``adata.var``
    lacks are left out (their means have no row of ``adata.var``).
    """
    if groupby is not None:
        deprecated_argument("gene_embeddings(groupby=...)", "gene_embeddings_by_group(adata, groupby=...)")
        return gene_embeddings_by_group(adata, model, groupby=groupby, genes=genes, **options)
    opts = run_options(options, "gene_embeddings")
    key = base_key(key_added, "gene_embeddings")
    copy = check_bool(copy, "copy")
    genes = check_genes(genes)
    check_adata(adata)
    check_writable(adata, copy)
    run, loaded = run_model(adata, model, opts, ("gene_sum",), genes=genes, data_genes_only=True)
    means, n, positions = _means(run, adata)
    placed = positions >= 0
    varm = np.full((adata.n_vars, loaded.embed_dim), np.nan, dtype=np.float32)
    n_cells = np.zeros(adata.n_vars, dtype=np.int64)
    varm[positions[placed]] = means[0][placed]
    n_cells[positions[placed]] = n[0][placed]
    update = Update("gene_embeddings", record=key)
    update.set("varm", f"X_{key}", varm)
    update.set("var", f"{key}_n_cells", n_cells)
    update.set("uns", key, {"params": run.params(loaded, opts, "gene_embeddings", genes=genes)})
    return update.apply(adata, copy=copy)


@documents_run_options
def gene_embeddings_by_group(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    groupby: str,
    genes: Sequence[str] | None = None,
    **options: Unpack[RunKwargs],
) -> AnnData:
    """One embedding per gene and group of cells: :func:`gene_embeddings` within each group.

    Lets the same gene be compared across cell types, species or conditions. Memory holds
    ``groups x genes x embed_dim`` float64 sums for the groups that have cells (at most
    :data:`MAX_GROUP_BYTES`; a larger request is refused before any compute, with the numbers).

    Parameters
    ----------
    adata, model
        As in :func:`embed`.
    groupby
        An ``obs`` column: one mean per (group, gene). Cells whose group is missing are skipped; categories
        without cells are left out. Labels are compared as strings, as in :func:`rank_regulators`: ``1`` and
        ``"1"`` are one group, ``"1"``.
    genes
        As in :func:`gene_embeddings`.
    {run_options}

    Returns
    -------
    anndata.AnnData
        A new AnnData with one row per (group, gene) that occurs: ``X`` the mean (float32), ``obs`` columns
        ``group``, ``gene_id`` (the vocabulary id), ``gene`` (the gene's ``adata.var`` name) and ``n_cells``;
        ``uns["transcriptformer_genes"]["params"]``. ``adata`` is not modified.
    """
    opts = run_options(options, "gene_embeddings_by_group")
    check_adata(adata)
    if not isinstance(groupby, str) or groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    codes, labels = group_codes(table_column(adata.obs, groupby))
    if not labels:
        raise ValueError(f"adata.obs[{groupby!r}] has no group with cells.")
    genes = check_genes(genes)
    loaded = load(model, opts, adata)
    n_genes = len(genes) if genes is not None else adata.n_vars
    need = len(labels) * min(n_genes, len(loaded.vocab)) * loaded.embed_dim * 8
    if need > MAX_GROUP_BYTES:
        raise ValueError(
            f"adata.obs[{groupby!r}] has {len(labels):,} groups with cells: their sums over up to {n_genes:,} genes "
            f"would take {need / 2**30:.1f} GiB (limit {MAX_GROUP_BYTES / 2**30:.0f} GiB). Group by a column with "
            "fewer values (a categorical of cell types, not a numeric column), or pass genes=[...]."
        )
    run, loaded = run_model(
        adata, loaded, opts, ("gene_sum",), genes=genes, groups=codes, n_groups=len(labels), data_genes_only=True
    )
    means, n, positions = _means(run, adata)
    g, r = np.nonzero((n > 0) & (positions >= 0)[None, :])
    tokens = run.result.gene_sums["tokens"]
    obs = pd.DataFrame(
        {
            "group": pd.Categorical([labels[i] for i in g], categories=labels),
            "gene_id": pd.Categorical(run.vocab.names()[tokens[r]].astype(str)),
            "gene": pd.Categorical(np.asarray(adata.var_names)[positions[r]]),
            "n_cells": n[g, r].astype(np.int64),
        }
    )
    obs.index = [f"{labels[i]}:{name}" for i, name in zip(g, obs["gene"], strict=True)]
    out = AnnData(X=means[g, r], obs=obs)
    out.var_names = [f"tf_{i}" for i in range(loaded.embed_dim)]
    params = run.params(loaded, opts, "gene_embeddings_by_group", groupby=groupby, genes=genes)
    out.uns["transcriptformer_genes"] = {"params": params}
    return out


def _means(run: Inference, adata: AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-(group, gene) means and counts of a ``gene_sum`` run, and each row's position in ``adata.var``."""
    sums = run.result.gene_sums
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums["sum"] / sums["n"][..., None]).astype(np.float32)
    return means, sums["n"], run.source.token_positions(adata.var_names)[sums["tokens"]]
