"""Label transfer and cell-type similarity (``tfs.tl.transfer_labels``, ``tfs.tl.celltype_similarity``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, snapshot


@pytest.mark.parametrize("method", ["knn", "logreg"])
def test_transfer_labels(tiny_path, tiny_adata, method):
    tfs.tl.embed(tiny_adata, model=tiny_path)
    ref, query = tiny_adata[::2].copy(), tiny_adata[1::2].copy()
    before = snapshot(ref)
    tfs.tl.transfer_labels(query, ref, labels_key="cell_type", method=method, n_neighbors=3)
    assert_unchanged(ref, before)
    pred = query.obs["cell_type_transferred"]
    assert set(pred.cat.categories) <= set(tiny_adata.obs["cell_type"].astype(str))
    conf = query.obs["cell_type_transferred_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    assert query.uns["cell_type_transferred"]["params"]["method"] == method
    # a reference transferred onto itself with one neighbour recovers its own labels
    self_copy = tfs.tl.transfer_labels(ref, ref, labels_key="cell_type", n_neighbors=1, key_added="again", copy=True)
    np.testing.assert_array_equal(self_copy.obs["again"].astype(str), ref.obs["cell_type"].astype(str))


def test_transfer_labels_errors(tiny_path, tiny_adata):
    with pytest.raises(KeyError, match="embed it first"):
        tfs.tl.transfer_labels(tiny_adata, tiny_adata, labels_key="cell_type")
    tfs.tl.embed(tiny_adata, model=tiny_path)
    with pytest.raises(KeyError, match="no column 'nope'"):
        tfs.tl.transfer_labels(tiny_adata, tiny_adata, labels_key="nope")
    other = tiny_adata.copy()
    other.obsm["X_transcriptformer"] = other.obsm["X_transcriptformer"][:, :5]
    with pytest.raises(ValueError, match="differ in width"):
        tfs.tl.transfer_labels(tiny_adata, other, labels_key="cell_type")


def test_celltype_similarity_tables(embedded):
    a, b = embedded[::2].copy(), embedded[1::2].copy()
    table = tfs.tl.celltype_similarity({"A": a, "B": b}, groupby="cell_type")
    types_a, types_b = sorted(a.obs["cell_type"].astype(str).unique()), sorted(b.obs["cell_type"].astype(str).unique())
    assert list(table.index) == [f"A | {t}" for t in types_a] + [f"B | {t}" for t in types_b]
    np.testing.assert_allclose(np.diag(table.to_numpy()), 1.0)  # cosine of each centroid with itself
    # the centroid cosine by hand for one pair
    t = types_a[0]
    ca = a.obsm["X_transcriptformer"][(a.obs["cell_type"] == t).to_numpy()].mean(0)
    cb = b.obsm["X_transcriptformer"][(b.obs["cell_type"] == t).to_numpy()].mean(0)
    expected = ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb)
    assert table.loc[f"A | {t}", f"B | {t}"] == pytest.approx(expected, rel=1e-5)
    knn = tfs.tl.celltype_similarity([a, b], groupby="cell_type", method="knn_transfer", n_neighbors=3)
    block = knn.loc[[i for i in knn.index if i.startswith("0 |")], [c for c in knn.columns if c.startswith("1 |")]]
    np.testing.assert_allclose(block.sum(axis=1), 1.0)  # shares of each type's cells
    assert (
        knn.loc[[i for i in knn.index if i.startswith("0 |")], [c for c in knn.columns if c.startswith("0 |")]]
        .isna()
        .all()
        .all()
    )
    # one AnnData with a batch key: also stored in its uns (drawn by tfs.pl.celltype_similarity: test_pl.py)
    both = embedded.copy()
    both.obs["half"] = np.where(np.arange(both.n_obs) % 2 == 0, "A", "B")
    tfs.tl.celltype_similarity(both, groupby="cell_type", batch_key="half")
    assert "transcriptformer_celltype_similarity" in both.uns


def test_transfer_labels_former_spellings_are_deprecated_but_work(embedded):
    ref, query = embedded[::2].copy(), embedded[1::2].copy()
    expected = tfs.tl.transfer_labels(query, ref, labels_key="cell_type", use_rep="X_transcriptformer", copy=True)
    with pytest.warns(FutureWarning) as record:
        old = tfs.tl.transfer_labels(query, ref, key="cell_type", rep="X_transcriptformer", copy=True)
    messages = " ".join(str(w.message) for w in record)
    assert "labels_key=..." in messages and "use_rep=..." in messages
    assert old.obs["cell_type_transferred"].equals(expected.obs["cell_type_transferred"])


def test_knn_transfer_needs_two_datasets(embedded):
    with pytest.raises(ValueError, match="method='knn_transfer' compares datasets with each other, but there is one"):
        tfs.tl.celltype_similarity(embedded, groupby="cell_type", method="knn_transfer")
    with pytest.raises(ValueError, match="but there is one"):
        tfs.tl.celltype_similarity({"only": embedded}, groupby="cell_type", method="knn_transfer")
    assert "transcriptformer_celltype_similarity" not in embedded.uns


def test_labels_holding_the_separator_are_refused(embedded):
    a, b = embedded[::2].copy(), embedded[1::2].copy()
    with pytest.raises(ValueError, match=r"dataset 'A \| B' / group .* neither may contain it"):
        tfs.tl.celltype_similarity({"A | B": a, "C": b}, groupby="cell_type")
    b.obs["cell_type"] = b.obs["cell_type"].astype(str) + " | subtype"
    with pytest.raises(ValueError, match=r"group '.* \| subtype'"):
        tfs.tl.celltype_similarity({"A": a, "C": b}, groupby="cell_type")
    table = tfs.tl.celltype_similarity({"A": a, "C": embedded[1::2].copy()}, groupby="cell_type")  # fine without
    assert all(label.count(" | ") == 1 for label in table.index)


def test_datasets_that_are_not_anndata_or_none_are_clear_errors(embedded):
    with pytest.raises(TypeError, match="dataset '1' must be an AnnData, got str"):
        tfs.tl.celltype_similarity([embedded, "x"], groupby="cell_type")
    with pytest.raises(ValueError, match="adatas is empty: pass the datasets to compare"):
        tfs.tl.celltype_similarity({}, groupby="cell_type")
    with pytest.raises(TypeError, match="adatas must be an AnnData, a dict of AnnData or a list of AnnData, got int"):
        tfs.tl.celltype_similarity(5, groupby="cell_type")


def test_nan_embeddings_are_refused_by_label_transfer_and_similarity(embedded):
    broken = embedded.copy()
    broken.obsm["X_transcriptformer"][3, 0] = np.nan
    ref = embedded[::2].copy()
    before = snapshot(broken)
    with pytest.raises(ValueError, match=r"adata\.obsm\['X_transcriptformer'\] has NaN or infinite values in 1 cell"):
        tfs.tl.transfer_labels(broken, ref, labels_key="cell_type")
    assert_unchanged(broken, before)
    with pytest.raises(ValueError, match=r"reference\.obsm\['X_transcriptformer'\] has NaN or infinite values"):
        tfs.tl.transfer_labels(ref, broken, labels_key="cell_type")
    with pytest.raises(ValueError, match=r"dataset 'B'\.obsm\['X_transcriptformer'\] has NaN or infinite values"):
        tfs.tl.celltype_similarity({"A": ref, "B": broken}, groupby="cell_type")
    with pytest.raises(ValueError, match="has NaN or infinite values in 1 cell"):
        tfs.tl.celltype_similarity(broken, groupby="cell_type")
    assert "transcriptformer_celltype_similarity" not in broken.uns


def test_celltype_similarity_rep_is_deprecated_but_works(embedded):
    expected = tfs.tl.celltype_similarity(embedded, groupby="cell_type")
    with pytest.warns(FutureWarning, match=r"use_rep=\.\.\."):
        old = tfs.tl.celltype_similarity(embedded, groupby="cell_type", rep="X_transcriptformer")
    pd.testing.assert_frame_equal(old, expected)


def test_the_tools_without_a_model_record_the_package_version(embedded):
    """Every params record is built by the one provenance builder: tool and package version included."""
    from transcriptformer import __version__

    a = embedded.copy()
    tfs.tl.transfer_labels(a, embedded, labels_key="cell_type")
    tfs.tl.celltype_similarity(a, groupby="cell_type", batch_key="donor_id")
    tfs.tl.umap(a, n_neighbors=5)
    for key, tool in (
        ("cell_type_transferred", "transfer_labels"),
        ("transcriptformer_celltype_similarity", "celltype_similarity"),
        ("umap_transcriptformer", "umap"),
    ):
        params = a.uns[key]["params"]
        assert params["tool"] == tool and params["transcriptformer_version"] == __version__, key


def test_transfer_labels_keeps_the_reference_categories_and_colours(embedded):
    ref, query = embedded[::2].copy(), embedded[1::2].copy()
    order = ["T cell", "monocyte", "unused", "B cell", "NK cell"]  # not sorted, not in order of appearance
    ref.obs["cell_type"] = pd.Categorical(ref.obs["cell_type"].astype(str), categories=order)
    ref.uns["cell_type_colors"] = ["#000001", "#000002", "#000003", "#000004", "#000005"]
    tfs.tl.transfer_labels(query, ref, labels_key="cell_type", n_neighbors=3)
    used = [c for c in order if c != "unused"]
    assert list(query.obs["cell_type_transferred"].cat.categories) == used
    assert list(query.uns["cell_type_transferred_colors"]) == ["#000001", "#000002", "#000004", "#000005"]
    assert "uns/cell_type_transferred_colors" in query.uns["cell_type_transferred"]["params"]["keys"]
    # a column of strings: its labels sorted, and no colours
    ref.obs["plain"] = ref.obs["cell_type"].astype(str).to_numpy()[::-1]
    tfs.tl.transfer_labels(query, ref, labels_key="plain", n_neighbors=3)
    assert list(query.obs["plain_transferred"].cat.categories) == sorted(set(ref.obs["plain"]))
    assert "plain_transferred_colors" not in query.uns


def test_celltype_similarity_leaves_out_cells_without_a_batch(embedded):
    both = embedded.copy()
    both.obs["half"] = pd.Series(np.where(np.arange(both.n_obs) % 2 == 0, "A", "B"), index=both.obs_names, dtype=object)
    both.obs.loc[both.obs_names[:4], "half"] = np.nan
    table = tfs.tl.celltype_similarity(both, groupby="cell_type", batch_key="half")
    assert {label.split(" | ")[0] for label in table.index} == {"A", "B"}
    kept = both[4:].copy()
    pd.testing.assert_frame_equal(table, tfs.tl.celltype_similarity(kept, groupby="cell_type", batch_key="half"))
    both.obs["half"] = pd.Categorical([np.nan] * both.n_obs, categories=["A"])
    with pytest.raises(ValueError, match=r"adata\.obs\['half'\] \(batch_key\) has no label"):
        tfs.tl.celltype_similarity(both, groupby="cell_type", batch_key="half")


def test_knn_transfer_refuses_more_neighbours_than_a_dataset_has_cells(embedded):
    a, b = embedded[::2].copy(), embedded[1:7].copy()  # 11 and 6 cells
    before = snapshot(a)
    for k in (6, 15):
        with pytest.raises(ValueError, match=rf"n_neighbors={k}, but dataset 'small' has 6 cell\(s\)"):
            tfs.tl.celltype_similarity(
                {"big": a, "small": b}, groupby="cell_type", method="knn_transfer", n_neighbors=k
            )
    assert_unchanged(a, before)
    table = tfs.tl.celltype_similarity(
        {"big": a, "small": b}, groupby="cell_type", method="knn_transfer", n_neighbors=5
    )
    assert table.notna().any().any()
