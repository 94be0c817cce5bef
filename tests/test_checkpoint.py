"""Checkpoints (weights/layout.py, loaded.py, checkpoint.py): loading a folder, the in-memory cache, damaged
folders, gene tables of other species (``species_embedding``), new models.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import TINY, copy_tiny, embed_fails, infer_args, run_cli, spy_on
from transcriptformer.inference.pipeline import infer
from transcriptformer.weights import checkpoint
from transcriptformer.weights.checkpoint import species_vocabulary

# --- loading a folder -----------------------------------------------------------------------------------------------


def test_loaded_models_are_cached(tiny_path):
    a = transcriptformer.load_model(tiny_path)
    b = transcriptformer.load_model(str(tiny_path))
    assert a is b
    assert transcriptformer.load_model(a) is a


def test_cache_reloads_when_files_change(tiny_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    a = transcriptformer.load_model(ckpt)
    assert transcriptformer.load_model(ckpt) is a
    st = os.stat(ckpt / "model_weights.pt")
    os.utime(ckpt / "model_weights.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert transcriptformer.load_model(ckpt) is not a


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


@pytest.mark.parametrize("bad", [None, 5, "", "   "])
def test_model_argument_is_validated(tiny_adata, bad):
    with pytest.raises(ValueError, match="model must be a checkpoint folder, a registry name"):
        tfs.tl.embed(tiny_adata, model=bad)
    with pytest.raises(ValueError, match="model must be"):
        transcriptformer.load_model(bad)


def test_an_existing_folder_wins_over_a_registry_name(tmp_path, tiny_path, monkeypatch, caplog, capsys, h5ad):
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")  # offline
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_path, tmp_path / "tf_sapiens")  # what `download tf-sapiens --checkpoint-dir .` makes
    transcriptformer.clear_cache()
    with caplog.at_level(logging.INFO, logger="transcriptformer"):
        loaded = transcriptformer.load_model("tf_sapiens")
    assert loaded.path == (tmp_path / "tf_sapiens").resolve()
    assert "using the local folder" in caplog.text and "wins over the registry name tf-sapiens" in caplog.text
    adata = tfs.tl.embed(tfs.datasets.tiny_human(), model="tf_sapiens", copy=True)
    assert adata.uns["transcriptformer"]["params"]["model_path"] == str(loaded.path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transcriptformer"):
        code, err = run_cli(capsys, "-v", *infer_args("tf_sapiens", h5ad, tmp_path / "out"))  # INFO with -v
    assert code == 0, err
    assert "using the local folder" in caplog.text
    # an existing file of that name wins too: a clear error, not a download
    shutil.rmtree(tmp_path / "tf_sapiens")
    (tmp_path / "tf_sapiens").write_text("not a checkpoint")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        transcriptformer.load_model("tf_sapiens")
    transcriptformer.clear_cache()


# --- damaged folders ------------------------------------------------------------------------------------------------


def test_checkpoint_folder_missing_files(tiny_path, tiny_adata, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_path, broken)
    (broken / "vocabs" / "mus_musculus_gene.h5").unlink()
    embed_fails(tiny_adata, FileNotFoundError, r"incomplete: missing vocabs/mus_musculus_gene.h5", model=broken)
    (broken / "model_weights.pt").unlink()
    embed_fails(tiny_adata, FileNotFoundError, r"incomplete: missing model_weights.pt", model=broken)
    embed_fails(tiny_adata, FileNotFoundError, r"does not exist", model=tmp_path / "nowhere")


def test_weights_do_not_fit_config(tiny_path, tiny_adata, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model"]["model_config"]["model_dim"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    embed_fails(tiny_adata, ValueError, r"do not fit.*shape differences.*linear1.weight", model=broken)
    shutil.copy(tiny_path / "config.json", broken / "config.json")
    state = torch.load(broken / "model_weights.pt", weights_only=True)
    state["extra.weight"] = state.pop("mu.gene_embedding.weight")
    torch.save(state, broken / "model_weights.pt")
    embed_fails(
        tiny_adata,
        ValueError,
        r"missing keys \(1\): mu.gene_embedding.weight.*unexpected keys \(1\): extra.weight",
        model=broken,
    )


def _edit_config(ckpt: Path, section: str, key: str, value) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"][section][key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("esm2_mappings", ["../../outside_gene.h5"], "is not a file name inside vocabs/"),
        ("esm2_mappings", ["/etc/passwd"], "is not a file name inside vocabs/"),
        ("esm2_mappings", ["homo_sapiens_gene.h5", "~/x.h5"], "is not a file name inside vocabs/"),
        ("aux_cols", "../assay", "is not a file name inside vocabs/"),
        ("esm2_mappings", ["link_gene.h5"], "is a link to .* outside the checkpoint folder"),
    ],
)
def test_files_named_by_config_stay_in_the_folder(tmp_path, key, value, message):
    ckpt = copy_tiny(tmp_path)
    shutil.copy(TINY / "vocabs" / "homo_sapiens_gene.h5", tmp_path / "outside_gene.h5")
    (ckpt / "vocabs" / "link_gene.h5").symlink_to(tmp_path / "outside_gene.h5")
    _edit_config(ckpt, "data_config", key, value)
    with pytest.raises(ValueError, match=message):
        transcriptformer.load_model(ckpt)
    # a link inside the folder is fine
    (ckpt / "vocabs" / "link_gene.h5").unlink()
    (ckpt / "vocabs" / "link_gene.h5").symlink_to(ckpt / "vocabs" / "homo_sapiens_gene.h5")
    _edit_config(ckpt, "data_config", "esm2_mappings", ["link_gene.h5", "mus_musculus_gene.h5"])
    _edit_config(ckpt, "data_config", "aux_cols", "assay")
    assert len(transcriptformer.load_model(ckpt).vocab) == len(checkpoint.load_model(TINY).vocab)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "must hold a JSON object"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "is not UTF-8 text"),
        (b"{", "is not valid JSON"),
        ({"model": [1]}, "'model' must be a JSON object"),
        ({"model": {"model_config": "big"}}, "model_config must be a JSON object"),
        ({"model": {"model_config": {"embed_dim": "big"}}}, r"model_config\.embed_dim: expected a number"),
        ({"model": {"model_config": {"embed_dim": True}}}, r"model_config\.embed_dim: expected a number"),
        ({"model": {"model_config": {"num_layers": 2.5}}}, r"model_config\.num_layers: expected an integer"),
        ({"model": {"model_config": {"log_counts_eps": float("nan")}}}, "expected a finite number"),
        ({"model": {"model_config": {"softcap": float("inf")}}}, "expected a finite number"),
        ({"model": {"model_config": {"attn_bias": "maybe"}}}, r"attn_bias: expected a boolean"),
        ({"model": {"model_config": {"mu_link_fn": 5}}}, r"mu_link_fn: expected a string"),
        ({"model": {"data_config": {"esm2_mappings": 5}}}, r"esm2_mappings: expected a list of names"),
        ({"model": {"data_config": {"aux_cols": 5}}}, r"aux_cols must be a comma-separated string"),
        ({"model": {"data_config": {"esm2_mappings": [1, 2]}}}, r"esm2_mappings: expected a list of names"),
        ({"model": {"loss_config": {"softplus_approx": 2}}}, r"softplus_approx: expected a boolean"),
    ],
)
def test_a_malformed_config_is_one_line_naming_the_file_and_key(tmp_path, content, message):
    ckpt = copy_tiny(tmp_path)
    if isinstance(content, dict):
        base = json.loads((TINY / "config.json").read_text())
        for section, values in content["model"].items() if isinstance(content["model"], dict) else []:
            base["model"][section] = values if not isinstance(values, dict) else {**base["model"][section], **values}
        if not isinstance(content["model"], dict):
            base["model"] = content["model"]
        content = json.dumps(base).encode()
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        transcriptformer.load_model(ckpt)
    assert str(ckpt / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_config_json_that_is_a_folder(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=r"config\.json.* not a file|is a folder"):
        transcriptformer.load_model(ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, tiny_adata, value):
    ckpt = copy_tiny(tmp_path)
    state = torch.load(ckpt / "model_weights.pt", weights_only=True)
    state["transformer_encoder.encoder_layers.1.linear2.weight"][3, 4] = value
    torch.save(state, ckpt / "model_weights.pt")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(1 tensor\(s\), e\.g\. transformer_encoder"):
        tfs.tl.embed(tiny_adata, model=ckpt)
    assert "X_transcriptformer" not in tiny_adata.obsm


# --- gene tables of other species (species_vocabulary) --------------------------------------------------------------


def _write_table(path, ids, vectors):
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.asarray(ids, dtype="S"))
        arrays = f.create_group("arrays")
        for k, v in zip(ids, vectors, strict=True):
            arrays.create_dataset(k, data=np.asarray(v, dtype=np.float32))


def _state_fingerprint(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_own_tables_reproduce_in_vocabulary_results(tiny_path, tiny_model, tiny_adata, reference):
    tables = [tiny_path / "vocabs" / "homo_sapiens_gene.h5", tiny_path / "vocabs" / "mus_musculus_gene.h5"]
    before = _state_fingerprint(tiny_model)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, species_embedding=tables, copy=True)
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], reference["cell"].obsm["embeddings"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        out.obs["transcriptformer_llh"].to_numpy(), reference["llh"].obsm["llh"].ravel(), atol=1e-6, rtol=0
    )
    assert out.uns["transcriptformer"]["params"]["species_embedding"] == [str(t) for t in tables]
    # the cached model is untouched
    after = _state_fingerprint(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = tfs.tl.embed(tiny_adata, model=tiny_path, copy=True)
    np.testing.assert_allclose(again.obsm["X_transcriptformer"], reference["cell"].obsm["embeddings"], atol=1e-6)


def test_vocabulary_keeps_special_tokens_and_biases(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    known = list(tiny_model.vocab.genes[:5])
    new = [f"ENSDARG{i:011d}" for i in range(400)]  # more genes than the model's whole vocabulary (364)
    ids = known + new
    _write_table(tmp_path / "fish.h5", ids, rng.normal(size=(len(ids), 16)))
    vocab, esm, bias = species_vocabulary(tiny_model, [tmp_path / "fish.h5"])
    assert len(vocab) == 7 + 405 > len(tiny_model.vocab)
    assert vocab.special_tokens == tiny_model.vocab.special_tokens
    assert (vocab.pad, vocab.start, vocab.end) == (tiny_model.vocab.pad, tiny_model.vocab.start, tiny_model.vocab.end)
    weight = tiny_model.model.gene_embeddings.embedding.weight
    old_bias = tiny_model.model.mu.gene_embedding.weight
    assert torch.equal(esm[:7], weight[:7])
    assert torch.equal(bias[:7], old_bias[:7])
    for g in known:  # genes the model knows keep their own count bias
        assert bias[vocab.index[g], 0] == old_bias[tiny_model.vocab.index[g], 0]
    assert torch.all(bias[7 + 5 :] == 0)  # unseen genes: neutral bias
    with h5py.File(tmp_path / "fish.h5") as f:
        np.testing.assert_array_equal(esm[vocab.index[new[3]]].numpy(), f["arrays"][new[3]][:])


def test_unseen_genes_embed(tiny_path, tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"ENSDARG{i:011d}" for i in range(400)]
    _write_table(tmp_path / "fish.h5", ids, rng.normal(size=(400, 16)))
    n_cells = 12
    X = sp.random(n_cells, 400, density=0.2, format="csr", random_state=2, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    adata = ad.AnnData(X=X, var=pd.DataFrame({"ensembl_id": ids}, index=[f"g{i}" for i in range(400)]))
    adata.obs["assay"] = "10x 3' v3"
    with pytest.raises(ValueError, match="none of the 400 genes"):
        tfs.tl.embed(adata, model=tiny_path)
    tfs.tl.embed(adata, model=tiny_path, llh=True, species_embedding=tmp_path / "fish.h5")
    emb = adata.obsm["X_transcriptformer"]
    assert emb.shape == (n_cells, 32) and np.isfinite(emb).all()
    assert np.isfinite(adata.obs["transcriptformer_llh"]).all()
    # results do not depend on batching
    again = tfs.tl.embed(
        adata, model=tiny_path, llh=True, species_embedding=tmp_path / "fish.h5", batch_size=1, copy=True
    )
    np.testing.assert_allclose(again.obsm["X_transcriptformer"], emb, atol=1e-6)
    # the tables give the genes their meaning: other vectors, other embeddings
    _write_table(tmp_path / "fish2.h5", ids, rng.normal(size=(400, 16)))
    other = tfs.tl.embed(adata, model=tiny_path, species_embedding=tmp_path / "fish2.h5", copy=True)
    assert not np.allclose(other.obsm["X_transcriptformer"], emb)


def test_species_errors(tiny_path, tiny_model, tiny_adata, tmp_path):
    _write_table(tmp_path / "wide.h5", ["ENSG00000900100"], np.zeros((1, 8)))
    with pytest.raises(ValueError, match=r"width 8.*width 16"):
        tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding=tmp_path / "wide.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding=tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="gene-identity likelihoods"):
        infer(
            tiny_adata,
            tiny_model,
            species_embedding=tiny_path / "vocabs" / "homo_sapiens_gene.h5",
            heads=("gene_llh",),
        )
    assert "X_transcriptformer" not in tiny_adata.obsm


def test_an_existing_file_wins_over_a_species_name(tmp_path, tiny_path, tiny_adata, monkeypatch):
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")  # offline
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_path / "vocabs" / "homo_sapiens_gene.h5", tmp_path / "homo_sapiens")
    out = tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding="homo_sapiens", copy=True)
    assert out.uns["transcriptformer"]["params"]["species_embedding"] == ["homo_sapiens"]
    (tmp_path / "homo_sapiens").unlink()
    (tmp_path / "homo_sapiens").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        tfs.tl.embed(tiny_adata, model=tiny_path, species_embedding="homo_sapiens")


# --- new models ---------------------------------------------------------------------------------------------------


def _tables(tiny_path):
    return [tiny_path / "vocabs" / f for f in ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")]


@pytest.fixture
def no_network_built(monkeypatch) -> list:
    """Records every network built by new_model (the checks under test must come before)."""
    return spy_on(monkeypatch, checkpoint, "_network")


def test_new_model_builds_with_sound_options(tiny_path, no_network_built):
    model = checkpoint.new_model(
        _tables(tiny_path), assay_vocab={"unknown": 0, "10x": 2}, embed_dim=16, num_layers=1, num_heads=2, seq_len=15
    )
    assert len(no_network_built) == 1 and model.config.loss.gene_id_loss_weight == 1.0
    assert model.aux_vocabs[0].labels == {"unknown": 0, "10x": 2}


@pytest.mark.parametrize("weight", [float("nan"), -1.0, 1e30, float("inf"), "1"])
def test_new_model_refuses_an_unusable_gene_id_loss_weight(tiny_path, no_network_built, weight):
    with pytest.raises(ValueError, match="gene_id_loss_weight must be a finite number from 0 to 1e6"):
        checkpoint.new_model(_tables(tiny_path), embed_dim=16, num_layers=1, num_heads=2, gene_id_loss_weight=weight)
    assert no_network_built == []


@pytest.mark.parametrize(
    "assays",
    [{"unknown": 0, "10x": -1}, {"unknown": 0, "10x": 0}, {"unknown": 0, "10x": 10**9}, {"unknown": 0, "10x": 1.5}],
    ids=["negative", "duplicate", "huge", "not-an-integer"],
)
def test_new_model_refuses_unusable_assay_indices(tiny_path, no_network_built, assays):
    with pytest.raises(ValueError, match="assay_vocab: every label needs its own index, an integer from 0 to 99,999"):
        checkpoint.new_model(_tables(tiny_path), assay_vocab=assays, embed_dim=16, num_layers=1, num_heads=2)
    assert no_network_built == []


def test_new_model_takes_one_assay_label_given_as_a_string(tiny_path, no_network_built):
    model = checkpoint.new_model(
        _tables(tiny_path), assay_vocab="10x 3' v3", embed_dim=16, num_layers=1, num_heads=2, seq_len=15
    )
    assert dict(model.aux_vocabs[0].labels) == {"unknown": 0, "10x 3' v3": 1}  # not one label per character


def test_new_model_numbers_each_assay_label_once(tiny_path, no_network_built):
    assays = ["10x 3' v2", "10x 3' v3", "unknown", "10x 3' v2", "smart-seq"]
    model = checkpoint.new_model(_tables(tiny_path), assay_vocab=assays, embed_dim=16, num_layers=1, num_heads=2)
    assert dict(model.aux_vocabs[0].labels) == {"unknown": 0, "10x 3' v2": 1, "10x 3' v3": 2, "smart-seq": 3}


@pytest.mark.parametrize("assays", [5, [""], ["10x", None]], ids=["not-a-list", "empty-label", "not-a-string"])
def test_new_model_refuses_unusable_assay_labels(tiny_path, no_network_built, assays):
    with pytest.raises(ValueError, match="assay_vocab"):
        checkpoint.new_model(_tables(tiny_path), assay_vocab=assays, embed_dim=16, num_layers=1, num_heads=2)
    assert no_network_built == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("embed_dim", 16.0),
        ("embed_dim", "16"),
        ("embed_dim", True),
        ("num_heads", 2.0),
        ("num_layers", "1"),
        ("num_layers", 0),
        ("seq_len", 15.5),
        ("model_dim", 64.0),
        ("gene_head_hidden_dim", "16"),
        ("dropout", "0.1"),
        ("dropout", 2),
        ("softcap", float("nan")),
        ("seed", 1.5),
        ("activation", "tanh"),
    ],
)
def test_new_model_refuses_wrong_typed_shapes_naming_the_argument(tiny_path, no_network_built, key, value):
    options = {"embed_dim": 16, "num_layers": 1, "num_heads": 2, key: value}
    with pytest.raises(ValueError, match=rf"^{key}(=| must be)") as info:
        checkpoint.new_model(_tables(tiny_path), **options)
    assert "\n" not in str(info.value)
    assert no_network_built == []


def test_new_model_with_numpy_integers_saves_and_loads(tiny_path, tmp_path):
    model = checkpoint.new_model(
        _tables(tiny_path), embed_dim=np.int64(16), num_layers=np.int32(1), num_heads=np.int64(2), seq_len=15
    )
    checkpoint.save_checkpoint(model, tmp_path / "ckpt")  # config.json holds plain integers
    assert transcriptformer.load_model(tmp_path / "ckpt").config.model.embed_dim == 16


def test_new_model_refuses_heads_that_do_not_divide_the_width(tiny_path, no_network_built):
    with pytest.raises(ValueError, match=r"embed_dim=16 is not divisible by num_heads=3"):
        checkpoint.new_model(_tables(tiny_path), embed_dim=16, num_layers=1, num_heads=3)
    assert no_network_built == []


# --- saving ---------------------------------------------------------------------------------------------------------


def _lora_wrapped(tiny_model):
    """A copy of tf-tiny's network holding LoRA layers with non-zero updates (as merge_adapter=False leaves it),
    and the plain network those layers merge into."""
    import copy

    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraModel

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["linear1", "linear2"])
    wrapped = LoraModel(copy.deepcopy(tiny_model.model), config, "default")
    with torch.no_grad():
        for name, p in wrapped.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    return wrapped.model, merged


@pytest.mark.parametrize("how", ["loaded", "model="])
def test_save_checkpoint_merges_a_network_with_lora_layers(tiny_model, tmp_path, how):
    import dataclasses

    net, merged = _lora_wrapped(tiny_model)
    assert any(".base_layer." in k for k in net.state_dict())
    if how == "loaded":  # load_model(..., adapter=..., merge_adapter=False)
        checkpoint.save_checkpoint(dataclasses.replace(tiny_model, model=net), tmp_path / "ckpt")
    else:
        checkpoint.save_checkpoint(tiny_model, tmp_path / "ckpt", model=net)
    assert any(".base_layer." in k for k in net.state_dict())  # the network itself is left as it was
    saved = transcriptformer.load_model(tmp_path / "ckpt")
    expected = merged.state_dict()
    assert set(saved.model.state_dict()) == set(expected)
    for key, value in saved.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    key = "transformer_encoder.encoder_layers.0.linear1.weight"
    assert not torch.equal(expected[key], tiny_model.model.state_dict()[key])  # the adapter changed the weights


def test_save_checkpoint_refuses_weights_that_would_not_load(tiny_path, tiny_model, tmp_path):
    import copy

    other = checkpoint.new_model(_tables(tiny_path), embed_dim=16, num_layers=1, num_heads=2, seq_len=15)
    with pytest.raises(ValueError, match=r"model= does not fit the config and vocabularies of tf.tiny .*nothing was"):
        checkpoint.save_checkpoint(tiny_model, tmp_path / "ckpt", model=other.model)
    assert not (tmp_path / "ckpt").exists()
    broken = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        broken.transformer_encoder.encoder_layers[0].linear1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values .*linear1.weight"):
        checkpoint.save_checkpoint(tiny_model, tmp_path / "ckpt", model=broken)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(TypeError, match=r"model= must be a network"):
        checkpoint.save_checkpoint(tiny_model, tmp_path / "ckpt", model=tiny_model)


def test_save_checkpoint_names_what_is_wrong_with_its_arguments(tiny_model, tmp_path):
    with pytest.raises(TypeError, match=r"call transcriptformer.load_model\('tf-tiny'\) first"):
        checkpoint.save_checkpoint("tf-tiny", tmp_path / "ckpt")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"takes a loaded model"):
        checkpoint.save_checkpoint(tiny_model.model, tmp_path / "ckpt")  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"{tmp_path / 'afile'}: it is a file, not a folder"):
        checkpoint.save_checkpoint(tiny_model, tmp_path / "afile")
    with pytest.raises(NotADirectoryError, match=rf"{tmp_path / 'afile'} is a file; pass another folder"):
        checkpoint.save_checkpoint(tiny_model, tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "x"


def test_docstring_examples_use_no_deprecated_name():
    import doctest
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = doctest.testmod(checkpoint, optionflags=doctest.ELLIPSIS, report=False)
    assert result.attempted > 0 and result.failed == 0
