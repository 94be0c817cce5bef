"""The network, its attention, config parsing, vocabularies and checkpoint loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from transcriptformer.config import ModelConfig, TranscriptFormerConfig
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.inference.engine import Engine
from transcriptformer.model import chunked_attention, dense_attention


def _inputs(B=3, H=2, T=150, dk=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, dk, generator=g) for _ in range(3))
    bias = torch.log1p(torch.rand(B, T, generator=g) * 30)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 0] = False  # an unknown aux token: the first query row has no key at all
    valid[1, 90:] = False  # padding
    return q, k, v, bias, valid


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


def test_attention_reduced_precision_close_to_fp32():
    q, k, v, bias, valid = _inputs()
    ref = dense_attention(q, k, v, bias, valid, 10.0)
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, valid, 10.0).float()
    assert (out - ref).abs().max() < 5e-2


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


# -- heads run only when asked ---------------------------------------------------------------


def test_heads_run_only_when_requested(tiny_model, tiny_adata, monkeypatch):
    calls = {"mu": 0, "gene": 0, "widths": []}
    model = tiny_model.model
    h1 = model.mu.register_forward_hook(lambda *a: calls.__setitem__("mu", calls["mu"] + 1))
    h2 = model.gene_id_head.register_forward_hook(lambda *a: calls.__setitem__("gene", calls["gene"] + 1))
    original = type(model).encode

    def spy(self, tokens, *args, **kwargs):
        calls["widths"].append(tokens.shape[1])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(model), "encode", spy)
    src = prepare_cells(tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions())
    try:
        eng = Engine(tiny_model, batch_size=4)
        eng.run(src, ("embeddings",))
        assert calls["mu"] == 0 and calls["gene"] == 0
        widths = list(calls["widths"])
        eng.run(src, ("embeddings", "llh"))
        assert calls["mu"] > 0 and calls["gene"] == 0
        eng.run(src, ("gene_llh",))
        assert calls["gene"] > 0
    finally:
        h1.remove()
        h2.remove()
    # batches are trimmed to their longest cell (+1 slot for the position after the last gene)
    w = src.read(0, 21)
    plan = eng.plan_batches(w.lengths)
    assert widths == [min(int(w.lengths[b].max()) + 1, 63) for b in plan]


# -- config ----------------------------------------------------------------------------------


def test_config_tolerates_nulls_missing_and_targets(tiny_path):
    raw = json.loads((tiny_path / "config.json").read_text())
    cfg = TranscriptFormerConfig.from_dict(raw)
    assert cfg.model.embed_dim == 32 and cfg.model.seq_len == 63 and cfg.model.softcap == 10.0
    assert cfg.data.aux_cols == ("assay",)
    assert cfg.data.esm2_mappings == ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")
    # nulls and missing keys fall back to the documented defaults
    raw["model"]["model_config"]["softcap"] = None
    del raw["model"]["model_config"]["activation"]
    del raw["model"]["loss_config"]
    cfg = TranscriptFormerConfig.from_dict(raw)
    assert cfg.model.softcap == ModelConfig().softcap
    assert cfg.model.activation == "gelu"
    assert cfg.loss.softplus_approx is True and cfg.loss.has_gene_head
    raw["model"]["data_config"]["aux_cols"] = None
    assert TranscriptFormerConfig.from_dict(raw).data.aux_cols == ()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("mu_link_fn", "poisson", "mu_link_fn='poisson' is not supported"),
        ("activation", "swish", "activation='swish' is not supported"),
        ("num_heads", 5, "not divisible"),
        ("embed_dim", "wide", "embed_dim"),
    ],
)
def test_config_rejects_what_it_cannot_honour(tiny_path, key, value, match):
    raw = json.loads((tiny_path / "config.json").read_text())
    raw["model"]["model_config"][key] = value
    with pytest.raises(ValueError, match=match):
        TranscriptFormerConfig.from_dict(raw)


def test_config_overrides(tiny_path):
    cfg = TranscriptFormerConfig.from_json(tiny_path / "config.json")
    new = cfg.with_overrides({"model.model_config.softcap": 0, "loss_config.softplus_approx": "false"})
    assert new.model.softcap == 0.0 and new.loss.softplus_approx is False
    with pytest.raises(ValueError, match="no key"):
        cfg.with_overrides({"model_config.nope": 1})


@pytest.mark.parametrize("link", ["exp", "softplus", "sigmoid"])
def test_other_link_functions_run(tiny_path, tiny_adata, tmp_path, link):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model"]["model_config"]["mu_link_fn"] = link
    (ckpt / "config.json").write_text(json.dumps(raw))
    out = tfs.tl.embed(tiny_adata, model=ckpt, llh=True, copy=True)
    assert np.isfinite(out.obs["transcriptformer_llh"]).all()


# -- vocabularies and checkpoints -----------------------------------------------------------


def test_vocab_follows_esm2_mappings_order_not_the_folder(tiny_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model"]["data_config"]["esm2_mappings"] = ["mus_musculus_gene.h5", "homo_sapiens_gene.h5"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    m = transcriptformer.load_model(ckpt)
    assert m.vocab.genes[0].startswith("ENSMUSG")
    assert m.vocab.index[m.vocab.genes[0]] == 7
    assert len(m.vocab) == 364


def test_first_occurrence_wins_and_special_tokens_first(tiny_model):
    import h5py

    with h5py.File(tiny_model.path / "vocabs" / "mus_musculus_gene.h5") as f:
        mouse = [k.decode() for k in f["keys"][:]]
    dups = [g for g in mouse if g.startswith("ENSG")]
    assert len(dups) == 3
    human_count = 240
    for g in dups:
        assert tiny_model.vocab.index[g] < 7 + human_count
    assert list(tiny_model.vocab.special_tokens) == ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
    assert tiny_model.aux_vocabs[0].labels["Smart-seq2"] == 4  # indices come from the values


def test_cache_reloads_when_files_change(tiny_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    a = transcriptformer.load_model(ckpt)
    assert transcriptformer.load_model(ckpt) is a
    st = os.stat(ckpt / "model_weights.pt")
    os.utime(ckpt / "model_weights.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert transcriptformer.load_model(ckpt) is not a


def test_state_dict_keys_are_the_published_ones(tiny_model):
    from helpers import DATA

    shapes = json.loads((DATA / "state_dict_shapes.json").read_text())
    own = {k: list(v.shape) for k, v in tiny_model.model.state_dict().items()}
    assert own == shapes


def test_weights_load_with_weights_only(tiny_path, monkeypatch):
    seen = {}
    original = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    transcriptformer.weights.checkpoint.build_model(tiny_path)
    assert seen.get("weights_only") is True


def test_load_model_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a known model"):
        transcriptformer.load_model("tf-nonexistent")


def test_fast_path_masks_unknown_aux_keys():
    q, k, v, bias, valid = _inputs()
    out = chunked_attention(q, k, v, bias, valid, 10.0, num_aux=1)
    v2 = v.clone()
    v2[0, :, 0] += 100.0  # cell 0's aux key is invalid: no query may read it
    v2[2, :, 0] += 100.0  # cell 2's aux key is valid: every query reads it
    out2 = chunked_attention(q, k, v2, bias, valid, 10.0, num_aux=1)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[2] - out[2]).abs().amin() > 0
