"""``tfs.tl.embed``: its keys and record, ``key_added``, ``copy``, and the checks every tool of the face shares
(scanpy/_utils.py: AnnData input, no cells, views of backed data, scanpy's verbosity).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import (
    assert_unchanged,
    embed_fails,
    error_line,
    infer_args,
    run_cli,
    snapshot,
)


def test_outputs_and_params(tiny_path, tiny_adata, tiny_model, tmp_path):
    assert tfs.tl.embed(tiny_adata, model=tiny_path, llh=True) is None
    emb = tiny_adata.obsm["X_transcriptformer"]
    assert emb.shape == (tiny_adata.n_obs, 32)
    assert emb.dtype == np.float32
    entry = tiny_adata.uns["transcriptformer"]
    params = entry["params"]
    assert params["weights_sha256"] == tiny_model.weights_sha256
    assert params["model_path"] == str(tiny_path)
    assert params["transcriptformer_version"] == transcriptformer.__version__
    assert params["clip_counts"] == 30
    assert params["n_genes_matched"] == 165
    assert params["precision"] == "32"
    assert params["llh"] is True and params["tool"] == "embed"
    assert tiny_adata.obs["transcriptformer_llh"].shape == (tiny_adata.n_obs,)
    # the likelihoods in uns, as the design asks: n_obs floats in input order, the same as the obs column
    np.testing.assert_array_equal(entry["llh"], tiny_adata.obs["transcriptformer_llh"].to_numpy())
    assert sorted(params["keys"]) == [
        "obs/transcriptformer_llh",
        "obs/transcriptformer_n_genes",
        "obsm/X_transcriptformer",
        "uns/transcriptformer",
    ]
    # everything written is h5ad-serialisable
    tiny_adata.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["transcriptformer"]["params"]["weights_sha256"] == tiny_model.weights_sha256
    np.testing.assert_array_equal(back.uns["transcriptformer"]["llh"], entry["llh"])


def test_alias_and_key_added_and_copy(tiny_path, tiny_adata, ref_embedding):
    assert tfs.tl.transcriptformer is tfs.tl.embed
    before = snapshot(tiny_adata)
    out = tfs.tl.embed(tiny_adata, model=tiny_path, llh=True, key_added="tf2", copy=True)
    assert_unchanged(tiny_adata, before)
    np.testing.assert_allclose(out.obsm["X_tf2"], ref_embedding[0], atol=1e-6)
    assert "params" in out.uns["tf2"] and "llh" in out.uns["tf2"]  # keys derive from the base name "tf2"
    assert "tf2_llh" in out.obs and "tf2_n_genes" in out.obs


def test_keyword_only_options(tiny_path, tiny_adata):
    with pytest.raises(TypeError):
        tfs.tl.embed(tiny_adata, tiny_path, "ensembl_id")


def test_neighbors_downstream(tiny_path, tiny_adata):
    # exact neighbours with Gaussian weights: no numba compilation of pynndescent / umap for 21 cells
    # (the README quickstart test runs the default umap method on the same embedding)
    tfs.tl.embed(tiny_adata, model=tiny_path)
    sc.pp.neighbors(tiny_adata, use_rep="X_transcriptformer", n_neighbors=5, method="gauss", transformer="sklearn")
    assert tiny_adata.obsp["connectivities"].shape == (21, 21)


def test_input_unchanged_when_model_fails_midway(tiny_path, tiny_adata, monkeypatch):
    from transcriptformer.inference.engine import Engine

    calls = {"n": 0}
    original = Engine._forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_forward", flaky)
    embed_fails(tiny_adata, RuntimeError, "boom", model=tiny_path, batch_size=4, llh=True)


def test_embed_key_added_as_an_obsm_key_is_deprecated(tiny_path, tiny_adata):
    with pytest.warns(FutureWarning, match="key_added is now a base name"):
        tfs.tl.embed(tiny_adata, model=tiny_path, key_added="X_mine")
    assert "X_mine" in tiny_adata.obsm and "mine" in tiny_adata.uns


# --- what every tool checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda p: tfs.pp.match_genes("x", p),
        lambda p: tfs.pp.check_input("x", p),
        lambda p: tfs.tl.embed("x", model=p),
        lambda p: tfs.tl.likelihood("x", model=p),
        lambda p: tfs.tl.contextual_gene_embeddings("x", model=p),
        lambda p: tfs.pp.symbols_to_ensembl("x"),
    ],
)
def test_non_anndata_input_is_named(tiny_path, call):
    with pytest.raises(TypeError, match="AnnData, got str"):
        call(tiny_path)


@pytest.mark.parametrize("stream", [False, True])
def test_zero_cells_are_an_error_in_the_api_and_the_cli(tmp_path, tiny_path, tiny_adata, capsys, stream):
    empty = tiny_adata[:0].copy()
    with pytest.raises(ValueError, match="has no cells"):
        tfs.tl.embed(empty, model=tiny_path)
    path = tmp_path / "empty.h5ad"
    empty.write_h5ad(path)
    code, err = run_cli(capsys, *infer_args(tiny_path, path, tmp_path / "out", *(["--stream-output"] * stream)))
    assert code == 1 and "has no cells" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_zero_genes_say_so(tiny_path, tiny_adata):
    for no_genes in (tiny_adata[:, []], tiny_adata[:, tiny_adata.var_names == "not a gene"].copy()):
        with pytest.raises(ValueError, match=r"the data has no genes \(var\['ensembl_id'\] is empty, n_vars = 0\)"):
            tfs.tl.embed(no_genes, model=tiny_path)


def test_views_of_backed_data(tiny_path, tiny_adata, tmp_path, no_model_load):
    path = tmp_path / "backed.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[3:15]
    for call in (
        lambda: tfs.tl.embed(view, model=tiny_path),
        lambda: tfs.tl.likelihood(view, model=tiny_path),
        lambda: tfs.tl.gene_embeddings(view, model=tiny_path),
        lambda: tfs.pp.match_genes(view, tiny_path),
        lambda: tfs.pp.symbols_to_ensembl(view, symbol_key="feature_name"),
        lambda: tfs.tl.transfer_labels(view, tiny_adata, labels_key="cell_type"),
        lambda: tfs.tl.umap(view),
    ):
        with pytest.raises(ValueError, match=r"view of a backed AnnData.*copy=True"):
            call()
    for call in (  # no copy option: the message offers only loading the subset
        lambda: tfs.tl.celltype_similarity(view, groupby="cell_type"),
    ):
        with pytest.raises(
            ValueError, match=r"view of a backed AnnData.*Load the subset first: adata = adata\[\.\.\.\]\.to_memory"
        ):
            call()
    assert no_model_load == []


def test_copy_of_a_view_of_backed_data_works(tiny_path, tiny_adata, tmp_path):
    path = tmp_path / "backed.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[3:15]
    expected = tfs.tl.embed(tiny_adata[3:15].copy(), model=tiny_path, llh=True, copy=True)
    out = tfs.tl.embed(view, model=tiny_path, llh=True, copy=True)
    assert not out.isbacked and out.n_obs == 12
    np.testing.assert_allclose(out.obsm["X_transcriptformer"], expected.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_allclose(out.obs["transcriptformer_llh"], expected.obs["transcriptformer_llh"], atol=1e-6)
    assert "X_transcriptformer" not in view.obsm and "X_transcriptformer" not in backed.obsm
    marked = tfs.pp.match_genes(view, tiny_path, copy=True)
    assert marked.var["transcriptformer_in_vocab"].sum() > 0 and "transcriptformer_in_vocab" not in backed.var
    assert tfs.pp.check_input(view, tiny_path)["n_obs"] == 12
    backed.file.close()


@pytest.fixture
def package_logger():
    """The ``transcriptformer`` logger, its level and scanpy's verbosity restored afterwards (with what the package
    remembers of the level it set itself), so that no later test depends on what this one did."""
    ours = logging.getLogger("transcriptformer")
    level, verbosity = ours.level, sc.settings.verbosity
    remembered = ours.__dict__.get("_scanpy_level")
    yield ours
    sc.settings.verbosity = verbosity
    ours.setLevel(level)
    if remembered is None:
        ours.__dict__.pop("_scanpy_level", None)
    else:
        ours._scanpy_level = remembered  # type: ignore[attr-defined]


def test_messages_follow_scanpys_verbosity(tiny_path, tiny_adata, package_logger):
    import io

    ours = package_logger
    stream = io.StringIO()
    shown = logging.StreamHandler(stream)  # stands for scanpy's handler (which writes to the session's stderr)
    sc.settings._root_logger.addHandler(shown)
    try:
        ours.setLevel(logging.NOTSET)
        sc.settings.verbosity = "warning"
        tfs.tl.embed(tiny_adata, model=tiny_path)
        assert "matched 165 of 205 genes" not in stream.getvalue()
        sc.settings.verbosity = "info"
        tfs.tl.embed(tiny_adata, model=tiny_path)
        assert "matched 165 of 205 genes" in stream.getvalue()  # through scanpy's handlers
    finally:
        sc.settings._root_logger.removeHandler(shown)


def test_a_level_the_user_sets_on_the_package_logger_is_kept(tiny_path, tiny_adata, package_logger, caplog):
    ours = package_logger
    ours.setLevel(logging.NOTSET)
    sc.settings.verbosity = "info"
    tfs.tl.embed(tiny_adata, model=tiny_path)  # the package follows scanpy: INFO
    sc.settings.verbosity = "warning"
    ours.setLevel(logging.INFO)  # the user's own choice: INFO messages of the package, whatever scanpy says
    with caplog.at_level(logging.INFO, logger="transcriptformer"):
        tfs.tl.embed(tiny_adata, model=tiny_path)
        assert ours.level == logging.INFO
    assert "matched 165 of 205 genes" in caplog.text
