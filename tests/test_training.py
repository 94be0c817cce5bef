"""Training (training/objective.py, fit.py): the objective against the published model, fine-tuning and training
runs (options, output folder, resume, divergence, records), new models, determinism, DDP.

The published references (tests/data/reference_train, from scripts/make_reference.py) are the published
0.6.1 model's own training-mode forward and loss modules (eval mode: no dropout, fp32, CPU) on the parity
fixture and on three datasets it was run on for this project only.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import DATA, adapter_weights, spy_on
from transcriptformer.errors import TranscriptFormerWarning
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


def test_cell_losses_are_nan_only_for_a_cell_without_any_gene_of_the_vocabulary(tiny_model, tiny_adata):
    in_vocab = tfs.pp.match_genes(tiny_adata, tiny_model, copy=True).var["transcriptformer_in_vocab"].to_numpy()
    X = tiny_adata.X.toarray()
    X[4, in_vocab] = 0  # cell 4 keeps only genes outside the vocabulary
    assert X[4].sum() > 0
    tiny_adata.X = sp.csr_matrix(X)
    with pytest.warns(TranscriptFormerWarning, match="no expressed gene"):
        df = transcriptformer.cell_losses(tiny_adata, tiny_model)
    assert df.loc[tiny_adata.obs_names[4], "n_genes"] == 0
    assert np.isnan(df[["count_nll", "gene_nll"]].to_numpy()[4]).all()
    others = df.drop(index=tiny_adata.obs_names[4])
    assert np.isfinite(others[["count_nll", "gene_nll"]].to_numpy()).all()


def test_cell_losses_in_the_former_order_are_deprecated_but_work(tiny_model, tiny_adata):
    expected = transcriptformer.cell_losses(tiny_adata, tiny_model)
    with pytest.warns(FutureWarning, match=r"cell_losses\(adata, model\)"):
        old = transcriptformer.cell_losses(tiny_model, tiny_adata)
    pd.testing.assert_frame_equal(old, expected)


def test_inputs_that_are_not_h5ad_files_are_named(tiny_model, tmp_path):
    text = tmp_path / "cells.csv"
    text.write_text("cell,gene\n")
    with pytest.raises(ValueError, match=rf"adata file '{text}' is not an h5ad file \(not HDF5\)"):
        transcriptformer.cell_losses(text, tiny_model)
    with pytest.raises(ValueError, match=rf"train file '{text}' is not an h5ad file \(not HDF5\)"):
        transcriptformer.finetune(text, tiny_model, output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=rf"validation file '{text}' is not an h5ad file"):
        transcriptformer.finetune(tfs.datasets.tiny_human(), tiny_model, validation=[text], output_dir=tmp_path / "v")


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


def test_an_impossible_learning_rate_is_refused_before_anything_loads(tiny_path, tiny_adata, tmp_path, no_model_load):
    for lr in (1e38, float("inf"), 0.0):
        with pytest.raises(ValueError, match="learning_rate must be"):
            transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "run", learning_rate=lr)
        with pytest.raises(ValueError, match="learning_rate must be"):
            transcriptformer.train(tiny_adata, tiny_path, output_dir=tmp_path / "run", learning_rate=lr)
    assert no_model_load == [] and not (tmp_path / "run").exists()


class _Planted:
    """A pickle that, when loaded with code execution allowed, creates the folder ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resuming_never_executes_code_from_the_trainer_state(tiny_path, tiny_adata, tmp_path):
    control = tmp_path / "control.pt"
    torch.save(_Planted(tmp_path / "control-ran"), control)
    torch.load(control, weights_only=False)  # the planted file is hostile: loaded with code allowed, it runs
    assert (tmp_path / "control-ran").is_dir()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(_Planted(tmp_path / "marker"), run / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt cannot be read as a trainer state") as info:
        transcriptformer.finetune(tiny_adata[:8], tiny_path, output_dir=run, resume=True, progress=False)
    assert str(run / "trainer_state.pt") in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_training_stops_at_the_first_non_finite_gradient_and_saves_nothing_non_finite(
    tiny_path, tiny_adata, tmp_path, monkeypatch
):
    from transcriptformer.training import fit

    real_step, real_loss = fit._Run._step, fit.batch_loss
    where = {}

    def step(self, epoch, g, group, cache):
        if (epoch, g) == (1, 1):  # the second step of the second epoch: its loss becomes NaN
            where["step"] = self.step + 1
            monkeypatch.setattr(fit, "batch_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
        return real_step(self, epoch, g, group, cache)

    monkeypatch.setattr(fit._Run, "_step", step)
    out = tmp_path / "run"
    with pytest.raises(
        FloatingPointError, match=r"training diverged at epoch 2, step \d+: .*gradient norm nan"
    ) as info:
        transcriptformer.finetune(
            tiny_adata[:8], tiny_path, output_dir=out, epochs=2, batch_size=2, learning_rate=1e-2, progress=False
        )
    assert f"epoch 2, step {where['step']}:" in str(info.value) and where["step"] > 2
    assert "Lower learning_rate" in str(info.value)
    assert f"the last complete epoch is in {out / 'epochs' / 'epoch-1'}" in str(info.value)
    # the last complete epoch is kept, finite; no final adapter, no record of a finished run
    assert not (out / "adapter_model.safetensors").exists() and not (out / "training.json").exists()
    assert sorted(p.name for p in (out / "epochs").iterdir()) == ["epoch-1"]
    assert all(bool(torch.isfinite(v).all()) for v in adapter_weights(out / "epochs" / "epoch-1").values())
    transcriptformer.load_model(tiny_path, adapter=out / "epochs" / "epoch-1")


def test_a_divergence_in_the_first_epoch_says_that_nothing_was_saved(tiny_path, tiny_adata, tmp_path, monkeypatch):
    from transcriptformer.training import fit

    real_loss = fit.batch_loss
    monkeypatch.setattr(fit, "batch_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(fit.TrainingDiverged, match="epoch 1, step 1") as info:
        transcriptformer.finetune(tiny_adata[:8], tiny_path, output_dir=out, progress=False)
    assert "no epoch was complete, so nothing was saved" in str(info.value)
    assert "last complete epoch" not in str(info.value)
    assert not (out / "epochs").exists()


def _without_genes(adata, rows):
    """``adata`` with the cells ``rows`` emptied (all counts 0: an empty droplet)."""
    adata = adata.copy()
    X = adata.X.toarray()
    X[rows] = 0
    adata.X = sp.csr_matrix(X)
    return adata


def test_cells_without_any_gene_are_left_out_of_training(tiny_path, tiny_adata, tmp_path):
    from transcriptformer.inference.batching import BatchPlanner
    from transcriptformer.training import fit

    # 8 empty cells: in micro-batches of 4, the planner (which groups cells by length) put them together, and the
    # step of two such micro-batches had loss 0 / 0: the run stopped as "diverged"
    a = _without_genes(tiny_adata, slice(0, 8))
    with pytest.warns(TranscriptFormerWarning, match="8 of 21 training cells have no expressed gene"):
        out = transcriptformer.finetune(a, tiny_path, output_dir=tmp_path / "run", batch_size=4, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["train_cells"] == 13 and record["train_cells_left_out"] == 8
    assert all(np.isfinite(record["history"][-1]["step_losses"]))
    # the plan: no empty cell, every other cell once
    planner = BatchPlanner.for_model(transcriptformer.load_model(tiny_path), "cpu", max_tokens=4096, batch_size=4)
    lengths = [np.array([0, 3, 0, 5, 7, 0, 2, 9])]
    plan = fit._plan_epoch(lengths, planner, 0, 0, 4096)
    assert sorted(r for mb in plan for r in mb.rows) == [1, 3, 4, 6, 7] and all(mb.n_genes > 0 for mb in plan)
    full = [np.array([4, 3, 1, 5, 7, 6, 2, 9])]
    assert sorted(r for mb in fit._plan_epoch(full, planner, 0, 0, 4096) for r in mb.rows) == list(range(8))
    # no cell with a gene: nothing to train on, said before any step
    with pytest.raises(ValueError, match="none of the 4 training cells has an expressed gene"):
        transcriptformer.finetune(a[:4], tiny_path, output_dir=tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def _interrupted_after_epoch_1(monkeypatch, call):
    """Run ``call()`` (a 2-epoch run) and stop it after its first epoch is saved, as Ctrl-C would."""
    from transcriptformer.training import fit

    real = fit._Run._checkpoint

    def checkpoint(self, epoch):
        real(self, epoch)
        raise KeyboardInterrupt("after epoch 1")

    monkeypatch.setattr(fit._Run, "_checkpoint", checkpoint)
    with pytest.raises(KeyboardInterrupt):
        call()
    monkeypatch.setattr(fit._Run, "_checkpoint", real)


def test_resume_compares_the_tokenisation_precision_attention_and_the_data(
    tiny_path, tiny_adata, tmp_path, monkeypatch
):
    (tmp_path / "data").mkdir()
    tiny_adata.var["gene_ids"] = tiny_adata.var["ensembl_id"]  # another column of the same ids
    tiny_adata[:8].write_h5ad(tmp_path / "data" / "cells.h5ad")
    tiny_adata[8:12].write_h5ad(tmp_path / "data" / "held_out.h5ad")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "data")
    kwargs = {"epochs": 2, "learning_rate": 1e-2, "progress": False, "validation": "held_out.h5ad"}
    _interrupted_after_epoch_1(
        monkeypatch, lambda: transcriptformer.finetune("cells.h5ad", tiny_path, output_dir=run, **kwargs)
    )
    other = tiny_adata[:8].copy()
    X = other.X.toarray()
    X[1] *= 2  # the same cells and genes; one cell's counts differ
    other.X = sp.csr_matrix(X)
    other.write_h5ad(tmp_path / "other.h5ad")
    refused = [
        ({"clip_counts": 1}, "clip_counts: 30.0 -> 1.0"),
        ({"normalize_to_scale": 10}, "normalize_to_scale: None -> 10.0"),
        ({"gene_key": "gene_ids"}, "gene_key: 'ensembl_id' -> 'gene_ids'"),
        ({"filter_to_vocab": False}, "filter_to_vocab: True -> False"),
        ({"duplicate_genes": "first"}, "duplicate_genes: 'raise' -> 'first'"),
        ({"layer": "X"}, "layer: None -> 'X'"),
        ({"precision": "bf16!"}, "precision: '32' -> 'bf16'"),
        ({"attention": "dense"}, "attention: 'auto' -> 'dense'"),
        ({"train": tiny_adata[:12]}, "train_inputs: input 1 differs (n_obs 8 -> 12; cell names"),
        ({"train": str(tmp_path / "other.h5ad")}, "input 1 differs (first cells' counts)"),
        ({"validation": "cells.h5ad"}, "validation_inputs: input 1 differs (n_obs 4 -> 8"),
        ({"validation": None}, "validation_inputs: 1 -> 0 inputs"),
    ]
    for change, message in refused:
        args = {"train": "cells.h5ad", **kwargs, **change}
        with pytest.raises(ValueError, match="was written with other options") as info:
            transcriptformer.finetune(args.pop("train"), tiny_path, output_dir=run, resume=True, **args)
        assert message in str(info.value), (change, str(info.value))
    # the same files named another way (absolute paths, from another working directory) resume
    monkeypatch.chdir(tmp_path)
    absolute = {**kwargs, "validation": str(tmp_path / "data" / "held_out.h5ad")}
    transcriptformer.finetune(tmp_path / "data" / "cells.h5ad", tiny_path, output_dir=run, resume=True, **absolute)
    record = json.loads((run / "training.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]
    assert record["train"] == [str(tmp_path / "data" / "cells.h5ad")]
    for key, value in [("clip_counts", 30.0), ("normalize_to_scale", None), ("gene_key", "ensembl_id"),
                       ("layer", None), ("filter_to_vocab", True), ("duplicate_genes", "raise"),
                       ("precision", "32"), ("attention", "auto")]:  # fmt: skip
        assert record[key] == value, key
    assert record["train_inputs"][0]["n_obs"] == 8 and record["validation_inputs"][0]["n_obs"] == 4


def test_a_dry_run_makes_the_checks_of_the_run_and_writes_nothing(tiny_path, tiny_adata, tmp_path, monkeypatch):
    from transcriptformer.training import fit

    steps = spy_on(monkeypatch, fit._Run, "_step")
    out = transcriptformer.finetune(tiny_adata, tiny_path, output_dir=tmp_path / "run", dry_run=True, progress=False)
    assert out == tmp_path / "run" and not out.exists() and steps == []
    out = transcriptformer.train(tiny_adata, tiny_path, output_dir=tmp_path / "run", dry_run=True, progress=False)
    assert not out.exists() and steps == []
    bad = tiny_adata[:8].copy()
    X = bad.X.toarray()
    X[1, 0] = np.nan
    bad.X = sp.csr_matrix(X)
    for kwargs, message in [
        ({"validation": bad}, "NaN"),  # validation counts: read by a dry run as the run reads them first
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"device": "cuda:99"}, "device='cuda:99' but"),
        ({"lora_r": 33}, "lora_r=33 exceeds the width"),
    ]:
        with pytest.raises(ValueError, match=message):
            transcriptformer.finetune(
                tiny_adata, tiny_path, output_dir=tmp_path / "run", dry_run=True, progress=False, **kwargs
            )
    assert not (tmp_path / "run").exists() and steps == []


def test_a_rank_wider_than_a_targeted_layer_is_refused_before_any_cell_is_read(
    tiny_path, tiny_adata, tmp_path, monkeypatch
):
    from transcriptformer.training import fit

    opened = spy_on(monkeypatch, fit, "open_cells")
    # tf-tiny: linear1 is 32 -> 64, linear2 64 -> 32, the attention projections 32 -> 32: a rank of 33 fits none
    for targets in (["linear1"], ["linears"], ["linear1", "linear2", "linears"]):
        with pytest.raises(ValueError, match=r"lora_r=33 exceeds the width of .* lower lora_r to at most 32"):
            transcriptformer.finetune(
                tiny_adata, tiny_path, output_dir=tmp_path / "run", lora_r=33, target_modules=targets, progress=False
            )
    assert opened == [] and not (tmp_path / "run").exists()
    out = transcriptformer.finetune(
        tiny_adata[:8], tiny_path, output_dir=tmp_path / "r32", lora_r=32, target_modules=["linear1"], progress=False
    )
    transcriptformer.load_model(tiny_path, adapter=out)  # the widest rank allowed: it loads


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_nan_losses_are_written_to_training_json_as_null(tiny_path, tiny_adata, tmp_path):
    from transcriptformer.training import fit

    in_vocab = tfs.pp.match_genes(tiny_adata, tiny_path, copy=True).var["transcriptformer_in_vocab"].to_numpy()
    hopeless = tiny_adata[:4].copy()
    X = hopeless.X.toarray()
    X[:, in_vocab] = 0  # no cell has a gene of the vocabulary: the validation losses are NaN
    hopeless.X = sp.csr_matrix(X)
    out = transcriptformer.finetune(
        tiny_adata[4:12], tiny_path, validation=hopeless, output_dir=tmp_path / "run", progress=False
    )

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    record = json.loads((out / "training.json").read_text(), parse_constant=refuse)
    assert [h["validation"]["loss"] for h in record["history"]] == [None, None]
    assert record["history"][-1]["train_loss"] is not None
    assert record["best_epoch"] is None  # no epoch is chosen by NaN validation losses
    fit.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=refuse) == {"a": None, "b": [None, 1.5]}


@pytest.mark.parametrize("kind", ["a-file", "below-a-file", "unwritable"])
def test_an_unusable_output_dir_fails_before_any_training_step(tiny_path, tiny_adata, tmp_path, monkeypatch, kind):
    from transcriptformer.training import fit

    (tmp_path / "afile").write_text("x")
    output_dir = {"a-file": tmp_path / "afile", "below-a-file": tmp_path / "afile" / "run"}.get(kind, tmp_path / "run")
    if kind == "unwritable":  # root ignores permission bits: the write itself is made to fail

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(fit.tempfile, "mkstemp", denied)
    opened = spy_on(monkeypatch, fit, "open_cells")
    with pytest.raises(OSError, match="cannot") as info:
        transcriptformer.finetune(tiny_adata, tiny_path, output_dir=output_dir, progress=False)
    message = str(info.value)
    assert "[Errno" not in message
    if kind == "unwritable":
        assert message.startswith(f"cannot write to {tmp_path}") and "pass a writable output_dir" in message
    else:
        assert f"{tmp_path / 'afile'} is a file; pass another output_dir" in message
    assert opened == []  # not a cell read, let alone a step


def test_fine_tuning_tells_its_story_on_stderr(tiny_path, tiny_adata, tmp_path, capsys):
    out = transcriptformer.finetune(
        tiny_adata[:12], tiny_path, validation=tiny_adata[12:], output_dir=tmp_path / "run", epochs=2
    )
    err = capsys.readouterr().err
    assert re.search(r"before training: validation loss \d+\.\d{4}", err)
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2: train loss \d+\.\d{{4}}, validation loss \d+\.\d{{4}}", err), err
    assert f"saved to {out}" in err and f"model=('tf_tiny', {str(out)!r})" in err  # where it is, how to load it
    transcriptformer.finetune(tiny_adata[:12], tiny_path, output_dir=tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_a_quick_fine_tuning_draws_no_progress_bar(tiny_path, tiny_adata, tmp_path, capsys):
    transcriptformer.finetune(tiny_adata[:8], tiny_path, output_dir=tmp_path / "run", epochs=2)
    err = capsys.readouterr().err
    assert "epoch 2/2: train loss" in err  # the story is told ...
    assert "step/s" not in err and "%|" not in err, err  # ... without a bar for a run of a second


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


def test_train_in_the_former_order_is_deprecated_but_works(tiny_path, tiny_adata, tmp_path):
    with pytest.warns(FutureWarning, match=r"train\(model, train\); write train\(train, model\)"):
        out = transcriptformer.train(
            tiny_path, tiny_adata[:8], output_dir=tmp_path / "run", learning_rate=1e-3, progress=False
        )
    assert transcriptformer.load_model(out).weights_sha256 != transcriptformer.load_model(tiny_path).weights_sha256


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


def test_training_flops_count_the_whole_objective(tiny_model):
    from transcriptformer.inference.batching import estimate_flops

    c = tiny_model.config.model
    E, Hg, V = c.embed_dim, c.gene_head_hidden_dim, len(tiny_model.vocab)
    D = tiny_model.model.gene_embeddings.embedding.weight.shape[1]
    lengths = np.array([3, 40, 17])
    layers = estimate_flops(lengths, tiny_model)
    with_count_head = estimate_flops(lengths, tiny_model, llh=True)
    objective = estimate_flops(lengths, tiny_model, objective=True)
    # the gene-identity head (E -> Hg -> V) and the targets' gene MLP (D -> E -> E), per gene token
    assert objective - with_count_head == pytest.approx(2 * lengths.sum() * (E * Hg + Hg * V + D * E + E * E))
    assert with_count_head > layers
