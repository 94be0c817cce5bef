"""The inference engine: device, precision, length-aware batching, streaming and sharding.

Data flows one way::

    CellSource --windows--> TokenWindow --plan_batches--> batch --model.encode--> Batch --heads--> Accumulator

:meth:`Engine.run` reads a :class:`~transcriptformer.tokenizer.CellSource` in windows of consecutive
cells (the next window is read and tokenised on a background thread while the model runs), groups
each window's cells into batches of similar length (:meth:`Engine.plan_batches`), trims every batch
to its longest cell, runs the encoder once per batch and then only the :data:`HEADS` that were asked
for, and hands each batch's results to an :class:`Accumulator`, which puts them back in input order.
Every step is exact: a cell's outputs do not depend on the cells it is batched with. Under
``torch.distributed`` (``torchrun``) each rank takes a contiguous shard of cells and the accumulators
are gathered in input order.

Adding an output is one entry in :data:`HEADS`: a name, a layout (per cell, per sequence slot, per read
gene, or summed per gene) and a function of a :class:`Batch`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .checkpoint import LoadedModel, species_vocabulary
from .config import ATTENTION_BACKENDS, PRECISION_ALIASES, PRECISIONS, AttentionBackend, Precision, device_name
from .errors import warn
from .model import (
    BiasMode,
    ChunkedAttention,
    DenseAttention,
    FlexAttention,
    Kernel,
    LayerSteps,
    TranscriptFormer,
    chunked_attention,
    flex_attention,
)
from .options import check_positive_int
from .tokenizer import CellSource, TokenizeOptions, TokenWindow, sequence_width
from .vocab import GeneVocab

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "Accumulator",
    "Batch",
    "BatchPlanner",
    "Engine",
    "Head",
    "Inference",
    "InferenceResult",
    "batch_tensors",
    "estimate_flops",
    "infer",
    "resolve_device",
    "resolve_precision",
]


# --------------------------------------------------------------------------------------------
# devices and precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on: ``"auto"`` is CUDA if available, else CPU (MPS only when asked for).

    Raises
    ------
    ValueError
        An unknown name, or a device that is not available here.
    """
    name = device_name(device)  # the same rule as RunOptions
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but MPS is not available; use device='cpu' or 'auto'.")
    return dev


def resolve_precision(precision: Precision | str, device: torch.device) -> Literal["32", "bf16", "16"]:
    """Returns ``"32"``, ``"bf16"`` or ``"16"`` (see :data:`~transcriptformer.config.Precision`).

    ``"auto"`` is float32 on CPU and MPS and bfloat16 autocast on CUDA. ``"16"`` on CPU runs as
    bfloat16, as the published tool (Lightning) does for its default ``16-mixed``.
    """
    key = str(precision).strip().lower() if isinstance(precision, str | int) and not isinstance(precision, bool) else ""
    p = PRECISION_ALIASES.get(key, key if key in PRECISIONS else None)
    if p is None:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(map(repr, PRECISIONS))}.")
    if p == "auto":
        return "bf16" if device.type == "cuda" else "32"
    if p == "16" and device.type == "cpu":
        logger.info("float16 autocast on CPU runs as bfloat16 (as the published tool does).")
        return "bf16"
    return p  # type: ignore[return-value]


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (none for float32)."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# per-device state: the model copy and what was decided and compiled for it


@dataclass
class DeviceState:
    """A loaded model on one device with the kernels and compiled steps built for it (kept across runs)."""

    model: TranscriptFormer
    kernels: dict[str, Kernel] = field(default_factory=dict)
    auto_attention: str | None = None  # what "auto" resolved to here (the flex probe's outcome)
    probed: bool = False
    fused_steps: LayerSteps | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kernel(self, name: str) -> Kernel:
        """The kernel called ``name`` (built once: compiled kernels keep their caches)."""
        with self.lock:
            if name not in self.kernels:
                self.kernels[name] = _build_kernel(name)
            return self.kernels[name]


def _build_kernel(name: str) -> Kernel:
    if name == "chunked":
        return ChunkedAttention()
    if name == "dense":
        return DenseAttention()
    if name in ("flex", "flex-dynamic"):
        return FlexAttention(dynamic=name == "flex-dynamic")
    raise ValueError(f"attention={name!r}; expected one of {', '.join(map(repr, ATTENTION_BACKENDS))}.")


