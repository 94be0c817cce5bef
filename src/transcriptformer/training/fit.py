"""One fit loop behind :func:`train` (every weight) and :func:`finetune` (LoRA adapters).

The objective is the published one (:mod:`.objective`). Here the batch of that formula is everything one
optimiser step sees, however it is split into micro-batches (gradient accumulation) and processes
(``torchrun``): the loss of a step does not depend on how it is split, so two processes with micro-batches of
4 cells follow the same curve as one process with micro-batches of 8.

Data stream from AnnData objects or h5ad files (opened backed) in windows of consecutive cells, as in
inference: every epoch the windows are visited in a new random order, the cells of a window are shuffled,
grouped into micro-batches of similar length under a token budget (the engine's planner), and the
micro-batches shuffled; the plan depends only on the seed and the epoch, so training is reproducible and
can resume at an epoch boundary. Under ``torch.distributed`` the micro-batches of each step are dealt to
the ranks and the model is wrapped in ``DistributedDataParallel``.

Everything that can be checked is checked before the first step (options, the output folder, the data, the
resume state); training stops at the first non-finite loss or gradient, before the step that would write it
into the weights, so nothing non-finite is ever saved. The trainer state is read without unpickling code
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import torch

from .._progress import PROGRESS_DELAY_S, tqdm, write_above
from ..errors import deprecated, warn
from ..inference.batching import BatchPlanner, batch_tensors, estimate_flops
from ..inference.devices import autocast, resolve_device, resolve_precision
from ..inference.options import (
    RunKwargs,
    RunOptions,
    check_bool,
    check_positive_int,
    documents_run_options,
    run_options,
)
from ..inference.pipeline import input_identity
from ..inference.record import provenance
from ..model import DenseAttention, FlexAttention, TranscriptFormer
from ..model.attention import BlockedAttention
from ..weights.adapter import ADAPTER_INFO_FILE
from ..weights.checkpoint import load_model, save_checkpoint
from ..weights.loaded import LoadedModel
from . import lora
from .objective import batch_loss, evaluate, looks_like_model, open_cells

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_FILE", "TRAINER_STATE", "FitKwargs", "FitOptions", "check_output_dir", "finetune", "train"]

TRAINER_STATE = "trainer_state.pt"
HISTORY_FILE = "training.json"

#: The largest learning rate accepted (AdamW's steps are about this large: beyond it the weights explode).
MAX_LEARNING_RATE = 10.0


# --------------------------------------------------------------------------------------------------
# the data plan


@dataclass(frozen=True)
class _MicroBatch:
    source: int
    start: int  # the window [start, stop) of that source
    stop: int
    rows: np.ndarray  # positions within the window
    n_genes: int  # genes of these cells (the loss positions)


def _lengths(sources, seq_len: int, window: int) -> list[np.ndarray]:
    """Genes each cell will give the model (one pass over the counts, with the value checks)."""
    out = []
    for _, src, _ in sources:
        n = np.concatenate([src.count_expressed(s, min(s + window, src.n_obs)) for s in range(0, src.n_obs, window)])
        out.append(np.minimum(n, seq_len) if src.pad_zeros else np.full(src.n_obs, min(len(src.columns), seq_len)))
    return out


def _plan_epoch(
    lengths: list[np.ndarray], planner: BatchPlanner, epoch: int, seed: int, window: int
) -> list[_MicroBatch]:
    """The micro-batches of one epoch, in order (a function of the seed and the epoch only).

    Cells without any gene (no expressed gene of the vocabulary) are left out: they have no count term, and a
    micro-batch of them only would make the loss of its step ``0 / 0``. Data without such cells get the plan they
    always had.
    """
    rng = np.random.default_rng([seed, epoch])
    windows = [(i, s, min(s + window, len(n))) for i, n in enumerate(lengths) for s in range(0, len(n), window)]
    plan = []
    for k in rng.permutation(len(windows)):
        i, start, stop = windows[k]
        perm = rng.permutation(stop - start)
        perm = perm[lengths[i][start:stop][perm] > 0]
        if not len(perm):
            continue
        lens = lengths[i][start:stop][perm]
        batches = planner.plan(lens)
        for j in rng.permutation(len(batches)):
            rows = perm[batches[j]]
            plan.append(_MicroBatch(i, start, stop, rows, int(lengths[i][start:stop][rows].sum())))
    return plan


def _steps(plan: list[_MicroBatch], per_step: int) -> list[list[_MicroBatch]]:
    return [plan[i : i + per_step] for i in range(0, len(plan), per_step)]


def _schedule(total: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then a cosine down to ``min_lr_ratio`` (upstream's)."""
    warm = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass(frozen=True)
