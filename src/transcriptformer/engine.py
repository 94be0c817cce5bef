"""The inference engine: device, precision, length-aware batching, streaming and sharding.

``Engine.run`` reads a :class:`~transcriptformer.tokenize.CellSource` in windows of consecutive
cells (the next window is read and tokenised on a background thread while the model runs),
sorts each window's cells by length, packs them into batches under a token budget, trims every
batch to its longest cell, runs only the heads that were asked for, and writes results back in
input order. Every step is exact: a cell's outputs do not depend on the cells it is batched
with. Under ``torch.distributed`` (``torchrun``) each rank takes a contiguous shard of cells and
the results are gathered in input order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .checkpoint import LoadedModel, species_vocabulary
from .model import AttentionBackend, TranscriptFormer, fused
from .tokenize import CellSource, TokenizeOptions, TokenWindow, TranscriptFormerWarning, prepare_cells
from .vocab import GeneVocab

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Inference", "InferenceResult", "Outputs", "infer", "resolve_device", "resolve_precision"]

Precision = Literal["auto", "32", "bf16", "16"]

_PRECISION_ALIASES = {
    "auto": "auto",
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "float32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "bfloat16": "bf16",
    "16": "16",
    "16-mixed": "16",
    "fp16": "16",
    "float16": "16",
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU (MPS only when asked for)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but MPS is not available; use device='cpu' or 'auto'.")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Returns ``"32"``, ``"bf16"`` or ``"16"``.

    ``"auto"`` is float32 on CPU and MPS and bfloat16 autocast on CUDA. ``"16"`` on CPU runs as
    bfloat16, as the published tool (Lightning) does for its default ``16-mixed``.
    """
    p = _PRECISION_ALIASES.get(str(precision).lower())
    if p is None:
        raise ValueError(f"precision={precision!r}; expected 'auto', '32', 'bf16' or '16'.")
    if p == "auto":
        return "bf16" if device.type == "cuda" else "32"
    if p == "16" and device.type == "cpu":
        logger.info("float16 autocast on CPU runs as bfloat16 (as the published tool does).")
        return "bf16"
    return p


@dataclass(frozen=True)
class Outputs:
    """What to compute. The count head runs only for ``llh``, the gene head only for ``gene_llh``."""

    embeddings: bool = True
    llh: bool = False
    gene_llh: bool = False
    cge: bool = False


