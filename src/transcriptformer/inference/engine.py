"""The inference engine: length-aware batching, streaming, sharding, and the run loop.

Data flows one way::

    CellSource --windows--> TokenWindow --plan_batches--> batch --model.encode--> Batch --heads--> Accumulator

:meth:`Engine.run` reads a :class:`~transcriptformer.data.tokenizer.CellSource` in windows of consecutive
cells (the next window is read and tokenised on a background thread while the model runs), groups
each window's cells into batches of similar length (:class:`~.batching.BatchPlanner`), trims every batch
to its longest cell, runs the encoder once per batch and then only the :data:`~.outputs.HEADS` that were
asked for, and hands each batch's results to an :class:`~.outputs.Accumulator`, which puts them back in input
order. Every step is exact: a cell's outputs do not depend on the cells it is batched with. Under
``torch.distributed`` (``torchrun``) each rank takes a contiguous shard of cells and the accumulators are
gathered in input order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._progress import PROGRESS_DELAY_S, tqdm
from ..config import ATTENTION_BACKENDS, AttentionBackend, Precision
from ..data.tokenizer import CellSource, TokenWindow
from ..model import BiasMode, EncoderLayer, FlexAttention, Kernel, TranscriptFormer
from ..weights.loaded import LoadedModel
from .batching import BatchPlanner, batch_tensors
from .devices import autocast, device_state, resolve_device, resolve_precision
from .options import check_positive_int
from .outputs import HEADS, Accumulator, Batch, Head, InferenceResult, gather

logger = logging.getLogger(__name__)

__all__ = ["Engine", "GeneEmbeddingCache"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (Linux with glibc), or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None


def _rss_bytes() -> int:
    """Resident memory of the process (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrim:
    """Hands memory that a CPU run has freed back to the operating system once it has piled up.

    Memory that stays allocated between freed batches (oneDNN's kernels compiled per input shape were the
    largest case: see :class:`~transcriptformer.model.network.GELU`) keeps glibc from returning the batches'
    memory, and a long CPU run's resident memory grew with its cells (1.7 GB at 100,000 cells of tf-demo, 3.5
    GB at 1 million). Trimming (``malloc_trim``) after every window kept it flat but cost 10% of the time (the
    next batches fault their pages in again), so the heap is trimmed only when the resident memory has grown by
    ``slack`` bytes since the last trim: memory stays within ``slack`` of its floor for a fraction of a percent of
    the time. With the GELU's kernels bounded a float32 run stays flat without it (measured); it stays as a
    guard for other per-shape caches (bfloat16 matrix products also go through oneDNN; not measured). A no-op
    off Linux/glibc.
    """

    def __init__(self, slack: int = 256 << 20, *, trim: Callable[[int], int] | None = None, rss=_rss_bytes):
        self.slack = slack
        self.trim = trim if trim is not None else _malloc_trim()
        self.rss = rss
        self.floor: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        """Called after each window: trims when the resident memory is ``slack`` above its last floor."""
        if self.trim is None:
            return
        now = self.rss()
        if self.floor is None or now < self.floor:
            self.floor = now
        elif now > self.floor + self.slack:
            self.trim(0)
            self.trims += 1
            self.floor = self.rss()


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
        Show a progress bar: ``None`` once the run has taken a few seconds, ``True`` from the start, ``False`` never.
    fuse
        Compile each encoder layer as a whole (``torch.compile``), the attention kernel left out of the graph.
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
            attention = self.state.auto_attention(self.device) if gpu else "chunked"
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

    def plan_batches(
        self, lengths: np.ndarray, max_tokens: int | None = None, kernel: Kernel | None = None
    ) -> list[np.ndarray]:
        """Group cells into batches (see :meth:`BatchPlanner.plan`)."""
        return self.planner(max_tokens, kernel).plan(lengths)

    # -- running ----------------------------------------------------------------------------

    def _compiled_layer(self) -> Callable | None:
        """``torch.compile(EncoderLayer.forward)`` when fusing (made once per device), else ``None``."""
        if not self.fuse:
            return None
        with self.state.lock:
            if self.state.compiled_layer is None:
                self.state.compiled_layer = torch.compile(EncoderLayer.forward, dynamic=True)
            return self.state.compiled_layer

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
                compiled=self._compiled_layer(),
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

    def _windows(self, source: CellSource, bounds: Sequence[tuple[int, int]]) -> Generator[TokenWindow, None, None]:
        """Tokenised windows ``bounds``, the next one prepared on a background thread."""
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
            Tokenisable cells (:func:`~transcriptformer.data.tokenizer.prepare_cells`).
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
            for evaluating it: :func:`~transcriptformer.training.fit.cell_losses`).

        Returns
        -------
        InferenceResult
            Results in input order. Under ``torch.distributed`` every rank returns the full result.
        """
        t0 = time.perf_counter()
        n = source.n_obs
        lo, hi = (self.rank * n) // self.world, ((self.rank + 1) * n) // self.world
        (result,) = self._run_ranges(
            source,
            heads,
            [(lo, hi)],
            tables=tables,
            embeddings_out=embeddings_out,
            gene_tokens=gene_tokens,
            groups=None if groups is None else np.asarray(groups)[lo:hi],
            n_groups=n_groups,
            mode=mode,
        )
        stats = result.stats
        if self.world > 1:
            result = gather(result, embeddings_out is not None)
        result.seconds = time.perf_counter() - t0
        result.stats = {**stats, "cells": n, "world_size": self.world}
        result.stats.pop("start")
        result.stats.pop("stop")
        logger.info(
            "ran %s cells in %.1f s (%.1f cells/s, %s tokens, %.0f%% padding) on %s",
            f"{n:,}",
            result.seconds,
            n / max(result.seconds, 1e-9),
            f"{stats['tokens']:,}",
            100.0 * (1 - stats["tokens"] / max(stats["padded_tokens"], 1)),
            self.device,
        )
        return result

    def run_ranges(
        self,
        source: CellSource,
        heads: Sequence[str],
        ranges: Sequence[tuple[int, int]],
        *,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        gene_tokens: np.ndarray | None = None,
        mode: BiasMode = "embed",
    ) -> Iterator[InferenceResult]:
        """Run the model over the cells ``[start, stop)`` of each range, yielding each range's results when done.

        The building block of sharded, resumable runs (:mod:`~transcriptformer.inference.shards`): the ranges
        are this process's share (whatever the ``torch.distributed`` rank), read in windows that never cross a
        range's end, with the next window read on a background thread across ranges, and nothing is gathered.
        Each result holds the range's cells only (gene rows' ``cell`` are input positions) and ``stats``
        with ``start``, ``stop``, ``tokens``, ``padded_tokens``, the device, precision, attention kernel and
        token budget, and ``seconds`` since the previous range ended.

        Parameters
        ----------
        source
            Tokenisable cells.
        heads
            Names of the outputs to compute (not the ``"gene_sum"`` layout, which sums over all cells).
        ranges
            ``(start, stop)`` pairs of input rows, ``0 <= start <= stop <= n_obs``.
        tables, gene_tokens, mode
            As for :meth:`run`.
        """
        if any(HEADS[h].layout == "gene_sum" for h in heads if h in HEADS):
            raise ValueError("outputs summed over cells (gene_sum) cannot be computed range by range; use run().")
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= source.n_obs:
                raise ValueError(f"range ({lo}, {hi}) is outside the {source.n_obs:,} cells of the input.")
        yield from self._run_ranges(source, heads, ranges, tables=tables, gene_tokens=gene_tokens, mode=mode)

    def _run_ranges(
        self,
        source: CellSource,
        heads: Sequence[str],
        ranges: Sequence[tuple[int, int]],
        *,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        embeddings_out: Any | None = None,
        gene_tokens: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        n_groups: int = 1,
        mode: BiasMode = "embed",
    ) -> Iterator[InferenceResult]:
        """The run loop over ``ranges`` (``groups``: of the cells of the ranges, in order; one range with it)."""
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ValueError(f"unknown output(s) {unknown}; known: {', '.join(HEADS)}.")
        selected = [HEADS[h] for h in heads]
        if any(h.gene_head for h in selected) and self.model.gene_id_head is None:
            raise ValueError(f"{self.loaded.name} has no gene-identity head; {heads} cannot be computed.")
        if mode not in ("embed", "train"):
            raise ValueError(f"mode={mode!r}; expected 'embed' or 'train'.")
        S = self.loaded.seq_len
        keep = np.ones(len(source.vocab), dtype=bool) if gene_tokens is None else np.asarray(gene_tokens, bool).copy()
        keep[: source.vocab.n_special] = False
        dev_tables = None if tables is None else (tables[0].to(self.device), tables[1].to(self.device))
        cache_bytes = (4 << 30) if self.device.type == "cuda" else (1 << 30)
        embed = GeneEmbeddingCache(self.model, None if dev_tables is None else dev_tables[0], self.device, cache_bytes)
        state = _RunState(kernel=self.kernel, max_tokens=self.max_tokens)
        run_args = (dev_tables, source.options.clip_counts, embed, mode)

        def accumulator(lo: int, hi: int) -> Accumulator:
            return Accumulator(
                selected,
                self.model,
                n_rows=hi - lo,
                seq_len=S,
                gene_tokens=keep,
                groups=groups,
                n_groups=n_groups,
                embeddings_out=embeddings_out,
                device=self.device,
                offset=lo,
            )

        bounds = [(s, min(s + self.window, hi)) for lo, hi in ranges for s in range(lo, hi, self.window)]
        windows = self._windows(source, bounds)
        trim_heap = HeapTrim()
        total = sum(hi - lo for lo, hi in ranges)
        bar = None
        t0 = time.perf_counter()
        try:
            for lo, hi in ranges:
                acc = accumulator(lo, hi)
                n_tokens = n_padded = 0
                for window in windows if hi > lo else ():
                    base = window.start - lo
                    if bar is None:
                        bar = self._progress_bar(total)
                    acc.start_window(window, base)
                    for idx in self.plan_batches(window.lengths, state.max_tokens, state.kernel):
                        for done, batch, results in self._run_batch(window, idx, selected, state, run_args):
                            n_tokens += int(np.minimum(window.lengths[done] + 1, S).sum())
                            n_padded += batch.tokens.shape[1] * len(done)
                            acc.add(base + done, done, batch, results)
                            bar.update(len(done))
                    acc.end_window(window, base)
                    if self.device.type != "cuda":  # host memory (on CUDA the batches live on the card)
                        trim_heap()
                    if window.start + len(window) >= hi:
                        break
                result = acc.finish(offset=lo)
                now = time.perf_counter()
                result.seconds, t0 = now - t0, now
                result.stats = {
                    "start": lo,
                    "stop": hi,
                    "cells": hi - lo,
                    "tokens": n_tokens,
                    "padded_tokens": n_padded,
                    "device": str(self.device),
                    "precision": self.precision,
                    "attention": state.kernel.name,  # type: ignore[attr-defined]  # every kernel class has a name
                    "oom_retries": state.oom_retries,
                    "max_tokens": state.max_tokens,
                }
                if state.fallback:
                    result.stats["attention_fallback"] = state.fallback
                yield result
        finally:
            windows.close()
            if bar is not None:
                bar.close()

    def _progress_bar(self, n_cells: int):
        """A progress bar that appears once the run has taken :data:`~transcriptformer._progress.PROGRESS_DELAY_S`.

        Measured, not predicted: quick runs stay quiet and every long one shows it (``progress=True``: from the
        start; ``False``: never). Only rank 0 of a distributed run shows one.
        """
        return tqdm(
            total=n_cells,
            unit="cell",
            desc=f"TranscriptFormer ({self.loaded.name})",
            delay=0.0 if self.progress else PROGRESS_DELAY_S,
            disable=self.progress is False or self.rank > 0,
        )
