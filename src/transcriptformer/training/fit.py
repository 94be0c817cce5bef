"""Training and LoRA fine-tuning, on the model code and data path that inference uses.

The objective is the published one (the training forward, ``embed=False``): the count bias on strictly
earlier keys only, dropout active, and the loss

``count NLL sum / genes + gene_id_loss_weight x gene cross-entropy sum / (cells x seq_len)``

over the cells of a batch (the published reduction: a token-weighted mean for the count term; for the
gene term a mean over all ``cells x seq_len`` slots, padding included). Here the batch of that formula is
everything one optimiser step sees, however it is split into micro-batches (gradient accumulation) and
processes (``torchrun``): the loss of a step does not depend on how it is split, so two processes with
micro-batches of 4 cells follow the same curve as one process with micro-batches of 8.

Data stream from AnnData objects or h5ad files (opened backed) in windows of consecutive cells, as in
inference: every epoch the windows are visited in a new random order, the cells of a window are shuffled,
grouped into micro-batches of similar length under a token budget (the engine's planner), and the
micro-batches shuffled; the plan depends only on the seed and the epoch, so training is reproducible and
can resume at an epoch boundary. Under ``torch.distributed`` the micro-batches of each step are dealt to
the ranks and the model is wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._meta import __version__
from .._progress import tqdm
from ..data.tokenizer import CellSource
from ..errors import warn
from ..inference.batching import BatchPlanner, batch_tensors, estimate_flops
from ..inference.devices import autocast, resolve_device, resolve_precision
from ..inference.options import RunOptions, check_bool, check_positive_int, with_run_options
from ..inference.pipeline import infer
from ..model import DenseAttention, FlexAttention, TranscriptFormer
from ..weights.checkpoint import load_model, save_checkpoint
from ..weights.loaded import LoadedModel
from . import lora

logger = logging.getLogger(__name__)

__all__ = ["batch_loss", "cell_losses", "finetune", "train"]

TRAINER_STATE = "trainer_state.pt"
HISTORY_FILE = "training.json"


def batch_loss(
    count_sum: torch.Tensor,
    gene_sum: torch.Tensor,
    n_genes: int | torch.Tensor,
    n_cells: int,
    seq_len: int,
    gene_weight: float,
) -> torch.Tensor:
    """The published training loss of a batch from the sums :meth:`TranscriptFormer.forward` returns."""
    return count_sum / n_genes + gene_weight * gene_sum / (n_cells * seq_len)


# --------------------------------------------------------------------------------------------------
# evaluation


def _open(data: Any, loaded: LoadedModel, options: RunOptions, what: str) -> list[tuple[str, CellSource, Any]]:
    """``(label, source, handle)`` for an AnnData, an h5ad path, or a list of either (files are opened backed)."""
    import anndata as ad

    items = data if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError(f"{what} is empty: pass an AnnData, an h5ad path or a list of them.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str | os.PathLike):
            path = Path(item).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{what} file {str(item)!r} does not exist.")
            adata, label = ad.read_h5ad(path, backed="r"), str(path)
        elif isinstance(item, ad.AnnData):
            adata, label = item, f"{what}[{i}]"
        else:
            raise TypeError(f"{what} must hold AnnData objects or h5ad paths, got {type(item).__name__}.")
        if adata.n_obs == 0:
            raise ValueError(f"{label} has no cells.")
        source = loaded.cells(adata, options.tokenize())
        out.append((label, source, adata))
    return out


@with_run_options
def cell_losses(model: Any, adata: Any, *, options: RunOptions) -> pd.DataFrame:
    """The training objective's per-cell terms, evaluated (no dropout, no gradients).

    The training-mode forward (the count bias on strictly earlier keys) and, per cell, the mean over its
    genes of the zero-truncated-Poisson count NLL and of the gene-identity cross-entropy (targets as the
    published objective has them: the genes, and ``[END]`` at the last slot of a full-length cell). This is
    how fine-tuning and training are evaluated.

    Parameters
    ----------
    model
        A checkpoint folder, registry name, loaded model or ``(model, adapter)``, as everywhere.
    adata
        Cells (raw counts) as for :func:`~transcriptformer.scanpy.tl.embed`: an AnnData (in memory, a view or
        backed), or the path of an h5ad file (opened backed, as ``finetune`` and ``train`` open theirs).
    {run_options}

    Returns
    -------
    pandas.DataFrame
        Indexed by ``adata.obs_names`` in input order: ``count_nll``, ``gene_nll`` (NaN without a
        gene-identity head) and ``n_genes`` (the genes read; ``count_nll`` and ``gene_nll`` are NaN for a cell
        without any).
    """
    import anndata as ad

    if options.species_embedding is not None:
        raise ValueError("cell_losses is over the model's own vocabulary; species_embedding is not supported.")
    opened = None
    if isinstance(adata, str | os.PathLike):
        path = Path(adata).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"h5ad file {str(adata)!r} does not exist.")
        adata = opened = ad.read_h5ad(path, backed="r")
    elif not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData or the path of an h5ad file, got {type(adata).__name__}.")
    try:
        loaded = load_model(model, cache_dir=options.cache_dir)
        heads = ("llh", "gene_ce") if loaded.model.gene_id_head is not None else ("llh",)
        run = infer(adata, loaded, heads=heads, tokenize=options.tokenize(), mode="train", **options.engine())
        cells = run.result.cells
        gene = cells["gene_ce"] if "gene_ce" in cells else np.full(adata.n_obs, np.nan, dtype=np.float32)
        return pd.DataFrame(
            {"count_nll": cells["llh"], "gene_nll": gene, "n_genes": run.result.n_genes},
            index=pd.Index(adata.obs_names, name=adata.obs_names.name),
        )
    finally:
        if opened is not None:
            opened.file.close()


def _evaluate(view: LoadedModel, sources, options: RunOptions, device: str, precision: str) -> dict[str, float]:
    """Mean per-cell terms over validation sources, and the loss of the published weighting."""
    frames = []
    for _, _, adata in sources:
        frames.append(
            cell_losses(
                view,
                adata,
                **{**options_kwargs(options), "device": device, "precision": precision, "progress": False},
            )
        )
    df = pd.concat(frames)
    weight = view.config.loss.gene_id_loss_weight if view.model.gene_id_head is not None else 0.0
    count, gene = float(np.nanmean(df["count_nll"])), float(np.nanmean(df["gene_nll"])) if weight else 0.0
    return {"count_nll": count, "gene_nll": gene, "loss": count + weight * gene, "cells": len(df)}


def options_kwargs(options: RunOptions) -> dict[str, Any]:
    """The options as keyword arguments (to pass them on)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


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
    """The micro-batches of one epoch, in order (a function of the seed and the epoch only)."""
    rng = np.random.default_rng([seed, epoch])
    windows = [(i, s, min(s + window, len(n))) for i, n in enumerate(lengths) for s in range(0, len(n), window)]
    plan = []
    for k in rng.permutation(len(windows)):
        i, start, stop = windows[k]
        perm = rng.permutation(stop - start)
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
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        for name in ("warmup_ratio", "min_lr_ratio"):  # shares of the run / of the peak rate
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}.")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")