@dataclass
class InferenceResult:
    """Arrays in input order (``None`` where not requested).

    Attributes
    ----------
    embeddings
        ``(n_obs, E)`` float32 cell embeddings.
    llh
        ``(n_obs,)`` float32 mean negative log-likelihood per gene (NaN for cells without genes).
    gene_llh
        ``(n_obs, S)`` float32 per-position gene-identity cross-entropy.
    cge_embeddings, cge_cell_indices, cge_tokens, cge_positions
        Contextual gene embeddings: one row per (cell, gene), cells in input order, genes in
        sequence order; the gene's token id; the gene's slot in the cell's sequence.
    n_genes
        ``(n_obs,)`` number of gene tokens each cell was given (``<= S``).
    seconds
        Wall time of the run.
    """

    embeddings: np.ndarray | None = None
    llh: np.ndarray | None = None
    gene_llh: np.ndarray | None = None
    cge_embeddings: np.ndarray | None = None
    cge_cell_indices: np.ndarray | None = None
    cge_tokens: np.ndarray | None = None
    cge_positions: np.ndarray | None = None
    n_genes: np.ndarray | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tables:
    """Replacement gene tables for out-of-distribution vocabularies (on the engine's device)."""

    esm: torch.Tensor
    bias: torch.Tensor


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


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
        ``"auto"`` (flex_attention on CUDA when it compiles, else chunked), ``"chunked"``, ``"flex"``
        (compiled per shape), ``"flex-dynamic"`` (compiled for varying shapes), ``"dense"`` (reference;
        materialises the score matrix).
    window
        Cells read and tokenised at a time (and sorted by length within).
    progress
        Show a progress bar; ``None`` shows one for runs of 2,000 cells or more.
    fuse
        Run the code around attention through ``torch.compile`` (:func:`~transcriptformer.model.fused`).
        ``None``: only where flex_attention compiled with dynamic shapes (CUDA).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        max_tokens: int | None = None,
        attention: str = "auto",
        window: int = 4096,
        progress: bool | None = None,
        fuse: bool | None = None,
    ):
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        self.batch_size = batch_size
        gpu = self.device.type == "cuda"
        self.max_tokens = int(max_tokens or (131072 if gpu else 16384))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
        if attention not in ("auto", "chunked", "flex", "flex-dynamic", "dense"):
            raise ValueError(f"attention={attention!r}; expected 'auto', 'chunked', 'flex', 'flex-dynamic' or 'dense'.")
        if attention == "auto":
            attention = (_flex_mode(self.device) if gpu else None) or "chunked"
        self.attention: AttentionBackend = attention  # type: ignore[assignment]
        self.window = int(window)
        self.progress = progress
        self.model: TranscriptFormer = loaded.on(self.device)
        self.oom_retries = 0
        self._set_shapes()
        self.fuse = self.attention == "flex-dynamic" if fuse is None else bool(fuse)
        self._embed: GeneEmbeddingCache | None = None

    def _set_shapes(self) -> None:
        """Padding policy of the attention kernel (exact: padded positions and rows are never read).

        Compiled flex kernels like lengths on a coarse grid; one compiled for fixed shapes also gets a
        fixed number of cells per length (short batches are filled with copies of a cell), so that
        at most ``seq_len / 256`` shapes are ever compiled.
        """
        self._pad_multiple = {"flex": 256, "flex-dynamic": 128}.get(self.attention, 1)
        self._fixed_batches = self.attention == "flex"

    # -- batching ---------------------------------------------------------------------------

    def plan_batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Group cells (positions into ``lengths``) into batches, longest first, under the token budget."""
        order = np.argsort(-lengths, kind="stable")
        batches = []
        i = 0
        while i < len(order):
            n = self._cells_per_batch(self._width(int(lengths[order[i]])))
            batches.append(order[i : i + n])
            i += n
        return batches

    def _cells_per_batch(self, width: int) -> int:
        """Cells in a full batch running at ``width``: the token budget, capped by ``batch_size``."""
        n = max(1, self.max_tokens // width)
        return min(n, self.batch_size) if self.batch_size else n

    def _width(self, longest: int) -> int:
        """Sequence length a batch whose longest cell has ``longest`` genes runs at."""
        S = self.loaded.seq_len
        width = min(longest + 1, S)
        m = self._pad_multiple
        if m > 1:
            A = self.model.num_aux
            width = min(S, -(-(width + A) // m) * m - A)
        return width

    # -- running ----------------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward(
        self,
        window: TokenWindow,
        idx: np.ndarray,
        outputs: Outputs,
        tables: _Tables | None,
        clip_counts: float | None,
    ) -> dict[str, torch.Tensor]:
        S = self.loaded.seq_len
        width = self._width(int(window.lengths[idx].max()))
        n = len(idx)
        if self._fixed_batches:  # fill short batches up to the usual size of their width
            idx = np.concatenate([idx, np.repeat(idx[:1], max(0, self._cells_per_batch(width) - n))])
        tokens = np.full((len(idx), width), self.model.pad_idx, dtype=np.int64)
        counts = np.zeros((len(idx), width), dtype=np.float32)
        w = min(width, window.tokens.shape[1])
        tokens[:, :w] = window.tokens[idx, :w]
        counts[:, :w] = window.counts[idx, :w]
        dev = self.device
        tok = torch.from_numpy(tokens).to(dev, non_blocking=True)
        cnt = torch.from_numpy(counts).to(dev, non_blocking=True)
        aux = torch.from_numpy(window.aux[idx]).to(dev, non_blocking=True)
        model = self.model
        full = width == S
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), self._autocast(), fused(self.fuse):
            hidden, target = model.encode(
                tok,
                cnt,
                aux,
                with_targets=outputs.llh,
                gene_table=None if tables is None else tables.esm,
                attention=self.attention,
                embed=self._embed,
            )
            if outputs.embeddings:
                out["embeddings"] = model.cell_embedding(hidden, tok)
            if outputs.llh:
                out["llh"] = model.count_nll(
                    hidden,
                    target,
                    tok,
                    cnt,
                    clip_counts=clip_counts,
                    full_length=full,
                    gene_bias=None if tables is None else tables.bias,
                )
            if outputs.gene_llh:
                out["gene_llh"] = model.gene_nll(hidden, tok, full_length=full)
            if outputs.cge:
                out["cge"] = hidden.float()
                out["tokens"] = tok
        return {key: value[:n] for key, value in out.items()}

    def _run_batch(self, window, idx, outputs, tables, clip_counts, sink) -> None:
        """Run one batch; on out-of-memory halve it (and the token budget) and retry, losing no cell."""
        try:
            result = self._forward(window, idx, outputs, tables, clip_counts)
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise
            self._halve(len(idx))
            half = len(idx) // 2
            self._run_batch(window, idx[:half], outputs, tables, clip_counts, sink)
            self._run_batch(window, idx[half:], outputs, tables, clip_counts, sink)
            return
        except Exception as e:  # a compiled kernel that fails on a new shape: fall back (re-raised otherwise)
            if not self.attention.startswith("flex"):
                raise
            logger.warning("flex_attention failed (%s: %s); continuing with chunked attention.", type(e).__name__, e)
            self.attention = "chunked"
            self._set_shapes()
            result = self._forward(window, idx, outputs, tables, clip_counts)
        sink(idx, result)

    def _halve(self, n_cells: int) -> None:
        self.oom_retries += 1
        self.max_tokens = max(1, self.max_tokens // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning(
            "out of memory on a batch of %d cells; retrying in halves (token budget now %d).", n_cells, self.max_tokens
        )

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
        outputs: Outputs = Outputs(),
        *,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        embeddings_out: Any | None = None,
        cge_tokens: np.ndarray | None = None,
    ) -> InferenceResult:
        """Run the model over every cell of ``source``.

        Parameters
        ----------
        source
            Tokenisable cells (:func:`~transcriptformer.tokenize.prepare_cells`).
        outputs
            What to compute.
        tables
            ``(esm_matrix, gene_bias)`` replacing the model's gene tables (out-of-distribution
            vocabularies; ``source`` must be tokenised with the matching vocabulary).
        embeddings_out
            Optional array-like of shape ``(n_obs, E)`` (``np.memmap``, h5py dataset, zarr array)
            that receives the embeddings window by window instead of an in-memory array, for
            inputs too large to hold. The result's ``embeddings`` is then this object.
        cge_tokens
            Boolean mask over the vocabulary: keep contextual gene embeddings of these tokens only
            (the others are never copied off the device).

        Returns
        -------
        InferenceResult
            Results in input order. Under ``torch.distributed`` every rank returns the full result.
        """
        t0 = time.perf_counter()
        n = source.n_obs
        rank, world = _distributed()
        lo, hi = (rank * n) // world, ((rank + 1) * n) // world
        E, S = self.loaded.embed_dim, self.loaded.seq_len
        m = hi - lo
        emb = np.zeros((m, E), dtype=np.float32) if outputs.embeddings and embeddings_out is None else None
        llh = np.full(m, np.nan, dtype=np.float32) if outputs.llh else None
        gene_llh = np.zeros((m, S), dtype=np.float32) if outputs.gene_llh else None
        n_genes = np.zeros(m, dtype=np.int64)
        cge_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        dev_tables = None
        if tables is not None:
            dev_tables = _Tables(tables[0].to(self.device), tables[1].to(self.device))
        cache_bytes = (4 << 30) if self.device.type == "cuda" else (1 << 30)
        self._embed = GeneEmbeddingCache(
            self.model, None if dev_tables is None else dev_tables.esm, self.device, cache_bytes
        )
        clip = source.options.clip_counts
        show = self.progress if self.progress is not None else n >= 2000
        from tqdm.auto import tqdm

        bar = tqdm(total=m, unit="cell", desc=f"TranscriptFormer ({self.loaded.name})", disable=not show or rank > 0)
        n_tokens = 0
        n_padded = 0
        # contextual gene embeddings: real genes only (never special tokens), optionally a chosen few
        cge_keep = np.ones(len(source.vocab), dtype=bool) if cge_tokens is None else np.asarray(cge_tokens, bool).copy()
        cge_keep[: source.vocab.n_special] = False
        try:
            for window in self._windows(source, lo, hi):
                base = window.start - lo
                n_genes[base : base + len(window)] = window.lengths
                win_emb = np.zeros((len(window), E), dtype=np.float32) if embeddings_out is not None else None
                win_cge: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

                def sink(idx, res, base=base, window=window, win_emb=win_emb, win_cge=win_cge):
                    rows = base + idx
                    if "embeddings" in res:
                        target = emb if win_emb is None else win_emb
                        target[rows if win_emb is None else idx] = res["embeddings"].float().cpu().numpy()
                    if "llh" in res:
                        llh[rows] = res["llh"].float().cpu().numpy()
                    if "gene_llh" in res:
                        g = res["gene_llh"].cpu().numpy()
                        gene_llh[rows, : g.shape[1]] = g
                    if "cge" in res:
                        tok = res["tokens"].cpu().numpy()
                        L = tok.shape[1]
                        keep = (np.arange(L)[None, :] < window.lengths[idx][:, None]) & cge_keep[tok]
                        b, j = np.nonzero(keep)
                        hidden = res["cge"][torch.from_numpy(b), torch.from_numpy(j)].cpu().numpy()
                        win_cge.append((rows[b], j, tok[b, j], hidden))
                    bar.update(len(idx))

                for idx in self.plan_batches(window.lengths):
                    width = self._width(int(window.lengths[idx].max()))
                    n_tokens += int(np.minimum(window.lengths[idx] + 1, S).sum())
                    n_padded += width * len(idx)
                    self._run_batch(window, idx, outputs, dev_tables, clip, sink)
                if win_emb is not None:
                    embeddings_out[window.start : window.start + len(window)] = win_emb
                if win_cge:
                    cells, pos, tok, hid = (np.concatenate(p) for p in zip(*win_cge, strict=True))
                    order = np.lexsort((pos, cells))
                    cge_parts.append((cells[order], pos[order], tok[order], hid[order]))
        finally:
            bar.close()
        result = InferenceResult(
            embeddings=emb if embeddings_out is None else embeddings_out,
            llh=llh,
            gene_llh=gene_llh,
            n_genes=n_genes,
        )
        if outputs.cge:
            if cge_parts:
                cells, pos, tok, hid = (np.concatenate(p) for p in zip(*cge_parts, strict=True))
            else:
                cells, pos, tok = (np.zeros(0, np.int64) for _ in range(3))
                hid = np.zeros((0, E), np.float32)
            result.cge_cell_indices, result.cge_tokens = cells + lo, tok.astype(np.int64)
            result.cge_positions, result.cge_embeddings = pos.astype(np.int64), hid
        if world > 1:
            result = _gather(result, n, embeddings_out is not None)
        result.seconds = time.perf_counter() - t0
        result.stats = {
            "cells": n,
            "tokens": n_tokens,
            "padded_tokens": n_padded,
            "device": str(self.device),
            "precision": self.precision,
            "attention": self.attention,
            "oom_retries": self.oom_retries,
            "world_size": world,
        }
        logger.info(
            "embedded %s cells in %.1f s (%.1f cells/s, %s tokens, %.0f%% padding) on %s",
            f"{n:,}",
            result.seconds,
            n / max(result.seconds, 1e-9),
            f"{n_tokens:,}",
            100.0 * (1 - n_tokens / max(n_padded, 1)),
            self.device,
        )
        return result


def _gather(result: InferenceResult, n: int, external_embeddings: bool) -> InferenceResult:
    """Gather every rank's contiguous shard into full arrays in input order (all ranks get them)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    shards: list[Any] = [None] * world
    payload = {
        k: getattr(result, k)
        for k in ("llh", "gene_llh", "n_genes", "cge_embeddings", "cge_cell_indices", "cge_tokens", "cge_positions")
    }
    if not external_embeddings:
        payload["embeddings"] = result.embeddings
    dist.all_gather_object(shards, payload)
    merged = InferenceResult(embeddings=result.embeddings if external_embeddings else None)
    for key in payload:
        parts = [s[key] for s in shards]
        if parts[0] is not None:
            setattr(merged, key, np.concatenate(parts))
    return merged


