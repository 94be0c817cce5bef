"""What a forward pass can compute (:data:`HEADS`) and how the results are collected in input order.

Adding an output is one entry in :data:`HEADS`: a name, a layout (per cell, per sequence slot, per read gene,
or summed per gene) and a function of a :class:`Batch`. The :class:`Accumulator` puts each batch's results back
in input order; under ``torch.distributed`` :func:`gather` joins the ranks' shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch

from ..data.tokenizer import TokenWindow
from ..model import TranscriptFormer

__all__ = ["HEADS", "Accumulator", "Batch", "Head", "InferenceResult", "Layout", "gather"]


@dataclass
class Batch:
    """One forward pass: the inputs on the device and what the encoder returned.

    Intermediate results shared by several heads (the count head's per-gene NLL, the gene-identity
    logits) are computed once, on first use.
    """

    model: TranscriptFormer
    tokens: torch.Tensor  # (b, w) int64
    counts: torch.Tensor  # (b, w) float32
    lengths: torch.Tensor  # (b,) int64: real genes of each cell
    hidden: torch.Tensor  # (b, w, E)
    targets: torch.Tensor | None  # (b, w, E) target embeddings, or None
    full_length: bool  # position w - 1 is slot S - 1
    clip_counts: float | None
    gene_bias: torch.Tensor | None  # replacement count-head bias (out-of-distribution vocabularies)

    @cached_property
    def count_nll(self) -> torch.Tensor:
        """``(b, w)`` zero-truncated-Poisson NLL per position (0 at padding)."""
        return self.model.count_nll_per_gene(
            self.hidden,
            self.targets,  # type: ignore[arg-type]  # set whenever a count head runs
            self.tokens,
            self.counts,
            clip_counts=self.clip_counts,
            full_length=self.full_length,
            gene_bias=self.gene_bias,
        )

    @cached_property
    def own_gene_nll(self) -> torch.Tensor:
        """``(b, w)`` cross-entropy of each position's own gene (0 at padding)."""
        return self.model.gene_nll(self.hidden, self.tokens)

    def published_gene_nll(self) -> torch.Tensor:
        """``(b, w)`` the published ``gene_llh``: the own gene's CE, ``[END]``'s at slot ``S - 1``."""
        if not self.full_length:
            return self.own_gene_nll
        out = self.own_gene_nll.clone()
        end = self.end_nll()
        full = ~torch.isnan(end)
        out[full, -1] = end[full]
        return out

    def end_nll(self) -> torch.Tensor:
        """``(b,)`` cross-entropy of ``[END]`` at slot ``S - 1`` of full-length cells (NaN for the others)."""
        b = self.tokens.shape[0]
        out = torch.full((b,), float("nan"), device=self.tokens.device)
        if self.full_length:
            full = self.tokens[:, -1] != self.model.pad_idx
            if full.any():
                end = torch.full((int(full.sum()), 1), self.model.end_idx, device=self.tokens.device)
                out[full] = self.model.gene_nll(self.hidden[full, -1:], end)[:, 0]
        return out


Layout = Literal["cell", "slot", "gene", "gene_sum"]


@dataclass(frozen=True)
class Head:
    """One output of the engine.

    Attributes
    ----------
    name
        Key of the output in :class:`InferenceResult`.
    layout
        ``"cell"``: one value (or vector) per cell; ``"slot"``: a ``(n_obs, S)`` matrix over sequence slots
        (0 beyond a cell's sequence, the published ``gene_llh`` layout); ``"gene"``: one row per read gene
        (ragged; rows carry ``cell``, ``position`` and ``token``); ``"gene_sum"``: summed per (group, gene)
        over cells, with counts.
    compute
        ``f(batch) -> Tensor``: ``(b, *shape)`` for ``"cell"``, ``(b, w, *shape)`` for the others.
    shape
        Trailing shape of one value, as a function of the model (e.g. ``(E,)``).
    count_head, gene_head
        Whether it needs the count head's inputs (target embeddings) / the gene-identity head.
    """

    name: str
    layout: Layout
    compute: Callable[[Batch], torch.Tensor]
    shape: Callable[[TranscriptFormer], tuple[int, ...]] = lambda m: ()
    count_head: bool = False
    gene_head: bool = False


def _embed_dim(m: TranscriptFormer) -> tuple[int, ...]:
    return (m.config.embed_dim,)


