"""LoRA adapters (weights/adapter.py: files, checks, loading; training/lora.py: wrapping, saving)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs

peft = pytest.importorskip("peft")


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
