"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transcriptformer.scanpy as tfs
from helpers import flex_unavailable
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.inference.engine import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("attention", ["chunked", "dense", "flex", "flex-dynamic"])
def test_cuda_fp32_matches_published_outputs(tiny_model, tiny_adata, reference, attention):
    if attention.startswith("flex"):  # skip only if the kernel itself cannot compile for these heads here
        why = flex_unavailable(attention, "cuda", tiny_model)
        if why is not None:
            pytest.skip(f"{attention} cannot compile here for the tiny model's heads ({why})")
    src = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    eng = Engine(tiny_model, device="cuda", precision="32", attention=attention, batch_size=8)
    res = eng.run(src, ("embeddings", "llh", "gene_llh", "cge"))
    assert res.stats["attention"] == attention, (
        f"the engine fell back to {res.stats['attention']} although {attention} compiles here: "
        f"{res.stats.get('attention_fallback')}"
    )
    np.testing.assert_allclose(res.embeddings, reference["cell"].obsm["embeddings"], atol=1e-5)
    np.testing.assert_allclose(res.llh, reference["llh"].obsm["llh"].ravel(), atol=1e-5)
    np.testing.assert_allclose(res.gene_llh, reference["gene_llh"].obsm["gene_llh"], atol=1e-5)
    np.testing.assert_allclose(res.genes["cge"], reference["cge"].uns["cge_embeddings"], atol=2e-5)


def test_cuda_auto_is_bf16_and_close(tiny_path, tiny_adata, reference):
    out = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, copy=True)
    params = out.uns["transcriptformer"]["params"]
    assert params["device"].startswith("cuda") and params["precision"] == "bf16"
    emb, ref = out.obsm["X_transcriptformer"], reference["cell"].obsm["embeddings"]
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999, cos.min()
    llh = out.obs["transcriptformer_llh"].to_numpy()
    np.testing.assert_allclose(llh, reference["llh"].obsm["llh"].ravel(), rtol=2e-2)


def test_cuda_real_out_of_memory_is_retried(tiny_model, tiny_adata, reference, monkeypatch):
    """A real CUDA OOM: cap this process's GPU memory so that the first (big) batch cannot fit."""
    from transcriptformer.model import TranscriptFormer

    original = TranscriptFormer.encode
    calls = {"n": 0}

    def greedy(self, tokens, *args, **kwargs):
        calls["n"] += 1
        if tokens.shape[0] > 2:  # a batch bigger than two cells asks for far more memory than exists
            torch.empty(1 << 50, dtype=torch.uint8, device=tokens.device)
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(TranscriptFormer, "encode", greedy)
    src = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    eng = Engine(tiny_model, device="cuda", precision="32", attention="chunked", batch_size=16)
    res = eng.run(src, ("embeddings",))
    assert res.stats["oom_retries"] > 0
    np.testing.assert_allclose(res.embeddings, reference["cell"].obsm["embeddings"], atol=1e-5)


def _random_batch(device, B=6, S=255, V=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([S, 200, 120, 37, 1, 0][:B])
    tokens = torch.randint(7, V, (B, S), generator=g)
    tokens[torch.arange(S)[None, :] >= lengths[:, None]] = 1  # [PAD]
    counts = torch.where(tokens == 1, 0.0, torch.randint(1, 40, (B, S), generator=g).float().clamp(max=30))
    aux = torch.tensor([[0], [1], [2], [0], [1], [2]][:B])  # 0 = unknown assay
    return tokens.to(device), counts.to(device), aux.to(device), lengths


@pytest.mark.parametrize("attention", ["flex", "flex-dynamic"])
def test_cuda_flex_fp32_equals_dense(attention):
    """The tiny checkpoint's heads are too narrow for flex (dk=8 < 16): check flex on a dk=16 model instead."""
    from transcriptformer.config import ModelConfig
    from transcriptformer.model import DenseAttention, FlexAttention, TranscriptFormer

    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=64, model_dim=128, num_layers=2, num_heads=4, seq_len=255)
    model = TranscriptFormer(cfg, vocab_size=500, esm_dim=16, aux_vocab_sizes={"assay": 3}, aux_unknown=[0])
    model = model.cuda().eval()
    tokens, counts, aux, lengths = _random_batch("cuda")
    with torch.inference_mode():
        ref = model.encode(tokens, counts, aux, kernel=DenseAttention()).hidden
        out = model.encode(tokens, counts, aux, kernel=FlexAttention(dynamic=attention == "flex-dynamic")).hidden
        emb_ref, emb = model.cell_embedding(ref, tokens), model.cell_embedding(out, tokens)
    read = torch.arange(255)[None, :] <= lengths[:, None]
    torch.testing.assert_close(out[read.cuda()], ref[read.cuda()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, emb_ref, atol=1e-5, rtol=1e-5)


def test_cuda_fused_layers_equal_eager(tiny_model, tiny_adata, reference):
    src = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    res = Engine(tiny_model, device="cuda", precision="32", attention="chunked", fuse=True).run(
        src, ("embeddings", "llh")
    )
    np.testing.assert_allclose(res.embeddings, reference["cell"].obsm["embeddings"], atol=1e-5)
    np.testing.assert_allclose(res.llh, reference["llh"].obsm["llh"].ravel(), atol=1e-5)
