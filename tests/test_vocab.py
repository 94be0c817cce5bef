"""Vocabularies (vocab.py): gene vocabularies from the ESM2 gene tables, auxiliary (assay) vocabularies."""

from __future__ import annotations

import json
import shutil

import pytest

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import copy_tiny


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


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ({"unknown": 0, "10x": -1}, "must be non-negative integers"),
        ({"unknown": 0, "10x": True}, "must be non-negative integers"),
        ({"unknown": 0, "10x": "1"}, "must be non-negative integers"),
        ({"10x": 1}, "must contain the label 'unknown'"),
        ([0, 1], "must hold a JSON object"),
        (b"\xff\x00", "is not UTF-8 text"),
    ],
)
def test_a_malformed_assay_vocabulary_is_refused_at_load(tmp_path, tiny_adata, vocab, message):
    ckpt = copy_tiny(tmp_path)
    path = ckpt / "vocabs" / "assay_vocab.json"
    path.write_bytes(vocab if isinstance(vocab, bytes) else json.dumps(vocab).encode())
    with pytest.raises(ValueError, match=message) as info:
        tfs.tl.embed(tiny_adata, model=ckpt)
    assert "assay_vocab.json" in str(info.value)
    assert "X_transcriptformer" not in tiny_adata.obsm


def test_a_gene_table_that_is_not_one(tmp_path):
    ckpt = copy_tiny(tmp_path)
    (ckpt / "vocabs" / "homo_sapiens_gene.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"homo_sapiens_gene\.h5 is not a readable HDF5 gene table"):
        transcriptformer.load_model(ckpt)
