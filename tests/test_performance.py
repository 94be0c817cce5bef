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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_in_pieces_equals_gelu(dtype):
    from transcriptformer.model.network import GELU

    g = torch.Generator().manual_seed(0)
    act, piece = GELU(), GELU.piece
    for shape in [(3, 7), (1, piece), (2, piece), (3, 101, 517), (5, 1000, 64)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        with torch.no_grad():
            got = act(x)
        assert got.shape == x.shape and got.dtype == dtype
        assert torch.equal(got, torch.nn.functional.gelu(x))
    x = torch.randn(4, 300, 128, generator=g, requires_grad=True)  # with gradients: nn.GELU itself
    act(x).sum().backward()
    assert x.grad is not None


# -- training on the CPU: the blocked kernel's backward and the capped cross-entropy ------------------------


def _grads(fn, q, k, v, kb, g, rows):
    out = fn()
    (out * g * rows).sum().backward()
    grads = [(out * rows).detach()] + [x.grad.clone() for x in (q, k, v, kb) if x.grad is not None]
    for x in (q, k, v, kb):
        x.grad = None
    return grads


@pytest.mark.parametrize("softcap", [0.0, 10.0, 50.0])
@pytest.mark.parametrize("mode", ["embed", "train"])
@pytest.mark.parametrize("num_aux", [None, 1])
def test_blocked_attention_gradients_equal_dense(softcap, mode, num_aux):
    from transcriptformer.model.attention import blocked_attention, dense_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, dk = 2, 3, 45, 8
    q, k, v = (torch.randn(B, H, T, dk, generator=g).requires_grad_(True) for _ in range(3))
    kb = (torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 0] = False  # an unknown auxiliary token
    valid[1, 30:] = False  # padding
    rows = torch.ones(B, 1, T, 1)
    rows[1, :, 30:] = 0  # padding rows are never read (the num_aux fast path computes them unmasked)
    up = torch.randn(B, H, T, dk, generator=g)
    args = (q, k, v, kb, valid, softcap)
    dense = _grads(lambda: dense_attention(*args, mode=mode), q, k, v, kb, up, rows)
    blocked = _grads(
        lambda: blocked_attention(*args, mode=mode, num_aux=num_aux, max_scores=300), q, k, v, kb, up, rows
    )
    for a, b in zip(dense, blocked, strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_capped_cross_entropy_equals_autograd():
    from transcriptformer.model.network import _CappedCrossEntropy

    g = torch.Generator().manual_seed(0)
    for cap in (10.0, 50.0):
        z = (torch.randn(2, 5, 300, generator=g, dtype=torch.float64) * 8).requires_grad_(True)
        target = torch.randint(0, 300, (2, 5), generator=g)
        up = torch.randn(2, 5, generator=g, dtype=torch.float64)
        y = cap * torch.tanh(z / cap)
        ref = torch.logsumexp(y, -1) - y.gather(-1, target[..., None]).squeeze(-1)
        (ref * up).sum().backward()
        expected, z.grad = z.grad.clone(), None
        out = _CappedCrossEntropy.apply(z, target, cap)
        (out * up).sum().backward()
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-5)
        assert (z.grad - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_gene_cross_entropy_sum_equals_autograd(tiny_model, frozen_head):
    import copy

    from transcriptformer.model import network

    net = copy.deepcopy(tiny_model.model).train()
    head = net.gene_id_head
    head.requires_grad_(not frozen_head)
    head.layers[3].p = 0.0  # the dropout before the last layer: both passes must see the same function
    g = torch.Generator().manual_seed(1)
    V = head.layers[-1].out_features
    hidden = torch.randn(3, 300, head.layers[0].in_features, generator=g).requires_grad_(True)
    targets = torch.randint(5, V, (3, 300), generator=g)
    targets[1, 200:] = net.pad_idx  # padding: no target (and more than one chunk of rows)
    calls = []
    apply = network._CappedCrossEntropySum.apply
    network._CappedCrossEntropySum.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        fused = net.gene_nll_sum(hidden, targets)
    finally:
        network._CappedCrossEntropySum.apply = apply
    assert calls, "the fused path was not taken"
    (fused * 0.3).backward()
    got = [hidden.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    # reference: float64 autograd through the published function
    ref_net = copy.deepcopy(net).double()
    ref_net.zero_grad(set_to_none=True)
    h64 = hidden.detach().double().requires_grad_(True)
    with torch.autocast("cpu", enabled=False):
        expected = ref_net.gene_nll(h64, targets).sum()
    (expected * 0.3).backward()
    want = [h64.grad] + [p.grad for p in ref_net.gene_id_head.parameters() if p.requires_grad]
    assert len(got) == len(want) == (1 if frozen_head else 7)
    assert abs(float(fused.detach()) - float(expected.detach())) <= 1e-6 * abs(float(expected.detach()))
    for a, b in zip(got, want, strict=True):
        assert (a.double() - b).abs().max() <= 1e-6 * b.abs().max()


def test_training_on_the_cpu_uses_the_blocked_kernel():
    from transcriptformer.model.attention import BlockedAttention, DenseAttention
    from transcriptformer.training.fit import _train_kernel

    assert isinstance(_train_kernel(CPU, "auto"), BlockedAttention)
    assert isinstance(_train_kernel(CPU, "dense"), DenseAttention)


def test_training_gradients_of_the_network_equal_the_dense_path(tiny_model):
    import copy

    from transcriptformer.model.attention import BlockedAttention, DenseAttention

    net = copy.deepcopy(tiny_model.model).eval()  # no dropout: both passes see the same function
    for p in net.parameters():
        p.requires_grad_(True)
    net.gene_embeddings.embedding.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    V = net.gene_embeddings.embedding.num_embeddings
    tokens = torch.randint(5, V, (3, 40), generator=g)
    tokens[2, 25:] = net.pad_idx
    counts = torch.randint(1, 6, (3, 40), generator=g).float().masked_fill(tokens == net.pad_idx, 0.0)
    aux = torch.zeros(3, net.num_aux, dtype=torch.long)

    def grads(kernel):
        count, gene, n = net(tokens, counts, aux, full_length=False, kernel=kernel)
        (count / n + gene / 100).backward()
        out = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        return out

    dense, blocked = grads(DenseAttention()), grads(BlockedAttention(max_scores=500))
    scale = max(x.abs().max() for x in dense.values())
    for name, x in dense.items():  # relative to the largest gradient (some are 0 up to round-off)
        assert (x - blocked[name]).abs().max() <= 1e-6 * scale, name


def test_head_threads_give_the_same_result(monkeypatch):
    from transcriptformer.model import attention

    monkeypatch.setattr(attention, "_MIN_PARALLEL_SCORES", 0)  # split even this small call
    real = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    try:
        _check_head_threads()
    finally:
        torch.set_num_threads(real)  # the kernel restores the (pretended) 3


def _check_head_threads():
    from transcriptformer.model.attention import HeadThreads, blocked_attention, chunked_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 8, generator=g) for _ in range(3))
    bias, valid = torch.rand(2, 70, generator=g), torch.ones(2, 70, dtype=torch.bool)
    valid[1, 0] = False
    threads = HeadThreads()
    with torch.inference_mode():  # the worker threads must run under the caller's inference mode
        a = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1, max_scores=300)
        b = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1, max_scores=300, threads=threads)
    assert torch.equal(a, b)
    x = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = blocked_attention(*x, bias, valid, 10.0, mode="train", num_aux=1, max_scores=300, threads=threads)
    out.square().sum().backward()
    y = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = blocked_attention(*y, bias, valid, 10.0, mode="train", num_aux=1, max_scores=300)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(x, y, strict=True))
