"""The bundled demo model `tf-demo`: loads by name, and the numbers recorded beside it are reproduced."""

from __future__ import annotations

import json

import numpy as np
import pytest

import transcriptformer
import transcriptformer.scanpy as tfs


@pytest.fixture(scope="module")
def demo():
    return transcriptformer.load_model("tf-demo")


def test_demo_model_is_small_and_in_the_published_layout(demo):
    folder = tfs.models.path("tf-demo")
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 5e6
    assert {"config.json", "model_weights.pt", "vocabs"} <= {p.name for p in folder.iterdir()}
    assert demo.config.model.embed_dim == 64 and demo.seq_len == 511
    assert {a.column for a in demo.aux_vocabs} == {"assay"} and "MERFISH" in demo.aux_vocabs[0].labels


def test_recorded_label_transfer_accuracy_is_reproduced(demo):
    """kNN (k=15, cosine, distance-weighted) from the training split to the held-out PBMCs, as recorded."""
    from sklearn.metrics import accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    folder = tfs.models.path("tf-demo")
    report = json.loads((folder / "demo_report.json").read_text())
    held_out = set(json.loads((folder / "split.json").read_text())["pbmc_test"])
    pbmc = tfs.datasets.pbmc68k_counts()
    pbmc = pbmc[:, pbmc.var["ensembl_id"].notna().to_numpy()].copy()
    tfs.tl.embed(pbmc, model=demo)
    test = pbmc.obs_names.isin(held_out)
    assert test.sum() == report["pbmc"]["cells"]["test"]
    X, y = pbmc.obsm["X_transcriptformer"], pbmc.obs["bulk_labels"].astype(str).to_numpy()
    clf = KNeighborsClassifier(n_neighbors=15, metric="cosine", weights="distance").fit(X[~test], y[~test])
    accuracy = accuracy_score(y[test], clf.predict(X[test]))
    assert accuracy == pytest.approx(report["pbmc"]["tf_demo"]["accuracy"], abs=1e-9)
    assert np.isfinite(X).all()