def _train_kernel(device: torch.device, attention: str):
    """A differentiable attention kernel for training.

    flex_attention on CUDA when asked (or ``auto``); elsewhere ``auto`` is the blocked kernel with its own backward
    pass (:class:`~transcriptformer.model.attention.BlockedAttention`: exact, memory linear in length), ``dense``
    the reference.
    """
    from ..model.attention import BlockedAttention

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
    save: Any,
    info: dict[str, Any],
    attention: str = "auto",
) -> dict[str, Any]:
    """The training loop shared by :func:`train` and :func:`finetune`; ``save(net, folder)`` writes a model."""
    if options.species_embedding is not None:
        raise ValueError("training is over the model's own vocabulary; species_embedding is not supported.")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    if precision == "16" and device.type != "cuda":
        raise ValueError("float16 training needs CUDA (it uses a gradient scaler); use precision='bf16' or '32'.")
    rank, world = _distributed()
    output_dir = Path(output_dir).expanduser()
    state_path = output_dir / TRAINER_STATE
    if state_path.exists() and not resume:
        raise FileExistsError(f"{output_dir} holds an earlier training run; pass resume=True to continue it.")
    if resume and not state_path.exists():
        raise FileNotFoundError(f"resume=True but {state_path} does not exist; start without resume.")
    if not resume and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new folder for the run.")
    train_sources = _open(train_data, loaded, options, "train")
    val_sources = _open(validation, loaded, options, "validation") if validation is not None else []
    S = loaded.seq_len
    max_tokens = options.max_tokens or (32768 if device.type == "cuda" else 4096)
    planner = BatchPlanner.for_model(loaded, device.type, max_tokens=max_tokens, batch_size=options.batch_size)
    lengths = _lengths(train_sources, S, fit.window)
    for _, src, _ in train_sources:
        if (message := src.raw_count_warning()) is not None:
            warn(message)
    per_step = fit.accumulate * world
    plans = [_steps(_plan_epoch(lengths, planner, e, fit.seed, fit.window), per_step) for e in range(fit.epochs)]
    total_steps = sum(len(p) for p in plans)
    gene_weight = loaded.config.loss.gene_id_loss_weight if net.gene_id_head is not None else 0.0
    clip = options.clip_counts

    net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fit.learning_rate, betas=fit.betas, weight_decay=fit.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, fit.warmup_ratio, fit.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda") if precision == "16" else None
    kernel = _train_kernel(device, attention)
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    record = {
        "transcriptformer_version": __version__,
        **info,
        **{k: v for k, v in dataclasses.asdict(fit).items()},
        "max_tokens": max_tokens,
        "batch_size": options.batch_size,
        "precision": precision,
        "device": str(device),
        "world_size": world,
        "steps": total_steps,
        "train_cells": int(sum(len(n) for n in lengths)),
        "train": [label for label, _, _ in train_sources],
        "validation": [label for label, _, _ in val_sources],
    }
    history: list[dict[str, Any]] = []
    first_epoch, step = 0, 0
    if resume:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["options"] != _comparable(record):
            raise ValueError(
                f"{state_path} was written with other options; resume with the same options (differences: "
                f"{_differences(saved['options'], _comparable(record))})."
            )
        net.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        first_epoch, step, history = saved["epoch"] + 1, saved["step"], saved["history"]
        logger.info("resuming %s after epoch %d (step %d)", output_dir, first_epoch, step)

    def view() -> LoadedModel:
        return dataclasses.replace(loaded, model=net)

    if val_sources and not history:
        net.eval()
        history.append(
            {"epoch": 0, "step": 0, "validation": _evaluate(view(), val_sources, options, str(device), precision)}
        )
        logger.info("validation before training: %s", history[-1]["validation"])
    show = options.progress if options.progress is not None else True
    n_tokens, flops = 0, 0.0
    t_start = time.perf_counter()
    for epoch in range(first_epoch, fit.epochs):
        net.train()
        steps = plans[epoch]
        bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{fit.epochs}", unit="step", disable=not show or rank > 0)
        losses = []
        cache: dict[tuple[int, int], Any] = {}
        for g, group in enumerate(steps):
            N = sum(mb.n_genes for mb in group)
            B = sum(len(mb.rows) for mb in group)
            index = list(range(g * per_step, g * per_step + len(group)))  # micro-batches' places in the epoch
            mine, ids = group[rank::world], index[rank::world]
            runs = mine + [group[0]] * (fit.accumulate - len(mine)) if world > 1 else mine
            ids += [index[0]] * (len(runs) - len(mine))
            weights = [1.0] * len(mine) + [0.0] * (len(runs) - len(mine))
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(2, dtype=torch.float64)
            for k, (mb, w, i) in enumerate(zip(runs, weights, ids, strict=True)):
                # dropout masks depend on the micro-batch alone: the same whatever the split into processes
                torch.manual_seed(hash((fit.seed, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
                key = (mb.source, mb.start)
                if key not in cache:
                    cache = {key: train_sources[mb.source][1].read(mb.start, mb.stop)}  # one window at a time
                window = cache[key]
                width = min(int(window.lengths[mb.rows].max()) + 1, S)
                tok, cnt, aux = batch_tensors(window, mb.rows, width, net.pad_idx, device)
                last = k == len(runs) - 1
                sync = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
                with sync, autocast(device, precision):
                    count, gene, _ = (ddp or net)(
                        tok, cnt, aux, full_length=width == S, clip_counts=clip, kernel=kernel
                    )
                    loss = batch_loss(count.float(), gene.float(), N, B, S, gene_weight) * (w * world)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                sums += torch.tensor([float(count.detach()) * w, float(gene.detach()) * w], dtype=torch.float64)
                if w > 0:
                    n_tokens += int(window.lengths[mb.rows].sum())
                    flops += 3 * estimate_flops(np.minimum(window.lengths[mb.rows] + 1, S), loaded)
            if world > 1:
                torch.distributed.all_reduce(sums)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if fit.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, fit.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            loss_value = float(sums[0] / N + gene_weight * sums[1] / (B * S))
            losses.append(loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
        bar.close()
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else None,
        }
        entry["step_losses"] = losses
        if val_sources:
            net.eval()
            entry["validation"] = _evaluate(view(), val_sources, options, str(device), precision)
        history.append(entry)
        logger.info("epoch %d: %s", epoch + 1, {k: v for k, v in entry.items() if k != "step_losses"})
        if rank == 0:
            save(net, output_dir / "epochs" / f"epoch-{epoch + 1}")
            trainable = {k: v.detach().cpu() for k, v in net.state_dict().items() if _is_trainable(net, k)}
            state = {
                "epoch": epoch,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "trainable": trainable,
                "history": history,
                "options": _comparable(record),
            }
            tmp = state_path.with_suffix(".tmp")
            output_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, state_path)
        if world > 1:
            torch.distributed.barrier()
    seconds = time.perf_counter() - t_start
    net.eval()
    record["history"] = history
    record["seconds"] = seconds
    record["tokens_per_s"] = n_tokens * world / seconds if seconds > 0 else None
    record["train_flops_per_s"] = flops * world / seconds if seconds > 0 else None  # forward x 3, no padding
    if rank == 0:
        save(net, output_dir)
        (output_dir / HISTORY_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    if world > 1:
        torch.distributed.barrier()  # every rank returns once the result is on disk
    return record


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
    keys += ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "train")
    return {k: record.get(k) for k in keys}


def _differences(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------------
# public entry points


@with_run_options
def train(
    model: Any,
    train: Any,
    *,
    output_dir: str | os.PathLike,
    validation: Any = None,
    epochs: int = 1,
    learning_rate: float = 5.5e-5,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
    grad_clip: float | None = 1.0,
    accumulate: int = 1,
    seed: int = 0,
    resume: bool = False,
    attention: str = "auto",
    options: RunOptions,
) -> Path:
    """Train every weight of a model (the frozen ESM2 gene vectors excepted) on cells; save it.

    Parameters
    ----------
    model
        A model from :func:`transcriptformer.new_model`, or any checkpoint to train further (a folder, a
        registry name, a loaded model); it is copied, never modified.
    train
        Training cells: an AnnData, an h5ad path (read backed, in windows), or a list of them.
    output_dir
        A new folder. It receives the final model in the published checkpoint layout (``config.json``,
        ``model_weights.pt``, ``vocabs/``: what :func:`transcriptformer.load_model` and the published
        ``transcriptformer inference`` read), ``training.json`` (options, loss history, throughput), a
        checkpoint per epoch under ``epochs/`` and ``trainer_state.pt`` (to resume).
    validation
        Held-out cells, evaluated before training and after every epoch with :func:`cell_losses`.
    epochs
        Passes over the training cells.
    learning_rate, weight_decay
        AdamW's (betas 0.9, 0.95).
    warmup_ratio, min_lr_ratio
        Linear warm-up over this share of the steps, then a cosine decay to ``min_lr_ratio`` times the rate.
    grad_clip
        Clip the gradients' global norm (``None``: no clipping).
    accumulate
        Micro-batches per optimiser step (per process).
    seed
        The run is a function of the seed (data order, dropout), deterministic on CPU.
    resume
        Continue a run in ``output_dir`` from its last complete epoch (same options).
    attention
        ``"auto"`` (flex_attention on CUDA, dense elsewhere), ``"dense"``, ``"flex"``.
    {run_options}

    Returns
    -------
    pathlib.Path
        ``output_dir``.
    """
    fit = FitOptions(
        epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        min_lr_ratio=min_lr_ratio,
        grad_clip=grad_clip,
        accumulate=accumulate,
        seed=seed,
    )
    check_bool(resume, "resume")
    loaded = load_model(model, cache_dir=options.cache_dir)
    net = copy.deepcopy(loaded.model)
    net.requires_grad_(True)
    net.gene_embeddings.embedding.weight.requires_grad_(False)  # the ESM2 gene vectors stay frozen

    def save(weights: TranscriptFormer, folder: Path) -> None:
        save_checkpoint(loaded, folder, model=weights, overwrite=True)

    info = {"kind": "train", "base_model": loaded.name, "base_weights_sha256": loaded.weights_sha256}
    _fit(
        loaded,
        net,
        train_data=train,
        validation=validation,
        options=options,
        fit=fit,
        output_dir=Path(output_dir),
        resume=resume,
        save=save,
        info=info,
        attention=attention,
    )
    return Path(output_dir)


@with_run_options
def finetune(
    train: Any,
    model: Any = "tf-sapiens",
    *,
    output_dir: str | os.PathLike,
    validation: Any = None,
    lora_r: int = 4,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("linear1", "linear2", "linears"),
    epochs: int = 1,
    learning_rate: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
    grad_clip: float | None = 1.0,
    accumulate: int = 1,
    seed: int = 0,
    resume: bool = False,
    attention: str = "auto",
    options: RunOptions,
) -> Path:
    """Fine-tune a model with LoRA adapters; only the adapters are trained and saved.

    The adapters add ``(lora_alpha / lora_r) · B A`` to the selected linear layers (names as in the
    published LoRA example: ``linear1``/``linear2`` are the feed-forward block, ``linears`` the Q, K, V and
    output projections of every attention block). They are saved in PEFT's format, with the base
    checkpoint's sha256; load them with ``transcriptformer.load_model(base, adapter=output_dir)`` or
    ``model=(base, output_dir)`` anywhere (``--adapter`` on the command line). Needs ``peft``
    (``pip install transcriptformer[finetune]``).

    Parameters
    ----------
    train
        Training cells: an AnnData, an h5ad path (read backed, in windows), or a list of them.
    model
        The base model (folder, registry name, loaded model); never modified.
    output_dir
        A new folder: the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
        ``transcriptformer_adapter.json``), ``training.json``, one adapter per epoch under ``epochs/`` and
        ``trainer_state.pt`` (to resume).
    validation
        Held-out cells, evaluated before training and after every epoch with :func:`cell_losses`.
    lora_r, lora_alpha, lora_dropout, target_modules
        The adapters' rank, scale, dropout and the layers they wrap.
    epochs, learning_rate, weight_decay, warmup_ratio, min_lr_ratio, grad_clip, accumulate, seed, resume, attention
        As in :func:`train`.
    {run_options}

    Returns
    -------
    pathlib.Path
        ``output_dir`` (the adapter folder).
    """
    fit = FitOptions(
        epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        min_lr_ratio=min_lr_ratio,
        grad_clip=grad_clip,
        accumulate=accumulate,
        seed=seed,
    )
    check_bool(resume, "resume")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    base = load_model(model, cache_dir=options.cache_dir)
    net = copy.deepcopy(base.model)
    torch.manual_seed(seed)  # the adapters' initialisation
    wrapped = lora.apply_lora(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets)
    info = {
        "kind": "finetune",
        "base_model": base.name,
        "base_weights_sha256": base.weights_sha256,
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
        options=options,
        fit=fit,
        output_dir=Path(output_dir),
        resume=resume,
        save=save,
        info=info,
        attention=attention,
    )
    adapter = json.loads((Path(output_dir) / lora.ADAPTER_INFO_FILE).read_text())
    logger.info(
        "saved a LoRA adapter of %s parameters (%.2f MB) for a base of %s parameters (%.1f MB); final loss %s",
        f"{adapter['adapter_parameters']:,}",
        adapter["adapter_bytes"] / 1e6,
        f"{adapter['base_parameters']:,}",
        adapter["base_bytes"] / 1e6,
        record["history"][-1] if record["history"] else None,
    )
    return Path(output_dir)
