"""Plots (``tfs.pl``): what they draw (axes, labels, points), show/ax/save/return_fig, and that they only draw."""

from __future__ import annotations

import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import transcriptformer.scanpy as tfs

matplotlib.use("Agg")


def _points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))


@pytest.fixture(autouse=True)
def _close_figures():
    """Every figure a test opens is closed after it (pass or fail)."""
    yield
    plt.close("all")


def test_umap(embedded):
    tfs.tl.umap(embedded, n_neighbors=5)
    fig = tfs.pl.umap(embedded, color="cell_type", return_fig=True)
    assert fig is not None and _points(fig.axes[0]) == embedded.n_obs
    assert "X_umap" not in embedded.obsm  # an existing UMAP of the user's is never overwritten
    params = embedded.uns["umap_transcriptformer"]["params"]
    assert params["n_neighbors"] == 5 and params["use_rep"] == "X_transcriptformer"
    assert "umap_transcriptformer_neighbors_connectivities" in embedded.obsp
    fig, ax = plt.subplots()
    first = embedded.obsm["X_umap_transcriptformer"].copy()
    assert tfs.pl.umap(embedded, color="cell_type", ax=ax, show=False) is ax
    np.testing.assert_array_equal(embedded.obsm["X_umap_transcriptformer"], first)  # pl only draws


def test_tl_umap_never_writes_over_its_input(embedded):
    embedded.obsm["X_other"] = embedded.obsm["X_transcriptformer"][:, :5].copy()
    before = embedded.obsm["X_other"].copy()
    with pytest.raises(ValueError, match=r"over the embedding it is computed from; pass another key_added"):
        tfs.tl.umap(embedded, use_rep="X_other", key_added="other")
    np.testing.assert_array_equal(embedded.obsm["X_other"], before)
    assert "other" not in embedded.uns


def test_pl_umap_only_draws_and_says_what_to_run(embedded):
    with pytest.raises(KeyError, match=r"tfs\.tl\.umap\(adata"):
        tfs.pl.umap(embedded)
    assert "X_umap_transcriptformer" not in embedded.obsm
    tfs.tl.umap(embedded, n_neighbors=5)
    embedded.obsm["X_transcriptformer"] = embedded.obsm["X_transcriptformer"][::-1].copy()  # a new embedding
    with pytest.warns(UserWarning, match=r"earlier version of the embedding; run tfs\.tl\.umap"):
        tfs.pl.umap(embedded, show=False)


def test_save_goes_through_scanpys_figure_settings(embedded, tmp_path):
    old = sc.settings.figdir, sc.settings.file_format_figs
    sc.settings.figdir, sc.settings.file_format_figs = tmp_path, "png"
    try:
        assert tfs.pl.llh(embedded, save=True) is None
        tfs.pl.llh(embedded, groupby="cell_type", save="_by_type.pdf", show=False)
        tfs.pl.llh(embedded, save="_bare", show=False)
    finally:
        sc.settings.figdir, sc.settings.file_format_figs = old
    # named as scanpy names its figures: the plot's name, then the suffix
    assert (tmp_path / "llh.png").stat().st_size > 1000
    assert (tmp_path / "llh_by_type.pdf").stat().st_size > 1000
    assert (tmp_path / "llh_bare.png").stat().st_size > 1000


def test_llh_violin(embedded):
    ax = tfs.pl.llh(embedded, groupby="cell_type", show=False)
    groups = embedded.obs["cell_type"].astype("category").cat.categories
    assert [t.get_text() for t in ax.get_xticklabels()] == list(groups)
    assert ax.get_ylabel() == "negative log-likelihood per gene"
    with pytest.raises(KeyError, match="llh=True"):
        tfs.pl.llh(tfs.datasets.tiny_human())
    with pytest.warns(FutureWarning, match="key='transcriptformer'"):
        tfs.pl.llh(embedded, key="transcriptformer_llh", show=False)


def test_species_umap_is_deprecated_but_works(embedded):
    other = embedded.copy()
    with pytest.warns(FutureWarning, match=r"anndata\.concat\(adatas, label='species'\)"):
        fig = tfs.pl.species_umap({"human": embedded, "copy": other}, color="cell_type", n_neighbors=5, return_fig=True)
    assert len(fig.axes) >= 2 and _points(fig.axes[0]) == 2 * embedded.n_obs
    assert "X_umap_transcriptformer" not in embedded.obsm  # the inputs are not written to


