"""Training: the objective against the published model, LoRA fine-tuning, new models, resume, determinism, DDP.

The published references (tests/data/reference_train, from scripts/make_reference.py) are the published
0.6.1 model's own training-mode forward and loss modules (eval mode: no dropout, fp32, CPU) on the parity
fixture and on three datasets it was run on for this project only.
"""

from __future__ import annotations

import copy
import json
import shutil
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
from helpers import DATA
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


@pytest.mark.parametrize("name", list(SETS))
def test_cell_losses_equal_the_published_training_objective(tiny_model, name):
    adata, options, ref = _set(name)
    df = cell_losses(tiny_model, adata, **options)
    assert list(df.index) == list(adata.obs_names) and list(df.columns) == ["count_nll", "gene_nll", "n_genes"]
    np.testing.assert_array_equal(df["n_genes"], ref["n_genes"])
    np.testing.assert_allclose(df["count_nll"], ref["train_count_nll_cell"], rtol=1e-5)
    np.testing.assert_allclose(df["gene_nll"], ref["train_gene_ce_cell"], rtol=1e-5)
    # the training objective differs from the inference likelihood (the count bias of a position's own key)
    assert np.abs(df["count_nll"].to_numpy() - ref["cell_llh_inference_path"]).max() > 1e-3


def test_cell_losses_of_an_h5ad_path(tiny_model, tiny_adata, tmp_path):
    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    pd.testing.assert_frame_equal(cell_losses(tiny_model, path), cell_losses(tiny_model, tiny_adata))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cell_losses(tiny_model, tmp_path / "missing.h5ad")
    with pytest.raises(TypeError, match="AnnData or the path of an h5ad file, got list"):
        cell_losses(tiny_model, [tiny_adata])


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


# -- LoRA ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_path):
    a = tfs.datasets.tiny_human()
    out = tmp_path_factory.mktemp("lora") / "adapter"
    transcriptformer.finetune(
        a[:15], tiny_path, validation=a[15:], output_dir=out, epochs=2, learning_rate=1e-2, progress=False
    )
    return out


def test_adapter_files_in_peft_format(adapter, tiny_model):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    targets = sorted(config["target_modules"])
    assert len(targets) == 12  # linear1, linear2 and the four attention projections of both layers
    assert all(t.endswith(("linear1", "linear2")) or ".self_attn.linears." in t for t in targets)
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in weights)
    info = json.loads((adapter / "transcriptformer_adapter.json").read_text())
    assert info["base_weights_sha256"] == tiny_model.weights_sha256
    assert info["adapter_parameters"] == 3584 and info["adapter_parameters"] < info["base_parameters"]
    assert info["adapter_bytes"] < (tiny_model.path / "model_weights.pt").stat().st_size
    history = json.loads((adapter / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and all("validation" in h for h in history)
    assert (adapter / "epochs" / "epoch-1" / "adapter_model.safetensors").is_file()


def test_adapter_loads_merged_unmerged_and_through_peft(adapter, tiny_path, tiny_model, tiny_adata, reference):
    merged = transcriptformer.load_model(tiny_path, adapter=adapter)
    plain = transcriptformer.load_model((tiny_path, adapter), merge_adapter=False)
    a = tfs.tl.embed(tiny_adata, model=merged, llh=True, copy=True)
    b = tfs.tl.embed(tiny_adata, model=(tiny_path, adapter), llh=True, copy=True)  # the tuple form, merged
    c = tfs.tl.embed(tiny_adata, model=plain, llh=True, copy=True)
    np.testing.assert_allclose(a.obsm["X_transcriptformer"], b.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_allclose(a.obsm["X_transcriptformer"], c.obsm["X_transcriptformer"], atol=1e-5)
    np.testing.assert_allclose(a.obs["transcriptformer_llh"], c.obs["transcriptformer_llh"], atol=1e-5)
    ref = reference["cell"].obsm["embeddings"]
    assert np.abs(a.obsm["X_transcriptformer"] - ref).max() > 1e-3  # the adapter changes the model ...
    base = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)  # ... and the cached base is untouched
    np.testing.assert_allclose(base.obsm["X_transcriptformer"], ref, atol=1e-5)
    assert a.uns["transcriptformer"]["params"]["adapter"] == str(adapter)
    # PEFT itself reads the files and gives the same model
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_model.model), str(adapter)).merge_and_unload()
    for key, value in pm.state_dict().items():
        torch.testing.assert_close(value, merged.model.state_dict()[key], atol=1e-6, rtol=0)