class FitOptions:
    """Optimisation settings of :func:`train` and :func:`finetune` (upstream's fine-tuning defaults)."""

    epochs: int = 1
    learning_rate: float = 5.5e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    accumulate: int = 1
    seed: int = 0
    window: int = 4096

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs", allow_none=False)
        check_positive_int(self.accumulate, "accumulate", allow_none=False)
        check_positive_int(self.window, "window", allow_none=False)
        for name in ("learning_rate", "weight_decay", "warmup_ratio", "min_lr_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(
                f"learning_rate must be > 0 and at most {MAX_LEARNING_RATE:g}, got {self.learning_rate!r}."
            )
        for name in ("warmup_ratio", "min_lr_ratio"):  # shares of the run / of the peak rate
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}.")
        clip = self.grad_clip
        if clip is not None and not (
            isinstance(clip, int | float) and not isinstance(clip, bool) and 0 < clip < math.inf
        ):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {clip!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")


def _adamw(params: list[torch.nn.Parameter], device: torch.device, **options: Any) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch has one (CPU and CUDA float weights).

    On the CPU the fused step is 3-5x faster than PyTorch's default loop over the weights (one thread: 0.012 against
    0.04-0.05 CPU s for the 9.2 M weights that full training updates in the benchmarks' medium model, 0.075 against
    0.41 for all of its 60 M weights); for that model it is about 3% of a training step, more for wider models. The
    update is the same AdamW, to float32 round-off.
    """
    fused = device.type in ("cpu", "cuda") and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    return torch.optim.AdamW(params, fused=fused or None, **options)


def _train_kernel(device: torch.device, attention: str):
    """A differentiable attention kernel for training.

    flex_attention on CUDA when asked (or ``auto``); elsewhere ``auto`` is the blocked kernel with its own backward
    pass (:class:`~transcriptformer.model.attention.BlockedAttention`: exact, memory linear in length), ``dense``
    the reference.
    """
    if attention == "dense":
        return DenseAttention()
    if attention == "auto" and device.type != "cuda":
        return BlockedAttention()
    if attention in ("auto", "flex", "flex-dynamic"):
        if device.type != "cuda":
            raise ValueError("flex_attention cannot be differentiated on this device; use attention='dense'.")
        return FlexAttention(dynamic=attention != "flex")
    raise ValueError(f"attention={attention!r} for training; expected 'auto', 'dense', 'flex' or 'flex-dynamic'.")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FitKwargs(TypedDict, total=False):
    """The optimisation options :func:`train` and :func:`finetune` share (see :class:`FitOptions`)."""

    epochs: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    min_lr_ratio: float
    grad_clip: float | None
    accumulate: int
    seed: int


class TrainKwargs(FitKwargs, RunKwargs, total=False):
    """Everything :func:`train` and :func:`finetune` take besides their own parameters."""


#: The numpy-style documentation of the options of :class:`FitKwargs` (defaults are the function's own).
FIT_OPTIONS_DOC = """    epochs
        Passes over the training cells (default 1).
    learning_rate, weight_decay
        AdamW's (betas 0.9, 0.95); defaults: :func:`train` 5.5e-5 and 0.05, :func:`finetune` 5e-4 and 0.
    warmup_ratio, min_lr_ratio
        Linear warm-up over this share of the steps, then a cosine decay to ``min_lr_ratio`` times the rate
        (defaults 0.1 and 0.1).
    grad_clip
        Clip the gradients' global norm (default 1.0; ``None``: no clipping).
    accumulate
        Micro-batches per optimiser step, per process (default 1).
    seed
        The run is a function of the seed (data order, dropout, initialisation), deterministic on CPU (default 0)."""


def _split_kwargs(kwargs: dict[str, Any], tool: str, defaults: dict[str, Any]) -> tuple[FitOptions, RunOptions]:
    """The fit options (with the tool's defaults) and the run options of a tool's ``**kwargs``."""
    fit = {k: kwargs.pop(k) for k in list(kwargs) if k in FitKwargs.__annotations__}
    unsupported = {"species_embedding": "training is over the model's own vocabulary"}
    return FitOptions(**{**defaults, **fit}), run_options(kwargs, tool, unsupported=unsupported)


def check_output_dir(output_dir: Path, resume: bool) -> Path:
    """The run's folder, checked before any compute: it can be written, and it is new (or resumable)."""
    output_dir = Path(output_dir).expanduser()
    state = output_dir / TRAINER_STATE
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"cannot create the output folder {output_dir}: {existing} is a file; pass another output_dir."
        )
    if output_dir.exists():
        if state.exists() and not resume:
            raise FileExistsError(f"{output_dir} holds an earlier training run; pass resume=True to continue it.")
        if not state.exists() and any(output_dir.iterdir()):
            raise FileExistsError(f"{output_dir} exists and is not empty; choose a new folder for the run.")
    elif resume:
        raise FileNotFoundError(f"resume=True but {output_dir} does not exist; start without resume.")
    if resume and not state.exists():
        raise FileNotFoundError(f"resume=True but {state} does not exist; start without resume.")
    try:  # the only reliable test of writability (permissions, read-only file systems, quotas)
        existing.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".transcriptformer-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to {existing} ({e.strerror or e}); pass a writable output_dir.") from None
    return output_dir


