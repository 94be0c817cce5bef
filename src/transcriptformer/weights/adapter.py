"""LoRA adapters on disk, in PEFT's file format, and applying one to a loaded model.

An adapter adds a low-rank update ``(alpha / r) · B A`` to chosen linear layers. Adapters are written as PEFT
writes them (``adapter_config.json`` and ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``), so PEFT-aware tools can read them, with a small
``transcriptformer_adapter.json`` beside them that records the base checkpoint's sha256 and the training
options. Training adapters is :mod:`transcriptformer.training.lora`. PEFT is an optional dependency:
``pip install peft`` (or the ``finetune`` extra of ``transcriptformer-scanpy``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._files import read_json, sha256_file, write_json_atomic
from .loaded import LoadedModel

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_INFO_FILE",
    "CONFIG_FILE",
    "PREFIX",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "check_adapter",
    "load_adapter",
    "peft",
    "read_adapter_info",
    "write_adapter",
]

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
            "LoRA adapters need the PEFT library: pip install peft (or install transcriptformer-scanpy with its "
            "finetune extra)."
        ) from None
    return peft


#: Most bytes an adapter's files may declare (a rank far beyond the layers' own width is refused before this).
MAX_ADAPTER_BYTES = 4 << 30


class AdapterFiles(NamedTuple):
    """An adapter folder, checked: its record, configuration (parsed) and the fingerprint of its three files."""

    folder: Path
    record: dict[str, Any]
    config: dict[str, Any]
    digest: str  # sha256 over the three files: what a cached adapted model is keyed on


def read_adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Our record of an adapter folder (raises with the fix when the folder is not a complete adapter)."""
    return check_adapter(folder).record