#: Every output the engine can compute, by name.
HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("embeddings", "cell", lambda b: b.model.cell_embedding(b.hidden, b.tokens), _embed_dim),
        Head(
            "llh",
            "cell",
            lambda b: b.count_nll.sum(-1) / (b.tokens != b.model.pad_idx).sum(-1),
            count_head=True,
        ),
        Head("gene_llh", "slot", lambda b: b.published_gene_nll(), gene_head=True),
        Head("end_nll", "cell", lambda b: b.end_nll(), gene_head=True),
        Head(
            "gene_ce",
            "cell",
            lambda b: b.published_gene_nll().sum(-1) / (b.tokens != b.model.pad_idx).sum(-1),
            gene_head=True,
        ),
        Head("cge", "gene", lambda b: b.hidden.float(), _embed_dim),
        Head("count", "gene", lambda b: b.counts.float()),
        Head("count_nll", "gene", lambda b: b.count_nll, count_head=True),
        Head("gene_nll", "gene", lambda b: b.own_gene_nll, gene_head=True),
        Head("gene_sum", "gene_sum", lambda b: b.hidden.float(), _embed_dim),
    )
}


@dataclass
class InferenceResult:
    """Arrays in input order.

    Attributes
    ----------
    cells
        Per-cell outputs by head name: ``embeddings`` ``(n_obs, E)``, ``llh`` ``(n_obs,)`` (NaN for cells
        without genes), ``end_nll`` ``(n_obs,)``, ``n_genes`` ``(n_obs,)`` (gene tokens each cell was given,
        ``<= S``).
    slots
        ``(n_obs, S)`` outputs: ``gene_llh``.
    genes
        One row per read gene, cells in input order and genes in sequence order: ``cell`` (input position),
        ``position`` (slot in the cell's sequence), ``token``, and the gene-layout heads (``cge``
        ``(n, E)``, ``count``, ``count_nll``, ``gene_nll``).
    gene_sums
        With the ``gene_sum`` head: ``sum`` ``(n_groups, n_vocab_rows, E)`` float64, ``n`` ``(n_groups,
        n_vocab_rows)``, ``tokens`` (the vocabulary token of each row).
    seconds
        Wall time of the run.
    stats
        How it ran: cells, tokens, padded tokens, device, precision, attention (after any fallback, with
        ``attention_fallback`` saying why), out-of-memory retries, world size.
    """

    cells: dict[str, Any] = field(default_factory=dict)
    slots: dict[str, np.ndarray] = field(default_factory=dict)
    genes: dict[str, np.ndarray] = field(default_factory=dict)
    gene_sums: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    # shorthands for the common outputs
    @property
    def embeddings(self):
        return self.cells.get("embeddings")

    @property
    def llh(self) -> np.ndarray | None:
        return self.cells.get("llh")

    @property
    def gene_llh(self) -> np.ndarray | None:
        return self.slots.get("gene_llh")

    @property
    def n_genes(self) -> np.ndarray:
        return self.cells["n_genes"]


