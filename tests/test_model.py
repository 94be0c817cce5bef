"""The network (model/): attention kernels, masks, precision, memory, link functions, state_dict names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import transcriptformer.scanpy as tfs
from helpers import DATA
from transcriptformer.model import chunked_attention, dense_attention


def _inputs(B=3, H=2, T=150, dk=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, dk, generator=g) for _ in range(3))
    bias = torch.log1p(torch.rand(B, T, generator=g) * 30)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 0] = False  # an unknown aux token: the first query row has no key at all
    valid[1, 90:] = False  # padding
    return q, k, v, bias, valid


# --- attention kernels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [10.0, 0.0, 2.5])
@pytest.mark.parametrize("max_scores", [1 << 23, 16 * 6 * 150, 1])
@pytest.mark.parametrize("num_aux", [None, 1])
def test_chunked_attention_equals_dense(softcap, max_scores, num_aux):
    q, k, v, bias, valid = _inputs()
    ref = dense_attention(q, k, v, bias, valid, softcap)
    out = chunked_attention(q, k, v, bias, valid, softcap, num_aux=num_aux, max_scores=max_scores)
    assert torch.isfinite(out).all()
    assert torch.all(out[0, :, 0] == 0)  # fully masked query row: zeros, not NaN
    if num_aux is None:  # every row exact
        torch.testing.assert_close(out, ref, atol=3e-6, rtol=1e-5)
    else:  # rows inside each sequence's valid prefix exact (cell 1 is padding from position 90)
        torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], atol=3e-6, rtol=1e-5)
        torch.testing.assert_close(out[1, :, :90], ref[1, :, :90], atol=3e-6, rtol=1e-5)


def test_attention_masks_are_honoured():
    q, k, v, bias, valid = _inputs()
    out = chunked_attention(q, k, v, bias, valid, 10.0)
    # changing a key after the query (causal) or an invalid key must not change the output
    v2 = v.clone()
    v2[1, :, 95] += 100.0  # invalid key
    v2[2, :, 140] += 100.0  # valid key, but only queries >= 140 see it
    out2 = chunked_attention(q, k, v2, bias, valid, 10.0)
    torch.testing.assert_close(out2[1], out[1])
    torch.testing.assert_close(out2[2, :, :140], out[2, :, :140])
    assert not torch.allclose(out2[2, :, 140:], out[2, :, 140:])


def test_fast_path_masks_unknown_aux_keys():
    q, k, v, bias, valid = _inputs()
    out = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1)
    v2 = v.clone()
    v2[0, :, 0] += 100.0  # cell 0's aux key is invalid: no query may read it
    v2[2, :, 0] += 100.0  # cell 2's aux key is valid: every query reads it
    out2 = chunked_attention(q, k, v2, bias, valid, 10.0, num_aux=1)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[2] - out[2]).abs().amin() > 0


def test_attention_reduced_precision_close_to_fp32():
    q, k, v, bias, valid = _inputs()
    ref = dense_attention(q, k, v, bias, valid, 10.0)
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, valid, 10.0).float()
    assert (out - ref).abs().max() < 5e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_attention_is_finite_and_close(dtype):
    """Soft-capped weights reach e^20: float16 needs them relative to the row maximum (no inf, no NaN)."""
    from transcriptformer.model import chunked_attention, dense_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(3, 2, 150, 16, generator=g) for _ in range(3))
    bias = torch.log1p(torch.rand(3, 150, generator=g) * 30)
    valid = torch.ones(3, 150, dtype=torch.bool)
    valid[0, 0] = False
    ref = dense_attention(q, k, v, bias, valid, 10.0)
    out = chunked_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias, valid, 10.0, num_aux=1).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < (2e-2 if dtype == torch.float16 else 1e-1)


@pytest.mark.slow
def test_memory_stays_bounded_for_full_length_sequences():
    """One batch at seq_len 2047: peak RSS growth far below the full score matrix.

    B=4 cells x H=8 heads x T=2048^2 scores is 537 MB per float32 copy; the dense reference holds
    several such copies. The chunked kernel holds at most 2^23 scores (32 MiB) plus masks and
    activations (4 x 2048 x 64 floats = 2 MiB each), so 200 MB leaves room for allocator slack
    while staying below even one copy of the full matrix.
    """
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from transcriptformer.config import ModelConfig
        from transcriptformer.model import ChunkedAttention, DenseAttention, TranscriptFormer
        torch.manual_seed(0)
        torch.set_num_threads(2)
        cfg = ModelConfig(embed_dim=64, model_dim=128, num_layers=1, num_heads=8, seq_len=2047)
        m = TranscriptFormer(cfg, vocab_size=3000, esm_dim=16, aux_vocab_sizes={"assay": 3}, aux_unknown=[0]).eval()
        def run(B, T, backend):
            tok = torch.randint(7, 3000, (B, T)); cnt = torch.rand(B, T) * 5; aux = torch.ones(B, 1, dtype=torch.long)
            with torch.inference_mode():
                h = m.encode(tok, cnt, aux, kernel=backend()).hidden
            return h
        backend = {"chunked": ChunkedAttention, "dense": DenseAttention}[sys.argv[1]]
        run(1, 64, backend)  # warm up: libraries, allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(4, 2047, backend)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )

    def peak(backend):
        out = subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    chunked = peak("chunked")
    assert chunked < 200, f"chunked attention grew RSS by {chunked:.0f} MB"
    dense = peak("dense")
    assert dense > 500, f"the dense reference should materialise the scores (grew {dense:.0f} MB)"


# --- the network ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["exp", "softplus", "sigmoid"])
def test_other_link_functions_run(tiny_path, tiny_adata, tmp_path, link):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model"]["model_config"]["mu_link_fn"] = link
    (ckpt / "config.json").write_text(json.dumps(raw))
    out = tfs.tl.embed(tiny_adata, model=ckpt, llh=True, copy=True)
    assert np.isfinite(out.obs["transcriptformer_llh"]).all()


def test_state_dict_keys_are_the_published_ones(tiny_model):

    shapes = json.loads((DATA / "state_dict_shapes.json").read_text())
    own = {k: list(v.shape) for k, v in tiny_model.model.state_dict().items()}
    assert own == shapes