def test_adapter_for_other_weights_is_refused(adapter, tiny_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_path, other)
    state = torch.load(other / "model_weights.pt", weights_only=True)
    state["mu.mlp.layers.4.bias"] += 1.0
    torch.save(state, other / "model_weights.pt")
    with pytest.raises(ValueError, match="trained on weights with identity"):
        transcriptformer.load_model(other, adapter=adapter)
    with pytest.raises(FileNotFoundError, match="not a complete LoRA adapter folder"):
        transcriptformer.load_model(tiny_path, adapter=tmp_path)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_finetune_is_deterministic_and_resumes_exactly(tiny_path, tmp_path, monkeypatch):
    a = tfs.tl.embed(tfs.datasets.tiny_human(), model=tiny_path, copy=True)  # any AnnData of counts
    kwargs = {"epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "progress": False, "lora_dropout": 0.1}
    transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "one", **kwargs)
    transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "two", **kwargs)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the same seed: the same adapter, bit for bit
    other = transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "seed", seed=1, **kwargs)
    assert not all(torch.equal(w1[k], _weights(other)[k]) for k in w1)
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
    w3 = _weights(tmp_path / "resumed")
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    with pytest.raises(ValueError, match="other options"):
        transcriptformer.finetune(
            a, tiny_path, output_dir=tmp_path / "resumed", resume=True, **{**kwargs, "learning_rate": 1e-3}
        )


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


# -- new models ------------------------------------------------------------------------------------------


def test_new_model_trains_saves_and_loads_in_the_published_layout(tiny_path, tmp_path):
    tables = [tiny_path / "vocabs" / f for f in ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")]
    model = new_model(
        tables, assay_vocab=["10x 3' v2", "10x 3' v3"], embed_dim=16, num_layers=1, num_heads=2, seq_len=63, seed=0
    )
    assert model.path is None and len(model.vocab) == 364
    assert list(model.vocab.special_tokens) == ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
    a = tfs.datasets.tiny_human()
    before = cell_losses(model, a)
    out = transcriptformer.train(
        model,
        a,
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
    after = cell_losses(loaded, a)
    assert after["count_nll"].mean() < before["count_nll"].mean()  # it learned something of its training data
    history = json.loads((out / "training.json").read_text())["history"]
    assert history[-1]["validation"]["count_nll"] == pytest.approx(after["count_nll"].mean(), rel=1e-5)
    tfs.tl.embed(a, model=out)
    assert np.isfinite(a.obsm["X_transcriptformer"]).all()
    # saving again is a no-op round trip
    again = save_checkpoint(loaded, tmp_path / "again")
    torch.testing.assert_close(torch.load(again / "model_weights.pt", weights_only=True), state)


# -- command line ----------------------------------------------------------------------------------------


def test_cli_finetune_with_the_published_flags_and_inference_with_the_adapter(tiny_path, tiny_adata, tmp_path):
    from transcriptformer.cli import main

    tiny_adata.write_h5ad(tmp_path / "train.h5ad")
    code = main([
        "finetune", "--checkpoint-path", str(tiny_path), "--train-files", str(tmp_path / "train.h5ad"),
        "--lora-r", "4", "--lora-alpha", "16", "--lora-dropout", "0.0",
        "--lora-target-modules", "linear1", "linear2", "linears",
        "--epochs", "1", "--learning-rate", "0.01", "--batch-size", "8", "--seed", "3",
        "--output-dir", str(tmp_path / "adapter"), "--no-progress",
    ])  # fmt: skip
    assert code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    code = main([
        "inference", "--checkpoint-path", str(tiny_path), "--data-file", str(tmp_path / "train.h5ad"),
        "--adapter", str(tmp_path / "adapter"), "--output-path", str(tmp_path / "out"), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    expected = tfs.tl.embed(tiny_adata, model=(tiny_path, tmp_path / "adapter"), copy=True)
    np.testing.assert_allclose(out.obsm["embeddings"], expected.obsm["X_transcriptformer"], atol=1e-6)


def test_cli_train_a_new_model(tiny_path, tiny_adata, tmp_path, capsys):
    from transcriptformer.cli import main

    tiny_adata.write_h5ad(tmp_path / "train.h5ad")
    tables = [str(tiny_path / "vocabs" / f) for f in ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")]
    args = ["train", "--gene-tables", *tables, "--assays", "10x 3' v3", "--embed-dim", "16", "--num-layers", "1",
            "--num-heads", "2", "--seq-len", "63", "--train-files", str(tmp_path / "train.h5ad"),
            "--output-dir", str(tmp_path / "model"), "--no-progress"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0 and not (tmp_path / "model").exists()
    assert main(args) == 0
    assert transcriptformer.load_model(tmp_path / "model").embed_dim == 16
    assert main([*args[:-3], "--output-dir", str(tmp_path / "model"), "--no-progress"]) == 1
    assert "resume" in capsys.readouterr().err
    # the shape flags describe a new model: with --checkpoint-path they are refused, not ignored
    again = ["train", "--checkpoint-path", str(tmp_path / "model"), "--embed-dim", "32", "--assays", "x",
             "--train-files", str(tmp_path / "train.h5ad"), "--output-dir", str(tmp_path / "more")]  # fmt: skip
    assert main(again) == 1 and not (tmp_path / "more").exists()
    assert "--embed-dim, --assays describe a new model" in capsys.readouterr().err


# -- several processes -----------------------------------------------------------------------------------

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
    w_ddp, w_one = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    for key in w_one:
        torch.testing.assert_close(w_ddp[key], w_one[key], atol=1e-5, rtol=1e-4)