class Accumulator:
    """Collects each batch's head outputs into arrays in input order (``add``), then ``finish``-es them.

    Parameters
    ----------
    heads
        The heads being computed.
    model
        The network (for shapes and special tokens).
    n_rows
        Cells in this process's shard.
    seq_len
        ``S`` (width of slot outputs).
    gene_tokens
        Boolean mask over the vocabulary: gene-layout rows are kept for these tokens only (special tokens
        are never kept).
    groups, n_groups
        Group code of every cell of the shard (``-1``: in no group) for ``gene_sum``.
    embeddings_out
        Optional array-like ``(n_rows, E)`` receiving the embeddings window by window.
    device
        Where the gene sums are accumulated.
    offset
        Input row of the shard's first cell (named in messages).
    """

    def __init__(
        self,
        heads: Sequence[Head],
        model: TranscriptFormer,
        *,
        n_rows: int,
        seq_len: int,
        gene_tokens: np.ndarray,
        groups: np.ndarray | None = None,
        n_groups: int = 1,
        embeddings_out: Any | None = None,
        device: torch.device | None = None,
        offset: int = 0,
    ):
        self.heads = list(heads)
        self.offset = offset  # input row of the shard's first cell (for messages)
        self.model = model
        self.gene_tokens = gene_tokens
        self.embeddings_out = embeddings_out
        self.cells: dict[str, Any] = {"n_genes": np.zeros(n_rows, dtype=np.int64)}
        self.slots: dict[str, np.ndarray] = {}
        self.gene_parts: list[dict[str, np.ndarray]] = []
        self._window_genes: list[dict[str, np.ndarray]] = []
        for h in self.heads:
            shape = h.shape(model)
            if h.layout == "cell":
                if h.name == "embeddings" and embeddings_out is not None:
                    self.cells[h.name] = embeddings_out
                else:
                    fill = 0.0 if h.name == "embeddings" else np.nan
                    self.cells[h.name] = np.full((n_rows, *shape), fill, dtype=np.float32)
            elif h.layout == "slot":
                self.slots[h.name] = np.zeros((n_rows, seq_len, *shape), dtype=np.float32)
        self.sums = None
        if any(h.layout == "gene_sum" for h in self.heads):
            V, E = len(gene_tokens), model.config.embed_dim
            self.sum_rows = np.full(V, -1, dtype=np.int64)
            self.sum_tokens = np.flatnonzero(gene_tokens)
            self.sum_rows[self.sum_tokens] = np.arange(len(self.sum_tokens))
            self.n_groups = n_groups
            self.groups = np.zeros(n_rows, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
            R = len(self.sum_tokens)
            self.sums = torch.zeros(n_groups * R, E, dtype=torch.float64, device=device)
            self.sum_n = torch.zeros(n_groups * R, dtype=torch.int64, device=device)
            self._sum_rows_dev = torch.from_numpy(self.sum_rows).to(device)
        self._keep_dev = torch.from_numpy(np.asarray(gene_tokens, dtype=bool)).to(device)
        self._window_emb: np.ndarray | None = None

    def start_window(self, window: TokenWindow, base: int) -> None:
        """A new window of cells ``[base, base + len(window))`` of the shard."""
        self.cells["n_genes"][base : base + len(window)] = window.lengths
        if self.embeddings_out is not None and "embeddings" in self.cells:
            self._window_emb = np.zeros((len(window), self.model.config.embed_dim), dtype=np.float32)

    def check_finite(self, rows: np.ndarray, batch: Batch, results: dict[str, torch.Tensor]) -> None:
        """Raise if a head gave NaN or infinity where it must not (nothing non-finite is ever written).

        NaN is a documented value only for ``end_nll`` (cells shorter than ``S``) and for ``llh`` and ``gene_ce`` of
        a cell without any gene of the vocabulary (the published objective gives it NaN too).
        """
        for h in self.heads:
            if h.name == "end_nll":
                continue
            ok = torch.isfinite(results[h.name])
            if h.layout in ("gene", "gene_sum"):  # only the read genes' values are kept
                b, w = ok.shape[:2]
                ok = ok.reshape(b, w, -1).all(dim=2)
                ok = (ok | (torch.arange(w, device=ok.device)[None, :] >= batch.lengths[:, None])).all(dim=1)
            elif ok.dim() > 1:
                ok = ok.reshape(ok.shape[0], -1).all(dim=1)
            if h.name in ("llh", "gene_ce"):  # a cell without any gene of the vocabulary: NaN, as published
                ok = ok | (batch.lengths == 0)
            if not bool(ok.all()):
                bad = rows[(~ok).cpu().numpy()] + self.offset
                raise ValueError(
                    f"the model gave NaN or infinite values ({h.name}) for {len(bad)} cell(s), e.g. the cells at rows "
                    f"{bad[:5].tolist()}; nothing was written. Check those cells' counts (huge counts with "
                    "clip_counts=None or normalize_to_scale), the checkpoint's weights, or use precision='32' instead "
                    "of float16."
                )

    def add(self, rows: np.ndarray, window_rows: np.ndarray, batch: Batch, results: dict[str, torch.Tensor]) -> None:
        """Store one batch: ``rows`` are the cells' positions in the shard, ``window_rows`` in the window."""
        self.check_finite(rows, batch, results)
        genes = None
        part: dict[str, np.ndarray] = {}
        for h in self.heads:
            value: Any = results[h.name]  # a tensor, then for cell and slot heads its numpy copy
            if h.layout == "cell":
                value = value.float().cpu().numpy()
                if h.name == "embeddings" and self._window_emb is not None:
                    self._window_emb[window_rows] = value
                else:
                    self.cells[h.name][rows] = value
            elif h.layout == "slot":
                value = value.float().cpu().numpy()
                self.slots[h.name][rows, : value.shape[1]] = value
            else:
                if genes is None:
                    genes = self._read_genes(batch)
                b, j = genes
                if h.layout == "gene":
                    part[h.name] = value[b, j].float().cpu().numpy()
                else:
                    self._add_sums(rows, batch, b, j, value[b, j])
        if part:
            b, j = genes  # type: ignore[misc]  # read by the first gene head
            part.update(cell=rows[b.cpu().numpy()], position=j.cpu().numpy(), token=batch.tokens[b, j].cpu().numpy())
            self._window_genes.append(part)

    def _read_genes(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch rows and slots of the read genes of this batch (kept tokens only)."""
        w = batch.tokens.shape[1]
        real = torch.arange(w, device=batch.tokens.device)[None, :] < batch.lengths[:, None]
        return torch.nonzero(real & self._keep_dev[batch.tokens], as_tuple=True)  # type: ignore[return-value]

    def _add_sums(self, rows: np.ndarray, batch: Batch, b: torch.Tensor, j: torch.Tensor, values: torch.Tensor):
        group = torch.from_numpy(self.groups[rows]).to(b.device)[b]
        row = self._sum_rows_dev[batch.tokens[b, j]]
        ok = (group >= 0) & (row >= 0)
        index = group[ok] * len(self.sum_tokens) + row[ok]
        self.sums.index_add_(0, index, values[ok].to(torch.float64))  # type: ignore[union-attr]
        self.sum_n.index_add_(0, index, torch.ones_like(index))

    def end_window(self, window: TokenWindow, base: int) -> None:
        """The window is complete: flush streamed embeddings and order its gene rows."""
        if self._window_emb is not None:
            self.embeddings_out[base : base + len(window)] = self._window_emb  # type: ignore[index]
            self._window_emb = None
        parts, self._window_genes = self._window_genes, []
        if parts:
            merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            order = np.lexsort((merged["position"], merged["cell"]))
            self.gene_parts.append({k: v[order] for k, v in merged.items()})

    def finish(self, offset: int) -> InferenceResult:
        """The shard's results (gene rows' ``cell`` shifted by ``offset``, the shard's first cell)."""
        result = InferenceResult(cells=self.cells, slots=self.slots)
        gene_heads = [h for h in self.heads if h.layout == "gene"]
        if gene_heads:
            if self.gene_parts:
                result.genes = {k: np.concatenate([p[k] for p in self.gene_parts]) for k in self.gene_parts[0]}
            else:
                result.genes = {k: np.zeros(0, np.int64) for k in ("cell", "position", "token")}
                for h in gene_heads:
                    result.genes[h.name] = np.zeros((0, *h.shape(self.model)), np.float32)
            result.genes["cell"] = result.genes["cell"].astype(np.int64) + offset
            result.genes["position"] = result.genes["position"].astype(np.int64)
            result.genes["token"] = result.genes["token"].astype(np.int64)
        if self.sums is not None:
            R = len(self.sum_tokens)
            result.gene_sums = {
                "sum": self.sums.cpu().numpy().reshape(self.n_groups, R, -1),
                "n": self.sum_n.cpu().numpy().reshape(self.n_groups, R),
                "tokens": self.sum_tokens,
            }
        return result


def gather(result: InferenceResult, external_embeddings: bool) -> InferenceResult:
    """Gather every rank's contiguous shard into full arrays in input order (all ranks get them)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    cells = {k: v for k, v in result.cells.items() if not (k == "embeddings" and external_embeddings)}
    payload = {"cells": cells, "slots": result.slots, "genes": result.genes, "gene_sums": result.gene_sums}
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, payload)
    merged = InferenceResult()
    for part in ("cells", "slots", "genes"):
        out = getattr(merged, part)
        for key in payload[part]:
            out[key] = np.concatenate([s[part][key] for s in shards])
    if external_embeddings:
        merged.cells["embeddings"] = result.cells["embeddings"]
    if result.gene_sums:
        merged.gene_sums = dict(result.gene_sums)
        for key in ("sum", "n"):
            merged.gene_sums[key] = sum(s["gene_sums"][key] for s in shards)
    return merged
