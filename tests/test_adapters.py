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
from helpers import adapter_weights

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


# --- an adapter trained on an adapted model ---------------------------------------------------------------------


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_adapter_trained_on_an_adapted_model_loads_only_on_that_model(adapter, tiny_path, tiny_adata, tmp_path):
    second = transcriptformer.finetune(
        tiny_adata[:8], (tiny_path, adapter), output_dir=tmp_path / "second", learning_rate=1e-2, progress=False
    )
    adapted = transcriptformer.load_model((tiny_path, adapter))
    record = json.loads((second / "transcriptformer_adapter.json").read_text())
    assert record["base_weights_sha256"] == adapted.identity != adapted.weights_sha256  # the adapted weights' identity
    run = json.loads((second / "training.json").read_text())  # the run's record names the adapter it started from
    assert run["adapter"] == str(adapter.resolve())
    assert run["adapter_sha256"] == _sha256(adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="trained on weights with identity"):
        transcriptformer.load_model(tiny_path, adapter=second)  # the plain base: refused
    twice = transcriptformer.load_model(adapted, adapter=second)  # the model it was made for: loads
    nested = transcriptformer.load_model(((tiny_path, adapter), second))  # the same, as one model=
    out = tfs.tl.embed(tiny_adata, model=nested, copy=True)
    params = out.uns["transcriptformer"]["params"]
    assert params["adapter"] == str(second.resolve())
    assert params["adapter_sha256"] == _sha256(second / "adapter_model.safetensors")
    assert params["weights_sha256"] == adapted.weights_sha256  # the base file's, as for any adapted model
    once = tfs.tl.embed(tiny_adata, model=adapted, copy=True).obsm["X_transcriptformer"]
    np.testing.assert_allclose(
        out.obsm["X_transcriptformer"],
        tfs.tl.embed(tiny_adata, model=twice, copy=True).obsm["X_transcriptformer"],
        atol=1e-6,
    )
    assert np.abs(out.obsm["X_transcriptformer"] - once).max() > 1e-4  # the second adapter changes the model


def test_training_on_a_model_that_keeps_its_adapter_layers_trains_a_merged_copy(
    adapter, tiny_path, tiny_adata, tmp_path
):
    from transcriptformer.training import lora

    plain = transcriptformer.load_model((tiny_path, adapter), merge_adapter=False)  # keeps PEFT's LoRA layers
    merged = transcriptformer.load_model((tiny_path, adapter))
    before = {k: v.clone() for k, v in plain.model.state_dict().items()}
    assert lora.has_lora_layers(plain.model) and not lora.has_lora_layers(merged.model)
    copy_ = lora.merged_copy(plain.model)  # PEFT's merge, into a copy: the merged model's weights
    assert not lora.has_lora_layers(copy_) and set(copy_.state_dict()) == set(merged.model.state_dict())
    for key, value in copy_.state_dict().items():
        torch.testing.assert_close(value, merged.model.state_dict()[key], atol=1e-6, rtol=0)
    # finetune on it (was PEFT's NoMatchingPeftModuleError): the adapter of the merged model, bit for bit
    kwargs = {"epochs": 1, "learning_rate": 1e-2, "progress": False}
    second = transcriptformer.finetune(tiny_adata[:8], plain, output_dir=tmp_path / "second", **kwargs)
    same = transcriptformer.finetune(tiny_adata[:8], merged, output_dir=tmp_path / "same", **kwargs)
    w1, w2 = adapter_weights(second), adapter_weights(same)
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    record = json.loads((second / "transcriptformer_adapter.json").read_text())
    assert record["base_weights_sha256"] == merged.identity and not hasattr(copy_, "peft_config")
    assert record["base_parameters"] == sum(v.numel() for v in merged.model.state_dict().values())
    transcriptformer.load_model(merged, adapter=second)  # loads on the adapted model it was trained on
    # full training of it saves a checkpoint in the published layout, which loads
    out = transcriptformer.train(tiny_adata[:8], plain, output_dir=tmp_path / "full", **kwargs)
    assert set(transcriptformer.load_model(out).model.state_dict()) == set(merged.model.state_dict())
    after = plain.model.state_dict()  # the model given is never modified
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # a second adapter on the model with the layers kept: refused with the cause and the fix
    with pytest.raises(ValueError, match=r"is itself a LoRA layer: .*merge_adapter=False.*merge_adapter=True"):
        transcriptformer.load_model(plain, adapter=second)
    with pytest.raises(ValueError, match=r"already holds LoRA layers.*merge_adapter=True"):
        lora.apply_lora(copy.deepcopy(plain.model))


# --- an adapter's own files are checked ------------------------------------------------------------------------


def _copy_adapter(adapter, tmp_path, name="copy"):
    folder = tmp_path / name
    shutil.copytree(adapter, folder, ignore=shutil.ignore_patterns("epochs", "trainer_state.pt"))
    return folder


