"""Performance features that must not change results: the CPU precision decision, the fused Q/K/V projection
and the differentiable blocked attention used for training on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from transcriptformer.errors import TranscriptFormerWarning
from transcriptformer.inference import devices
from transcriptformer.inference.devices import cpu_bf16_support, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_as(monkeypatch):
    """Make the CPU report a PyTorch capability and a set of flags (the decision's cache is cleared)."""

    def set_cpu(capability: str, flags: set[str], machine: str = "x86_64"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(devices, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr("platform.machine", lambda: machine)
        devices._bf16_support.cache_clear()

    yield set_cpu
    devices._bf16_support.cache_clear()


@pytest.mark.parametrize("requested", ["bf16", "16", "bf16-mixed", "16-mixed", "BF16"])
def test_avx2_cpu_runs_float32_with_a_warning(cpu_as, requested):
    cpu_as("AVX2", {"avx2", "fma"})
    assert not cpu_bf16_support().native
    with pytest.warns(TranscriptFormerWarning, match="float32.*no native bfloat16.*AVX2"):
        assert resolve_precision(requested, CPU) == "32"


@pytest.mark.parametrize("requested", ["bf16!", "16!", "bf16-mixed!", "16-mixed!", " bf16! "])
def test_insisting_runs_bfloat16_without_a_warning(cpu_as, requested):
    cpu_as("AVX2", {"avx2", "fma"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision(requested, CPU) == "bf16"


def test_native_bf16_cpu_runs_bfloat16(cpu_as):
    cpu_as("AVX512", {"avx512f", "avx512_bf16"})
    assert cpu_bf16_support().native
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("16-mixed", CPU) == "bf16"  # as Lightning does on the CPU


def test_bf16_flags_at_a_lowered_capability_are_not_native(cpu_as):
    cpu_as("AVX2", {"avx512_bf16", "amx_bf16"})  # e.g. ATEN_CPU_CAPABILITY=avx2 on a Sapphire Rapids
    assert not cpu_bf16_support().native
    cpu_as("AVX512", {"avx512f"})  # AVX-512 without BF16: emulated
    assert not cpu_bf16_support().native


def test_other_cpus_are_decided_by_a_measured_probe(cpu_as, monkeypatch):
    monkeypatch.setattr(devices, "_probe_bf16", lambda: 0.3)
    cpu_as("SVE256", set(), machine="aarch64")
    assert not cpu_bf16_support().native and "0.30x" in cpu_bf16_support().reason
    monkeypatch.setattr(devices, "_probe_bf16", lambda: 2.5)
    devices._bf16_support.cache_clear()
    assert cpu_bf16_support().native


def test_cuda_and_float32_are_unaffected(cpu_as):
    cpu_as("AVX2", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
        assert resolve_precision("16-mixed", torch.device("cuda")) == "16"
        assert resolve_precision("16!", torch.device("cuda")) == "16"
        assert resolve_precision("auto", torch.device("cuda")) == "bf16"
        assert resolve_precision("auto", CPU) == "32"
        assert resolve_precision("32", CPU) == "32"


@pytest.mark.parametrize("bad", ["32!", "auto!", "bf16!!", "64"])
def test_insisting_is_only_for_reduced_precisions(bad):
    with pytest.raises(ValueError, match="precision"):
        resolve_precision(bad, CPU)


def test_engine_records_the_precision_that_ran(cpu_as, tiny_model):
    from transcriptformer.inference.engine import Engine

    cpu_as("AVX2", set())
    with pytest.warns(TranscriptFormerWarning, match="float32"):
        assert Engine(tiny_model, device="cpu", precision="16-mixed").precision == "32"
    assert Engine(tiny_model, device="cpu", precision="bf16!").precision == "bf16"


def test_insisted_bf16_runs_bfloat16_on_any_cpu(tiny_path, tiny_adata, reference):
    import numpy as np

    import transcriptformer.scanpy as tfs

    out = tfs.tl.embed(tiny_adata, model=tiny_path, precision="bf16!", copy=True)
    assert out.uns["transcriptformer"]["params"]["precision"] == "bf16"
    emb, ref = out.obsm["X_transcriptformer"], reference["cell"].obsm["embeddings"]
    assert np.abs(emb - ref).max() < 1e-2
    assert np.abs(emb - ref).max() > 0  # it did not run in float32
