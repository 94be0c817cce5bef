"""``tfs.datasets`` (cells) and ``tfs.models`` (model paths, downloads), and the bundled demo model ``tf-demo``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import HUMAN, RegistryServer

# --- the demo model -------------------------------------------------------------------------------------------------


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


# --- datasets -------------------------------------------------------------------------------------------------------


def test_pbmc68k_counts():
    adata = tfs.datasets.pbmc68k_counts()
    assert adata.shape == (700, 765)
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.data, np.rint(adata.X.data))
    assert adata.X.data.min() >= 1
    deviation = adata.uns["pbmc68k_counts"]["max_deviation"]
    assert 0 <= deviation < tfs.datasets.COUNT_TOLERANCE
    # the counts give back scanpy's log-normalised matrix (stored to three decimals)
    src = sc.datasets.pbmc68k_reduced()
    size = adata.obs["n_counts_all_genes"].to_numpy()[:, None]
    lognorm = np.log1p(adata.X.toarray() / size * 1e4)
    np.testing.assert_allclose(lognorm, src.raw.X.toarray(), atol=6e-4, rtol=0)
    assert list(adata.var_names) == list(src.raw.var_names)
    assert (adata.obs["bulk_labels"] == src.obs["bulk_labels"]).all()
    assert (adata.obs["louvain"] == src.obs["louvain"]).all()
    assert set(adata.obs["assay"]) == {"10x 3' v1"}
    assert adata.var["ensembl_id"].notna().mean() > 0.9
    assert adata.var.loc["CD3E", "ensembl_id"] == HUMAN["CD3E"]
    assert adata.raw is None
    assert adata.uns["ensembl_id"]["params"]["tool"] == "symbols_to_ensembl"
    # a new object each time
    adata.obs["bulk_labels"] = "x"
    assert (tfs.datasets.pbmc68k_counts().obs["bulk_labels"] != "x").all()


def test_datasets_list_only_their_api():
    names = dir(tfs.datasets)
    assert names == sorted(tfs.datasets.__all__)
    assert {"pbmc68k_counts", "tiny_human", "mouse_val", "tabula_sapiens"} <= set(names)
    assert not {"np", "os", "pd", "sp", "ad", "logger", "registry", "models"} & set(names)
    assert not {"tiny_model_path", "demo_model_path", "available_models", "download", "species_testis"} & set(names)


# --- models -------------------------------------------------------------------------------------------------------


def test_models_paths_and_listing(registry_offline, tmp_path):
    for name in ("tf-tiny", "tf-demo"):
        folder = tfs.models.path(name)
        assert (folder / "config.json").is_file() and (folder / "model_weights.pt").is_file()
        assert transcriptformer.load_model(name).path == folder.resolve()
    listing = tfs.models.available()
    assert listing.loc["tf-tiny", "cached"] and listing.loc["tf-demo", "cached"]
    assert not listing.loc["tf-sapiens", "cached"]
    assert {"kind", "url", "cached", "path"} <= set(listing.columns)
    with pytest.raises(
        FileNotFoundError, match=r"tf-sapiens is not downloaded yet: tfs\.models\.download\('tf-sapiens'\)"
    ):
        tfs.models.path("tf-sapiens", cache_dir=tmp_path)  # registered, not downloaded: nothing is downloaded
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError, match="tf-nonsense"):
        tfs.models.path("tf-nonsense")
    # datasets are not models: say what they are and how to read them (tfs.models.path gave the .h5ad file)
    with pytest.raises(ValueError, match=r"'human-val' is a dataset .*tfs\.datasets\.published_test_data\('human'\)"):
        tfs.models.path("human-val", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'mouse-val' is a dataset .*published_test_data\('mouse'\)"):
        transcriptformer.load_model("mouse-val")
    with pytest.raises(ValueError, match=r"'testis-human' is a dataset .*bgee_testis_evolution\('human'\)"):
        transcriptformer.load_model("testis-human")
    with pytest.raises(ValueError, match=r"'all-embeddings' is a set of gene tables .*species_embedding"):
        transcriptformer.load_model("all-embeddings")
    with pytest.raises(FileNotFoundError, match=r"or pass a species name as species_embedding= to any tool"):
        tfs.models.path("all-embeddings", cache_dir=tmp_path)
    assert dir(tfs.models) == ["available", "download", "path"]


# --- deprecated names: they warn and still work -------------------------------------------------------------------


def test_model_paths_in_datasets_are_deprecated_but_work(registry_offline):
    with pytest.warns(FutureWarning, match=r"tfs\.models\.path\('tf-tiny'\)"):
        assert tfs.datasets.tiny_model_path() == tfs.models.path("tf-tiny")
    with pytest.warns(FutureWarning, match=r"tfs\.models\.path\('tf-demo'\)"):
        assert tfs.datasets.demo_model_path() == tfs.models.path("tf-demo")
    with pytest.warns(FutureWarning, match=r"tfs\.models\.available\(\)"):
        listing = tfs.datasets.available_models()
    pd.testing.assert_frame_equal(listing, tfs.models.available())
    with pytest.warns(FutureWarning, match=r"tfs\.models\.download\(name\)"):
        assert tfs.datasets.download("tf-demo") == tfs.models.path("tf-demo")  # bundled: nothing to download


def test_species_testis_is_deprecated_but_works(registry_offline, tmp_path, tiny_adata, monkeypatch):
    tiny_adata.write_h5ad(tmp_path / "testis.h5ad")
    files = {"Macaca_mulatta_ERP132582_droplet_based_curated.h5ad": (tmp_path / "testis.h5ad").read_bytes()}
    with RegistryServer(files, prefix="/data/") as server:
        monkeypatch.setenv("TRANSCRIPTFORMER_DATA_URL", server.url)
        with pytest.warns(FutureWarning, match=r"datasets\.bgee_testis_evolution\(\.\.\.\)"):
            old = tfs.datasets.species_testis("macaque", cache_dir=tmp_path / "cache", progress=False)
        new = tfs.datasets.bgee_testis_evolution("macaque", cache_dir=tmp_path / "cache", progress=False)
        assert server.requests == ["/data/Macaca_mulatta_ERP132582_droplet_based_curated.h5ad"]  # one download
    assert old.shape == new.shape == tiny_adata.shape
    assert list(old.obs_names) == list(tiny_adata.obs_names)
