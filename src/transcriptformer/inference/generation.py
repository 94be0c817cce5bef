"""In-silico cells: sampling genes and counts from TranscriptFormer's generative factorisation.

A cell is generated one gene at a time. At slot ``t`` the model has read the assay token, ``[START]``
and the genes ``g_0 .. g_{t-1}`` with their counts; its hidden state there gives

* the next gene: the gene-identity head's soft-capped logits, sharpened or flattened by a temperature,
  optionally cut to the ``top_k`` most likely, over the genes not yet in the cell (special tokens other
  than ``[END]`` are never sampled). ``[END]`` ends the cell, as does ``max_genes``;
* its count: a zero-truncated Poisson whose rate comes from the count head (below).

Attention runs in the training-mode semantics: a position's own count does not bias its attention to
itself (in the inference mode that embeddings use it does), because the model learned to predict a
gene and its count from what came before. Keys and values are cached across steps
(:class:`~transcriptformer.model.KVCache`), so a cell of ``n`` genes costs ``n`` single-position layer
passes rather than ``n`` passes over growing prefixes.

The count head's ``softmax`` link (the released models) gives gene ``j`` of a finished cell the rate
``total · exp(l_j) / Σ_k exp(l_k)``: a share of the cell's total count, normalised over *all* of the cell's
genes, which are not known yet while it is generated. The sampler takes the total as given
(``total_counts``) and estimates the normaliser at slot ``t`` from the logits so far, assuming the cell will
have ``max_genes`` genes whose mean ``exp(l)`` is that of the genes so far:
``Ẑ_t = Σ_{k<=t} exp(l_k) · max_genes / (t + 1)``. At the last slot this is exact. The other links give the
rate from the logit alone.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .._progress import PROGRESS_DELAY_S, tqdm
from ..data.tokenizer import TokenizeOptions
from ..errors import warn
from ..model import ChunkedAttention, KVCache, TranscriptFormer
from ..weights.loaded import LoadedModel
from .devices import autocast, resolve_device, resolve_precision
from .options import check_positive_int

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COUNTS_PER_GENE",
    "GeneratedCells",
    "check_sampling",
    "sample_cells",
    "sample_zero_truncated_poisson",
]

#: Without a prompt, the default total count of a generated cell is this many counts per gene slot
#: (``max_genes``): about what droplet data (10x 3') has per detected gene.
DEFAULT_COUNTS_PER_GENE = 2.5

#: The largest ``total_counts`` accepted (a cell's total; the model reads counts clipped to ``clip_counts``).
MAX_TOTAL_COUNTS = 1e9


def sample_zero_truncated_poisson(rate: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples of ``Poisson(rate)`` conditioned on being at least 1 (one per element).

    The first event of a Poisson process of intensity ``rate`` on ``[0, 1]``, given that there is one, falls
    at ``T = -log1p(u · expm1(-rate)) / rate`` (``u`` uniform); the events after it are ``Poisson(rate ·
    (1 - T))``. So ``1 + Poisson(rate · (1 - T))`` has the zero-truncated distribution, for any rate.
    """
    rate = rate.float().clamp_min(1e-12)
    u = torch.rand(rate.shape, generator=generator, device=rate.device)
    return 1.0 + torch.poisson(_after_first_event(rate, u), generator=generator)