def _finite_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def write_json(path: Path, record: dict[str, Any]) -> None:
    """A record as strict JSON (NaN written as null), through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite_json(record), indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss or gradient; nothing of the diverging step was applied or saved."""


@dataclass
class _Run:
    """One training run: what was prepared before the first step, and the state that changes as it goes."""

    loaded: LoadedModel
    net: TranscriptFormer
    options: RunOptions
    fit: FitOptions
    output_dir: Path
    save: Callable[[TranscriptFormer, Path], None]
    info: dict[str, Any]
    attention: str
    device: torch.device = field(init=False)
    precision: str = field(init=False)
    rank: int = 0
    world: int = 1
    train_sources: list = field(default_factory=list)
    val_sources: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    first_epoch: int = 0
    n_tokens: int = 0
    flops: float = 0.0

    def prepare(self, train_data: Any, validation: Any, resume: bool, *, dry_run: bool = False) -> None:
        """Check and open everything, plan every epoch, build the optimiser; resume if asked.

        ``dry_run`` also reads the validation cells' counts once (the value checks; a run evaluates them before its
        first step).
        """
        self.device = resolve_device(self.options.device)
        self.precision = resolve_precision(self.options.precision, self.device)
        if self.precision == "16" and self.device.type != "cuda":
            raise ValueError("float16 training needs CUDA (it uses a gradient scaler); use precision='bf16' or '32'.")
        self.rank, self.world = _distributed()
        self.kernel = _train_kernel(self.device, self.attention)
        self.output_dir = check_output_dir(self.output_dir, resume)
        self.train_sources = open_cells(train_data, self.loaded, self.options, "train")
        self.val_sources = (
            open_cells(validation, self.loaded, self.options, "validation") if validation is not None else []
        )
        S = self.loaded.seq_len
        max_tokens = self.options.max_tokens or (32768 if self.device.type == "cuda" else 4096)
        planner = BatchPlanner.for_model(
            self.loaded, self.device.type, max_tokens=max_tokens, batch_size=self.options.batch_size
        )
        lengths = _lengths(self.train_sources, S, self.fit.window)
        if dry_run:  # the value checks of the validation counts (a run makes them when it evaluates them first)
            _lengths(self.val_sources, S, self.fit.window)
        for label, src, _ in [*self.train_sources, *self.val_sources]:
            logger.info("%s: %d cells, %d of %d genes in the vocabulary", label, src.n_obs, src.n_matched, src.n_genes)
        for _, src, _ in self.train_sources:
            if (message := src.raw_count_warning()) is not None:
                warn(message)
        n_cells = int(sum(len(n) for n in lengths))
        empty = int(sum(int((n == 0).sum()) for n in lengths))
        if empty == n_cells:
            raise ValueError(
                f"none of the {n_cells:,} training cells has an expressed gene of the vocabulary of {self.loaded.name}:"
                " there is nothing to train on. Check the gene ids (gene_key) and where the counts come from (layer)."
            )
        if empty:
            warn(
                f"{empty:,} of {n_cells:,} training cells have no expressed gene of the vocabulary; they are left out "
                "of training (they have no count term to learn from). Consider filtering them "
                "(e.g. sc.pp.filter_cells(adata, min_genes=...))."
            )
        per_step = self.fit.accumulate * self.world
        self.plans = [
            _steps(_plan_epoch(lengths, planner, e, self.fit.seed, self.fit.window), per_step)
            for e in range(self.fit.epochs)
        ]
        total_steps = sum(len(p) for p in self.plans)
        self.net.to(self.device)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        fit = self.fit
        self.optimizer = _adamw(
            self.params, self.device, lr=fit.learning_rate, betas=fit.betas, weight_decay=fit.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(total_steps, fit.warmup_ratio, fit.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "16" else None
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel  # lazily: only under torchrun

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.net, device_ids=device_ids)
        self.record = {
            **provenance(self.info["kind"], self.loaded),
            **self.info,
            **dataclasses.asdict(fit),
            **dataclasses.asdict(self.options.tokenize()),
            "max_tokens": max_tokens,
            "batch_size": self.options.batch_size,
            "precision": self.precision,
            "attention": self.attention,
            "device": str(self.device),
            "world_size": self.world,
            "steps": total_steps,
            "train_cells": n_cells - empty,
            "train_cells_left_out": empty,
            "train": [label for label, _, _ in self.train_sources],
            "validation": [label for label, _, _ in self.val_sources],
            # what identifies the data (resume compares these, not the files' names)
            "train_inputs": [
                {**input_identity(adata, src), "lengths_sha256": _digest(n)}
                for (_, src, adata), n in zip(self.train_sources, lengths, strict=True)
            ],
            "validation_inputs": [input_identity(adata, src) for _, src, adata in self.val_sources],
        }
        if resume:
            self._resume()

    def _resume(self) -> None:
        """Continue from the last complete epoch (the trainer state is read without unpickling code)."""
        path = self.output_dir / TRAINER_STATE
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several kinds for a damaged or foreign file
            raise ValueError(
                f"{path} cannot be read as a trainer state ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "it is damaged or not one this package wrote: start a new run in another folder."
            ) from None
        if not isinstance(saved, dict) or not {"options", "trainable", "optimizer", "epoch"} <= set(saved):
            raise ValueError(f"{path} is not a trainer state this package wrote; start a new run in another folder.")
        if saved["options"] != _comparable(self.record):
            raise ValueError(
                f"{path} was written with other options; resume with the same options (differences: "
                f"{_differences(saved['options'], _comparable(self.record))})."
            )
        self.net.load_state_dict(saved["trainable"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.first_epoch, self.step, self.history = saved["epoch"] + 1, saved["step"], saved["history"]
        logger.info("resuming %s after epoch %d (step %d)", self.output_dir, self.first_epoch, self.step)

    def view(self) -> LoadedModel:
        """The model as it is now (for evaluation)."""
        return dataclasses.replace(self.loaded, model=self.net)

    def validate(self) -> dict[str, float]:
        self.net.eval()
        return evaluate(self.view(), self.val_sources, self.options, str(self.device), self.precision)

    def run(self) -> dict[str, Any]:
        """Every epoch, then the final model and the record; returns the record."""
        show = (self.options.progress is not False) and self.rank == 0
        if self.val_sources and not self.history:
            self.history.append({"epoch": 0, "step": 0, "validation": self.validate()})
            self._say(show, f"before training: validation loss {self.history[-1]['validation']['loss']:.4f}")
        t_start = time.perf_counter()
        for epoch in range(self.first_epoch, self.fit.epochs):
            losses = self._epoch(epoch, show)
            entry: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            entry["train_loss"] = float(np.mean(losses)) if losses else None
            entry["step_losses"] = losses
            if self.val_sources:
                entry["validation"] = self.validate()
            self.history.append(entry)
            line = f"epoch {epoch + 1}/{self.fit.epochs}: train loss {entry['train_loss']:.4f}"
            if self.val_sources:
                line += f", validation loss {entry['validation']['loss']:.4f}"
            self._say(show, line)
            self._checkpoint(epoch)
        seconds = time.perf_counter() - t_start
        self.net.eval()
        record = {**self.record, "history": self.history, "seconds": seconds}
        record["tokens_per_s"] = self.n_tokens * self.world / seconds if seconds > 0 else None
        record["train_flops_per_s"] = self.flops * self.world / seconds if seconds > 0 else None  # forward x 3
        record["train_flops_counted"] = "objective"  # the heads too (records without it: layers and gene MLP only)
        record["best_epoch"] = _best_epoch(self.history)
        if self.rank == 0:
            self.save(self.net, self.output_dir)
            write_json(self.output_dir / HISTORY_FILE, record)
        if self.world > 1:
            torch.distributed.barrier()  # every rank returns once the result is on disk
        return record

    @staticmethod
    def _say(show: bool, line: str) -> None:
        """A line of the run's story: above the progress bar when one is shown, and in the log."""
        logger.info(line)
        if show:
            write_above(line)

    def _epoch(self, epoch: int, show: bool) -> list[float]:
        self.net.train()
        steps = self.plans[epoch]
        delay = 0.0 if self.options.progress else PROGRESS_DELAY_S  # as every run's bar: once it has taken a while
        bar = tqdm(
            total=len(steps), desc=f"epoch {epoch + 1}/{self.fit.epochs}", unit="step", disable=not show, delay=delay
        )
        losses: list[float] = []
        cache: dict[tuple[int, int], Any] = {}
        try:
            for g, group in enumerate(steps):
                loss = self._step(epoch, g, group, cache)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
                bar.update(1)
        finally:
            bar.close()
        return losses

    def _step(self, epoch: int, g: int, group: list, cache: dict) -> float:
        """One optimiser step over the micro-batches ``group`` (dealt to the ranks); returns the step's loss."""
        fit, S, world, rank = self.fit, self.loaded.seq_len, self.world, self.rank
        per_step = fit.accumulate * world
        N = max(sum(mb.n_genes for mb in group), 1)  # the plan has no cell without genes: never 0 / 0
        B = sum(len(mb.rows) for mb in group)
        index = list(range(g * per_step, g * per_step + len(group)))  # micro-batches' places in the epoch
        mine, ids = group[rank::world], index[rank::world]
        runs = mine + [group[0]] * (fit.accumulate - len(mine)) if world > 1 else mine
        ids += [index[0]] * (len(runs) - len(mine))
        weights = [1.0] * len(mine) + [0.0] * (len(runs) - len(mine))
        gene_weight = self.loaded.config.loss.gene_id_loss_weight if self.net.gene_id_head is not None else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64)
        for k, (mb, w, i) in enumerate(zip(runs, weights, ids, strict=True)):
            # dropout masks depend on the micro-batch alone: the same whatever the split into processes
            torch.manual_seed(hash((fit.seed, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            key = (mb.source, mb.start)
            if key not in cache:
                cache.clear()  # one window at a time
                cache[key] = self.train_sources[mb.source][1].read(mb.start, mb.stop)
            window = cache[key]
            width = min(int(window.lengths[mb.rows].max()) + 1, S)
            tok, cnt, aux = batch_tensors(window, mb.rows, width, self.net.pad_idx, self.device)
            last = k == len(runs) - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync, autocast(self.device, self.precision):
                count, gene, _ = (self.ddp or self.net)(
                    tok, cnt, aux, full_length=width == S, clip_counts=self.options.clip_counts, kernel=self.kernel
                )
                loss = batch_loss(count.float(), gene.float(), N, B, S, gene_weight) * (w * world)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            sums += torch.tensor([float(count.detach()) * w, float(gene.detach()) * w], dtype=torch.float64)
            if w > 0:
                self.n_tokens += int(window.lengths[mb.rows].sum())
                tokens = np.minimum(window.lengths[mb.rows] + 1, S)
                self.flops += 3 * estimate_flops(tokens, self.loaded, objective=True)
        if world > 1:
            torch.distributed.all_reduce(sums)
        step_loss = float(sums[0] / N + gene_weight * sums[1] / (B * S))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, fit.grad_clip if fit.grad_clip is not None else math.inf)
        if not (math.isfinite(step_loss) and bool(torch.isfinite(norm))) and self.scaler is None:
            if epoch > 0:
                saved = f"the last complete epoch is in {self.output_dir / 'epochs' / f'epoch-{epoch}'}"
            else:
                saved = "no epoch was complete, so nothing was saved"
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}, step {self.step + 1}: loss {step_loss:g}, gradient norm "
                f"{float(norm):g}. Nothing of this step was applied, and nothing non-finite was saved ({saved}). "
                f"Lower learning_rate ({fit.learning_rate:g}) or clip the gradients (grad_clip)."
            )
        if self.scaler is not None:  # float16: the scaler skips non-finite steps and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return step_loss

    def _checkpoint(self, epoch: int) -> None:
        """The epoch's model under ``epochs/`` and the state to resume from (written whole, then renamed)."""
        if self.rank == 0:
            self.save(self.net, self.output_dir / "epochs" / f"epoch-{epoch + 1}")
            trainable = {k: v.detach().cpu() for k, v in self.net.state_dict().items() if _is_trainable(self.net, k)}
            state = {
                "epoch": epoch,
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainable": trainable,
                "history": self.history,
                "options": _comparable(self.record),
            }
            tmp = self.output_dir / f".{TRAINER_STATE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.output_dir / TRAINER_STATE)
        if self.world > 1:
            torch.distributed.barrier()


def _best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch with the lowest validation loss (else training loss); ``None`` before any epoch."""
    scored = [
        (e["validation"]["loss"] if "validation" in e else e.get("train_loss"), e["epoch"])
        for e in history
        if e["epoch"] > 0
    ]
    scored = [(loss, epoch) for loss, epoch in scored if loss is not None and math.isfinite(loss)]
    return min(scored)[1] if scored else None


def _is_trainable(net: torch.nn.Module, key: str) -> bool:
    params = dict(net.named_parameters())
    return key in params and params[key].requires_grad


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The options that must not change when a run is resumed."""
    keys: tuple[str, ...] = (
        "base_model",
        "base_weights_sha256",
        "epochs",
        "learning_rate",
        "weight_decay",
        "betas",
        "warmup_ratio",
    )
    keys += ("min_lr_ratio", "grad_clip", "accumulate", "seed", "window", "max_tokens", "batch_size", "world_size")
    keys += ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
    keys += ("gene_key", "layer", "clip_counts", "normalize_to_scale", "filter_to_vocab", "duplicate_genes")
    keys += ("precision", "attention", "train_inputs", "validation_inputs")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, record.get(k)) for k in keys)}