def test_joint_umap_of_species_the_new_way(embedded):
    import anndata as ad

    joint = ad.concat({"human": embedded, "copy": embedded.copy()}, label="species", index_unique=":")
    tfs.tl.umap(joint, n_neighbors=5)
    fig = tfs.pl.umap(joint, color=["species", "cell_type"], return_fig=True)
    assert _points(fig.axes[0]) == 2 * embedded.n_obs


def test_label_transfer_plot(embedded):
    ref, query = embedded[::2].copy(), embedded[1::2].copy()
    tfs.tl.transfer_labels(query, ref, labels_key="cell_type", n_neighbors=3)
    ax = tfs.pl.label_transfer(query, true_key="cell_type", key="cell_type_transferred", show=False)
    truth = query.obs["cell_type"].astype(str)
    pred = query.obs["cell_type_transferred"].astype(str)
    accuracy = float((truth == pred).mean())
    assert f"accuracy {accuracy:.3f}" in ax.get_title() and "macro-F1" in ax.get_title()
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(image).sum(axis=1), 1.0)  # each true label's row sums to 1
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(truth.unique())


def test_label_transfer_plot_leaves_out_cells_without_a_true_label(embedded):
    query = embedded.copy()
    query.obs["predicted"] = query.obs["cell_type"].astype(str)  # every labelled cell right
    query.obs["truth"] = query.obs["cell_type"].astype(object)
    query.obs.loc[query.obs_names[:4], "truth"] = np.nan
    ax = tfs.pl.label_transfer(query, true_key="truth", key="predicted", show=False)
    assert (
        ax.get_title().startswith("accuracy 1.000, macro-F1 1.000") and "4 cells without a true label" in ax.get_title()
    )
    assert "nan" not in [t.get_text() for t in ax.get_yticklabels()]
    query.obs["truth"] = np.nan
    with pytest.raises(ValueError, match="no labels"):
        tfs.pl.label_transfer(query, true_key="truth", key="predicted", show=False)


def test_label_transfer_needs_both_columns(embedded):
    with pytest.raises(KeyError, match="no column 'nope'"):
        tfs.pl.label_transfer(embedded, true_key="cell_type", key="nope")
    with pytest.raises(KeyError, match="batch"):
        tfs.tl.celltype_similarity(embedded, groupby="cell_type", batch_key="batch")
    assert isinstance(tfs.tl.celltype_similarity(embedded, groupby="cell_type"), pd.DataFrame)


def test_celltype_similarity_heatmap(embedded):
    types_a = sorted(embedded[::2].obs["cell_type"].astype(str).unique())
    types_b = sorted(embedded[1::2].obs["cell_type"].astype(str).unique())
    both = embedded.copy()
    both.obs["half"] = np.where(np.arange(both.n_obs) % 2 == 0, "A", "B")
    tfs.tl.celltype_similarity(both, groupby="cell_type", batch_key="half")
    ax = tfs.pl.celltype_similarity(both, show=False)
    assert ax.get_ylabel() == "A" and ax.get_xlabel() == "B"
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == types_a
    assert sorted(t.get_text() for t in ax.get_xticklabels()) == types_b


def test_gene_embeddings_plot(tiny_path, tiny_adata):
    tfs.tl.gene_embeddings(tiny_adata, tiny_path)
    with pytest.raises(KeyError, match=r"tfs\.tl\.umap\(adata, use_rep='X_transcriptformer_genes', axis='var'\)"):
        tfs.pl.gene_embeddings(tiny_adata)
    tfs.tl.umap(tiny_adata, use_rep="X_transcriptformer_genes", axis="var", n_neighbors=5)
    tiny_adata.var["mouse"] = tiny_adata.var["ensembl_id"].astype(str).str.startswith("ENSMUSG")
    ax = tfs.pl.gene_embeddings(tiny_adata, color="mouse", genes=[tiny_adata.var_names[0]], show=False)
    n_read = int(np.isfinite(tiny_adata.varm["X_transcriptformer_genes"]).all(axis=1).sum())
    assert _points(ax) == n_read and ax.get_title().startswith(f"{n_read} genes")
    coords = tiny_adata.varm["X_umap_transcriptformer_genes"]
    assert coords.shape == (tiny_adata.n_vars, 2) and int(np.isfinite(coords).all(axis=1).sum()) == n_read
    assert {t.get_text() for t in ax.get_legend().get_texts()} <= {"True", "False"}
    with pytest.raises(KeyError, match=r"tl\.gene_embeddings"):
        tfs.pl.gene_embeddings(tfs.datasets.tiny_human())


