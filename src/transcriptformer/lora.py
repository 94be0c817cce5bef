"""LoRA adapters through the PEFT library, in PEFT's file format.

An adapter adds a low-rank update ``(alpha / r) · B A`` to chosen linear layers and is all that fine-tuning
trains and saves. Adapters are written as PEFT writes them (``adapter_config.json`` and
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``), so PEFT-aware tools can
read them, with a small ``transcriptformer_adapter.json`` beside them that records the base checkpoint's
sha256 and the training options. PEFT is an optional dependency: ``pip install transcriptformer[finetune]``.

Target modules are named as in the published LoRA example (``linear1 linear2 linears``): a name selects
every linear layer whose dotted path ends with it, and a container (``linears``, the Q, K, V and output
projections of each attention block) selects every linear layer inside it. PEFT itself would refuse the
container, so the selection is expanded to the full module names before PEFT sees it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import LoadedModel
from .model import TranscriptFormer

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_INFO_FILE",
    "DEFAULT_TARGET_MODULES",
    "apply_lora",
    "load_adapter",
    "resolve_target_modules",
    "save_adapter",
]

#: The published LoRA example's default targets: the feed-forward block and the attention projections.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("linear1", "linear2", "linears")

#: Our record beside PEFT's files: base checkpoint sha256, options, sizes.
ADAPTER_INFO_FILE = "transcriptformer_adapter.json"
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the weights


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA fine-tuning needs the PEFT library: pip install 'transcriptformer[finetune]' (or pip install peft)."
        ) from None
    return peft


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
    peft = _peft()
    from peft.tuners.lora import LoraModel

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive integer, got {r!r}.")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0 (the scale is lora_alpha / lora_r), got {alpha!r}.")
    names = resolve_target_modules(model, target_modules)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names)
    wrapped = LoraModel(model, config, "default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return wrapped


def adapter_state(wrapped: Any) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's file naming."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(wrapped)
    return {_PREFIX + k.removeprefix("model."): v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(wrapped: Any, folder: str | os.PathLike, *, base: LoadedModel, info: dict[str, Any]) -> Path:
    """Write an adapter (PEFT's two files and our record) into ``folder``; returns the folder.

    ``info`` (options, training history) is stored in ``transcriptformer_adapter.json`` with the base
    checkpoint's sha256 and the adapter's size beside the base's.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = wrapped.peft_config["default"]
    config.save_pretrained(str(folder))
    state = adapter_state(wrapped)
    save_file(state, str(folder / _WEIGHTS_FILE))
    n_adapter = sum(v.numel() for v in state.values())
    n_base = sum(v.numel() for k, v in base.model.state_dict().items())
    record = {
        "base_model": base.name,
        "base_path": None if base.path is None else str(base.path),
        "base_weights_sha256": base.weights_sha256,
        "adapter_parameters": n_adapter,
        "base_parameters": n_base,
        "adapter_bytes": (folder / _WEIGHTS_FILE).stat().st_size,
        "base_bytes": 4 * n_base,
        **info,
    }
    (folder / ADAPTER_INFO_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return folder


def read_adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Our record of an adapter folder (raises with the fix when the folder is not one)."""
    folder = Path(folder).expanduser()
    missing = [f for f in (_CONFIG_FILE, _WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a LoRA adapter folder: missing {', '.join(missing)} (expected what "
            "`transcriptformer finetune --output-dir` writes)."
        )
    path = folder / ADAPTER_INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_adapter(base: LoadedModel, folder: str | os.PathLike, *, merge: bool = True) -> LoadedModel:
    """A copy of ``base`` with the adapter in ``folder`` applied (``base`` itself is never modified).

    Parameters
    ----------
    base
        The model the adapter was trained on.
    folder
        The adapter folder.
    merge
        Fold ``(alpha / r) · B A`` into the weights (a plain model, as fast as the base). ``False`` keeps the
        adapter layers (the same outputs, up to float round-off).

    Raises
    ------
    ValueError
        The adapter was made for other weights (its recorded base sha256 differs from ``base``'s).
    """
    peft = _peft()
    from peft.tuners.lora import LoraModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder).expanduser().resolve()
    info = read_adapter_info(folder)
    expected = info.get("base_weights_sha256")
    if expected and expected != base.weights_sha256:
        raise ValueError(
            f"the adapter in {folder} was trained on weights with sha256 {expected[:16]}... "
            f"({info.get('base_model', '?')}), but {base.name} has {base.weights_sha256[:16]}...: "
            "load it on the model it was made for."
        )
    config = peft.LoraConfig.from_pretrained(str(folder))
    net = copy.deepcopy(base.model)
    wrapped = LoraModel(net, config, "default")
    # PeftModel names (base_model.model.<module>) -> LoraModel names (model.<module>)
    state = {k.removeprefix("base_model."): v for k, v in load_file(str(folder / _WEIGHTS_FILE)).items()}
    result = set_peft_model_state_dict(wrapped, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the adapter in {folder} does not fit {base.name}: unexpected keys {unexpected[:3]}.")
    net = wrapped.merge_and_unload() if merge else wrapped.model  # type: ignore[assignment]  # still a TranscriptFormer
    net.float().eval().requires_grad_(False)
    from ._hash import sha256_file

    adapter = {"path": str(folder), "sha256": sha256_file(folder / _WEIGHTS_FILE), "merged": merge}
    return replace(base, model=net, name=f"{base.name}+{folder.name}", adapter=adapter)
