"""Out-of-distribution species: gene tables passed as `species_embedding`."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import transcriptformer.scanpy as tfs
from transcriptformer.inference.pipeline import infer
from transcriptformer.weights.checkpoint import species_vocabulary


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
