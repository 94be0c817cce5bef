"""The run options every tool shares (inference/options.py): each one checked, before a model is loaded or a
count is read, by the same rules in the Python API and on the command line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, embed_fails, error_line, infer_args, run_cli, snapshot
from transcriptformer.inference.options import RunOptions


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("batch_size", 1.5),
        ("batch_size", "8"),
        ("batch_size", True),
        ("batch_size", np.nan),
        ("batch_size", 0),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 2.0),
        ("clip_counts", "30"),
        ("clip_counts", True),
        ("clip_counts", 0),
        ("normalize_to_scale", True),
        ("normalize_to_scale", -1),
        ("normalize_to_scale", "10"),
        ("filter_to_vocab", "no"),
        ("filter_to_vocab", 1),
        ("filter_to_vocab", None),
        ("device", "tpu"),
        ("device", ""),
        ("device", None),
        ("device", 0),
        ("device", "meta"),
        ("device", "cpu:0"),
        ("device", "cuda:x"),
        ("precision", "8"),
        ("precision", None),
        ("gene_key", 5),
        ("layer", ""),
        ("species_embedding", 5),
        ("species_embedding", []),
        ("species_embedding", [3]),
        ("species_embedding", {"a": 1}),
    ],
)
def test_run_options_are_refused_before_the_model_loads(tiny_path, tiny_adata, name, bad, no_model_load):
    with pytest.raises(ValueError, match=name):
        tfs.tl.embed(tiny_adata, model=tiny_path, **{name: bad})
    with pytest.raises(ValueError, match=name):
        RunOptions(**{name: bad})
    assert no_model_load == []


def test_non_finite_options_are_refused_in_the_api_and_the_cli(tiny_path, tiny_adata, h5ad, capsys, no_model_load):
    for name, value in [
        ("normalize_to_scale", np.inf),
        ("normalize_to_scale", np.nan),
        ("clip_counts", np.inf),
        ("clip_counts", np.nan),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            tfs.tl.embed(tiny_adata, model=tiny_path, **{name: value})
    for extra, named in [
        (("--config-override", "model.data_config.normalize_to_scale=inf"), "normalize_to_scale=inf"),
        (("--config-override", "data_config.normalize_to_scale=nan"), "data_config.normalize_to_scale=nan"),
        (("--config-override", "model.data_config.clip_counts=-inf"), "clip_counts=-inf"),
        (("--clip-counts", "inf"), "--clip-counts"),
        (("--clip-counts", "nan"), "--clip-counts"),
    ]:
        code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, h5ad.parent / "out", *extra))
        assert code == 1
        assert named in error_line(err)
    assert no_model_load == []
    assert not (h5ad.parent / "out").exists()


def test_bad_options_are_refused_and_leave_the_input_unchanged(tiny_path, tiny_adata):
    embed_fails(tiny_adata, ValueError, "precision", model=tiny_path, precision="8")
    if not torch.cuda.is_available():
        embed_fails(tiny_adata, ValueError, "CUDA is not available", model=tiny_path, device="cuda")
    embed_fails(tiny_adata, KeyError, "layer 'nope' not found", model=tiny_path, layer="nope")
    embed_fails(tiny_adata, ValueError, "duplicate_genes", model=tiny_path, duplicate_genes="last")
    embed_fails(tiny_adata, ValueError, "batch_size", model=tiny_path, batch_size=0)
    with pytest.raises(TypeError, match="AnnData"):
        tfs.tl.embed(np.zeros((3, 3)), model=tiny_path)


@pytest.mark.parametrize("bad", [None, 5, "", "   ", "a/b", ["x"]])
def test_key_added_is_validated_everywhere(tiny_path, tiny_adata, bad, no_model_load):
    before = snapshot(tiny_adata)
    tiny_adata.obsm["X_transcriptformer"] = np.zeros((tiny_adata.n_obs, 32), np.float32)
    reference = tiny_adata.copy()
    calls = [
        lambda: tfs.tl.embed(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.likelihood(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.gene_embeddings(tiny_adata, model=tiny_path, key_added=bad),
        lambda: tfs.tl.transfer_labels(tiny_adata, reference, labels_key="cell_type", key_added=bad or ""),
        lambda: tfs.pp.match_genes(tiny_adata, tiny_path, key_added=bad),
        lambda: tfs.pp.symbols_to_ensembl(tiny_adata, symbol_key="feature_name", key_added=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="key_added"):
            call()
    del tiny_adata.obsm["X_transcriptformer"]
    assert_unchanged(tiny_adata, before)
    assert no_model_load == []


def test_gene_lists_are_validated(tiny_path, tiny_adata, no_model_load):
    for bad in (5, [1, 2], [], [""], ["ENSG1", None]):
        with pytest.raises(ValueError, match="genes must be gene ids"):
            tfs.tl.contextual_gene_embeddings(tiny_adata, model=tiny_path, genes=bad)
        with pytest.raises(ValueError, match="genes must be gene ids"):
            tfs.tl.gene_embeddings(tiny_adata, model=tiny_path, genes=bad)
    assert no_model_load == []