def _rerecord(folder) -> None:
    """Record the present files' sha256 in the adapter's record (a foreign or hand-made adapter, consistent)."""
    path = folder / "transcriptformer_adapter.json"
    record = json.loads(path.read_text())
    record["adapter_config_sha256"] = _sha256(folder / "adapter_config.json")
    record["adapter_weights_sha256"] = _sha256(folder / "adapter_model.safetensors")
    path.write_text(json.dumps(record))


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, sort_keys=True))


def test_an_adapter_without_its_record_is_refused_with_the_reason(adapter, tiny_path, tmp_path):
    folder = _copy_adapter(adapter, tmp_path)
    transcriptformer.load_model(tiny_path, adapter=folder)  # intact: loads
    (folder / "transcriptformer_adapter.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing transcriptformer_adapter\.json") as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert "without which it cannot be checked" in str(info.value)
    folder = _copy_adapter(adapter, tmp_path, "empty-identity")
    path = folder / "transcriptformer_adapter.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_weights_sha256": ""}))
    with pytest.raises(ValueError, match="has no base_weights_sha256: the adapter cannot be checked") as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert str(path.resolve()) in str(info.value)


@pytest.mark.parametrize(
    "changes", [{"lora_alpha": 160}, {"use_dora": True}, {"init_lora_weights": "gaussian"}], ids=str
)
def test_an_edited_adapter_config_is_refused_even_after_a_load(adapter, tiny_path, tmp_path, changes):
    folder = _copy_adapter(adapter, tmp_path)
    first = transcriptformer.load_model(tiny_path, adapter=folder)  # loaded once in this process (and kept)
    assert transcriptformer.load_model(tiny_path, adapter=folder) is first
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match="is not the file the adapter was saved with") as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert str(folder.resolve() / "adapter_config.json") in str(info.value)


def test_a_huge_rank_is_refused_before_anything_is_allocated(adapter, tiny_path, tmp_path, monkeypatch):
    import time

    from peft.tuners import lora as peft_lora

    def never(*args, **kwargs):
        raise AssertionError("LoRA layers were built")

    monkeypatch.setattr(peft_lora, "LoraModel", never)
    folder = _copy_adapter(adapter, tmp_path)
    _edit_config(folder, r=10**7)
    _rerecord(folder)  # consistent files: the rank itself must be refused
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"r=10000000 exceeds the width of") as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert time.perf_counter() - start < 1.0
    assert "adapter_config.json" in str(info.value)


def _truncate(folder) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rank_8(folder) -> None:
    _edit_config(folder, r=8)


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.mark.parametrize(
    ("damage", "damaged", "message", "named"),
    [
        (_rank_8, CONFIG, r"does not fit adapter_config.json and the base model \(rank 8\)", WEIGHTS),
        (lambda f: (f / CONFIG).write_text("{}"), CONFIG, r"r \(the rank\) must be a positive integer", CONFIG),
        (lambda f: _edit_config(f, peft_type="IA3"), CONFIG, "peft_type 'IA3'; only LoRA adapters", CONFIG),
        (lambda f: (f / CONFIG).write_text("[1, 2]"), CONFIG, "must hold a JSON object, got list", CONFIG),
        (_truncate, WEIGHTS, "is not a readable safetensors file", WEIGHTS),
    ],
    ids=["rank-mismatch", "empty-config", "ia3", "json-list", "truncated-weights"],
)
def test_a_malformed_adapter_is_a_clear_error_naming_the_file(
    adapter, tiny_path, tmp_path, damage, damaged, message, named
):
    folder = _copy_adapter(adapter, tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=r"is not the file the adapter was saved with|must hold a JSON") as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert str(folder.resolve() / damaged) in str(info.value)
    _rerecord(folder)  # as if the record had been made for the damaged files: the files themselves are checked
    with pytest.raises(ValueError, match=message) as info:
        transcriptformer.load_model(tiny_path, adapter=folder)
    assert str(folder.resolve() / named) in str(info.value)


def test_an_adapter_with_non_finite_weights_is_refused(adapter, tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_adapter(adapter, tmp_path)
    state = load_file(folder / "adapter_model.safetensors")
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / "adapter_model.safetensors"))
    _rerecord(folder)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        transcriptformer.load_model(tiny_path, adapter=folder)


def test_an_interrupted_save_leaves_no_complete_adapter(adapter, tiny_path, tmp_path, monkeypatch):
    import safetensors.torch

    from transcriptformer.weights import adapter as adapter_files

    folder = _copy_adapter(adapter, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    record = json.loads((folder / "transcriptformer_adapter.json").read_text())
    state = adapter_weights(folder)

    def interrupted(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(OSError, match="No space left"):
        adapter_files.write_adapter(folder, config, state, record)  # over a complete adapter
    assert not (folder / "transcriptformer_adapter.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete LoRA adapter folder"):
        transcriptformer.load_model(tiny_path, adapter=folder)


def test_an_adapter_folder_passed_as_the_model_says_how_to_pass_it(adapter):
    with pytest.raises(FileNotFoundError, match=r"is a LoRA adapter folder, not a checkpoint.*model=\(base, "):
        transcriptformer.load_model(adapter)
