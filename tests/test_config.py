"""The configuration (config.py): parsing config.json, defaults, what it refuses, overrides."""

from __future__ import annotations

import json

import pytest

from transcriptformer.config import ModelConfig, TranscriptFormerConfig


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
