"""``tl.generate``: in-silico cells sampled gene by gene, with counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Unpack

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ...data.gene_ids import SPECIES, gene_table
from ...inference.options import RunKwargs, documents_run_options, run_options
from ...inference.record import provenance
from .._utils import check_adata
from ._common import ModelArg, load

logger = logging.getLogger("transcriptformer")

__all__ = ["generate"]


@documents_run_options
def generate(
    model: ModelArg = "tf-sapiens",
    n_cells: int | None = None,
    *,
    assay: str | Sequence[str] | None = None,
    prompt: AnnData | None = None,
    n_prompt_genes: int | None = None,
    max_genes: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    total_counts: float | Sequence[float] | None = None,
    seed: int = 0,
    **options: Unpack[RunKwargs],
) -> AnnData:
    """In-silico cells sampled from the model, gene by gene, with counts.

    At each slot the gene-identity head gives the next gene (special tokens other than ``[END]`` and genes
    already in the cell are never sampled), then the count head gives its count (a zero-truncated
    Poisson). ``[END]`` or ``max_genes`` ends a cell. Attention uses the *training-mode* semantics (a
    position's own count does not bias its attention to itself), because a gene's count is not known when
    the gene is predicted; embeddings and likelihoods use the inference mode, where it does. Keys and
    values are cached across steps, so a cell of ``n`` genes costs ``n`` single-position passes.

    The released models' count head shares the cell's total count among its genes with a softmax over
    all of them, which a sampler cannot know in advance. The total is taken from ``total_counts`` and the
    softmax's normaliser is estimated from the genes so far, assuming the cell will have ``max_genes``
    genes (exact at the last one). The released models were trained with ``[END]`` as a target only at the
    last slot of full-length cells, so cells usually run to ``max_genes``: set it to the length you want.
    See :mod:`transcriptformer.inference.generation` for the details.

    Parameters
    ----------
    model
        As in :func:`embed` (it needs the gene-identity head).
    n_cells
        Cells to generate (default: one per prompt cell). With a prompt, cell ``i`` continues prompt cell
        ``i % prompt.n_obs``.
    assay
        Assay label of the generated cells (one, or one per cell), from the model's assay vocabulary
        (e.g. ``"10x 3' v3"``); ignored with a prompt (its ``obs["assay"]`` is used). ``None``: unknown.
    prompt
        Real cells (raw counts) to continue: each generated cell starts with the prompt cell's first
        ``n_prompt_genes`` genes in the order the model reads them (its expressed genes in column order) and
        their real counts, unchanged.
    n_prompt_genes
        Genes taken from each prompt cell (default: all of them, up to ``max_genes``).
    max_genes
        Most genes per cell, prompt included (default: the model's ``seq_len``).
    temperature
        The gene logits are divided by it before sampling (1: the model's distribution; lower: more
        typical genes).
    top_k
        Sample each gene among the ``top_k`` most likely only.
    total_counts
        Total count of each cell that the count rates share (one number, or one per cell). Default: the
        prompt cell's total as the model sees it (its clipped counts), else 2.5 counts per gene slot
        (``2.5 * max_genes``), about what droplet data has per detected gene.
    seed
        Random seed: the same seed gives the same cells, whatever ``batch_size`` (on the same device and
        precision).
    {run_options}

    ``batch_size`` is the number of cells generated together (default 64); ``species_embedding`` and
    ``max_tokens`` do not apply to generation.

    Returns
    -------
    anndata.AnnData
        One row per generated cell. ``X``: sampled counts (CSR float32), one column per vocabulary gene that
        occurs in at least one cell (``var_names`` and ``var["ensembl_id"]`` the vocabulary ids, in vocabulary
        order; ``var["symbol"]`` the human or mouse gene symbol where the Ensembl tables know one).
        ``layers["position"]``: each gene's slot in its cell's sequence (the generation order).
        ``obs``: ``assay``, ``n_genes``, ``n_prompt_genes``, ``ended`` (``[END]`` was sampled), ``total_counts``,
        ``gene_logprob`` (summed log-probability of the sampled genes under the model) and, with a prompt,
        ``prompt_cell`` (the prompt's obs name). ``uns["transcriptformer_generate"]["params"]``.

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> cells = tfs.tl.generate("tf-tiny", 3, assay="10x 3' v3", max_genes=20, seed=1)
    >>> cells.obs["n_genes"].tolist()
    [20, 20, 20]
    """
    opts = run_options(
        options,
        "generate",
        unsupported={
            "species_embedding": "cells are sampled from the model's own vocabulary",
            "max_tokens": "batch_size sets how many cells are generated together",
        },
    )
    from ...inference.generation import check_sampling, sample_cells  # lazily: torch (`import tfs.tl` start-up)

    if prompt is not None:
        check_adata(prompt, "prompt")
    sampling: dict[str, Any] = {
        "n_cells": n_cells,
        "n_prompt_genes": n_prompt_genes,
        "max_genes": max_genes,
        "temperature": temperature,
        "top_k": top_k,
        "total_counts": total_counts,
        "seed": seed,
    }
    check_sampling(prompt=prompt is not None, **sampling)  # before the model is loaded (or downloaded)
    loaded = load(model, opts, prompt)
    g = sample_cells(
        loaded,
        assay=assay,
        prompt=prompt,
        **sampling,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
        tokenize=opts.tokenize(),
        progress=opts.progress,
    )
    n = len(g.lengths)
    rows, pos = np.nonzero(np.arange(g.tokens.shape[1])[None, :] < g.lengths[:, None])
    tokens = g.tokens[rows, pos]
    genes = np.unique(tokens)
    cols = np.searchsorted(genes, tokens)
    X = sp.csr_matrix((g.counts[rows, pos], (rows, cols)), shape=(n, len(genes)), dtype=np.float32)
    order = sp.csr_matrix((pos.astype(np.float32), (rows, cols)), shape=(n, len(genes)), dtype=np.float32)
    X.sort_indices()
    order.sort_indices()
    names = loaded.vocab.names()[genes].astype(str)
    obs = pd.DataFrame(index=[f"generated_{i}" for i in range(n)])
    if loaded.aux_vocabs:
        inverse = {v: k for k, v in loaded.aux_vocabs[0].labels.items()}
        obs["assay"] = pd.Categorical([inverse.get(int(a), "unknown") for a in g.aux[:, 0]])
    obs["n_genes"] = g.lengths
    obs["n_prompt_genes"] = g.n_prompt
    obs["ended"] = g.ended
    obs["total_counts"] = g.total_counts
    obs["gene_logprob"] = np.nansum(g.gene_logprob, axis=1).astype(np.float32)
    if prompt is not None:
        obs["prompt_cell"] = pd.Categorical(np.asarray(prompt.obs_names)[g.prompt_index])
    var = pd.DataFrame({"ensembl_id": names, "symbol": _symbols(names)}, index=names)
    out = AnnData(X=X, obs=obs, var=var)
    out.layers["position"] = order
    params = provenance(
        "generate",
        loaded,
        options=opts,
        n_cells=n,
        assay="none" if assay is None else (assay if isinstance(assay, str) else list(map(str, assay))),
        prompt=prompt is not None,
        n_prompt_genes="all" if n_prompt_genes is None else int(n_prompt_genes),
        max_genes=int(g.tokens.shape[1]),
        temperature=float(temperature),
        top_k="none" if top_k is None else int(top_k),
        seed=int(seed),
        batch_size=g.stats["batch_size"],
        device=g.stats["device"],
        precision=g.stats["precision"],
    )
    out.uns["transcriptformer_generate"] = {"params": params}
    return out


def _symbols(ids: np.ndarray) -> pd.Series:
    """The gene symbol of each Ensembl id in the human and mouse tables ("" where none is known)."""
    symbols: dict[str, str] = {}
    for species in SPECIES:
        table = gene_table(species).dropna(subset=["symbol"])
        symbols.update(zip(table["ensembl_id"], table["symbol"], strict=True))
    return pd.Series([symbols.get(i, "") for i in ids], index=ids, dtype=object)
