"""Devices and numeric precision, and what is kept per device across runs (the network's copy, kernels).

On CUDA, ``attention="auto"`` probes once per device whether compiled flex_attention runs and agrees with the
chunked kernel (:func:`_probe_flex`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import ATTENTION_BACKENDS, PRECISION_ALIASES, PRECISIONS, Precision, device_name
from ..model import (
    ChunkedAttention,
    DenseAttention,
    FlexAttention,
    Kernel,
    TranscriptFormer,
    chunked_attention,
    flex_attention,
)
from ..weights.loaded import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["DeviceState", "autocast", "build_kernel", "device_state", "resolve_device", "resolve_precision"]


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


@dataclass
class DeviceState:
    """A loaded model on one device with the kernels and compiled steps built for it (kept across runs)."""

    model: TranscriptFormer
    kernels: dict[str, Kernel] = field(default_factory=dict)
    compiled_layer: Callable | None = None  # torch.compile(EncoderLayer.forward), made once per device
    probed: str | None = None  # what attention="auto" resolved to here (the flex probe's outcome)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kernel(self, name: str) -> Kernel:
        """The kernel called ``name`` (built once: compiled kernels keep their caches)."""
        with self.lock:
            if name not in self.kernels:
                self.kernels[name] = build_kernel(name)
            return self.kernels[name]

    def auto_attention(self, device: torch.device) -> str:
        """What ``attention="auto"`` means on this CUDA device: flex_attention if it compiles and agrees, else chunked.

        Probed once per device (:func:`_probe_flex`).
        """
        with self.lock:
            if self.probed is None:
                self.probed = _probe_flex(device) or "chunked"
                logger.info("attention on %s: %s", device, self.probed)
            return self.probed


def build_kernel(name: str) -> Kernel:
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
    or disagreement means chunked attention. So does a ``torch.compile`` that would not compile
    (:func:`_compile_disabled`): uncompiled flex_attention agrees but holds every attention score in memory.
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

    why = _compile_disabled(flex)
    if why is not None:
        logger.info(
            "torch.compile does not compile here (%s): flex_attention would run uncompiled, holding every attention "
            "score in memory; using the chunked kernel on %s.",
            why,
            device,
        )
        return None
    for name, shapes in (("flex-dynamic", [(2, 256), (3, 256), (2, 384)]), ("flex", [(2, 256)])):
        try:
            compiled = torch.compile(flex, dynamic=None if name == "flex-dynamic" else False)
            if all(agrees(B, T, compiled) for B, T in shapes):
                return name
            logger.warning("%s disagrees with the chunked kernel on %s.", name, device)
        except Exception as e:  # noqa: BLE001 - any compile failure means: try the next
            logger.info("%s is not usable on %s (%s: %s).", name, device, type(e).__name__, str(e)[:200])
    return None


def _compile_disabled(fn: Callable) -> str | None:
    """Why ``torch.compile`` would not compile ``fn`` in this process (so that "compiled" code runs eagerly), or None.

    ``TORCHDYNAMO_DISABLE=1`` makes ``torch.compile`` return the function itself; ``TORCH_COMPILE_DISABLE=1``
    (``torch._dynamo.config.disable``) runs the compiled wrapper eagerly; on some platforms ``torch.compile``
    refuses outright. (``TORCH_COMPILE=0`` and ``TORCH_NN_FLEX_ATTENTION_DISABLE_COMPILE=1``, which the published
    tool's Windows instructions set, are read by neither torch nor this package.)
    """
    try:
        import torch._dynamo

        if torch.compile(fn) is fn:
            return "TORCHDYNAMO_DISABLE=1"
        if torch._dynamo.config.disable:
            return "TORCH_COMPILE_DISABLE=1"
    except Exception as e:  # noqa: BLE001 - torch.compile not supported here: just as unusable
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None