def _after_first_event(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The Poisson rate of the events after the first, given the uniform ``u`` that places the first."""
    t = (-torch.log1p(u * torch.expm1(-rate)) / rate).clamp(0.0, 1.0)
    return rate * (1.0 - t)


class CellStreams:
    """One random stream per generated cell, so that a cell's draws depend on the seed and its index alone.

    Cells are generated in batches; with one generator per run the draws of a cell would depend on which cells
    share its batch. Each cell ``i`` gets ``numpy.random.Generator(PCG64(SeedSequence([seed, i])))`` instead.
    """

    def __init__(self, seed: int, n: int):
        self.rngs = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), i]))) for i in range(n)]

    def uniform(self, cells: np.ndarray, device: torch.device) -> torch.Tensor:
        """One uniform in ``[0, 1)`` per cell, float64."""
        return torch.tensor([self.rngs[i].random() for i in cells], dtype=torch.float64, device=device)

    def zero_truncated_poisson(self, cells: np.ndarray, rate: torch.Tensor) -> torch.Tensor:
        """One zero-truncated Poisson count per cell (see :func:`sample_zero_truncated_poisson`)."""
        rate = rate.double().clamp_min(1e-12)
        rest = _after_first_event(rate, self.uniform(cells, rate.device)).cpu().numpy()
        extra = [self.rngs[i].poisson(lam) for i, lam in zip(cells, rest, strict=True)]
        return 1.0 + torch.tensor(extra, dtype=torch.float32, device=rate.device)

    def categorical(self, cells: np.ndarray, log_weights: torch.Tensor) -> torch.Tensor:
        """One index per row of ``log_weights`` (``-inf``: never), drawn by the inverse of the cumulative sum."""
        w = torch.exp(log_weights.double() - log_weights.double().amax(dim=-1, keepdim=True))
        cdf = torch.cumsum(w, dim=-1)
        u = self.uniform(cells, w.device)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(w.shape[-1] - 1)


@dataclass
class GeneratedCells:
    """Cells sampled by :func:`sample_cells`, genes in the order they were generated.

    Attributes
    ----------
    tokens
        ``(n, L)`` int64 vocabulary tokens (``[PAD]`` after each cell's genes).
    counts
        ``(n, L)`` float32 sampled counts (prompt genes: their real counts), 0 at padding.
    lengths
        ``(n,)`` genes in each cell.
    n_prompt
        ``(n,)`` genes taken from the prompt (they come first and are not sampled).
    ended
        ``(n,)`` whether the cell ended with ``[END]`` (otherwise it reached ``max_genes``).
    gene_logprob
        ``(n, L)`` float32: log-probability of each gene under the model's gene-identity head (before the
        temperature, top-k and the exclusion of genes already present), NaN for prompt genes and padding.
    count_logit
        ``(n, L)`` float32: the count head's logit of each gene (prompt genes included).
    total_counts
        ``(n,)`` the total count the count rates were scaled to.
    aux
        ``(n, A)`` auxiliary tokens.
    prompt_index
        ``(n,)`` the prompt cell each cell continues (``-1``: none).
    """

    tokens: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray
    n_prompt: np.ndarray
    ended: np.ndarray
    gene_logprob: np.ndarray
    count_logit: np.ndarray
    total_counts: np.ndarray
    aux: np.ndarray
    prompt_index: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def _aux_tokens(loaded: LoadedModel, assay: Any, n: int) -> np.ndarray:
    """Auxiliary tokens for ``n`` cells from a label (or one label per cell); unknown labels map to unknown."""
    single = assay is None or isinstance(assay, str)
    if not single and (not isinstance(assay, Sequence | np.ndarray) or not all(isinstance(a, str) for a in assay)):
        raise ValueError(f"assay must be a label (a string), one label per cell, or None; got {assay!r}.")
    cols = []
    for voc in loaded.aux_vocabs:
        labels = [assay] * n if single else list(assay)
        if len(labels) != n:
            raise ValueError(f"assay has {len(labels)} labels for {n} cells.")
        unknown = sorted({str(x) for x in labels if x is not None and x not in voc.labels})
        if unknown:
            # a warning about the input (TranscriptFormerWarning), as the other tools give, not only a log line
            warn(
                f"assay label(s) {unknown[:3]} are not in {loaded.name}'s {voc.column} vocabulary, so they mean "
                f"'unknown'. Known labels are e.g. {sorted(k for k in voc.labels if k != 'unknown')[:6]}."
            )
        cols.append(voc.encode(labels))
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)


def _prompts(
    loaded: LoadedModel, prompt, n_prompt_genes: int | None, tokenize: TokenizeOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prompt cells' first genes with their real counts: tokens, counts, lengths, aux, model-view totals."""
    clip = tokenize.clip_counts if tokenize.clip_counts is not None else np.inf
    src = loaded.cells(prompt, replace(tokenize, clip_counts=None))
    window = src.read(0, src.n_obs)
    P = window.lengths if n_prompt_genes is None else np.minimum(window.lengths, n_prompt_genes)
    W = max(1, int(P.max(initial=0)))
    slots = np.arange(window.tokens.shape[1])[None, :]
    tokens = np.where(slots < P[:, None], window.tokens, loaded.vocab.pad)[:, :W].astype(np.int64)
    counts = np.where(slots < P[:, None], window.counts, 0.0)[:, :W].astype(np.float32)
    # the total the model would see for the whole cell: clipped counts of its first seq_len genes
    totals = np.minimum(window.counts, clip).sum(axis=1)
    return tokens, counts, P.astype(np.int64), window.aux, totals.astype(np.float32)


def check_sampling(
    *,
    n_cells: Any,
    prompt: bool,
    n_prompt_genes: Any,
    max_genes: Any,
    temperature: Any,
    top_k: Any,
    total_counts: Any,
    seed: Any,
) -> None:
    """The options of :func:`sample_cells` that do not depend on the model, checked before one is loaded."""
    check_positive_int(n_cells, "n_cells", allow_none=prompt)
    check_positive_int(n_prompt_genes, "n_prompt_genes")
    if n_prompt_genes is not None and not prompt:
        raise ValueError("n_prompt_genes needs a prompt.")
    check_positive_int(max_genes, "max_genes")
    check_positive_int(top_k, "top_k")
    if (
        isinstance(temperature, bool | np.bool_)
        or not isinstance(temperature, numbers.Real)
        or not (math.isfinite(temperature) and float(temperature) > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}.")
    if total_counts is not None:
        try:
            totals = np.array(total_counts, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"total_counts must be a number or one number per cell, got {total_counts!r}.") from None
        if not (np.isfinite(totals).all() and (totals > 0).all() and (totals <= MAX_TOTAL_COUNTS).all()):
            raise ValueError(
                f"total_counts must be finite, > 0 and at most {MAX_TOTAL_COUNTS:g}, got {total_counts!r}."
            )


@torch.inference_mode()
def sample_cells(
    loaded: LoadedModel,
    n_cells: int | None = None,
    *,
    assay: Any = None,
    prompt=None,
    n_prompt_genes: int | None = None,
    max_genes: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    total_counts: float | Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    tokenize: TokenizeOptions = TokenizeOptions(),
    progress: bool | None = None,
    use_cache: bool = True,
) -> GeneratedCells:
    """Sample cells from a model (see the module documentation for how).

    Parameters
    ----------
    loaded
        The model (it needs the gene-identity head).
    n_cells
        Cells to generate (default: one per prompt cell). With a prompt, cell ``i`` continues prompt cell
        ``i % n_prompt``.
    assay
        Assay label of the generated cells (one, or one per cell); ignored with a prompt, whose
        ``obs["assay"]`` is used. ``None``: unknown.
    prompt
        An AnnData of real cells (raw counts) to continue from their first ``n_prompt_genes`` genes (in the
        order the model reads them: expressed genes in column order).
    n_prompt_genes
        Genes taken from each prompt cell (default: all it has, up to ``max_genes``).
    max_genes
        Most genes per cell, prompt included (default ``seq_len``).
    temperature
        Divides the gene logits before sampling (> 0; 1 samples the model's distribution).
    top_k
        Sample among the ``top_k`` most likely genes only.
    total_counts
        Total count each cell's count rates are scaled to (softmax link): a number, or one per cell.
        Default: the prompt cell's total (clipped counts of its genes, as the model sees them), else
        :data:`DEFAULT_COUNTS_PER_GENE` x ``max_genes``.
    seed
        Random seed. Every cell draws from a stream of its own (:class:`CellStreams`), so the same seed gives
        the same cells whatever ``batch_size`` (up to the rounding of batched matrix products, which can in
        rare cases tip a draw at a boundary) on the same device and precision.
    device, precision
        As in :class:`~transcriptformer.inference.engine.Engine`.
    batch_size
        Cells generated together (default 64; memory: the key/value cache is
        ``batch x layers x 2 x embed_dim x (max_genes + 2)`` floats).
    tokenize
        How to read the prompt (as in ``tl.embed``); its ``clip_counts`` also clips the generated counts before
        the model reads them (as in training and inference).
    progress
        Show a progress bar (``None``: once the run has taken more than a few seconds).
    use_cache
        Cache keys and values across steps (default). ``False`` recomputes every prefix (the reference the
        cache is checked against, and the baseline of the benchmark).

    Returns
    -------
    GeneratedCells
        The cells, genes in generation order.
    """
    check_sampling(
        n_cells=n_cells,
        prompt=prompt is not None,
        n_prompt_genes=n_prompt_genes,
        max_genes=max_genes,
        temperature=temperature,
        top_k=top_k,
        total_counts=total_counts,
        seed=seed,
    )
    model_cpu = loaded.model
    if model_cpu.gene_id_head is None:
        raise ValueError(f"{loaded.name} has no gene-identity head, so it cannot generate cells.")
    S = loaded.seq_len
    max_genes = check_positive_int(max_genes, "max_genes") or S
    if max_genes > S:
        raise ValueError(f"max_genes={max_genes} is more than the model's seq_len ({S}).")
    top_k = check_positive_int(top_k, "top_k")
    batch_size = check_positive_int(batch_size, "batch_size") or 64
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)

    if prompt is not None:
        p_tok, p_cnt, p_len, p_aux, p_total = _prompts(
            loaded, prompt, check_positive_int(n_prompt_genes, "n_prompt_genes"), tokenize
        )
        n_prompts = len(p_len)
        n_cells = check_positive_int(n_cells, "n_cells") or n_prompts
        which = np.arange(n_cells) % n_prompts
        p_len = np.minimum(p_len[which], max_genes)
        p_tok, p_cnt, p_aux, default_total = p_tok[which], p_cnt[which], p_aux[which], p_total[which]
    else:  # n_prompt_genes without a prompt: refused by check_sampling
        n_cells = check_positive_int(n_cells, "n_cells", allow_none=False)
        which = np.full(n_cells, -1)
        p_len = np.zeros(n_cells, dtype=np.int64)
        p_tok = np.zeros((n_cells, 1), dtype=np.int64)
        p_cnt = np.zeros((n_cells, 1), dtype=np.float32)
        p_aux = _aux_tokens(loaded, assay, n_cells)
        default_total = np.full(n_cells, DEFAULT_COUNTS_PER_GENE * max_genes, dtype=np.float32)
    if total_counts is None:
        totals = default_total.astype(np.float32)
    else:
        totals = np.array(total_counts, dtype=np.float32)  # values checked by check_sampling
        if totals.ndim == 0:
            totals = np.full(n_cells, totals, dtype=np.float32)
        elif totals.shape != (n_cells,):
            raise ValueError(
                f"total_counts must be one number or one per generated cell ({n_cells}), got shape {totals.shape}."
            )
    if (totals <= 0).any():
        raise ValueError("a prompt cell has no count of the model's genes: pass total_counts=...")

    model = loaded.on(dev)
    out_tok = np.full((n_cells, max_genes), loaded.vocab.pad, dtype=np.int64)
    out_cnt = np.zeros((n_cells, max_genes), dtype=np.float32)
    out_lp = np.full((n_cells, max_genes), np.nan, dtype=np.float32)
    out_logit = np.full((n_cells, max_genes), np.nan, dtype=np.float32)
    out_len = np.zeros(n_cells, dtype=np.int64)
    ended = np.zeros(n_cells, dtype=bool)
    streams = CellStreams(int(seed), n_cells)
    clip = tokenize.clip_counts if tokenize.clip_counts is not None else float("inf")
    # cells with equal prompt lengths run together (their positions stay aligned)
    order = np.argsort(p_len, kind="stable")
    steps = 0
    bar = tqdm(total=n_cells, unit="cell", desc=f"generating ({loaded.name})", delay=PROGRESS_DELAY_S)
    bar.disable = progress is False
    for start in range(0, n_cells, batch_size):
        idx = order[start : start + batch_size]
        groups = [idx[p_len[idx] == p] for p in np.unique(p_len[idx])]
        for g in groups:
            tok, cnt, lp, logit, n, end = _generate_batch(
                model,
                torch.from_numpy(p_tok[g]).to(dev),
                torch.from_numpy(p_cnt[g]).to(dev),
                int(p_len[g][0]),
                torch.from_numpy(p_aux[g]).to(dev),
                torch.from_numpy(totals[g]).to(dev),
                n_special=loaded.vocab.n_special,
                max_genes=max_genes,
                temperature=float(temperature),
                top_k=top_k,
                clip_counts=clip,
                streams=streams,
                cells=g,
                precision=prec,
                use_cache=use_cache,
            )
            out_tok[g], out_cnt[g], out_lp[g], out_logit[g], out_len[g], ended[g] = tok, cnt, lp, logit, n, end
            steps += max_genes - int(p_len[g][0])
            bar.update(len(g))
    bar.close()
    return GeneratedCells(
        tokens=out_tok,
        counts=out_cnt,
        lengths=out_len,
        n_prompt=p_len.astype(np.int64),
        ended=ended,
        gene_logprob=out_lp,
        count_logit=out_logit,
        total_counts=totals,
        aux=p_aux,
        prompt_index=which.astype(np.int64),
        stats={"device": str(dev), "precision": prec, "steps": steps, "cached": use_cache, "batch_size": batch_size},
    )


def _generate_batch(
    model: TranscriptFormer,
    p_tok: torch.Tensor,
    p_cnt: torch.Tensor,
    P: int,
    aux: torch.Tensor,
    totals: torch.Tensor,
    *,
    n_special: int,
    max_genes: int,
    temperature: float,
    top_k: int | None,
    clip_counts: float,
    streams: CellStreams,
    cells: np.ndarray,
    precision: str,
    use_cache: bool,
) -> tuple[np.ndarray, ...]:
    """Generate one batch of cells whose prompts all have ``P`` genes."""
    dev = p_tok.device
    B = p_tok.shape[0]
    V = model.gene_embeddings.embedding.num_embeddings
    pad, end = model.pad_idx, model.end_idx
    tokens = torch.full((B, max_genes + 1), pad, dtype=torch.long, device=dev)  # +1: the slot being predicted
    counts = torch.zeros(B, max_genes + 1, device=dev)
    logprob = torch.full((B, max_genes), float("nan"), device=dev)
    logit = torch.full((B, max_genes), float("nan"), device=dev)
    tokens[:, :P] = p_tok[:, :P]
    counts[:, :P] = p_cnt[:, :P]
    banned = torch.zeros(V, dtype=torch.bool, device=dev)
    banned[:n_special] = True  # special tokens are never sampled ...
    banned[end] = False  # ... except [END]
    used = torch.zeros(B, V, dtype=torch.bool, device=dev)
    used.scatter_(1, tokens[:, :P], True)  # a gene already in the cell is never sampled again
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    ended = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), P, dtype=torch.long, device=dev)
    norm = _Normaliser(B, dev)
    kernel = ChunkedAttention()
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision, torch.float32)
    cache = KVCache(model, B, model.num_aux + max_genes + 1, device=dev, dtype=dtype) if use_cache else None
    with autocast(dev, precision):
        clipped = counts.clamp(max=clip_counts)
        # the prompt (or nothing) after the assay token and [START]: hidden states of slots 0 .. P
        hidden = model.encode(tokens[:, : P + 1], clipped, aux, mode="train", kernel=kernel, cache=cache).hidden
        if P:
            lg = model.count_logits(hidden[:, :P], model.gene_embeddings(tokens[:, :P]), tokens[:, :P]).double()
            logit[:, :P] = lg.float()
            norm.add(lg)
        h = hidden[:, -1]
        for t in range(P, max_genes):
            # the next gene, from the gene-identity head
            logits = model.gene_logits(h)  # (B, V) float32, soft-capped
            allowed = logits.double().masked_fill(banned[None, :] | used, float("-inf"))
            if top_k is not None and top_k < V:
                kth = torch.topk(allowed, top_k, dim=-1).values[:, -1:]
                allowed = allowed.masked_fill(allowed < kth, float("-inf"))
            # relative to the row's largest before the temperature: a tiny temperature gives the argmax, not NaN
            scores = (allowed - allowed.amax(dim=-1, keepdim=True)) / temperature
            # only cells still being generated draw random numbers, each from its own stream
            gene = torch.full((B,), pad, dtype=torch.long, device=dev)
            live = alive.cpu().numpy()
            gene[alive] = streams.categorical(cells[live], scores[alive])
            ended |= alive & (gene == end)
            alive &= gene != end
            if not alive.any():
                break
            gene = torch.where(alive, gene, pad)
            tokens[:, t] = gene
            picked = torch.log_softmax(logits, dim=-1).gather(1, gene[:, None]).squeeze(1)
            logprob[:, t] = torch.where(alive, picked, float("nan"))
            used[alive, gene[alive]] = True
            lengths += alive.long()
            # its count, from the count head
            lg = model.count_logits(h[:, None], model.gene_embeddings(gene[:, None]), gene[:, None])[:, 0].double()
            logit[:, t] = torch.where(alive, lg, float("nan")).float()
            rate = norm.rate(model, lg, t + 1, max_genes, totals, alive)
            counts[alive, t] = streams.zero_truncated_poisson(cells[live], rate[alive])
            if t + 1 == max_genes:
                break
            # the model reads the gene and its (clipped) count
            c_in = counts[:, t].clamp(max=clip_counts)
            if cache is not None:
                x = model.gene_embeddings(gene[:, None])
                h = model.extend(x, model.key_bias(c_in[:, None]), alive[:, None], cache, kernel=kernel)[:, 0]
            else:
                clipped = counts.clamp(max=clip_counts)
                h = model.encode(tokens[:, : t + 2], clipped, aux, mode="train", kernel=kernel).hidden[:, -1]
    return tuple(
        x.cpu().numpy() for x in (tokens[:, :max_genes], counts[:, :max_genes], logprob, logit, lengths, ended)
    )


