"""LoRA adapters on disk, in PEFT's file format, and applying one to a loaded model.

An adapter adds a low-rank update ``(alpha / r) · B A`` to chosen linear layers. Adapters are written as PEFT
writes them (``adapter_config.json`` and ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``), so PEFT-aware tools can read them, with a small
``transcriptformer_adapter.json`` beside them that records the base checkpoint's sha256 and the training
options. Training adapters is :mod:`transcriptformer.training.lora`. PEFT is an optional dependency:
``pip install transcriptformer[finetune]``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._files import sha256_file
from .loaded import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_INFO_FILE", "CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "load_adapter", "peft", "read_adapter_info"]

#: Our record beside PEFT's files: base checkpoint sha256, options, sizes.
ADAPTER_INFO_FILE = "transcriptformer_adapter.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the weights


def peft():
    """The PEFT library, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA adapters need the PEFT library: pip install 'transcriptformer[finetune]' (or pip install peft)."
        ) from None
    return peft


def read_adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Our record of an adapter folder (raises with the fix when the folder is not one)."""
    folder = Path(folder).expanduser()
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
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
    peft_ = peft()
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
    config = peft_.LoraConfig.from_pretrained(str(folder))
    net = copy.deepcopy(base.model)
    wrapped = LoraModel(net, config, "default")
    # PeftModel names (base_model.model.<module>) -> LoraModel names (model.<module>)
    state = {k.removeprefix("base_model."): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    result = set_peft_model_state_dict(wrapped, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the adapter in {folder} does not fit {base.name}: unexpected keys {unexpected[:3]}.")
    net = wrapped.merge_and_unload() if merge else wrapped.model  # type: ignore[assignment]  # still a TranscriptFormer
    net.float().eval().requires_grad_(False)
    adapter = {"path": str(folder), "sha256": sha256_file(folder / WEIGHTS_FILE), "merged": merge}
    return replace(base, model=net, name=f"{base.name}+{folder.name}", adapter=adapter)