_FLEX_MODE: dict[str, str | None] = {}


def _flex_mode(device: torch.device) -> str | None:
    """``"flex-dynamic"`` or ``"flex"`` if compiled flex_attention runs here and matches the chunked kernel.

    Checked once per device: the dynamic-shape compile is tried first (on three shapes), then the
    fixed-shape compile; any failure or disagreement means chunked attention.
    """
    key = str(device)
    if key in _FLEX_MODE:
        return _FLEX_MODE[key]
    from .model import chunked_attention, flex_attention_fn

    def agrees(B: int, T: int, dynamic: bool) -> bool:
        g = torch.Generator(device="cpu").manual_seed(B * T)
        q, k, v = (torch.randn(B, 2, T, 64, generator=g).to(device) for _ in range(3))
        bias = torch.rand(B, T, generator=g).to(device)
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        valid[0, 0] = False  # unknown aux token
        valid[1, T // 2 :] = False  # padding
        a = flex_attention_fn(q, k, v, bias, valid, 10.0, num_aux=1, dynamic=dynamic)
        b = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1)
        return bool(
            torch.allclose(a[0], b[0], atol=1e-4, rtol=1e-4)
            and torch.allclose(a[1, :, : T // 2], b[1, :, : T // 2], atol=1e-4, rtol=1e-4)
        )

    mode = None
    for name, shapes in (("flex-dynamic", [(2, 256), (3, 256), (2, 384)]), ("flex", [(2, 256)])):
        try:
            if all(agrees(B, T, name == "flex-dynamic") for B, T in shapes):
                mode = name
                break
            logger.warning("%s disagrees with the chunked kernel on %s.", name, device)
        except Exception as e:  # noqa: BLE001 - any compile failure means: try the next
            logger.info("%s is not usable on %s (%s: %s).", name, device, type(e).__name__, str(e)[:200])
    _FLEX_MODE[key] = mode
    logger.info("attention on %s: %s", device, mode or "chunked")
    return mode


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


def _gene_mask(vocab: GeneVocab, genes: Sequence[str]) -> np.ndarray:
    """Boolean mask over the vocabulary for gene ids (version suffixes ignored); unknown ids warned about."""
    from .tokenize import strip_version

    ids = strip_version(list(genes))
    tokens = vocab.lookup(list(ids))
    known = tokens >= vocab.n_special
    if not known.any():
        raise ValueError(
            f"none of the {len(ids)} requested genes is in the vocabulary (e.g. {list(ids[:3])}; vocabulary ids "
            f"look like {list(vocab.genes[:3])})."
        )
    if not known.all():
        warnings.warn(
            f"{int((~known).sum())} requested gene(s) are not in the vocabulary and are skipped, "
            f"e.g. {list(ids[~known][:3])}.",
            TranscriptFormerWarning,
            stacklevel=3,
        )
    mask = np.zeros(len(vocab), dtype=bool)
    mask[tokens[known]] = True
    return mask


def resolve_species_tables(
    species_embedding: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Gene-table files from paths and/or species names (``"mus_musculus"`` -> the ``all-embeddings`` table)."""
    from . import registry

    items = [species_embedding] if isinstance(species_embedding, str | os.PathLike) else list(species_embedding)
    if not items:
        raise ValueError("species_embedding is empty; pass gene-table files or species names.")
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            paths.append(path)
        elif path.suffix in (".h5", ".hdf5") or os.sep in str(item) or "/" in str(item):
            raise FileNotFoundError(f"gene table {str(item)!r} does not exist.")
        else:
            paths.append(registry.species_table(str(item), cache_dir=cache_dir))
    return paths


@dataclass
class Inference:
    """What :func:`infer` computed and how."""

    result: InferenceResult
    source: CellSource
    vocab: GeneVocab
    engine: Engine
    species_tables: list[Path] | None


def infer(
    adata,
    loaded: LoadedModel,
    *,
    tokenize: TokenizeOptions = TokenizeOptions(),
    outputs: Outputs = Outputs(),
    species_embedding: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    attention: str = "auto",
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    embeddings_out: Any | None = None,
    cge_genes: Sequence[str] | None = None,
) -> Inference:
    """AnnData -> tokens -> model -> arrays: the pipeline shared by the scanpy tools and the CLI.

    Validates the input (raising fix-it errors before any compute), runs the engine, and warns
    about cells without any gene of the vocabulary. Never modifies ``adata``.
    """
    vocab, tables, species_paths = loaded.vocab, None, None
    if species_embedding is not None:
        if outputs.gene_llh:
            raise ValueError(
                "gene-level likelihoods are over the model's own vocabulary and cannot be computed with "
                "species_embedding; drop one of the two."
            )
        species_paths = resolve_species_tables(species_embedding, cache_dir=cache_dir)
        vocab, esm, bias = species_vocabulary(loaded, species_paths)
        tables = (esm, bias)
    if outputs.gene_llh and loaded.model.gene_id_head is None:
        raise ValueError(f"{loaded.name} has no gene-identity head, so gene-level likelihoods are not available.")
    source = prepare_cells(
        adata,
        vocab,
        loaded.aux_vocabs,
        seq_len=loaded.seq_len,
        pad_zeros=loaded.config.data.pad_zeros,
        options=tokenize,
        model_name=loaded.name,
    )
    engine = Engine(
        loaded,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        attention=attention,
        progress=progress,
    )
    cge_tokens = None
    if cge_genes is not None:
        cge_tokens = _gene_mask(vocab, cge_genes)
    result = engine.run(source, outputs, tables=tables, embeddings_out=embeddings_out, cge_tokens=cge_tokens)
    empty = int((result.n_genes == 0).sum())
    if empty:
        warnings.warn(
            f"{empty:,} of {source.n_obs:,} cells have no expressed gene of the vocabulary: their embedding only "
            "reflects the assay token, and their likelihood is NaN. Consider filtering them "
            "(e.g. sc.pp.filter_cells(adata, min_genes=...)).",
            TranscriptFormerWarning,
            stacklevel=3,
        )
    return Inference(result=result, source=source, vocab=vocab, engine=engine, species_tables=species_paths)
