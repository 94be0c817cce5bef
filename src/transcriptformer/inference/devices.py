"""Devices and numeric precision, and what is kept per device across runs (the network's copy, kernels).

On CUDA, ``attention="auto"`` probes once per device whether compiled flex_attention runs and agrees with the
chunked kernel (:func:`_probe_flex`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import ATTENTION_BACKENDS, PRECISION_ALIASES, PRECISIONS, Precision, device_name
from ..errors import warn
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

__all__ = [
    "CpuBf16Support",
    "DeviceState",
    "autocast",
    "build_kernel",
    "cpu_bf16_support",
    "device_state",
    "resolve_device",
    "resolve_precision",
]


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


#: Flags of x86 CPUs whose bfloat16 dot products run natively (AVX512-BF16, AMX); without them oneDNN and
#: PyTorch emulate bfloat16 in float32 registers and a bf16 run is several times slower than float32.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: A measured bfloat16 matmul must be at least this much faster than float32 for bf16 to count as paying.
_PROBE_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class CpuBf16Support:
    """Whether bfloat16 arithmetic pays on this CPU, and why (:func:`cpu_bf16_support`).

    Attributes
    ----------
    native
        bfloat16 runs natively (faster than float32); ``False`` means it is emulated (slower).
    capability
        ``torch.backends.cpu.get_cpu_capability()`` (``"AVX2"``, ``"AVX512"``, ``"SVE256"``, ...).
    reason
        How it was decided: the CPU flags found, or the measured bf16 / float32 matmul speed ratio.
    """

    native: bool
    capability: str
    reason: str


def _cpu_flags() -> set[str]:
    """x86 feature flags from ``/proc/cpuinfo`` (Linux), and torch's own checks where it has them."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, name in checks.items():
        check = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if check is not None and check():
                flags.add(flag)
    return flags


def _probe_bf16(size: int = 256, reps: int = 5) -> float:
    """Measured speed of a bfloat16 matmul relative to float32 on this CPU (best of ``reps``; a few ms)."""
    import time

    def best(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(dtype)
        b = torch.randn(size, size, generator=g).to(dtype)
        a @ b
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            t = min(t, time.perf_counter() - t0)
        return t

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


@functools.cache
def _bf16_support(capability: str, machine: str) -> CpuBf16Support:
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        # PyTorch's kernels use AVX-512 only at capability AVX512 (ATEN_CPU_CAPABILITY can lower it)
        found = sorted(set(_NATIVE_BF16_FLAGS) & _cpu_flags())
        if found and capability.upper().startswith("AVX512"):
            return CpuBf16Support(True, capability, f"CPU flags {', '.join(found)}")
        why = "without " if not found else f"with {', '.join(found)} but PyTorch at "
        return CpuBf16Support(
            False, capability, why + ("AVX512-BF16 or AMX" if not found else f"capability {capability}")
        )
    ratio = _probe_bf16()  # ARM (Apple silicon, Graviton, ...) and others: measure once per process
    return CpuBf16Support(
        ratio >= _PROBE_MIN_SPEEDUP, capability, f"measured bfloat16 matmul {ratio:.2f}x the float32 speed"
    )


def cpu_bf16_support() -> CpuBf16Support:
    """Whether bfloat16 (and float16, which runs as bfloat16 on the CPU) pays on this CPU.

    On x86 it does where the CPU has AVX512-BF16 or AMX and PyTorch runs at capability ``AVX512``
    (``torch.backends.cpu.get_cpu_capability()``): elsewhere bfloat16 is emulated, several times slower
    than float32. On other CPUs (ARM) a short bfloat16 / float32 matmul probe decides. The answer is
    cached per process (and per capability).

    Returns
    -------
    CpuBf16Support
        The decision and its reason.
    """
    import platform

    capability = str(torch.backends.cpu.get_cpu_capability())
    return _bf16_support(capability, platform.machine().lower())


def resolve_precision(precision: Precision | str, device: torch.device) -> Literal["32", "bf16", "16"]:
    """Returns ``"32"``, ``"bf16"`` or ``"16"`` (see :data:`~transcriptformer.config.Precision`): what runs.

    ``"auto"`` is float32 on CPU and MPS and bfloat16 autocast on CUDA. ``"16"`` on CPU runs as
    bfloat16, as the published tool (Lightning) does for its default ``16-mixed``. On a CPU where
    bfloat16 does not pay (:func:`cpu_bf16_support`: no AVX512-BF16 or AMX, where it is emulated and
    several times slower than float32), ``"bf16"`` and ``"16"`` (and their aliases ``"bf16-mixed"``,
    ``"16-mixed"``) run in float32 with a :class:`~transcriptformer.errors.TranscriptFormerWarning`;
    a trailing ``"!"`` (``"bf16!"``, ``"16-mixed!"``) insists on the reduced precision anyway. The value
    returned is the precision that runs, and what the run's parameters record.

    Raises
    ------
    ValueError
        An unknown precision.
    """
    key = str(precision).strip().lower() if isinstance(precision, str | int) and not isinstance(precision, bool) else ""
    insist = key.endswith("!")
    base = key[:-1].strip() if insist else key
    p = PRECISION_ALIASES.get(base, base if base in PRECISIONS else None)
    if p is None or p.endswith("!") or (insist and p not in ("bf16", "16")):
        raise ValueError(
            f"precision={precision!r}; expected one of {', '.join(map(repr, PRECISIONS))} "
            "(a trailing '!' insists on 'bf16' or '16' where the CPU has no native bfloat16)."
        )
    if p == "auto":
        return "bf16" if device.type == "cuda" else "32"
    if device.type != "cpu" or p == "32":
        return p  # type: ignore[return-value]
    support = cpu_bf16_support()
    if not support.native:
        if insist:
            logger.info("bfloat16 on this CPU as insisted (%s: emulated, slower than float32).", support.reason)
        else:
            warn(
                f"precision={precision!r} ran in float32: this CPU has no native bfloat16 ({support.reason}; "
                f"PyTorch capability {support.capability}), where bfloat16 is emulated and several times slower "
                f"than float32. Use precision='{p}!' to run it anyway."
            )
            return "32"
    if p == "16":
        logger.info("float16 autocast on CPU runs as bfloat16 (as the published tool does).")
    return "bf16"


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
