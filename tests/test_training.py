"""Training (training/objective.py, fit.py): the objective against the published model, fine-tuning and training
runs (options, output folder, resume, divergence, records), new models, determinism, DDP.

The published references (tests/data/reference_train, from scripts/make_reference.py) are the published
0.6.1 model's own training-mode forward and loss modules (eval mode: no dropout, fp32, CPU) on the parity
fixture and on three datasets it was run on for this project only.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import DATA, adapter_weights
from transcriptformer.training.objective import batch_loss, cell_losses
from transcriptformer.weights.checkpoint import new_model, save_checkpoint

peft = pytest.importorskip("peft")


SETS = {  # name -> (input, options the published run used)
    "tiny_human": (None, {}),
    "unseen_mixed": ("unseen_mixed.h5ad", {}),
    "unseen_norm": ("unseen_norm.h5ad", {"normalize_to_scale": 1000}),
    "unseen_raw_clip100": ("unseen_raw_clip100.h5ad", {"clip_counts": 100}),
}


def _set(name):
    file, options = SETS[name]
    adata = tfs.datasets.tiny_human() if file is None else ad.read_h5ad(DATA / "reference_train" / file)
    with np.load(DATA / "reference_train" / f"{name}.npz") as z:
        ref = {k: z[k] for k in z.files}
    return adata, options, ref


# --- the objective --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SETS))
def test_cell_losses_equal_the_published_training_objective(tiny_model, name):
    adata, options, ref = _set(name)
    df = cell_losses(adata, tiny_model, **options)
    assert list(df.index) == list(adata.obs_names) and list(df.columns) == ["count_nll", "gene_nll", "n_genes"]
    np.testing.assert_array_equal(df["n_genes"], ref["n_genes"])
    np.testing.assert_allclose(df["count_nll"], ref["train_count_nll_cell"], rtol=1e-5)
    np.testing.assert_allclose(df["gene_nll"], ref["train_gene_ce_cell"], rtol=1e-5)
    # the training objective differs from the inference likelihood (the count bias of a position's own key)
    assert np.abs(df["count_nll"].to_numpy() - ref["cell_llh_inference_path"]).max() > 1e-3


def test_cell_losses_of_an_h5ad_path(tiny_model, tiny_adata, tmp_path):
    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    pd.testing.assert_frame_equal(cell_losses(path, tiny_model), cell_losses(tiny_adata, tiny_model))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cell_losses(tmp_path / "missing.h5ad", tiny_model)
    with pytest.raises(TypeError, match="AnnData or the path of an h5ad file, got list"):
        cell_losses([tiny_adata], tiny_model)


def _forward(model, ref, rows, clip):
    tok = torch.from_numpy(ref["gene_token_indices"][rows])
    cnt = torch.from_numpy(ref["gene_counts"][rows])
    aux = torch.from_numpy(ref["aux_token_indices"][rows])
    return model(tok, cnt, aux, full_length=True, clip_counts=clip), len(rows)


@pytest.mark.parametrize("name", ["tiny_human", "unseen_mixed", "unseen_raw_clip100"])
def test_batch_loss_and_gradients_equal_the_published_ones(tiny_model, name):
    _, options, ref = _set(name)
    clip = options.get("clip_counts", 30)
    S = tiny_model.seq_len
    net = copy.deepcopy(tiny_model.model)
    with torch.no_grad():  # per batch of 8 consecutive cells, as the published training step reduces
        for b, start in enumerate(range(0, len(ref["n_genes"]), 8)):
            (c, g, n), B = _forward(net, ref, np.arange(start, min(start + 8, len(ref["n_genes"]))), clip)
            np.testing.assert_allclose(float(batch_loss(c, g, n, B, S, 1.0)), ref["batch8_total_loss"][b], rtol=1e-6)
            np.testing.assert_allclose(float(c / n), ref["batch8_count_loss"][b], rtol=1e-6)
    net.requires_grad_(True)
    net.gene_embeddings.embedding.weight.requires_grad_(False)
    (c, g, n), B = _forward(net, ref, np.arange(len(ref["n_genes"])), clip)
    loss = batch_loss(c, g, n, B, S, 1.0)
    np.testing.assert_allclose(float(loss.detach()), ref["full_total_loss"], rtol=1e-6)
    loss.backward()
    with np.load(DATA / "reference_train" / f"{name}_grads.npz") as z:
        grads = {k: z[k] for k in z.files}
    params = dict(net.named_parameters())
    assert set(grads) == {k for k, p in params.items() if p.requires_grad}
    scale = max(np.abs(g).max() for g in grads.values())
    for key, expected in grads.items():  # float32 round-off relative to the largest gradient
        np.testing.assert_allclose(params[key].grad.numpy(), expected, atol=1e-5 * scale, rtol=0, err_msg=key)


# --- fine-tuning runs -----------------------------------------------------------------------------------------------


def test_bad_finetune_options(tiny_path, tiny_adata, tmp_path):
    with pytest.raises(ValueError, match="target module 'nope' selects no linear layer"):
        transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "a", target_modules=["nope"])
    with pytest.raises(ValueError, match="lora_r"):
        transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "b", lora_r=0)
    with pytest.raises(ValueError, match="epochs"):
        transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "c", epochs=0)
    for bad, match in [
        ({"lora_alpha": -1.0}, "lora_alpha must be a finite number > 0"),
        ({"min_lr_ratio": 3.0}, "min_lr_ratio must be between 0 and 1"),
        ({"warmup_ratio": 5.0}, "warmup_ratio must be between 0 and 1"),
        ({"seed": 2**64}, "seed must be an integer from 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "d", **bad)
        assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "full")


@pytest.mark.slow
def test_finetune_is_deterministic_and_resumes_exactly(tiny_path, tmp_path, monkeypatch):
    a = tfs.tl.embed(tfs.datasets.tiny_human(), model=tiny_path, copy=True)  # any AnnData of counts
    kwargs = {"epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "progress": False, "lora_dropout": 0.1}
    transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "one", **kwargs)
    transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "two", **kwargs)
    w1, w2 = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the same seed: the same adapter, bit for bit
    other = transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "seed", seed=1, **kwargs)
    assert not all(torch.equal(w1[k], adapter_weights(other)[k]) for k in w1)
    # an interrupted run (killed while saving epoch 2) resumed gives the uninterrupted run's adapter
    from transcriptformer.training import lora

    real_save = lora.save_adapter

    def crash_on_epoch_2(wrapped, folder, **kw):
        if folder.name == "epoch-2":
            raise KeyboardInterrupt("killed")
        return real_save(wrapped, folder, **kw)

    monkeypatch.setattr(lora, "save_adapter", crash_on_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(lora, "save_adapter", real_save)
    with pytest.raises(FileExistsError, match="resume=True"):
        transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "resumed", **kwargs)
    transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "resumed", resume=True, **kwargs)
    w3 = adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    with pytest.raises(ValueError, match="other options"):
        transcriptformer.finetune(
            a, tiny_path, output_dir=tmp_path / "resumed", resume=True, **{**kwargs, "learning_rate": 1e-3}
        )


# --- new models -----------------------------------------------------------------------------------------------------


def test_new_model_trains_saves_and_loads_in_the_published_layout(tiny_path, tmp_path):
    tables = [tiny_path / "vocabs" / f for f in ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")]
    model = new_model(
        tables, assay_vocab=["10x 3' v2", "10x 3' v3"], embed_dim=16, num_layers=1, num_heads=2, seq_len=63, seed=0
    )
    assert model.path is None and len(model.vocab) == 364
    assert list(model.vocab.special_tokens) == ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
    a = tfs.datasets.tiny_human()
    before = cell_losses(a, model)
    out = transcriptformer.train(
        a,
        model,
        validation=a,
        output_dir=tmp_path / "run",
        epochs=3,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        progress=False,
    )
    for name in ("config.json", "model_weights.pt", "vocabs/assay_vocab.json", "vocabs/homo_sapiens_gene.h5"):
        assert (out / name).is_file()
    loaded = transcriptformer.load_model(out)
    state = torch.load(out / "model_weights.pt", weights_only=True)
    assert set(state) == set(model.model.state_dict())  # the published key names
    assert all(v.dtype == torch.float32 for v in state.values())
    config = json.loads((out / "config.json").read_text())["model"]
    for key in ("embed_dim", "model_dim", "num_layers", "num_heads", "seq_len", "softcap", "mu_link_fn", "block_len"):
        assert key in config["model_config"]
    assert config["data_config"]["aux_cols"] == "assay" and config["loss_config"]["gene_id_loss_weight"] == 1.0
    assert list(loaded.vocab.names()) == list(model.vocab.names())
    after = cell_losses(a, loaded)
    assert after["count_nll"].mean() < before["count_nll"].mean()  # it learned something of its training data
    history = json.loads((out / "training.json").read_text())["history"]
    assert history[-1]["validation"]["count_nll"] == pytest.approx(after["count_nll"].mean(), rel=1e-5)
    tfs.tl.embed(a, model=out)
    assert np.isfinite(a.obsm["X_transcriptformer"]).all()
    # saving again is a no-op round trip
    again = save_checkpoint(loaded, tmp_path / "again")
    torch.testing.assert_close(torch.load(again / "model_weights.pt", weights_only=True), state)


# --- several processes ----------------------------------------------------------------------------------------------


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import anndata as ad
    import torch.distributed as dist
    import transcriptformer, transcriptformer.scanpy as tfs
    dist.init_process_group("gloo")
    transcriptformer.finetune(ad.read_h5ad(sys.argv[1]), tfs.models.path("tf-tiny"), output_dir=sys.argv[2],
                              epochs=2, learning_rate=1e-2, batch_size=4, accumulate=1, progress=False)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(tiny_path, tiny_adata, tmp_path):
    """torchrun with 2 gloo processes x 1 micro-batch of <= 4 cells = 1 process x 2 micro-batches per step."""
    tiny_adata.write_h5ad(tmp_path / "train.h5ad")
    (tmp_path / "job.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "job.py"), str(tmp_path / "train.h5ad"), str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "one", epochs=2, learning_rate=1e-2,
                              batch_size=4, accumulate=2, progress=False)  # fmt: skip
    ddp = json.loads((tmp_path / "ddp" / "training.json").read_text())
    one = json.loads((tmp_path / "one" / "training.json").read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    curve = [loss for h in ddp["history"] for loss in h.get("step_losses", [])]
    reference = [loss for h in one["history"] for loss in h.get("step_losses", [])]
    assert len(curve) == len(reference) >= 4
    np.testing.assert_allclose(curve, reference, rtol=1e-5)
    w_ddp, w_one = adapter_weights(tmp_path / "ddp"), adapter_weights(tmp_path / "one")
    for key in w_one:
        torch.testing.assert_close(w_ddp[key], w_one[key], atol=1e-5, rtol=1e-4)
