"""Asking the model questions: the next gene after a prompt, gene-gene interactions, regulators of groups of cells.

The computation, and the exact definitions, are in :mod:`transcriptformer.inference.prompts`.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack

import numpy as np
import pandas as pd
from anndata import AnnData

from ...data.tokenizer import counts_var, table_column
from ...inference.options import (
    RunKwargs,
    check_bool,
    check_genes,
    check_key,
    check_positive_int,
    documents_run_options,
    run_options,
)
from ...inference.record import provenance
from .._utils import Update, check_adata, check_writable
from ._common import ModelArg, genes_var, group_codes, load

if TYPE_CHECKING:
    from ...inference.prompts import Prompts

logger = logging.getLogger("transcriptformer")

__all__ = ["gene_interactions", "next_gene", "rank_regulators"]

#: Options of the shared run options that the prompting tools cannot honour, with the reason.
_UNSUPPORTED = {
    "species_embedding": "the next-gene distribution is over the model's own vocabulary",
    "max_tokens": "batch_size sets how many prompts run together",
}

GenesArg = str | Sequence[str] | Mapping[str, float] | Sequence[Sequence[str] | Mapping[str, float]]


def _symbols(ids: Sequence[str], var: pd.DataFrame | None, gene_key: str | None) -> np.ndarray:
    """A readable name for each vocabulary id.

    The data's ``var_names`` (of ``var``, the table the counts come with) where the data has the gene, else the
    human or mouse symbol of the Ensembl tables, else the id.
    """
    from ...inference import prompts as P  # lazily: torch (start-up time of `import tfs.tl`)

    ids = [str(i) for i in ids]
    out = np.asarray(P.gene_symbols(ids), dtype=object)
    if var is not None and gene_key is not None and gene_key in var.columns:
        col = var[gene_key].astype(object)
        by_id = {str(v).split(".", 1)[0]: str(n) for n, v in zip(var.index, col, strict=True) if isinstance(v, str)}
        out = np.asarray([by_id.get(i, s) for i, s in zip(ids, out, strict=True)], dtype=object)
    return np.asarray([s if s else i for s, i in zip(out, ids, strict=True)], dtype=object)


def _assay_of(adata: AnnData | None) -> str | None:
    """The most frequent ``obs["assay"]`` label of ``adata``, missing labels left out (``None`` without one)."""
    if adata is None or "assay" not in adata.obs.columns or adata.n_obs == 0:
        return None
    # missing labels (NaN, None) are no assay: they must not count as one called "nan"
    counts = table_column(adata.obs, "assay").dropna().astype(str).value_counts()
    return str(counts.index[0]) if len(counts) else None


def check_random_state(random_state: Any) -> None:
    """A seed (an integer >= 0) or ``None`` (fresh randomness each call)."""
    if random_state is not None and (
        isinstance(random_state, bool | np.bool_) or not isinstance(random_state, int | np.integer) or random_state < 0
    ):
        raise ValueError(f"random_state must be an integer >= 0 or None, got {random_state!r}.")


def _subsample(n: int, max_cells: int | None, random_state: int | None, offset: int = 0) -> np.ndarray:
    """At most ``max_cells`` of ``n`` rows, in order; drawn with the seed ``random_state + offset``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    seed = None if random_state is None else int(random_state) + offset
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


