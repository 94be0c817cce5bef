"""LoRA fine-tuning through PEFT: wrapping a network's linear layers with adapters and saving them.

Target modules are named as in the published LoRA example (``linear1 linear2 linears``): a name selects
every linear layer whose dotted path ends with it, and a container (``linears``, the Q, K, V and output
projections of each attention block) selects every linear layer inside it. PEFT itself would refuse the
container, so the selection is expanded to the full module names before PEFT sees it. The file format and
loading are :mod:`transcriptformer.weights.adapter`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import TranscriptFormer
from ..weights.adapter import PREFIX, peft, write_adapter
from ..weights.loaded import LoadedModel

__all__ = ["DEFAULT_TARGET_MODULES", "adapter_state", "apply_lora", "resolve_target_modules", "save_adapter"]

#: The published LoRA example's default targets: the feed-forward block and the attention projections.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("linear1", "linear2", "linears")


def resolve_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the linear layers that ``targets`` select (see the module documentation).

    Raises
    ------
    ValueError
        A target that selects no linear layer (the message lists the names that exist).
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("no target modules given; e.g. target_modules=('linear1', 'linear2', 'linears').")
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    selected: list[str] = []
    for target in targets:
        containers = [c for c in modules if c and (c == target or c.endswith("." + target))]
        hits = [n for n in linear if any(n == c or n.startswith(c + ".") for c in containers)]
        if not hits:
            leaves = sorted({n.split(".")[-1] for n in linear} | {n.split(".")[-2] for n in linear if "." in n})
            raise ValueError(f"target module {target!r} selects no linear layer; names that do: {', '.join(leaves)}.")
        selected += [n for n in hits if n not in selected]
    return sorted(selected)


def apply_lora(
    model: TranscriptFormer,
    *,
    r: int = 4,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> Any:
    """Wrap the selected linear layers of ``model`` (in place) with LoRA adapters; freeze everything else.

    Returns
    -------
    peft.tuners.lora.LoraModel
        PEFT's wrapper; ``.model`` is ``model`` itself, now holding the adapters.
    """
    peft_ = peft()
    from peft.tuners.lora import LoraModel

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive integer, got {r!r}.")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0 (the scale is lora_alpha / lora_r), got {alpha!r}.")
    names = resolve_target_modules(model, target_modules)
    config = peft_.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names)
    wrapped = LoraModel(model, config, "default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return wrapped


def adapter_state(wrapped: Any) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's file naming."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(wrapped)
    return {PREFIX + k.removeprefix("model."): v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(wrapped: Any, folder: str | os.PathLike, *, base: LoadedModel, info: dict[str, Any]) -> Path:
    """Write an adapter (PEFT's two files and our record) into ``folder``, atomically; returns the folder.

    The record (``transcriptformer_adapter.json``) holds ``info`` (options), the identity of the weights the
    adapter was trained on (``base.identity``: for an adapted base, that of the adapted weights), the sha256 of
    the two other files, and the adapter's size beside the base's.
    """
    state = adapter_state(wrapped)
    n_adapter = sum(v.numel() for v in state.values())
    n_base = sum(v.numel() for v in base.model.state_dict().values())
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in wrapped.peft_config["default"].to_dict().items()}
    record = {
        "base_model": base.name,
        "base_path": None if base.path is None else str(base.path),
        **info,
        "base_weights_sha256": base.identity,
        "adapter_parameters": n_adapter,
        "base_parameters": n_base,
        "base_bytes": 4 * n_base,
    }
    return write_adapter(folder, config, state, record)