def _digest(values: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


#: The digests of an input's identity, in words.
_DIGESTS = {
    "obs_names_sha256": "cell names",
    "genes_sha256": "gene ids",
    "tokens_sha256": "genes and assays as read",
    "first_cells_sha256": "first cells' counts",
    "lengths_sha256": "genes of each cell",
}


def _difference(key: str, a: Any, b: Any) -> str:
    """How one compared option differs; for the inputs, which input and what about it."""
    if not (key.endswith("_inputs") and isinstance(a, list) and isinstance(b, list)):
        return f"{key}: {a!r} -> {b!r}"
    if len(a) != len(b):
        return f"{key}: {len(a)} -> {len(b)} inputs"
    parts = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        if not (isinstance(x, dict) and isinstance(y, dict)):
            parts.append(f"input {i + 1} differs")
            continue
        fields = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        values = [f"{k} {x.get(k)!r} -> {y.get(k)!r}" for k in fields if k not in _DIGESTS]
        digests = [words for k, words in _DIGESTS.items() if k in fields]
        parts.append(f"input {i + 1} differs ({'; '.join([*values, ', '.join(digests)] if digests else values)})")
    return f"{key}: {', '.join(parts)}"


def _differences(a: dict, b: dict) -> str:
    return ", ".join(_difference(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _fit(
    loaded: LoadedModel,
    net: TranscriptFormer,
    *,
    train_data: Any,
    validation: Any,
    options: RunOptions,
    fit: FitOptions,
    output_dir: Path,
    resume: bool,
    save: Callable[[TranscriptFormer, Path], None],
    info: dict[str, Any],
    attention: str,
    dry_run: bool = False,
) -> dict[str, Any]:
    """The one path of :func:`train` and :func:`finetune`: prepare (every check), run, save; the record.

    With ``dry_run`` it stops after the preparation, before the first step: the record of the run it would make.
    """
    run = _Run(loaded, net, options, fit, Path(output_dir), save, info, attention)
    run.prepare(train_data, validation, check_bool(resume, "resume"), dry_run=dry_run)
    return run.record if dry_run else run.run()


def _say_dry_run(show: bool, record: dict[str, Any], output_dir: Path) -> None:
    cells, left_out, steps, epochs = (record[k] for k in ("train_cells", "train_cells_left_out", "steps", "epochs"))
    left = f" ({left_out:,} without a gene of the vocabulary left out)" if left_out else ""
    _Run._say(
        show,
        f"dry run: {cells:,} training cells{left}, {steps:,} step{'s' * (steps != 1)} over {epochs} "
        f"epoch{'s' * (epochs != 1)}; the options, the model, the data and {output_dir} are ready; nothing was "
        "trained.",
    )


def _without_lora_layers(loaded: LoadedModel) -> LoadedModel:
    """``loaded``, or for a model that keeps LoRA layers (``merge_adapter=False``) a copy with them merged.

    What training starts from is then the plain network of the same weights (and the same identity, so that an
    adapter trained on it loads on the adapted model, merged).
    """
    if not lora.has_lora_layers(loaded.model):
        return loaded
    adapter = {**loaded.adapter, "merged": True} if loaded.adapter else None
    return dataclasses.replace(loaded, model=lora.merged_copy(loaded.model), adapter=adapter)


def _data_first(train: Any, model: Any, tool: str) -> tuple[Any, Any]:
    """``(train, model)``, swapping the former order ``(model, train)`` with a deprecation warning."""
    if looks_like_model(train) and not looks_like_model(model):
        deprecated(f"{tool}(model, train)", f"{tool}(train, model), the order of every tool")
        return model, train
    return train, model


def _summary(record: dict[str, Any], output_dir: Path, how_to_load: str) -> str:
    best = record.get("best_epoch")
    last = record["history"][-1] if record["history"] else {}
    loss = last.get("validation", {}).get("loss", last.get("train_loss"))
    lines = [
        f"saved to {output_dir} ({record['steps']} steps in {record['seconds']:.0f} s); load it with {how_to_load}"
    ]
    if loss is not None:
        lines.append(f"final {'validation' if 'validation' in last else 'training'} loss {loss:.4f}")
    if best is not None and best != last.get("epoch"):
        lines.append(f"best epoch {best}: its model is in {output_dir / 'epochs' / f'epoch-{best}'}")
    return "; ".join(lines)


@documents_run_options
def train(
    train: Any,
    model: Any,
    *,
    output_dir: str | os.PathLike,
    validation: Any = None,
    resume: bool = False,
    attention: str = "auto",
    dry_run: bool = False,
    **options: Unpack[TrainKwargs],
) -> Path:
    """Train every weight of a model (the frozen ESM2 gene vectors excepted) on cells; save it.

    Parameters
    ----------
    train
        Training cells: an AnnData, an h5ad path (read backed, in windows), or a list of them.
    model
        A model from :func:`transcriptformer.new_model`, or any checkpoint to train further (a folder, a
        registry name, a loaded model); it is copied, never modified.
    output_dir
        A new folder. It receives the final model in the published checkpoint layout (``config.json``,
        ``model_weights.pt``, ``vocabs/``: what :func:`transcriptformer.load_model` and the published
        ``transcriptformer inference`` read), ``training.json`` (options, loss history, throughput, best epoch),
        a checkpoint per epoch under ``epochs/`` and ``trainer_state.pt`` (to resume).
    validation
        Held-out cells, evaluated before training and after every epoch with
        :func:`~transcriptformer.training.objective.cell_losses`.
    resume
        Continue a run in ``output_dir`` from its last complete epoch (same options, tokenisation, precision,
        attention and data; the differences are listed otherwise).
    attention
        ``"auto"`` (flex_attention on CUDA, dense elsewhere), ``"dense"``, ``"flex"``.
    dry_run
        Make every check of the run (options, device, output folder, every training and validation cell's counts,
        the resume state) and stop before the first step: nothing is trained or written.
    {fit_options}
    {run_options}

    Returns
    -------
    pathlib.Path
        ``output_dir``.
    """
    train, model = _data_first(train, model, "train")
    fit, opts = _split_kwargs(dict(options), "train", {"learning_rate": 5.5e-5, "weight_decay": 0.05})
    check_bool(resume, "resume")
    check_bool(dry_run, "dry_run")
    loaded = _without_lora_layers(load_model(model, cache_dir=opts.cache_dir))
    net = copy.deepcopy(loaded.model)
    net.requires_grad_(True)
    net.gene_embeddings.embedding.weight.requires_grad_(False)  # the ESM2 gene vectors stay frozen

    def save(weights: TranscriptFormer, folder: Path) -> None:
        save_checkpoint(loaded, folder, model=weights, overwrite=True)

    info = {"kind": "train", "base_model": loaded.name, "base_weights_sha256": loaded.identity}
    record = _fit(
        loaded,
        net,
        train_data=train,
        validation=validation,
        options=opts,
        fit=fit,
        output_dir=Path(output_dir),
        resume=resume,
        save=save,
        info=info,
        attention=attention,
        dry_run=dry_run,
    )
    out = Path(output_dir).expanduser()
    if dry_run:
        _say_dry_run(opts.progress is not False, record, out)
        return out
    _Run._say(opts.progress is not False, _summary(record, out, f"transcriptformer.load_model({str(out)!r})"))
    return out


@documents_run_options
def finetune(
    train: Any,
    model: Any = "tf-sapiens",
    *,
    output_dir: str | os.PathLike,
    validation: Any = None,
    lora_r: int = 4,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = lora.DEFAULT_TARGET_MODULES,
    resume: bool = False,
    attention: str = "auto",
    dry_run: bool = False,
    **options: Unpack[TrainKwargs],
) -> Path:
    """Fine-tune a model with LoRA adapters; only the adapters are trained and saved.

    The adapters add ``(lora_alpha / lora_r) · B A`` to the selected linear layers (names as in the
    published LoRA example: ``linear1``/``linear2`` are the feed-forward block, ``linears`` the Q, K, V and
    output projections of every attention block). They are saved in PEFT's format, with the identity of the
    weights they were trained on; load them with ``transcriptformer.load_model(base, adapter=output_dir)`` or
    ``model=(base, output_dir)`` anywhere (``--adapter`` on the command line). Needs ``peft``
    (``pip install peft``, or the ``finetune`` extra of ``transcriptformer-scanpy``).

    Parameters
    ----------
    train
        Training cells: an AnnData, an h5ad path (read backed, in windows), or a list of them.
    model
        The base model (folder, registry name, loaded model, or an adapted model); never modified. An adapted
        model loaded with ``merge_adapter=False`` is trained on a merged copy (the same weights).
    output_dir
        A new folder: the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
        ``transcriptformer_adapter.json``), ``training.json``, one adapter per epoch under ``epochs/`` and
        ``trainer_state.pt`` (to resume).
    validation
        Held-out cells, evaluated before training and after every epoch.
    lora_r, lora_alpha, lora_dropout, target_modules
        The adapters' rank (at most the smaller width of every layer it wraps), scale, dropout and the layers
        they wrap.
    resume, attention, dry_run
        As in :func:`train`.
    {fit_options}
    {run_options}

    Returns
    -------
    pathlib.Path
        ``output_dir`` (the adapter folder).
    """
    train, model = _data_first(train, model, "finetune")
    fit, opts = _split_kwargs(dict(options), "finetune", {"learning_rate": 5e-4, "weight_decay": 0.0})
    check_bool(resume, "resume")
    check_bool(dry_run, "dry_run")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    base = _without_lora_layers(load_model(model, cache_dir=opts.cache_dir))
    net = copy.deepcopy(base.model)
    torch.manual_seed(fit.seed)  # the adapters' initialisation
    wrapped = lora.apply_lora(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
    info = {
        "kind": "finetune",
        "base_model": base.name,
        "base_weights_sha256": base.identity,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": targets,
        "modules": lora.resolve_target_modules(base.model, targets),
    }

    def save(_: TranscriptFormer, folder: Path) -> None:
        lora.save_adapter(wrapped, folder, base=base, info=info)

    record = _fit(
        base,
        net,
        train_data=train,
        validation=validation,
        options=opts,
        fit=fit,
        output_dir=Path(output_dir),
        resume=resume,
        save=save,
        info=info,
        attention=attention,
        dry_run=dry_run,
    )
    out = Path(output_dir).expanduser()
    if dry_run:
        _say_dry_run(opts.progress is not False, record, out)
        return out
    adapter = json.loads((out / ADAPTER_INFO_FILE).read_text())
    how = f"model=({base.name!r}, {str(out)!r}) or transcriptformer.load_model(base, adapter={str(out)!r})"
    summary = _summary(record, out, how)
    summary += (
        f"; an adapter of {adapter['adapter_parameters']:,} parameters ({adapter['adapter_bytes'] / 1e6:.2f} MB) "
        f"for a base of {adapter['base_parameters']:,}"
    )
    _Run._say(opts.progress is not False, summary)
    return out


for _f in (train, finetune):
    _f.__doc__ = (_f.__doc__ or "").replace("    {fit_options}", FIT_OPTIONS_DOC)