def device_state(loaded: LoadedModel, device: torch.device) -> DeviceState:
    """The :class:`DeviceState` of ``loaded`` on ``device`` (kept in ``loaded.runtime``)."""
    key = f"device:{device}"
    with loaded.lock:  # reentrant: loaded.on takes it too
        if key not in loaded.runtime:
            loaded.runtime[key] = DeviceState(loaded.on(device))
        return loaded.runtime[key]


def _probe_flex(device: torch.device) -> str | None:
    """``"flex-dynamic"`` or ``"flex"`` if compiled flex_attention runs here and matches the chunked kernel.

    The dynamic-shape compile is tried first (on three shapes), then the fixed-shape compile; any failure
    or disagreement means chunked attention.
    """
    from torch.nn.attention.flex_attention import flex_attention as flex

    def agrees(B: int, T: int, compiled) -> bool:
        g = torch.Generator(device="cpu").manual_seed(B * T)
        q, k, v = (torch.randn(B, 2, T, 64, generator=g).to(device) for _ in range(3))
        bias = torch.rand(B, T, generator=g).to(device)
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        valid[0, 0] = False  # unknown aux token
        valid[1, T // 2 :] = False  # padding
        a = flex_attention(q, k, v, bias, valid, 10.0, num_aux=1, compiled=compiled)
        b = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1)
        return bool(
            torch.allclose(a[0], b[0], atol=1e-4, rtol=1e-4)
            and torch.allclose(a[1, :, : T // 2], b[1, :, : T // 2], atol=1e-4, rtol=1e-4)
        )

    for name, shapes in (("flex-dynamic", [(2, 256), (3, 256), (2, 384)]), ("flex", [(2, 256)])):
        try:
            compiled = torch.compile(flex, dynamic=None if name == "flex-dynamic" else False)
            if all(agrees(B, T, compiled) for B, T in shapes):
                return name
            logger.warning("%s disagrees with the chunked kernel on %s.", name, device)
        except Exception as e:  # noqa: BLE001 - any compile failure means: try the next
            logger.info("%s is not usable on %s (%s: %s).", name, device, type(e).__name__, str(e)[:200])
    return None


# --------------------------------------------------------------------------------------------
# heads: what a batch can compute, and how it is laid out


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


# --------------------------------------------------------------------------------------------
# results


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

        NaN is a documented value only for ``end_nll`` (cells shorter than ``S``) and for ``llh`` of a cell
        without genes.
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
            if h.name == "llh":
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


def _gather(result: InferenceResult, external_embeddings: bool) -> InferenceResult:
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


# --------------------------------------------------------------------------------------------
# the engine


class GeneEmbeddingCache:
    """The gene-embedding MLP's output per token id, computed the first time a token is seen.

    A gene's input embedding depends on nothing but its token, so every later batch only gathers
    rows. Exact up to float32 round-off (the MLP runs on other shapes). Used when the table fits in
    ``max_bytes``.
    """

    def __init__(self, model: TranscriptFormer, table: torch.Tensor | None, device: torch.device, max_bytes: int):
        self.model = model
        self.table = table
        V = model.gene_embeddings.embedding.num_embeddings if table is None else table.shape[0]
        E = model.config.embed_dim
        self.enabled = V * E * 4 <= max_bytes
        if self.enabled:
            self.values = torch.empty(V, E, dtype=torch.float32, device=device)
            self.ready = torch.zeros(V, dtype=torch.bool, device=device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.model.gene_embeddings(tokens, self.table)
        seen = torch.unique(tokens)
        missing = seen[~self.ready[seen]]
        if missing.numel():
            self.values[missing] = self.model.gene_embeddings(missing, self.table).float()
            self.ready[missing] = True
        return self.values[tokens]


#: Heuristic cost of one batch beyond its arithmetic (kernel launches, Python, copies), as seconds, and the
#: arithmetic rate it is traded against: a batch is split where its padding would cost more than a new batch.
_BATCH_OVERHEAD_S = {"cpu": 2e-3, "cuda": 5e-3, "mps": 5e-3}
_FLOP_RATE = {"cpu": 2e11, "cuda": 3e14, "mps": 5e12}


@dataclass
class _RunState:
    """What may change while one run goes on (never the engine's own settings)."""

    kernel: Kernel
    max_tokens: int
    oom_retries: int = 0
    fallback: str | None = None


class Engine:
    """Runs a loaded model over cells.

    Parameters
    ----------
    loaded
        The checkpoint.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision
        ``"auto"``, ``"32"``, ``"bf16"``, ``"16"`` (autocast for the reduced ones).
    batch_size
        Most cells in one batch (``None``: limited by ``max_tokens`` only).
    max_tokens
        Token budget of one batch: cells x (longest cell + 1). Default 16,384 on CPU, 131,072 on GPU.
    attention
        One of :data:`~transcriptformer.config.AttentionBackend`; ``"auto"`` is flex_attention on CUDA
        when it compiles and agrees with the chunked kernel (checked once per device), else chunked.
    window
        Cells read and tokenised at a time (and sorted by length within).
    progress
        Show a progress bar; ``None`` shows one when the run is expected to take more than a few seconds.
    fuse
        Run the code around attention through ``torch.compile`` (:class:`~transcriptformer.model.LayerSteps`).
        ``None``: only where flex_attention compiled with dynamic shapes (CUDA).
    distributed
        Shard the cells over the ranks of the ``torch.distributed`` process group and gather the results.
        ``None``: when a process group is initialised.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | torch.device = "auto",
        precision: Precision | str = "auto",
        batch_size: int | None = None,
        max_tokens: int | None = None,
        attention: AttentionBackend | str = "auto",
        window: int = 4096,
        progress: bool | None = None,
        fuse: bool | None = None,
        distributed: bool | None = None,
    ):
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        gpu = self.device.type == "cuda"
        self.max_tokens = check_positive_int(max_tokens, "max_tokens") or (131072 if gpu else 16384)
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r}; expected one of {', '.join(map(repr, ATTENTION_BACKENDS))}.")
        self.window = check_positive_int(window, "window") or 4096
        self.progress = progress
        self.state = device_state(loaded, self.device)
        self.model: TranscriptFormer = self.state.model
        if attention == "auto":
            attention = "chunked"
            if gpu:
                with self.state.lock:
                    if not self.state.probed:
                        self.state.auto_attention = _probe_flex(self.device)
                        self.state.probed = True
                        logger.info("attention on %s: %s", self.device, self.state.auto_attention or "chunked")
                attention = self.state.auto_attention or "chunked"
        self.attention: str = attention
        self.kernel = self.state.kernel(attention)
        self.fuse = self.attention == "flex-dynamic" if fuse is None else bool(fuse)
        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        elif distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True but no torch.distributed process group is initialised.")
        self.rank, self.world = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        )

    # -- batching ---------------------------------------------------------------------------

    def planner(self, max_tokens: int | None = None, kernel: Kernel | None = None) -> BatchPlanner:
        """How this engine groups cells into batches (for a token budget and kernel other than its own)."""
        return BatchPlanner.for_model(
            self.loaded,
            self.device.type,
            max_tokens=max_tokens or self.max_tokens,
            batch_size=self.batch_size,
            kernel=getattr(kernel or self.kernel, "name", "chunked"),
        )

    def _width(self, longest: int, kernel: Kernel | None = None) -> int:
        """Sequence length a batch whose longest cell has ``longest`` genes runs at."""
        return self.planner(kernel=kernel).width(longest)

    def plan_batches(
        self, lengths: np.ndarray, max_tokens: int | None = None, kernel: Kernel | None = None
    ) -> list[np.ndarray]:
        """Group cells into batches (see :meth:`BatchPlanner.plan`)."""
        return self.planner(max_tokens, kernel).plan(lengths)

    # -- running ----------------------------------------------------------------------------

    def _steps(self) -> LayerSteps | None:
        if not self.fuse:
            return None
        with self.state.lock:
            if self.state.fused_steps is None:
                from .model import EncoderLayer

                self.state.fused_steps = LayerSteps(
                    torch.compile(EncoderLayer.before_attention, dynamic=True),
                    torch.compile(EncoderLayer.after_attention, dynamic=True),
                )
            return self.state.fused_steps

    def _forward(
        self,
        window: TokenWindow,
        idx: np.ndarray,
        heads: Sequence[Head],
        kernel: Kernel,
        max_tokens: int,
        tables: tuple[torch.Tensor, torch.Tensor] | None,
        clip_counts: float | None,
        embed: Callable | None,
        mode: BiasMode = "embed",
    ) -> tuple[Batch, dict[str, torch.Tensor]]:
        S = self.loaded.seq_len
        planner = self.planner(max_tokens, kernel)
        width = planner.width(int(window.lengths[idx].max()))
        n = len(idx)
        if planner.fixed:  # fixed shapes: fill short batches up to the usual size
            idx = np.concatenate([idx, np.repeat(idx[:1], max(0, planner.cells_per_batch(width) - n))])
        dev = self.device
        tok, cnt, aux = batch_tensors(window, idx, width, self.model.pad_idx, dev)
        lengths = torch.from_numpy(window.lengths[idx]).to(dev)
        model = self.model
        with torch.inference_mode(), autocast(dev, self.precision):
            enc = model.encode(
                tok,
                cnt,
                aux,
                mode=mode,
                with_targets=any(h.count_head for h in heads),
                gene_table=None if tables is None else tables[0],
                kernel=kernel,
                steps=self._steps(),
                embed=embed,
            )
            batch = Batch(
                model=model,
                tokens=tok[:n],
                counts=cnt[:n],
                lengths=lengths[:n],
                hidden=enc.hidden[:n],
                targets=None if enc.targets is None else enc.targets[:n],
                full_length=width == S,
                clip_counts=clip_counts,
                gene_bias=None if tables is None else tables[1],
            )
            results = {h.name: h.compute(batch) for h in heads}
        return batch, results

    def _run_batch(self, window, idx, heads, state: _RunState, run) -> Iterator[tuple[np.ndarray, Batch, dict]]:
        """Run one batch; on out-of-memory halve it (and the rest of the run's token budget), losing no cell.

        A compiled kernel that fails is replaced by the chunked kernel for the rest of this run (logged and
        reported in the run's stats).
        """
        try:
            batch, results = self._forward(window, idx, heads, state.kernel, state.max_tokens, *run)
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise
            state.oom_retries += 1
            state.max_tokens = max(1, state.max_tokens // 2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning(
                "out of memory on a batch of %d cells; retrying in halves (token budget now %d for this run).",
                len(idx),
                state.max_tokens,
            )
            half = len(idx) // 2
            yield from self._run_batch(window, idx[:half], heads, state, run)
            yield from self._run_batch(window, idx[half:], heads, state, run)
            return
        except Exception as e:  # a compiled kernel that fails on a new shape: fall back (re-raised otherwise)
            if not isinstance(state.kernel, FlexAttention):
                raise
            state.fallback = f"{state.kernel.name} failed ({type(e).__name__}: {str(e)[:200]}); used chunked"
            logger.warning(
                "%s failed (%s: %s); continuing with chunked attention.", state.kernel.name, type(e).__name__, e
            )
            state.kernel = self.state.kernel("chunked")
            yield from self._run_batch(window, idx, heads, state, run)
            return
        yield idx, batch, results

    def _windows(self, source: CellSource, start: int, stop: int) -> Iterator[TokenWindow]:
        """Tokenised windows of ``[start, stop)``, the next one prepared on a background thread."""
        bounds = [(s, min(s + self.window, stop)) for s in range(start, stop, self.window)]
        if not bounds:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="transcriptformer-reader") as pool:
            pending = pool.submit(source.read, *bounds[0])
            for nxt in bounds[1:]:
                current = pending.result()
                pending = pool.submit(source.read, *nxt)
                yield current
            yield pending.result()

    def run(
        self,
        source: CellSource,
        heads: Sequence[str] = ("embeddings",),
        *,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        embeddings_out: Any | None = None,
        gene_tokens: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        n_groups: int = 1,
        mode: BiasMode = "embed",
    ) -> InferenceResult:
        """Run the model over every cell of ``source``.

        Parameters
        ----------
        source
            Tokenisable cells (:func:`~transcriptformer.tokenizer.prepare_cells`).
        heads
            Names of the outputs to compute (keys of :data:`HEADS`).
        tables
            ``(esm_matrix, gene_bias)`` replacing the model's gene tables (out-of-distribution
            vocabularies; ``source`` must be tokenised with the matching vocabulary).
        embeddings_out
            Optional array-like of shape ``(n_obs, E)`` (``np.memmap``, h5py dataset, zarr array)
            that receives the embeddings window by window instead of an in-memory array, for
            inputs too large to hold. The result's ``embeddings`` is then this object.
        gene_tokens
            Boolean mask over the vocabulary: per-gene outputs (``"gene"`` and ``"gene_sum"`` layouts) of
            these tokens only (the others are never copied off the device). Special tokens are never kept.
        groups, n_groups
            For ``gene_sum``: each cell's group code (``0 .. n_groups - 1``, ``-1`` for none), in input order.
        mode
            ``"embed"`` (inference, the published outputs) or ``"train"`` (the training objective's forward,
            for evaluating it: :func:`~transcriptformer.training.cell_losses`).

        Returns
        -------
        InferenceResult
            Results in input order. Under ``torch.distributed`` every rank returns the full result.
        """
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ValueError(f"unknown output(s) {unknown}; known: {', '.join(HEADS)}.")
        selected = [HEADS[h] for h in heads]
        if any(h.gene_head for h in selected) and self.model.gene_id_head is None:
            raise ValueError(f"{self.loaded.name} has no gene-identity head; {heads} cannot be computed.")
        t0 = time.perf_counter()
        n = source.n_obs
        lo, hi = (self.rank * n) // self.world, ((self.rank + 1) * n) // self.world
        S = self.loaded.seq_len
        keep = np.ones(len(source.vocab), dtype=bool) if gene_tokens is None else np.asarray(gene_tokens, bool).copy()
        keep[: source.vocab.n_special] = False
        acc = Accumulator(
            selected,
            self.model,
            n_rows=hi - lo,
            seq_len=S,
            gene_tokens=keep,
            groups=None if groups is None else np.asarray(groups)[lo:hi],
            n_groups=n_groups,
            embeddings_out=embeddings_out,
            device=self.device,
            offset=lo,
        )
        dev_tables = None if tables is None else (tables[0].to(self.device), tables[1].to(self.device))
        cache_bytes = (4 << 30) if self.device.type == "cuda" else (1 << 30)
        embed = GeneEmbeddingCache(self.model, None if dev_tables is None else dev_tables[0], self.device, cache_bytes)
        state = _RunState(kernel=self.kernel, max_tokens=self.max_tokens)
        if mode not in ("embed", "train"):
            raise ValueError(f"mode={mode!r}; expected 'embed' or 'train'.")
        run_args = (dev_tables, source.options.clip_counts, embed, mode)
        n_tokens = n_padded = 0
        bar = None
        try:
            for window in self._windows(source, lo, hi):
                base = window.start - lo
                if bar is None:
                    bar = self._progress_bar(window, hi - lo)
                acc.start_window(window, base)
                for idx in self.plan_batches(window.lengths, state.max_tokens, state.kernel):
                    for done, batch, results in self._run_batch(window, idx, selected, state, run_args):
                        n_tokens += int(np.minimum(window.lengths[done] + 1, S).sum())
                        n_padded += batch.tokens.shape[1] * len(done)
                        acc.add(base + done, done, batch, results)
                        bar.update(len(done))
                acc.end_window(window, base)
        finally:
            if bar is not None:
                bar.close()
        result = acc.finish(offset=lo)
        if self.world > 1:
            result = _gather(result, embeddings_out is not None)
        result.seconds = time.perf_counter() - t0
        result.stats = {
            "cells": n,
            "tokens": n_tokens,
            "padded_tokens": n_padded,
            "device": str(self.device),
            "precision": self.precision,
            "attention": state.kernel.name,  # type: ignore[attr-defined]  # every kernel class has a name
            "oom_retries": state.oom_retries,
            "max_tokens": state.max_tokens,
            "world_size": self.world,
        }
        if state.fallback:
            result.stats["attention_fallback"] = state.fallback
        logger.info(
            "ran %s cells in %.1f s (%.1f cells/s, %s tokens, %.0f%% padding) on %s",
            f"{n:,}",
            result.seconds,
            n / max(result.seconds, 1e-9),
            f"{n_tokens:,}",
            100.0 * (1 - n_tokens / max(n_padded, 1)),
            self.device,
        )
        return result

    def _progress_bar(self, first: TokenWindow, n_cells: int):
        """A progress bar, shown when the run is expected to take more than a few seconds (from the tokens)."""
        from ._progress import tqdm

        show = self.progress
        if show is None:
            tokens = float(np.minimum(first.lengths + 1, self.loaded.seq_len).sum()) * n_cells / max(len(first), 1)
            plan = self.planner()
            width = float(np.mean(np.minimum(first.lengths + 1, self.loaded.seq_len))) if len(first) else 1.0
            seconds = tokens * (plan.per_token + plan.per_pair * width) / _FLOP_RATE.get(self.device.type, 1e12)
            show = seconds > 5.0
        return tqdm(
            total=n_cells, unit="cell", desc=f"TranscriptFormer ({self.loaded.name})", disable=not show or self.rank > 0
        )


@dataclass(frozen=True)
class BatchPlanner:
    """How cells are grouped into batches: a token budget and a cost model.

    Attributes
    ----------
    seq_len, num_aux
        The model's ``S`` and ``A``.
    max_tokens, batch_size
        Budget of a batch (cells x width) and the most cells in one (``None``: no cap).
    overhead, per_token, per_pair
        Estimated cost (in FLOPs) of a batch beyond its arithmetic, of a token (projections, feed-forward,
        gene MLP) and of a (query, key) pair of attention.
    pad_multiple
        Widths are rounded up to a multiple of this (with the auxiliary tokens): compiled flex kernels like
        lengths on a coarse grid (fewer recompilations).
    fixed
        Fixed shapes: every batch of a width holds the same number of cells (``flex`` compiled per shape).
    """

    seq_len: int
    num_aux: int
    max_tokens: int
    batch_size: int | None
    overhead: float
    per_token: float
    per_pair: float
    pad_multiple: int = 1
    fixed: bool = False

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, device_type: str, *, max_tokens: int, batch_size: int | None, kernel: str = "chunked"
    ) -> BatchPlanner:
        c = loaded.config.model
        E, Fd, L = c.embed_dim, c.model_dim, c.num_layers
        return cls(
            seq_len=c.seq_len,
            num_aux=loaded.model.num_aux,
            max_tokens=max_tokens,
            batch_size=batch_size,
            overhead=_BATCH_OVERHEAD_S.get(device_type, 5e-3) * _FLOP_RATE.get(device_type, 1e12),
            per_token=2.0 * (E * E + L * (4 * E * E + 2 * E * Fd)),
            per_pair=2.0 * L * 2 * E / 2,  # causal: about half the pairs
            pad_multiple={"flex": 256, "flex-dynamic": 128}.get(kernel, 1),
            fixed=kernel == "flex",
        )

    def width(self, longest: int) -> int:
        """Sequence length a batch whose longest cell has ``longest`` genes runs at."""
        width = sequence_width(longest, self.seq_len)
        m = self.pad_multiple
        if m > 1:
            width = min(self.seq_len, -(-(width + self.num_aux) // m) * m - self.num_aux)
        return width

    def cells_per_batch(self, width: int) -> int:
        """Cells in a full batch running at ``width``: the token budget, capped by ``batch_size``."""
        n = max(1, self.max_tokens // width)
        return min(n, self.batch_size) if self.batch_size else n

    def plan(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Group cells (positions into ``lengths``) into batches under the token budget, longest first.

        Cells are sorted by length and cut into consecutive groups. Where to cut is chosen to minimise the
        estimated cost: padding a short cell to a long batch costs its arithmetic, a new batch costs a fixed
        overhead. So a few cells of very different lengths run as separate batches, and many similar cells
        fill the budget. With fixed shapes, each batch is filled to the usual size of its width.
        """
        lengths = np.asarray(lengths)
        order = np.argsort(-lengths, kind="stable")
        n = len(order)
        if n == 0:
            return []
        widths = np.array([self.width(int(x)) for x in lengths[order]])
        cap = np.array([self.cells_per_batch(int(w)) for w in widths])
        if self.fixed:
            cuts, i = [0], 0
            while i < n:
                i = min(n, i + int(cap[i]))
                cuts.append(i)
        else:
            cuts = _optimal_cuts(widths, cap, self.overhead, self.per_token, self.per_pair)
        return [order[a:b] for a, b in itertools.pairwise(cuts)]


def batch_tensors(
    window: TokenWindow, idx: np.ndarray, width: int, pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, counts and auxiliary tokens of the cells ``idx`` of ``window``, trimmed or padded to ``width``."""
    tokens = np.full((len(idx), width), pad, dtype=np.int64)
    counts = np.zeros((len(idx), width), dtype=np.float32)
    w = min(width, window.tokens.shape[1])
    tokens[:, :w] = window.tokens[idx, :w]
    counts[:, :w] = window.counts[idx, :w]
    tok = torch.from_numpy(tokens).to(device, non_blocking=True)
    cnt = torch.from_numpy(counts).to(device, non_blocking=True)
    aux = torch.from_numpy(window.aux[idx]).to(device, non_blocking=True)
    return tok, cnt, aux


def _optimal_cuts(widths: np.ndarray, cap: np.ndarray, overhead: float, per_token: float, per_pair: float):
    """Cut points ``0 = c0 < c1 < ... = n`` of cells sorted by decreasing width minimising the estimated cost.

    A batch ``[i, j)`` runs at ``widths[i]`` with ``j - i <= cap[i]`` cells and costs
    ``overhead + (j - i) * (per_token * w + per_pair * w * w)``. Dynamic programming over the end of the last
    batch; each step is vectorised over the possible starts.
    """
    n = len(widths)
    w = widths.astype(np.float64)
    per_cell = per_token * w + per_pair * w * w
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    max_cap = int(cap.max())
    for j in range(1, n + 1):
        i = np.arange(max(0, j - max_cap), j)
        ok = (j - i) <= cap[i]
        i = i[ok]
        cost = best[i] + overhead + (j - i) * per_cell[i]
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], i[k]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(start[cuts[-1]]))
    return cuts[::-1]


def estimate_flops(n_tokens_per_cell: np.ndarray, loaded: LoadedModel, *, llh: bool = False) -> float:
    """Multiply-add FLOPs (x2) the model needs for cells of the given token counts (no padding).

    Counts the gene MLP, the projections and feed-forward of every layer, causal attention
    (``QK^T`` and ``PV`` over keys up to each query) and, with ``llh``, the count head.
    """
    c = loaded.config.model
    E, Fd, L = c.embed_dim, c.model_dim, c.num_layers
    D = loaded.model.gene_embeddings.embedding.weight.shape[1]
    A = loaded.model.num_aux
    T = n_tokens_per_cell.astype(np.float64) + A
    per_token = 2 * (D * E + E * E) + L * 2 * (4 * E * E + 2 * E * Fd)
    attn = L * 2 * 2 * E * (T * (T + 1) / 2)  # causal: query i meets i+1 keys
    total = float((per_token * T).sum() + attn.sum())
    if llh:
        total += float((2 * (E * E + E / 2) * T).sum())
    return total


# --------------------------------------------------------------------------------------------
# AnnData -> tokens -> model -> arrays


@dataclass
class Inference:
    """What :func:`infer` computed and how."""

    result: InferenceResult
    source: CellSource
    vocab: GeneVocab
    engine: Engine
    species_tables: list[Path] | None

    def params(self, loaded: LoadedModel, options: Any, tool: str, **extra: Any) -> dict[str, Any]:
        """Everything needed to reproduce the run, h5ad-writable (no ``None``), for ``uns[...]["params"]``.

        ``options`` is the :class:`~transcriptformer.options.RunOptions` the run was made with.
        """
        from . import __version__

        src, stats = self.source, self.result.stats
        params: dict[str, Any] = {
            "tool": tool,
            "model": loaded.name,
            "model_path": str(loaded.path) if loaded.path is not None else "in memory",
            "weights_sha256": loaded.weights_sha256,
            **options.record(),
            "gene_key": options.gene_key if options.gene_key is not None else "var_names",
            "counts_source": src.source,
            "counts_look_raw": src.counts_look_raw,
            "n_genes_matched": src.n_matched,
            "n_genes": src.n_genes,
            "seq_len": loaded.seq_len,
            "device": stats["device"],
            "precision": stats["precision"],
            "attention": stats["attention"],
            "max_tokens": stats["max_tokens"],
            "transcriptformer_version": __version__,
        }
        if "attention_fallback" in stats:
            params["attention_fallback"] = stats["attention_fallback"]
        if loaded.adapter:
            params["adapter"] = loaded.adapter["path"]
            params["adapter_sha256"] = loaded.adapter["sha256"]
            params["adapter_merged"] = loaded.adapter["merged"]
        if self.species_tables:
            params["species_embedding"] = [str(p) for p in self.species_tables]
        params.update({k: v for k, v in extra.items() if v is not None})
        return params


def infer(
    adata,
    loaded: LoadedModel,
    *,
    heads: Sequence[str] = ("embeddings",),
    tokenize: TokenizeOptions | None = None,
    species_embedding: Any = None,
    device: str | torch.device = "auto",
    precision: Precision | str = "auto",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    attention: AttentionBackend | str = "auto",
    progress: bool | None = None,
    cache_dir: Any = None,
    embeddings_out: Any | None = None,
    genes: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    distributed: bool | None = None,
    data_genes_only: bool = False,
    mode: BiasMode = "embed",
) -> Inference:
    """AnnData -> tokens -> model -> arrays: the pipeline shared by the scanpy tools and the CLI.

    Validates the input (raising fix-it errors before any compute), runs the engine, and warns
    about cells without any gene of the vocabulary. Never modifies ``adata``. ``genes`` restricts the
    per-gene outputs to those gene ids; ``data_genes_only`` to the genes of the data (smaller ``gene_sum``
    accumulators).
    """
    from . import registry

    loaded.check_weights_unchanged()
    tokenize = tokenize or TokenizeOptions()
    vocab, tables, species_paths = loaded.vocab, None, None
    if any(HEADS[h].gene_head for h in heads if h in HEADS):
        if loaded.model.gene_id_head is None:
            raise ValueError(
                f"{loaded.name} has no gene-identity head, so gene-identity likelihoods are not available."
            )
        if species_embedding is not None:
            raise ValueError(
                "gene-identity likelihoods are over the model's own vocabulary and cannot be computed with "
                "species_embedding; drop one of the two."
            )
    if species_embedding is not None:
        species_paths = registry.species_tables(species_embedding, cache_dir=cache_dir)
        vocab, esm, bias = species_vocabulary(loaded, species_paths)
        tables = (esm, bias)
    engine = Engine(
        loaded,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        attention=attention,
        progress=progress,
        distributed=distributed,
    )
    source = loaded.cells(adata, tokenize, vocab)
    gene_tokens = None if genes is None else vocab.mask(genes, what="requested genes")
    if data_genes_only:
        in_data = np.zeros(len(vocab), dtype=bool)
        in_data[source.column_tokens] = True
        gene_tokens = in_data if gene_tokens is None else gene_tokens & in_data
    result = engine.run(
        source,
        heads,
        tables=tables,
        embeddings_out=embeddings_out,
        gene_tokens=gene_tokens,
        groups=groups,
        n_groups=n_groups,
        mode=mode,
    )
    raw_warning = source.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    empty = int((result.n_genes == 0).sum())
    if empty:
        warn(
            f"{empty:,} of {source.n_obs:,} cells have no expressed gene of the vocabulary: their embedding only "
            "reflects the assay token, and their likelihood is NaN. Consider filtering them "
            "(e.g. sc.pp.filter_cells(adata, min_genes=...))."
        )
    return Inference(result=result, source=source, vocab=vocab, engine=engine, species_tables=species_paths)