def check_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Check an adapter folder without loading its weights: files present, parseable, consistent with the record.

    The record (``transcriptformer_adapter.json``, written last by :func:`write_adapter`) holds the sha256 of the
    other two files as trained; a file edited, replaced or cut short since is refused. Nothing is unpickled.

    Raises
    ------
    FileNotFoundError
        The folder lacks a file (an adapter never finished saving, or not an adapter folder).
    ValueError
        A file is damaged, edited since training, or describes something other than a LoRA adapter; the message
        names the file.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist.")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, ADAPTER_INFO_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete LoRA adapter folder: missing {', '.join(missing)} (expected what "
            "`transcriptformer finetune --output-dir` writes; its record, transcriptformer_adapter.json, is written "
            "last and names the weights the adapter was trained on, without which it cannot be checked)."
        )
    fix = "Train the adapter again (transcriptformer.finetune), or restore the folder as it was saved."
    record = read_json(folder / ADAPTER_INFO_FILE, "the adapter's record", fix)
    config = read_json(folder / CONFIG_FILE, "the adapter's configuration", fix)
    for name, value in ((ADAPTER_INFO_FILE, record), (CONFIG_FILE, config)):
        if not isinstance(value, dict):
            raise ValueError(f"{folder / name} must hold a JSON object, got {type(value).__name__}. {fix}")
    for key in ("base_weights_sha256", "adapter_weights_sha256", "adapter_config_sha256"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(
                f"{folder / ADAPTER_INFO_FILE} has no {key}: the adapter cannot be checked against the weights it "
                f"was trained on or against its own files. {fix}"
            )
    digests = {}
    for name, key in ((CONFIG_FILE, "adapter_config_sha256"), (WEIGHTS_FILE, "adapter_weights_sha256")):
        digests[name] = sha256_file(folder / name)
        if digests[name] != record[key]:
            raise ValueError(
                f"{folder / name} is not the file the adapter was saved with (its sha256 differs from the one "
                f"recorded in {ADAPTER_INFO_FILE}): it was edited, replaced or cut short. What was trained is what "
                f"loads; {fix.lower()}"
            )
    _check_config(config, folder / CONFIG_FILE)
    digest = hashlib.sha256(
        "".join([digests[CONFIG_FILE], digests[WEIGHTS_FILE], record["base_weights_sha256"]]).encode()
    )
    return AdapterFiles(folder, record, config, digest.hexdigest())


def _check_config(config: dict[str, Any], path: Path) -> None:
    """The configuration describes a plain LoRA adapter this package can apply exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are supported.")
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r (the rank) must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}.")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}.")
    for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{path}: {key} is not supported (adapters are trained and applied as plain LoRA).")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config.get('bias')!r} is not supported (plain LoRA has bias 'none').")


def _check_shapes(net: Any, files: AdapterFiles) -> dict[str, Any]:
    """Every tensor of the weights file has the shape the configuration and the base model's layers imply.

    Read from the file's header (no tensor is loaded), before anything is allocated. Returns the target modules.
    """
    from safetensors import safe_open  # lazily: an optional dependency
    from torch import nn

    path = files.folder / WEIGHTS_FILE
    r = files.config["r"]
    modules = dict(net.named_modules())
    targets = {}
    for target in files.config["target_modules"]:
        # PEFT's rule: a name matches itself and every module whose dotted name ends with it (PEFT saves 20 or
        # more targets as their shortest distinct endings, e.g. "linear1" for every layer's linear1)
        matched = {n: m for n, m in modules.items() if n == target or n.endswith(f".{target}")}
        wrapped = [n for n, m in matched.items() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
        if wrapped:  # a LoRA layer of PEFT: the base keeps the layers of its own adapter (merge_adapter=False)
            raise ValueError(
                f"{files.folder / CONFIG_FILE}: target module {wrapped[0]!r} of the base model is itself a LoRA "
                "layer: the base is an adapted model loaded with merge_adapter=False. Load it with "
                "merge_adapter=True (the default) to apply another adapter on top of it."
            )
        if not matched or not all(isinstance(m, nn.Linear) for m in matched.values()):
            raise ValueError(
                f"{files.folder / CONFIG_FILE}: target module {target!r} is not a linear layer of the base model."
            )
        targets.update(matched)
    expected = {}
    for name, layer in targets.items():
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"{files.folder / CONFIG_FILE}: r={r} exceeds the width of {name} "
                f"({layer.in_features} x {layer.out_features}); the adapter does not fit this model."
            )
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (layer.out_features, r)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = [
            f"{k}: {found[k]} instead of {expected[k]}"
            for k in sorted(set(found) & set(expected))
            if found[k] != expected[k]
        ]
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
            "; ".join(wrong[:3]),
        ]
        raise ValueError(
            f"{path} does not fit {CONFIG_FILE} and the base model (rank {r}): {', '.join(p for p in parts if p)}."
        )
    if sum(np.prod(s) for s in found.values()) * 4 > MAX_ADAPTER_BYTES:
        raise ValueError(f"{path} declares more than {MAX_ADAPTER_BYTES >> 30} GiB of adapter weights; refusing it.")
    return targets


def load_adapter(base: LoadedModel, folder: str | os.PathLike, *, merge: bool = True) -> LoadedModel:
    """A copy of ``base`` with the adapter in ``folder`` applied (``base`` itself is never modified).

    Parameters
    ----------
    base
        The model the adapter was trained on: the same weights, adapted the same way (an adapter trained on an
        adapted model loads on that adapted model only).
    folder
        The adapter folder.
    merge
        Fold ``(alpha / r) · B A`` into the weights (a plain model, as fast as the base). ``False`` keeps the
        adapter layers (the same outputs, up to float round-off).

    Raises
    ------
    ValueError
        The adapter was made for other weights (the identity it recorded differs from ``base.identity``), or a
        file of it is damaged or was edited since it was saved (:func:`check_adapter`).
    """
    files = check_adapter(folder)
    expected = files.record["base_weights_sha256"]
    if expected != base.identity:
        raise ValueError(
            f"the adapter in {files.folder} was trained on weights with identity {expected[:16]}... "
            f"({files.record.get('base_model', '?')}), but {base.name} has {base.identity[:16]}...: load it on the "
            "model it was made for (for an adapter trained on an adapted model: that adapted model)."
        )
    peft_ = peft()
    import torch  # lazily: the weights layer imports torch only to load
    from peft.tuners.lora import LoraModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    _check_shapes(base.model, files)
    config = peft_.LoraConfig(
        r=files.config["r"],
        lora_alpha=files.config["lora_alpha"],
        lora_dropout=float(files.config.get("lora_dropout") or 0.0),
        target_modules=list(files.config["target_modules"]),
    )
    net = copy.deepcopy(base.model)
    wrapped = LoraModel(net, config, "default")
    # PeftModel names (base_model.model.<module>) -> LoraModel names (model.<module>)
    state = {k.removeprefix("base_model."): v for k, v in load_file(str(files.folder / WEIGHTS_FILE)).items()}
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise ValueError(f"{files.folder / WEIGHTS_FILE} holds NaN or infinite values; train the adapter again.")
    set_peft_model_state_dict(wrapped, state)
    net = wrapped.merge_and_unload() if merge else wrapped.model  # type: ignore[assignment]  # still a TranscriptFormer
    net.float().eval().requires_grad_(False)
    adapter = {
        "path": str(files.folder),
        "sha256": files.record["adapter_weights_sha256"],
        "merged": merge,
        "base_identity": base.identity,
        "identity": hashlib.sha256(f"{base.identity}+{files.digest}".encode()).hexdigest(),
    }
    return replace(base, model=net, name=f"{base.name}+{files.folder.name}", adapter=adapter)


def write_adapter(
    folder: str | os.PathLike, config: dict[str, Any], state: dict[str, Any], record: dict[str, Any]
) -> Path:
    """Write an adapter folder: PEFT's two files, then our record (last, with their sha256), each atomically.

    A save cut short leaves no record naming the new files, so nothing of it loads as a complete adapter.
    """
    from safetensors.torch import save_file  # lazily: an optional dependency

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_INFO_FILE).unlink(missing_ok=True)  # the folder is incomplete until the record is back
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    from .._files import give_default_mode  # safetensors creates the file owner-only (0600)

    give_default_mode(tmp)
    os.replace(tmp, folder / WEIGHTS_FILE)
    write_json_atomic(folder / CONFIG_FILE, config, sort_keys=True, default=str)
    record = {
        **record,
        "adapter_weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "adapter_config_sha256": sha256_file(folder / CONFIG_FILE),
        "adapter_bytes": (folder / WEIGHTS_FILE).stat().st_size,
    }
    write_json_atomic(folder / ADAPTER_INFO_FILE, record, sort_keys=False, default=str)
    return folder