@documents_run_options
def next_gene(
    prompt: AnnData | GenesArg,
    model: ModelArg = "tf-sapiens",
    *,
    n_prompt_genes: int | None = None,
    assay: str | Sequence[str] | None = None,
    total_counts: float | Sequence[float] | None = None,
    counts: bool = True,
    key_added: str = "transcriptformer_next_gene",
    **options: Unpack[RunKwargs],
) -> AnnData:
    """The model's next-gene distribution after a prompt, with each gene's expected count.

    A prompt is the beginning of a cell: a real cell read as the model reads it (its expressed genes of the
    vocabulary in column order), or genes with counts. For every gene of the vocabulary this gives the
    probability that it is the next gene, from the gene-identity head in the training-mode attention (what the
    head was trained for; it equals the head at that slot of any cell that begins with the prompt), and the rate
    and expected count the count head gives it there. With the ``softmax`` link of the released models the
    rate of gene ``g`` is ``T · exp(l_g) / (Σ_k exp(l_k) + exp(l_g))``: the count head's share of the total ``T``
    for ``g`` in the cell "prompt, then ``g``" (``l_k`` the count logits of the prompt's genes at their own
    slots, ``l_g`` that of ``g`` after the prompt); the expected count is the zero-truncated Poisson mean
    ``rate / (1 - exp(-rate))``. See :mod:`transcriptformer.inference.prompts`.

    Parameters
    ----------
    prompt
        Real cells (an AnnData of raw counts), each a prompt; or genes written out: one gene, a list of genes
        (each with count 1), a mapping gene -> count (a dict or :class:`pandas.Series`), or a list of those for
        several prompts. Genes are Ensembl ids or human / mouse symbols, read in the order given.
    model
        As in :func:`embed` (it needs the gene-identity head).
    n_prompt_genes
        Take only each cell's first ``n_prompt_genes`` genes (cells only; default all, at most ``seq_len - 1``).
    assay
        Assay label of written prompts (one, or one per prompt), e.g. ``"10x 3' v3"``; ``None``: unknown. Cells
        use their ``obs["assay"]``.
    total_counts
        The total ``T`` the count rates share (one number, or one per prompt). Default: each prompt's total count
        as the model reads it (clipped).
    counts
        Also compute the count head's rate and expected count of every gene.
    key_added
        Key of the record in the result's ``uns``.
    {run_options}

    ``batch_size`` is the number of prompts run together (default 64); ``species_embedding`` and ``max_tokens``
    do not apply.

    Returns
    -------
    anndata.AnnData
        One row per prompt, one column per vocabulary gene (``var_names``: the vocabulary ids, in vocabulary
        order). ``X``: probability of each gene being the next gene (float32; the rest of the probability is on
        special tokens, ``[END]`` in ``obs["end_probability"]``). ``layers["log_probability"]`` and, with
        ``counts``, ``layers["count_rate"]``, ``layers["expected_count"]``. ``obs``: ``n_prompt_genes``,
        ``total_counts``, ``end_probability``. ``var``: ``symbol``, ``mean_probability`` and
        ``mean_expected_count`` (over the prompts: for one prompt, its own values, so
        ``out.var.sort_values("mean_probability")`` ranks the genes) and ``in_prompt`` (the fraction of prompts
        holding the gene). ``uns[key_added]["params"]``. The prompt AnnData is not modified.

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> out = tfs.tl.next_gene({"ENSG00000090382": 3, "ENSG00000163220": 1}, "tf-demo", assay="10x 3' v1")
    >>> out.var.sort_values("mean_probability", ascending=False).head()  # doctest: +SKIP
    """
    from ...inference import prompts as P  # lazily: torch (start-up time of `import tfs.tl`)

    opts = run_options(options, "next_gene", unsupported=_UNSUPPORTED)
    key = check_key(key_added)
    counts = check_bool(counts, "counts")
    n_prompt_genes = check_positive_int(n_prompt_genes, "n_prompt_genes")
    cells = isinstance(prompt, AnnData)
    if cells:
        check_adata(prompt, "prompt")
        if assay is not None:
            raise ValueError("assay= is for written prompts; cells are read with their own obs['assay'].")
    elif n_prompt_genes is not None:
        raise ValueError("n_prompt_genes= is for cells; a written prompt holds the genes it lists.")
    if total_counts is not None:
        # before the model is loaded (or downloaded); its length too where the number of prompts is known
        P.check_total_counts(total_counts, prompt.n_obs if isinstance(prompt, AnnData) else P.count_prompts(prompt))
    loaded = load(model, opts, prompt if cells else None)
    P.require_gene_head(loaded, "predict the next gene")
    if cells:
        prompts = P.cell_prompts(loaded, prompt, tokenize=opts.tokenize(), n_genes=n_prompt_genes)
    else:
        prompts = P.gene_prompts(loaded, prompt, assay=assay, clip_counts=opts.clip_counts)
    limit = loaded.seq_len - 1
    n_cut = int((prompts.lengths > limit).sum())
    if n_cut:
        logger.info(
            "%d prompts are cut to their first %d genes (seq_len - 1) to leave a slot for the next.", n_cut, limit
        )
        prompts = prompts.first(limit)
    res = P.next_gene(
        loaded,
        prompts,
        counts=counts,
        total_counts=total_counts,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    ids = loaded.vocab.names()[res.tokens].astype(str)
    prob = np.exp(res.log_prob)
    in_prompt = np.zeros(len(ids))
    inside = np.arange(prompts.tokens.shape[1])[None, :] < prompts.lengths[:, None]
    present = prompts.tokens[inside] - loaded.vocab.n_special
    np.add.at(in_prompt, present[present >= 0], 1.0)
    var = pd.DataFrame(index=pd.Index(ids, name="gene_id"))
    var["symbol"] = _symbols(ids, counts_var(prompt, opts.layer)[0] if cells else None, opts.gene_key)
    var["mean_probability"] = prob.mean(axis=0, dtype=np.float64).astype(np.float32)
    if counts:
        var["mean_expected_count"] = res.expected_count.mean(axis=0, dtype=np.float64).astype(np.float32)  # type: ignore[union-attr]
    var["in_prompt"] = (in_prompt / len(prompts)).astype(np.float32)
    obs = pd.DataFrame(index=pd.Index([str(x) for x in prompts.labels], name="prompt"))
    obs["n_prompt_genes"] = prompts.lengths
    obs["total_counts"] = res.total_counts
    obs["end_probability"] = np.exp(res.end_log_prob)
    layers = {"log_probability": res.log_prob}
    if counts:
        layers["count_rate"] = res.count_rate  # type: ignore[assignment]
        layers["expected_count"] = res.expected_count  # type: ignore[assignment]
    out = AnnData(X=prob.astype(np.float32), obs=obs, var=var, layers=layers)
    out.uns[key] = {
        "params": provenance(
            "next_gene",
            loaded,
            options=opts,
            stats=res.stats,
            prompt="cells" if cells else "genes",
            n_prompts=len(prompts),
            n_prompt_genes=n_prompt_genes,
            n_prompts_cut=n_cut,
            counts=counts,
            attention_mode="train",
            mu_link_fn=loaded.config.model.mu_link_fn,
        )
    }
    return out


def _default_genes(src: Prompts, max_genes: int) -> np.ndarray:
    """The data's genes of the vocabulary, most often read first, ``max_genes`` of them, in reading order."""
    inside = np.arange(src.tokens.shape[1])[None, :] < src.lengths[:, None]
    read = np.bincount(src.tokens[inside], minlength=len(src.place))  # type: ignore[arg-type]
    assert src.place is not None
    candidates = np.flatnonzero((src.place >= 0) & (read > 0))
    order = np.lexsort((candidates, -read[candidates]))
    chosen = candidates[order[:max_genes]]
    return chosen[np.argsort(src.place[chosen], kind="stable")]


@documents_run_options
def gene_interactions(
    adata: AnnData | None,
    model: ModelArg = "tf-sapiens",
    *,
    genes: Sequence[str] | None = None,
    max_genes: int = 100,
    background: AnnData | None = None,
    max_cells: int | None = 200,
    count: float = 1.0,
    assay: str | None = None,
    n_top: int = 10,
    random_state: int | None = 0,
    key_added: str = "transcriptformer_interactions",
    **options: Unpack[RunKwargs],
) -> AnnData:
    """Gene-gene interactions the model has learned: how one gene in a prompt changes the odds of another next.

    For genes ``a`` and ``b``, ``score(a, b) = log p(b | B, a) - log p(b | B)``: the change in the model's
    log-probability that ``b`` is the next gene when ``a`` (with count ``count``) follows the background prompt
    ``B``, a pointwise-mutual-information-like score (natural log). The background is the neutral prompt (the
    assay token and ``[START]``), or real cells (e.g. one cell type's cells): each is read in the model's order
    with the scored genes left out, and the score is averaged over them. Attention is in the training-mode
    semantics. Each background is run once and its keys and values are kept, so ``m`` genes cost ``m``
    one-position extensions per background. See :mod:`transcriptformer.inference.prompts`.

    The released models read a cell's genes in its data's column order, and so does the score: after ``a``, genes
    that come soon after ``a`` in that order are likely. ``score(a, b)`` with ``a`` before ``b`` in the data's
    order (the upper triangle of the result, whose genes are in reading order by default) is the direction the
    model saw in training; ``layers["symmetric"]`` averages both directions.

    Parameters
    ----------
    adata
        The data whose genes are scored by default (and whose assay is used); ``None`` with ``genes``.
    model
        As in :func:`embed` (it needs the gene-identity head).
    genes
        The genes to score: Ensembl ids, ``var_names`` (with ``var[gene_key]`` holding their ids) or human /
        mouse symbols, at least 2. Default: the ``max_genes`` genes of ``adata`` the model reads most often
        (most cells), in the data's column order.
    max_genes
        How many genes to score by default (the cost grows with it: one extension per gene and background).
    background
        Cells of raw counts to use as the background prompts (e.g. ``adata[adata.obs["cell_type"] == "B cell"]``);
        ``None``: the neutral prompt.
    max_cells
        Use at most this many background cells (drawn with ``random_state``); ``None``: all.
    count
        The count the added gene carries (default 1: detected once).
    assay
        Assay label of the neutral prompt. Default: the most frequent ``obs["assay"]`` of ``adata`` if it has
        one, else unknown.
    n_top
        Partners listed per gene in ``uns[key_added]["top_partners"]``.
    random_state
        Seed of the choice of background cells (``None``: a different choice each call).
    key_added
        Key of the record in the result's ``uns``.
    {run_options}

    Returns
    -------
    anndata.AnnData
        A genes x genes AnnData: row ``a`` (the gene added to the prompt), column ``b`` (the gene predicted
        next), ``X[a, b] = score(a, b)`` (float32, NaN on the diagonal); ``layers["symmetric"]``:
        ``(score(a, b) + score(b, a)) / 2``. ``obs`` and ``var``: ``symbol``; ``var["base_log_probability"]``:
        ``log p(b | B)``. ``uns[key_added]["top_partners"]``: for every gene, its ``n_top`` partners with the
        highest score (a table of ``gene``, ``rank``, ``partner``, ``symbol``, ``partner_symbol``, ``score``);
        ``uns[key_added]["params"]``. Neither ``adata`` nor ``background`` is modified.
    """
    from ...inference import prompts as P  # lazily: torch (start-up time of `import tfs.tl`)

    opts = run_options(options, "gene_interactions", unsupported=_UNSUPPORTED)
    key = check_key(key_added)
    max_genes = check_positive_int(max_genes, "max_genes", allow_none=False)
    max_cells = check_positive_int(max_cells, "max_cells")
    n_top = check_positive_int(n_top, "n_top", allow_none=False)
    names = check_genes(genes)
    if adata is None and names is None:
        raise ValueError("pass adata (its genes are scored by default) or genes=[...].")
    if adata is not None:
        check_adata(adata)
    if background is not None:
        check_adata(background, "background")
        if background.n_obs == 0:
            raise ValueError("background has no cells (e.g. a group with no cells): give at least one cell.")
    count = P.check_count(count, "count")
    check_random_state(random_state)
    loaded = load(model, opts, adata if names is None else None, background)
    P.require_gene_head(loaded, "score gene interactions")
    if names is None:
        src = P.cell_prompts(loaded, adata, tokenize=opts.tokenize())
        tokens = _default_genes(src, max_genes)
        if len(tokens) < 2:
            raise ValueError(f"adata has {len(tokens)} expressed gene(s) of the vocabulary; interactions need 2.")
    else:
        var = None if adata is None else genes_var(names, adata, loaded, opts, "genes")
        tokens = P.resolve_genes(loaded, names, var=var, gene_key=opts.gene_key, what="genes")
    if assay is None:
        assay = _assay_of(adata)
    bg = None
    if background is not None:
        pick = _subsample(background.n_obs, max_cells, random_state)
        bg = P.cell_prompts(
            loaded, background[pick] if len(pick) < background.n_obs else background, tokenize=opts.tokenize()
        )
    res = P.interactions(
        loaded,
        tokens,
        background=bg,
        count=count,
        assay=assay,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    ids = loaded.vocab.names()[tokens].astype(str)
    symbols = _symbols(ids, None if adata is None else counts_var(adata, opts.layer)[0], opts.gene_key)
    frame = pd.DataFrame({"symbol": symbols}, index=pd.Index(ids, name="gene_id"))
    S = res.score
    out = AnnData(X=S, obs=frame.copy(), var=frame.copy(), layers={"symmetric": ((S + S.T) / 2).astype(np.float32)})
    out.var["base_log_probability"] = res.base_log_prob
    rows = []
    for i in range(len(ids)):
        scores = np.where(np.isnan(S[i]), -np.inf, S[i])
        for r, j in enumerate(np.argsort(-scores, kind="stable")[: min(n_top, len(ids) - 1)]):
            rows.append((ids[i], r + 1, ids[j], symbols[i], symbols[j], float(S[i, j])))
    top = pd.DataFrame(rows, columns=["gene", "rank", "partner", "symbol", "partner_symbol", "score"])
    out.uns[key] = {
        "top_partners": top,
        "params": provenance(
            "gene_interactions",
            loaded,
            options=opts,
            stats=res.stats,
            n_genes=len(ids),
            genes_given=names is not None,
            background="neutral" if bg is None else "cells",
            n_background=res.n_background,
            count=res.count,
            assay=assay if assay is not None else "unknown",
            attention_mode="train",
            cached=True,
            prompt_passes=res.stats["prompt_passes"],
            extensions=res.stats["rows"],
        ),
    }
    return out


@documents_run_options
def rank_regulators(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    groupby: str,
    candidates: Sequence[str],
    groups: Sequence[Any] | str | None = None,
    max_cells: int | None = None,
    at: Literal["place", "end"] = "place",
    random_state: int | None = 0,
    key_added: str = "transcriptformer_regulators",
    copy: bool = False,
    **options: Unpack[RunKwargs],
) -> AnnData | None:
    """Rank candidate genes (e.g. transcription factors) per group of cells, as ``sc.tl.rank_genes_groups`` does.

    The rank is by how much more likely the model makes a candidate in the group's cells than across groups.
    Every cell is a prompt with the candidates left out. ``p_c(g)`` is the model's probability that candidate
    ``g`` is the next gene where it would read ``g``: after the cell's other genes that precede ``g`` in the
    data's column order (``at="place"``, one pass per cell), or after all of them (``at="end"``). A group's
    probability ``P_G(g)`` is the mean over its cells; the reference ``P_ref(g)`` is the mean of the groups'
    (each group counts once); the score is ``log2(P_G(g) / P_ref(g))``. P-values: two-sided Mann-Whitney U of
    the cells' ``log p_c(g)``, group against the rest, Benjamini-Hochberg adjusted per group. See
    :mod:`transcriptformer.inference.prompts`.

    Curated lists of human transcription factors: Lambert et al. 2018, "The Human Transcription Factors"
    (Cell 172:650, 1,639 TFs, humantfs.ccbr.utoronto.ca), and AnimalTFDB (human, mouse and other animals). None
    ships with the package.

    Parameters
    ----------
    adata
        Cells of raw counts.
    model
        As in :func:`embed` (it needs the gene-identity head).
    groupby
        ``obs`` column of the groups (e.g. cell types). Cells without a label (NaN) are left out; the empty string
        ``""`` cannot name a group (it is refused: label those cells, or leave them out with ``groups``).
    candidates
        Genes to rank: Ensembl ids, ``var_names`` (with ``var[gene_key]`` holding their ids) or human / mouse
        symbols. Genes the model does not know are an error; with ``at="place"`` genes that are not columns of
        the data have no place and are left out (with a warning).
    groups
        Rank within these groups only: labels of ``obs[groupby]``, each named once, compared as strings (so
        cluster ids ``[0, 1]`` and ``["0", "1"]`` are the same groups). Default: every group with cells.
    max_cells
        Use at most this many cells per group (drawn with ``random_state``); ``None``: all.
    at
        Where a candidate is scored in a cell: ``"place"`` or ``"end"`` (above).
    random_state
        Seed of the choice of cells (``None``: a different choice each call).
    key_added
        Key in ``uns`` (as ``sc.tl.rank_genes_groups``' ``key_added``).
    copy
        Return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with ``adata.uns[key_added]`` in the layout of
    ``sc.tl.rank_genes_groups`` (so ``sc.get.rank_genes_groups_df(adata, group, key=key_added)`` reads it):
    ``names`` (the data's ``var_names`` of the candidates, else their ids), ``scores`` and ``logfoldchanges``
    (both ``log2(P_G / P_ref)``), ``pvals``, ``pvals_adj`` (structured arrays, one field per group, best first),
    ``mean_probability`` (a groups x candidates table of ``P_G``), ``n_cells`` (cells per group) and ``params``
    (``groupby``, ``reference="rest"``, ``method="transcriptformer"`` and the run's record). On any error
    ``adata`` is left as it was.
    """
    from ...inference import prompts as P  # lazily: torch (start-up time of `import tfs.tl`)

    opts = run_options(options, "rank_regulators", unsupported=_UNSUPPORTED)
    key = check_key(key_added)
    copy = check_bool(copy, "copy")
    max_cells = check_positive_int(max_cells, "max_cells")
    check_key(groupby, "groupby")
    check_random_state(random_state)
    names = check_genes(candidates, "candidates")
    if names is None:
        raise ValueError(
            "candidates= is required: the genes to rank, e.g. a list of transcription factors (Lambert et al. 2018, "
            "AnimalTFDB)."
        )
    if at not in ("place", "end"):
        raise ValueError(f"at={at!r}; expected 'place' or 'end'.")
    check_adata(adata)
    check_writable(adata, copy)
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    group_of, present = group_codes(table_column(adata.obs, groupby))  # 1 and "1" are one group
    chosen = _check_groups(groups, groupby, present)
    if len(chosen) < 2:
        raise ValueError(f"the score compares groups, so it needs at least 2 groups of {groupby!r}; got {chosen}.")
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    for j, g in enumerate(chosen):
        where = np.flatnonzero(group_of == present.index(g))
        codes[where[_subsample(len(where), max_cells, random_state, j)]] = j
    loaded = load(model, opts, adata)
    P.require_gene_head(loaded, "rank genes by the next-gene distribution")
    var = genes_var(names, adata, loaded, opts, "candidates")  # where the counts (and their ids) come from
    cand = P.resolve_genes(loaded, names, var=var, gene_key=opts.gene_key, what="candidates")
    used = np.flatnonzero(codes >= 0)
    prompts = P.cell_prompts(loaded, adata[used] if len(used) < adata.n_obs else adata, tokenize=opts.tokenize())
    res = P.group_regulators(
        loaded,
        prompts,
        codes[used],
        chosen,
        cand,
        at=at,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    vocab_ids = loaded.vocab.names()[res.tokens].astype(str)
    shown = _names_in_data(vocab_ids, var, opts.gene_key)
    order = [res.order(j) for j in range(len(chosen))]

    def table(values: np.ndarray, dtype: str) -> np.ndarray:
        rec = np.empty(len(res.tokens), dtype=[(g, dtype) for g in chosen])
        for j, g in enumerate(chosen):
            rec[g] = values[j][order[j]]
        return rec

    names_arr = np.stack([shown] * len(chosen))
    result = {
        "names": table(names_arr, "O"),
        "scores": table(res.log2_ratio, "float32"),
        "logfoldchanges": table(res.log2_ratio, "float32"),
        "pvals": table(res.pvals, "float64"),
        "pvals_adj": table(res.pvals_adj, "float64"),
        "mean_probability": pd.DataFrame(res.mean_prob, index=pd.Index(chosen, name=groupby), columns=shown),
        "n_cells": {g: int(n) for g, n in zip(chosen, res.n_cells, strict=True)},
        "params": provenance(
            "rank_regulators",
            loaded,
            options=opts,
            stats=res.stats,
            groupby=groupby,
            reference="rest",
            method="transcriptformer",
            use_raw=False,
            corr_method="benjamini-hochberg",
            at=at,
            n_candidates=len(res.tokens),
            max_cells=max_cells,
            random_state=random_state,
            attention_mode="train",
        ),
    }
    update = Update("rank_regulators", record=key)
    update.set("uns", key, result)
    return update.apply(adata, copy=copy)


def _check_groups(groups: Any, groupby: str, present: list[str]) -> list[str]:
    """The groups to rank, as strings: ``groups`` (labels of ``obs[groupby]``, compared as strings) or ``present``.

    Every group names a field of the result's structured arrays (as in ``sc.tl.rank_genes_groups``), so a group
    is named once and is not the empty string (numpy renames an empty field name). Checked before the model runs.
    """
    if groups is None:
        chosen = present
    else:
        items: list[Any] | None = None  # None: not labels at all
        if isinstance(groups, str | bool | np.bool_ | numbers.Number):
            items = [groups]  # one label
        elif isinstance(groups, Iterable) and not isinstance(groups, Mapping):
            items = list(groups)
        bad = (
            [groups]
            if items is None
            else [g for g in items if not isinstance(g, str | bool | np.bool_ | numbers.Number) or pd.isna(g)]
        )
        if bad:
            raise ValueError(
                f"groups must be labels of obs[{groupby!r}] (a label or a list of labels, compared as strings) or "
                f"None, got {bad[0]!r}{'' if items is None else f' in {groups!r}'}."
            )
        assert items is not None
        chosen = [str(g) for g in items]
        twice = sorted({g for g in chosen if chosen.count(g) > 1})
        if twice:
            raise ValueError(
                f"group(s) {twice} of {groupby!r} are given more than once in groups= (labels are compared as "
                "strings); name each group once."
            )
        empty = [g for g in chosen if g not in present]
        if empty:
            raise ValueError(f"group(s) {empty} of {groupby!r} have no cells; groups with cells: {present}.")
    if "" in chosen:
        raise ValueError(
            f"cells of {groupby!r} are labelled '' (the empty string), which cannot name a group of the result (a "
            "field of its structured arrays, as in sc.tl.rank_genes_groups): give those cells a label (e.g. "
            "'unassigned') or leave the group out with groups=[...]."
        )
    return chosen


def _names_in_data(ids: np.ndarray, var: pd.DataFrame, gene_key: str | None) -> np.ndarray:
    """The data's ``var_names`` (of ``var``, where the counts come from) of vocabulary ids, else the ids."""
    if gene_key is None or gene_key not in var.columns:
        return ids.astype(object)
    col = var[gene_key].astype(object)
    by_id = {str(v).split(".", 1)[0]: str(n) for n, v in zip(var.index, col, strict=True) if isinstance(v, str)}
    return np.asarray([by_id.get(i, i) for i in ids], dtype=object)