def test_gene_embeddings_plot_warns_about_a_new_embedding(tiny_path, tiny_adata):
    """The UMAP is drawn as it was computed; a plot of a changed embedding says to compute it again."""
    tfs.tl.gene_embeddings(tiny_adata, tiny_path)
    tfs.tl.umap(tiny_adata, use_rep="X_transcriptformer_genes", axis="var", n_neighbors=5)
    first = tiny_adata.varm["X_umap_transcriptformer_genes"].copy()
    tfs.pl.gene_embeddings(tiny_adata, show=False)
    np.testing.assert_array_equal(tiny_adata.varm["X_umap_transcriptformer_genes"], first)  # pl only draws
    tfs.tl.gene_embeddings(tiny_adata, tiny_path, normalize_to_scale=10, clip_counts=2)  # another embedding
    with pytest.warns(UserWarning, match="earlier version of the embedding"):
        tfs.pl.gene_embeddings(tiny_adata, show=False)


def test_pl_umap_notices_a_change_of_one_row(embedded):
    tfs.tl.umap(embedded, n_neighbors=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the embedding the UMAP was made from: no warning
        tfs.pl.umap(embedded, show=False)
    embedded.obsm["X_transcriptformer"][7, 3] += 1e-3  # one value of one cell
    with pytest.warns(UserWarning, match=r"'umap_transcriptformer' was computed from an earlier version"):
        tfs.pl.umap(embedded, show=False)


def test_save_names_files_as_scanpy_does(embedded, tmp_path):
    old = sc.settings.figdir, sc.settings.file_format_figs
    sc.settings.figdir, sc.settings.file_format_figs = tmp_path, "pdf"
    try:
        tfs.pl.llh(embedded, save="_lt.png", show=False)
        tfs.tl.umap(embedded, n_neighbors=5)
        tfs.pl.umap(embedded, save="_cells", show=False)
    finally:
        sc.settings.figdir, sc.settings.file_format_figs = old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llh_lt.png", "umap_cells.pdf"]


def test_pl_umap_rep_is_deprecated_but_works(embedded):
    tfs.tl.umap(embedded, n_neighbors=5)
    with pytest.warns(FutureWarning, match=r"use_rep=\.\.\."):
        ax = tfs.pl.umap(embedded, rep="X_transcriptformer", show=False)
    assert _points(ax) == embedded.n_obs


def test_pl_umap_checks_the_embedding_the_umap_was_made_from(embedded):
    """A UMAP of another embedding (``tl.umap(use_rep=...)``) is checked against that one, and named in the advice."""
    embedded.obsm["X_other"] = np.random.default_rng(0).normal(size=(embedded.n_obs, 5)).astype(np.float32)
    tfs.tl.umap(embedded, use_rep="X_other", key_added="other_umap", n_neighbors=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # neither X_other nor the UMAP changed: no warning
        tfs.pl.umap(embedded, key="other_umap", show=False)
    embedded.obsm["X_other"][0, 0] += 1.0
    with pytest.warns(
        UserWarning, match=r"run tfs\.tl\.umap\(adata, use_rep='X_other', key_added='other_umap'\) again"
    ):
        tfs.pl.umap(embedded, key="other_umap", show=False)


def test_gene_embeddings_plot_checks_the_embedding_the_umap_was_made_from(tiny_adata):
    rng = np.random.default_rng(0)
    tiny_adata.varm["X_transcriptformer_genes"] = rng.normal(size=(tiny_adata.n_vars, 4)).astype(np.float32)
    tiny_adata.varm["X_g2"] = rng.normal(size=(tiny_adata.n_vars, 4)).astype(np.float32)
    tfs.tl.umap(tiny_adata, use_rep="X_g2", axis="var", key_added="gu", n_neighbors=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the UMAP of X_g2, which did not change: no warning
        tfs.pl.gene_embeddings(tiny_adata, umap_key="gu", show=False)
    tiny_adata.varm["X_g2"][0, 0] += 1.0
    with pytest.warns(UserWarning, match=r"use_rep='X_g2', axis='var', key_added='gu'\) again"):
        tfs.pl.gene_embeddings(tiny_adata, umap_key="gu", show=False)


def test_pl_umap_returns_what_scanpy_returns(embedded):
    """One Axes per panel (no colour bars), a single Axes for one colour, the figure with return_fig."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    tfs.tl.umap(embedded, n_neighbors=5)
    panels = ["transcriptformer_llh", "n_counts_input"]
    axs = tfs.pl.umap(embedded, color=panels, show=False)
    assert isinstance(axs, list) and [ax.get_title() for ax in axs] == panels
    assert all(_points(ax) == embedded.n_obs for ax in axs)
    for color in (["transcriptformer_llh"], "transcriptformer_llh", None):
        ax = tfs.pl.umap(embedded, color=color, show=False)
        assert isinstance(ax, Axes) and _points(ax) == embedded.n_obs
    assert isinstance(tfs.pl.umap(embedded, color=panels, return_fig=True), Figure)


def test_pl_umap_and_llh_leave_adata_unchanged_and_use_its_colours(embedded):
    """Scanpy stores colours and makes string columns categorical: the plots draw from a copy of what they need."""
    from matplotlib.colors import to_rgba

    from helpers import assert_unchanged, snapshot

    tfs.tl.umap(embedded, n_neighbors=5)
    embedded.obs["donor"] = embedded.obs["donor_id"].astype(str).astype(object)
    n_types = len(embedded.obs["cell_type"].cat.categories)
    mine = ["#123456", "#abcdef", "#fedcba", "#0f0f0f", "#f0f0f0", "#00ff00", "#ff00ff", "#00ffff"][:n_types]
    embedded.uns["cell_type_colors"] = list(mine)
    before, uns_before = snapshot(embedded), {k: embedded.uns[k] for k in embedded.uns}
    gene = embedded.var_names[3]
    axs = tfs.pl.umap(embedded, color=["donor", "cell_type", gene], show=False)
    ax = tfs.pl.llh(embedded, groupby="donor", show=False)
    tfs.pl.llh(embedded, groupby="cell_type", show=False)
    assert_unchanged(embedded, before)
    assert embedded.obs["donor"].dtype == object and "donor_colors" not in embedded.uns
    assert embedded.uns["cell_type_colors"] == mine and set(embedded.uns) == set(uns_before)
    # the plots are those of scanpy: the colours already in adata.uns, genes' values from X
    drawn = {tuple(c) for c in axs[1].collections[0].get_facecolors()}
    assert drawn == {to_rgba(c) for c in mine[: embedded.obs["cell_type"].nunique()]}
    values = np.asarray(embedded[:, gene].X.toarray()).ravel()
    assert axs[2].collections[0].get_array().min() == values.min()
    assert axs[2].collections[0].get_array().max() == values.max()
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(embedded.obs["donor"].unique())


def test_celltype_similarity_heatmap_keeps_the_dataset_of_an_axis_with_several(embedded):
    both = embedded.copy()
    both.obs["half"] = np.where(np.arange(both.n_obs) % 2 == 0, "A", "B")
    table = tfs.tl.celltype_similarity(both, groupby="cell_type", batch_key="half")
    ax = tfs.pl.celltype_similarity(both, rows="A", cluster=False, show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table.columns)  # "A | ...", "B | ..."
    assert [t.get_text() for t in ax.get_yticklabels()] == [i.split(" | ")[1] for i in table.index if i[0] == "A"]
    assert ax.get_ylabel() == "A" and ax.get_xlabel() == ""
    ax = tfs.pl.celltype_similarity(both, columns="B", cluster=False, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table.index)
    assert [t.get_text() for t in ax.get_xticklabels()] == [c.split(" | ")[1] for c in table.columns if c[0] == "B"]


def test_missing_results_name_the_tl_call_and_its_key_added(tiny_adata):
    with pytest.raises(KeyError, match=r"tfs\.tl\.transfer_labels\(adata, reference, labels_key='cell_type'\)"):
        tfs.pl.label_transfer(tiny_adata, true_key="cell_type", key="cell_type_transferred", show=False)
    with pytest.raises(KeyError, match=r"labels_key=<reference label column>, key_added='mine'\)"):
        tfs.pl.label_transfer(tiny_adata, true_key="cell_type", key="mine", show=False)
    with pytest.raises(KeyError, match=r"no column 'truth' \(true_key\)"):
        tfs.pl.label_transfer(tiny_adata, true_key="truth", key="mine", show=False)
    with pytest.raises(KeyError, match=r"tfs\.tl\.likelihood\(adata, model, key_added='mine'\)"):
        tfs.pl.llh(tiny_adata, key="mine", show=False)
    with pytest.raises(KeyError, match=r"tfs\.tl\.likelihood\(adata, model\) "):
        tfs.pl.llh(tiny_adata, show=False)
    with pytest.raises(KeyError, match=r"tfs\.tl\.gene_embeddings\(adata, model, key_added='mygenes'\), then"):
        tfs.pl.gene_embeddings(tiny_adata, key="mygenes", show=False)
    with pytest.raises(KeyError, match=r"tfs\.tl\.gene_embeddings\(adata, model\), then"):
        tfs.pl.gene_embeddings(tiny_adata, show=False)
