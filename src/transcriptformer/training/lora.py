"""LoRA fine-tuning through PEFT: wrapping a network's linear layers with adapters and saving them.

Target modules are named as in the published LoRA example (``linear1 linear2 linears``): a name selects
every linear layer whose dotted path ends with it, and a container (``linears``, the Q, K, V and output
projections of each attention block) selects every linear layer inside it. PEFT itself would refuse the
container, so the selection is expanded to the full module names before PEFT sees it. The file format and
loading are :mod:`transcriptformer.weights.adapter`.
"""

from __future__ import annotations

import copy
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

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adapter_state",
    "apply_lora",
    "has_lora_layers",
    "merged_copy",
    "resolve_target_modules",
    "save_adapter",
]

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

    Raises
    ------
    ValueError
        An option out of range, a target that selects no linear layer, a model that already holds LoRA layers, or
        a rank larger than a selected layer's smaller width (the rule :func:`~transcriptformer.load_model` applies
        to an adapter: such an adapter would never load).
    """
    peft_ = peft()
    from peft.tuners.lora import LoraModel

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive integer, got {r!r}.")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0 (the scale is lora_alpha / lora_r), got {alpha!r}.")
    if has_lora_layers(model):
        raise ValueError(
            "the model already holds LoRA layers (an adapted model loaded with merge_adapter=False); load it with "
            "merge_adapter=True (the default) to train another adapter on top of it."
        )
    names = resolve_target_modules(model, target_modules)
    layers = {n: m for n, m in model.named_modules() if n in names and isinstance(m, nn.Linear)}
    too_narrow = [n for n in names if r > min(layers[n].in_features, layers[n].out_features)]
    if too_narrow:
        largest = min(min(m.in_features, m.out_features) for m in layers.values())
        first = layers[too_narrow[0]]
        others = f" and {len(too_narrow) - 1} other targeted layer(s)" if len(too_narrow) > 1 else ""
        raise ValueError(
            f"lora_r={r} exceeds the width of {too_narrow[0]} ({first.in_features} x {first.out_features}){others}: "
            "the rank must be at most the smaller width of every targeted layer, or the adapter would not load; "
            f"lower lora_r to at most {largest} or target other layers."
        )
    config = peft_.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names)
    wrapped = LoraModel(model, config, "default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return wrapped


def _is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (a wrapper holding its ``base_layer`` and the ``lora_A``/``lora_B`` matrices)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "merge")


def has_lora_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers (an adapted model loaded with ``merge_adapter=False``)."""
    return any(_is_lora_layer(m) for m in model.modules())


def merged_copy(model: nn.Module) -> Any:
    """A copy of ``model`` with every LoRA layer folded into its base layer: a plain network of the same outputs.

    What :func:`~transcriptformer.load_model` with ``merge_adapter=True`` makes of the same adapter; ``model`` is
    not modified.
    """
    net = copy.deepcopy(model)
    for name, module in list(net.named_modules()):
        if _is_lora_layer(module):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, module.get_base_layer())
    if "peft_config" in vars(net):  # PEFT's record of the adapters it injected (merge_and_unload drops it too)
        del net.peft_config
    return net


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