class _Normaliser:
    """The softmax link's normaliser over a cell's genes, estimated while the cell is generated.

    ``Σ_{k<=t} exp(l_k)`` is kept in float64 relative to the running maximum logit; the estimate for a cell
    of ``max_genes`` genes scales it by ``max_genes / (t + 1)`` (exact at the last slot).
    """

    def __init__(self, B: int, device: torch.device):
        self.sum = torch.zeros(B, dtype=torch.float64, device=device)
        self.shift = torch.full((B,), -math.inf, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, alive: torch.Tensor | None = None) -> None:
        """Add the logits ``(B,)`` or ``(B, k)`` of genes of the cells (``alive``: only those cells)."""
        lg = logits if logits.ndim == 2 else logits[:, None]
        new = torch.maximum(self.shift, lg.max(dim=1).values)
        total = self.sum * torch.exp(self.shift - new) + torch.exp(lg - new[:, None]).sum(dim=1)
        if alive is not None:
            new, total = torch.where(alive, new, self.shift), torch.where(alive, total, self.sum)
        self.shift, self.sum = new, total

    def rate(
        self, model: TranscriptFormer, lg: torch.Tensor, n_so_far: int, max_genes: int, totals, alive
    ) -> torch.Tensor:
        """Count rate of the genes with logits ``lg`` (``(B,)``); ``n_so_far`` genes, this one included."""
        link = model.config.mu_link_fn
        if link != "softmax":
            return model.link(lg.float())
        self.add(lg, alive)
        z = self.sum * (max_genes / n_so_far)
        return (totals.double() * torch.exp(lg - self.shift) / z).float()
