"""AnnData -> token windows: the published preprocessing, one window of cells at a time.

For each cell the published pipeline keeps the genes of the vocabulary (dropping the others
before anything else), orders them *non-zero first, then zero, each group in the data's column
order* (not by expression), keeps the first ``S``, turns zero counts into ``[PAD]``, optionally
rescales the counts of the retained slots to a fixed total, and clips counts to
``clip_counts``. An auxiliary token per cell (the assay) comes from ``obs``.

:func:`prepare_cells` validates an AnnData without reading its whole matrix into memory and
returns a :class:`CellSource`; :meth:`CellSource.read` tokenises a window of rows. Sparse rows
are tokenised straight from the CSR structure; dense and backed inputs are read one window at
a time, so nothing is ever densified whole.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import TranscriptFormerWarning, warn
from ..vocab import AuxVocab, GeneVocab

logger = logging.getLogger(__name__)

__all__ = [
    "CellSource",
    "TokenWindow",
    "TokenizeOptions",
    "TranscriptFormerWarning",
    "as_frame",
    "check_readable",
    "column_values",
    "counts_var",
    "is_lazy",
    "prepare_cells",
    "read_gene_ids",
    "sequence_width",
    "source_files",
    "strip_version",
    "table_column",
    "unknown_aux_labels",
]

DEFAULT_GENE_KEY = "ensembl_id"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENSEMBL_ANY_CASE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9_\-\.@]{0,14}$")


@dataclass(frozen=True)
class TokenizeOptions:
    """How an AnnData is turned into tokens.

    Parameters
    ----------
    gene_key
        ``var`` column with the gene ids (Ensembl ids for the released models); ``None`` uses
        ``var_names``. When the default column ``"ensembl_id"`` is absent and ``var_names`` look
        like Ensembl ids, ``var_names`` are used.
    layer
        Where counts come from: ``None`` is the published rule (``.raw`` if present, else ``X``);
        ``"X"``, ``"raw"`` or the name of a layer choose explicitly.
    clip_counts
        Counts are clipped to ``[0, clip_counts]`` (after normalisation); ``None`` disables clipping.
    normalize_to_scale
        If set, the counts of each cell's retained genes are rescaled to sum to this value.
    filter_to_vocab
        Drop genes outside the vocabulary (published default). Without it they are kept as the
        ``unknown`` token and take sequence slots.
    duplicate_genes
        ``"raise"`` (default): duplicate gene ids (after removing version suffixes) are an error;
        ``"first"``: keep the first column of each id.
    """

    gene_key: str | None = DEFAULT_GENE_KEY
    layer: str | None = None
    clip_counts: float | None = 30.0
    normalize_to_scale: float | None = None
    filter_to_vocab: bool = True
    duplicate_genes: Literal["raise", "first"] = "raise"

    def __post_init__(self) -> None:
        if self.clip_counts is not None and not 0 < self.clip_counts < np.inf:
            raise ValueError(f"clip_counts must be a finite number > 0 or None, got {self.clip_counts!r}.")
        if self.normalize_to_scale is not None and not 0 <= self.normalize_to_scale < np.inf:
            raise ValueError(
                f"normalize_to_scale must be a finite number >= 0 or None (0 and None: off), got "
                f"{self.normalize_to_scale!r}."
            )
        if self.duplicate_genes not in ("raise", "first"):
            raise ValueError(f"duplicate_genes must be 'raise' or 'first', got {self.duplicate_genes!r}.")


@dataclass
class TokenWindow:
    """Tokens of a window of consecutive cells ``[start, start + n)``.

    ``tokens``/``counts`` are ``(n, W)`` with ``W = min(max(lengths) + 1, S)``; each cell's
    ``lengths[i]`` real slots come first, then ``[PAD]`` with count 0.
    """

    start: int
    tokens: np.ndarray  # (n, W) int32
    counts: np.ndarray  # (n, W) float32
    lengths: np.ndarray  # (n,) int64
    aux: np.ndarray  # (n, A) int64

    def __len__(self) -> int:
        return len(self.lengths)


def sequence_width(n_genes: int, seq_len: int) -> int:
    """Slots a cell of ``n_genes`` genes occupies: its genes and the slot after the last (``min(n + 1, S)``).

    The slot after the last gene is read by the cell embedding (published: the pooled positions are
    START and the shifted genes); a cell of ``S`` or more genes fills all ``S`` slots.
    """
    return min(int(n_genes) + 1, int(seq_len))


def strip_version(ids: Iterable[Any]) -> np.ndarray:
    """Cut each id at its first ``.`` (``ENSG00000141510.16`` -> ``ENSG00000141510``); non-strings become ``""``."""
    return np.asarray([s.split(".", 1)[0] if isinstance(s, str) else "" for s in ids], dtype=object)


def _looks_like_ensembl(ids: Sequence[Any], min_fraction: float = 0.5) -> bool:
    sample = [s for s in list(ids[:2000]) if isinstance(s, str)]
    return bool(sample) and sum(bool(_ENSEMBL.match(s)) for s in sample) >= min_fraction * len(sample)


def _looks_like_symbols(ids: Sequence[str]) -> bool:
    sample = [s for s in ids[:2000] if s]
    if not sample:
        return False
    symbolic = sum(bool(_SYMBOL.match(s)) and not _ENSEMBL_ANY_CASE.match(s) and not s.isdigit() for s in sample)
    return symbolic >= 0.8 * len(sample)


def _looks_like_lowercase_ensembl(ids: Sequence[str]) -> bool:
    sample = [s for s in ids[:2000] if s]
    return bool(sample) and sum(
        bool(_ENSEMBL_ANY_CASE.match(s)) and not _ENSEMBL.match(s) for s in sample
    ) >= 0.5 * len(sample)


def as_frame(table: Any) -> pd.DataFrame:
    """A ``var`` (or small ``obs``) table as a pandas DataFrame.

    AnnData read lazily (``anndata.experimental.read_lazy``) holds ``obs`` and ``var`` as xarray-backed
    ``Dataset2D`` objects; ``var`` has one row per gene, so reading it into memory is cheap.
    """
    if isinstance(table, pd.DataFrame):
        return table
    to_memory = getattr(table, "to_memory", None)
    if callable(to_memory):
        return to_memory()
    return pd.DataFrame(table)


def column_values(table: Any, column: str) -> list[Any]:
    """The values of one column of ``obs`` as a list (pandas, or the lazy ``Dataset2D`` of ``read_lazy``)."""
    return table_column(table, column).tolist()


def table_column(table: Any, name: str) -> pd.Series:
    """One column of ``obs`` or ``var`` as a pandas Series, its dtype kept and indexed as the table.

    The table is pandas, or the lazy ``Dataset2D`` of ``read_lazy`` (only that column is read).
    """
    if isinstance(table, pd.DataFrame):
        return table[name]
    return as_frame(table[[name]])[name]


def is_lazy(matrix: Any) -> bool:
    """Whether ``matrix`` is lazy, like a dask array (rows are computed, and checked, window by window)."""
    return hasattr(matrix, "compute") and not isinstance(matrix, np.ndarray)


def source_files(adata: Any) -> set[Path]:
    """The files or stores an AnnData reads its matrices from (resolved paths; none for one in memory).

    Its ``filename`` (backed, or ``read_lazy`` of an h5ad file), and the h5ad files and zarr stores behind the
    dask arrays of ``X``, ``raw.X`` and the layers (``read_lazy``, ``da.from_zarr``).
    """
    found: set[Path] = set()
    if getattr(adata, "filename", None) is not None:
        found.add(Path(adata.filename).resolve())
    raw = getattr(adata, "raw", None)
    matrices = [adata.X, None if raw is None else raw.X, *getattr(adata, "layers", {}).values()]
    for matrix in matrices:
        if is_lazy(matrix):
            for task in list(dict(matrix.__dask_graph__()).values())[:16]:  # chunks share their source
                _paths_in(task, found, depth=0)
    return found


def _paths_in(obj: Any, found: set[Path], depth: int) -> None:
    """Collect the paths of the h5py files, zarr stores and path objects reachable from a dask task."""
    if depth > 8 or obj is None or isinstance(obj, str | bytes | int | float | np.ndarray):
        return
    if isinstance(obj, os.PathLike):
        found.add(Path(obj).resolve())
        return
    h5 = getattr(getattr(obj, "file", None), "filename", None)  # an h5py dataset or group
    if isinstance(h5, str):
        found.add(Path(h5).resolve())
        return
    store = getattr(obj, "store", None)  # a zarr array or group: its store's folder (LocalStore, FsspecStore)
    root = getattr(store, "root", None) or getattr(store, "path", None)
    if isinstance(root, str | os.PathLike) and root:
        found.add(Path(root).resolve())
        return
    if isinstance(obj, functools.partial):
        children: list[Any] = [*obj.args, *obj.keywords.values()]
    elif isinstance(obj, tuple | list):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    else:  # dask task nodes (their value, arguments) and anndata's sparse datasets (their group)
        children = [getattr(obj, name, None) for name in ("value", "args", "kwargs", "group")]
    for child in children:
        _paths_in(child, found, depth + 1)


def _select_matrix(adata, layer: str | None) -> tuple[Any, pd.DataFrame, str]:
    """The count matrix, its ``var`` (in memory) and a label for messages."""
    if getattr(adata, "isbacked", False) and adata.is_view and (layer == "X" or (layer is None and adata.raw is None)):
        rows = BackedRows.of(adata)  # adata.X of a backed view would load every row of the view
        if rows is not None:
            return rows, as_frame(adata.var), "X"
    matrix, var, source = _select(adata, layer)
    return matrix, as_frame(var), source


def _every_column(columns: np.ndarray, n: int) -> bool:
    """Whether ``columns`` selects all ``n`` columns in order (so no selection is needed)."""
    return len(columns) == n and bool(np.all(columns == np.arange(n)))


class BackedRows:
    """The ``X`` of a view of a backed AnnData, read a window of rows at a time.

    anndata answers ``view.X`` by loading every row of the view (a view of a million cells of a backed file: the
    whole matrix in memory); this reads the view's rows from the file only when asked, in the view's order.
    """

    def __init__(self, matrix: Any, rows: np.ndarray, columns: np.ndarray):
        self.matrix, self.rows, self.columns = matrix, rows, columns
        self.all_columns = _every_column(columns, matrix.shape[1])
        self.shape = (len(rows), len(columns))
        self.dtype = matrix.dtype
        self.format = getattr(matrix, "format", None)

    @classmethod
    def of(cls, view: Any) -> BackedRows | None:
        """The reader of ``view.X``, or ``None`` where anndata does not say which rows the view holds."""
        oidx, vidx = getattr(view, "_oidx", None), getattr(view, "_vidx", None)  # anndata's view indices
        if oidx is None or vidx is None:
            return None
        try:  # lazily: start-up time (only a backed view gets here)
            from anndata.io import sparse_dataset
        except ImportError:  # anndata < 0.11
            from anndata.experimental import sparse_dataset
        if not view.file.is_open:  # as anndata's own X does: copies of backed views close the file
            view.file.open()
        stored = view.file["X"]
        matrix = stored if hasattr(stored, "dtype") else sparse_dataset(stored)  # dense: an h5py dataset
        n_obs, n_vars = matrix.shape
        return cls(matrix, np.arange(n_obs)[oidx], np.arange(n_vars)[vidx])

    def __getitem__(self, key: slice) -> Any:
        rows = self.rows[key]
        if len(rows) == 0:
            block = self.matrix[0:0]
        elif rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            block = self.matrix[int(rows[0]) : int(rows[-1]) + 1]
        else:  # the file is read in increasing row order, then put in the view's
            stored, order = np.unique(rows, return_inverse=True)
            block = self.matrix[stored][order]
        return block if self.all_columns else block[:, self.columns]


def _select_source(adata, layer: str | None) -> str:
    """Where ``layer`` takes the counts from: ``"raw.X"``, ``"X"`` or ``"layers[...]"``.

    Checked without reading any matrix (a backed view answers ``X`` and ``raw.X`` by loading its rows).
    """
    if layer == "raw" or (layer is None and adata.raw is not None):
        if adata.raw is None:
            raise ValueError("layer='raw' but adata.raw is None; pass layer='X' or the name of a layer of counts.")
        return "raw.X"
    if layer in (None, "X"):
        if not getattr(adata, "isbacked", False) and adata.X is None:
            raise ValueError("adata.X is empty; pass layer=<name> or layer='raw'.")
        return "X"
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found; adata.layers has {sorted(adata.layers.keys()) or 'no layers'}. "
            "Pass layer=None (raw if present, else X), 'X', 'raw' or one of those."
        )
    return f"layers[{layer!r}]"


def _select(adata, layer: str | None) -> tuple[Any, Any, str]:
    source = _select_source(adata, layer)
    if source == "raw.X":
        return adata.raw.X, adata.raw.var, source
    return (adata.X if source == "X" else adata.layers[layer]), adata.var, source


def counts_var(adata: Any, layer: str | None) -> tuple[pd.DataFrame, str]:
    """The ``var`` of the matrix the counts come from (``layer``, by the tokeniser's rule) and its name.

    ``raw.var`` when the counts are ``.raw``'s (``layer=None`` with ``.raw`` present, or ``layer="raw"``), else
    ``adata.var``: the table in which gene names given by users (``genes=``) are looked up, as the ids are.
    """
    source = _select_source(adata, layer)
    return as_frame(adata.raw.var if source == "raw.X" else adata.var), ("raw.var" if source == "raw.X" else "var")


def check_readable(adata: Any, options: TokenizeOptions) -> None:
    """The matrix the counts come from (``options.layer``) and its gene ids (``options.gene_key``) exist.

    The ids are also unique (after removing version suffixes) unless ``options.duplicate_genes == "first"``.
    What :func:`prepare_cells` would refuse about them, with its messages, but before a model is loaded (or
    downloaded): only ``layers``, ``raw`` and the ``var`` columns are looked at.
    """
    source = _select_source(adata, options.layer)  # no matrix is read
    var = as_frame(adata.raw.var if source == "raw.X" else adata.var)
    raw_ids, id_source = read_gene_ids(
        var, options.gene_key, source, adata_var=as_frame(adata.var) if source == "raw.X" else None
    )
    _first_of_each_id(raw_ids, id_source, options)


def read_gene_ids(
    var: pd.DataFrame, gene_key: str | None, where: str, *, adata_var: pd.DataFrame | None = None
) -> tuple[np.ndarray, str]:
    """Gene ids of ``var`` by the tokeniser's rules, and where they came from (for messages).

    ``gene_key=None`` uses ``var_names``; the default column ``"ensembl_id"``, when absent, falls back to
    ``var_names`` if they look like Ensembl ids. ``adata_var`` (the AnnData's own ``var`` when ``var`` is
    ``raw.var``) only improves the message when the column is missing.
    """
    table = "raw.var" if where == "raw.X" else "var"  # the ids of .raw's counts are in raw.var
    if gene_key is None:
        return np.asarray(var.index, dtype=object), f"{table}_names"
    if gene_key in var.columns:
        return np.asarray(var[gene_key].tolist(), dtype=object), f"{table}[{gene_key!r}]"
    if gene_key == DEFAULT_GENE_KEY and _looks_like_ensembl(var.index):
        logger.info("%s has no %r column; using %s_names, which look like Ensembl ids.", table, gene_key, table)
        return np.asarray(var.index, dtype=object), f"{table}_names"
    msg = (
        f"gene id column {gene_key!r} not found in the var of {where} (where the counts come from); its columns are "
        f"{list(var.columns) or 'none'} and var_names look like {list(var.index[:3])}."
    )
    if where == "raw.X" and adata_var is not None and gene_key in adata_var.columns:
        msg += (
            f" adata.var has {gene_key!r}, but with .raw present the counts (and their gene ids) come from .raw: "
            f"pass layer='X' if X holds raw counts, or copy the column, adata.raw.var[{gene_key!r}] = "
            f"adata.var[{gene_key!r}] (tfs.pp.symbols_to_ensembl writes both)."
        )
    elif _looks_like_symbols([str(i) for i in var.index[:2000]]):
        msg += (
            " var_names look like gene symbols: map them to Ensembl ids with "
            f"tfs.pp.symbols_to_ensembl(adata, species=...{_key_added(gene_key)}), which writes var[{gene_key!r}] "
            "(and raw.var's)."
        )
    else:
        msg += " Pass gene_key=<column with Ensembl ids>, or gene_key=None to use var_names."
    raise KeyError(msg)


def _first_of_each_id(raw_ids: np.ndarray, id_source: str, options: TokenizeOptions) -> tuple[np.ndarray, np.ndarray]:
    """The ids without version suffixes, and which columns hold the first of their id (``""``, no id: each).

    Duplicates are an error unless ``options.duplicate_genes == "first"``.
    """
    ids = strip_version(raw_ids)
    first = ~pd.Index(ids).duplicated(keep="first") | (ids == "")
    if not first.all() and options.duplicate_genes == "raise":
        dups = pd.unique(ids[~first])
        raise ValueError(
            f"{len(dups)} gene id(s) in {id_source} appear more than once after removing version suffixes, "
            f"e.g. {list(dups[:3])}. Pass duplicate_genes='first' to keep the first column of each."
        )
    return ids, first


def _key_added(gene_key: str) -> str:
    """``symbols_to_ensembl``'s argument that makes it write ``var[gene_key]`` (nothing for its default)."""
    return "" if gene_key == "ensembl_id" else f", key_added={gene_key!r}"


def _describe_no_match(raw_ids: np.ndarray, ids: np.ndarray, source: str, vocab: GeneVocab, model_name: str) -> str:
    vocab_examples = list(vocab.genes[:3])
    if len(raw_ids) == 0:
        return f"the data has no genes ({source} is empty, n_vars = 0): select some genes (e.g. adata[:, genes])."
    strings = [s for s in raw_ids if isinstance(s, str) and s]
    if not strings:
        present = [v for v in raw_ids if v is not None and not (isinstance(v, float) and np.isnan(v))]
        kinds = sorted({type(v).__name__ for v in present}) or ["missing values"]
        return (
            f"{source} holds no gene id strings ({', '.join(kinds)}, e.g. {[_plain(v) for v in present[:3]]}), so "
            f"no gene matches the vocabulary of {model_name} (ids look like {vocab_examples}). Pass gene_key=<var "
            "column with Ensembl gene ids as text>, or gene_key=None to use var_names."
        )
    data_examples = [s for s in ids if s][:3]
    msg = (
        f"none of the {len(ids):,} genes in {source} is in the vocabulary of {model_name} "
        f"({len(vocab.genes):,} genes). Data ids look like {data_examples}; vocabulary ids look like {vocab_examples}."
    )
    if _looks_like_lowercase_ensembl(strings) and _looks_like_ensembl(list(vocab.genes)):
        msg += (
            " The data ids are Ensembl ids in lower case, but Ensembl ids are upper case: convert them first, e.g. "
            "adata.var[<column>] = adata.var[<column>].str.upper()."
        )
    elif _looks_like_symbols(strings) and _looks_like_ensembl(list(vocab.genes)):
        msg += (
            " The data ids look like gene symbols, but the model expects Ensembl gene ids: pass gene_key=<var "
            "column with Ensembl ids> or map symbols to Ensembl ids first (tfs.pp.symbols_to_ensembl)."
        )
    else:
        msg += " Pass gene_key=<var column holding ids of this kind>, or check the species of the data and the model."
    return msg


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_backed_sparse(m: Any) -> bool:
    return hasattr(m, "format") and not sp.issparse(m) and hasattr(m, "shape") and not isinstance(m, np.ndarray)


class CellSource:
    """An AnnData's counts, validated and ready to be tokenised one window of cells at a time.

    Built by :func:`prepare_cells`; holds references to the data (not copies), so reading a window
    reads only those rows.
    """

    def __init__(
        self,
        matrix: Any,
        *,
        columns: np.ndarray,
        column_tokens: np.ndarray,
        aux: np.ndarray,
        vocab: GeneVocab,
        seq_len: int,
        pad_zeros: bool,
        options: TokenizeOptions,
        source: str,
        var_names: pd.Index | None = None,
        n_genes: int,
        n_matched: int,
        check_values: bool,
    ):
        self.matrix = matrix
        self.columns = columns
        self.column_tokens = column_tokens.astype(np.int32)
        self.all_columns = _every_column(columns, matrix.shape[1])
        self.aux = aux
        self.vocab = vocab
        self.seq_len = seq_len
        self.pad_zeros = pad_zeros
        self.options = options
        self.source = source
        self.var_names = var_names  # names of the matrix's columns (``columns`` index into them)
        self.n_genes = n_genes
        self.n_matched = n_matched
        self._check_values = check_values
        #: the first non-integer count seen (value, row), or None: the counts do not look raw
        self.non_integer_count: tuple[float, int] | None = None

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return int(self.matrix.shape[0])

    def token_positions(self, var_names: pd.Index) -> np.ndarray:
        """For every vocabulary token, the position of its gene in ``var_names`` (``-1``: not there).

        The genes are the matrix columns the tokens were read from, matched to ``var_names`` by name (so
        results computed from ``.raw`` can be placed in ``adata.var``). Special tokens map to ``-1``.
        """
        out = np.full(len(self.vocab), -1, dtype=np.int64)
        genes = self.column_tokens >= self.vocab.n_special
        var_names = pd.Index(var_names)
        if var_names.equals(self.var_names):
            out[self.column_tokens[genes]] = self.columns[genes]
            return out
        if not var_names.is_unique:
            raise ValueError(
                "adata.var_names are not unique, so results read from another matrix cannot be placed by gene "
                "name; run adata.var_names_make_unique() first."
            )
        out[self.column_tokens[genes]] = var_names.get_indexer(self.var_names[self.columns[genes]])  # type: ignore[index]
        return out

    def _read_block(self, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
        """Rows ``[start, stop)`` of the used columns as float32, canonical CSR if sparse.

        The published pipeline casts to float32 before anything else, and densifies (which sums
        duplicate entries of a non-canonical CSR).
        """
        block = self.matrix[start:stop]
        if is_lazy(block):  # dask (dense or sparse chunks): only the chunks of these rows are read
            block = block.compute()
        if sp.issparse(block):
            with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by the value check
                block = sp.csr_matrix(block, dtype=np.float32)
            if not self.all_columns:
                block = block[:, self.columns]
            block.sum_duplicates()
            return block
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by the value check
            block = np.asarray(block, dtype=np.float32)
        return block if self.all_columns else block[:, self.columns]

    def _check_block(self, values: np.ndarray, start: int) -> None:
        """Refuse negative, NaN or infinite counts, and note whether the values look like raw counts.

        In-memory data was checked for bad values up front, so only backed (and lazy) data is checked here.
        Every window is checked for non-integer values (one vectorised pass over its non-zero values), so
        non-count data later in a file is noticed too; the first such value is kept in
        :attr:`non_integer_count` (the caller warns: windows are read on a background thread).
        """
        if self._check_values:
            _refuse_bad_values(values, self.source, f" (cells from row {start})")
        if self.non_integer_count is None:
            nonzero = values[values != 0]
            frac = nonzero[np.abs(nonzero - np.round(nonzero)) > 1e-6]
            if frac.size:
                self.non_integer_count = (float(frac[0]), int(start))

    @property
    def counts_look_raw(self) -> bool:
        """No non-integer count was seen in what was read so far."""
        return self.non_integer_count is None

    def raw_count_warning(self) -> str | None:
        """The warning about non-count values, if any were seen."""
        if self.non_integer_count is None:
            return None
        value, row = self.non_integer_count
        return (
            f"the counts in {self.source} do not look like raw counts (non-integer values such as {value:g} in the "
            f"cells from row {row}). TranscriptFormer was trained on raw UMI counts; pass layer=<layer of raw "
            "counts> if you have them (the result records counts_look_raw=False)."
        )

    def count_expressed(self, start: int, stop: int) -> np.ndarray:
        """Expressed genes of the vocabulary in cells ``[start, stop)``, before truncation to ``seq_len``.

        Reads the rows once, with the same value checks (and raw-count warning) as :meth:`read`.
        """
        block: Any = self._read_block(start, stop)  # an ndarray or a CSR matrix (sp.issparse tells)
        self._check_block(block.data if sp.issparse(block) else block.ravel(), start)
        return np.asarray((block != 0).sum(axis=1)).ravel().astype(np.int64)

    def read(self, start: int, stop: int) -> TokenWindow:
        """Tokenise cells ``[start, stop)``."""
        block: Any = self._read_block(start, stop)  # an ndarray or a CSR matrix (sp.issparse tells)
        n = block.shape[0]
        S = self.seq_len
        if sp.issparse(block):
            self._check_block(block.data, start)
            keep = block.data != 0
            row_of = np.repeat(np.arange(n), np.diff(block.indptr))[keep]
            cols, vals = block.indices[keep], block.data[keep]
        else:
            self._check_block(block.ravel(), start)
            row_of, cols = np.nonzero(block)
            vals = block[row_of, cols]
        # entries are sorted by row, then column: the rank within the row is the sequence slot
        n_nonzero = np.bincount(row_of, minlength=n)
        first = np.cumsum(n_nonzero) - n_nonzero
        slot = np.arange(len(row_of)) - first[row_of]
        if self.pad_zeros:
            lengths = np.minimum(n_nonzero, S)
        else:  # zero-count genes stay as tokens, after the non-zero ones
            lengths = np.full(n, min(len(self.columns), S), dtype=np.int64)
        width = max(1, sequence_width(int(lengths.max(initial=0)), S))
        tokens = np.full((n, width), self.vocab.pad, dtype=np.int32)
        counts = np.zeros((n, width), dtype=np.float32)
        fits = slot < width
        tokens[row_of[fits], slot[fits]] = self.column_tokens[cols[fits]]
        counts[row_of[fits], slot[fits]] = vals[fits]
        if not self.pad_zeros:  # fill with the zero-count genes in column order, one row at a time
            for i in np.flatnonzero(n_nonzero < lengths):
                is_zero = np.ones(block.shape[1], dtype=bool)
                is_zero[cols[first[i] : first[i] + n_nonzero[i]]] = False
                zeros = np.flatnonzero(is_zero)[: lengths[i] - n_nonzero[i]]
                tokens[i, n_nonzero[i] : lengths[i]] = self.column_tokens[zeros]
        scale = self.options.normalize_to_scale
        if scale:
            total = counts.sum(axis=1, keepdims=True, dtype=np.float32)
            np.divide(counts, np.where(total > 0, total, 1).astype(np.float32), out=counts)
            counts *= np.float32(scale)
        if self.options.clip_counts is not None:
            np.clip(counts, 0, self.options.clip_counts, out=counts)
        return TokenWindow(start, tokens, counts, lengths.astype(np.int64), self.aux[start:stop])


def unknown_aux_labels(values: Sequence[Any], vocab: AuxVocab, limit: int = 5) -> dict[str, list[str]]:
    """Labels of ``values`` that ``vocab`` does not know (the literal ``"unknown"`` aside), with the closest known.

    Returns
    -------
    dict
        ``repr`` of each unknown label (at most ``limit``, most frequent first; missing values as ``'missing'``)
        -> up to two known labels that look alike (case and surrounding spaces ignored).
    """
    known = [k for k in vocab.labels if k != "unknown"]
    folded = {k.strip().lower(): k for k in known}
    counts: dict[str, int] = {}
    examples: dict[str, Any] = {}
    for v in values:
        if isinstance(v, str) and v in vocab.labels:
            continue
        missing = v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
        key = "missing" if missing else repr(_plain(v))
        counts[key] = counts.get(key, 0) + 1
        examples.setdefault(key, None if missing else v)
    out: dict[str, Any] = {}
    for key in sorted(counts, key=lambda k: counts[k], reverse=True)[:limit]:
        v = examples[key]
        if v is None:
            out[key] = []
            continue
        text = str(_plain(v)).strip().lower()
        out[key] = [folded[c] for c in difflib.get_close_matches(text, list(folded), n=2, cutoff=0.6)]
    return out


def _aux_tokens(obs: Any, aux_vocabs: Sequence[AuxVocab], model_name: str, n_obs: int) -> np.ndarray:
    columns = []
    for voc in aux_vocabs:
        if voc.column in obs.columns:
            values = column_values(obs, voc.column)
            codes = voc.encode(values)
            odd = np.fromiter(
                (
                    c == voc.unknown and not (isinstance(v, str) and v == "unknown")
                    for c, v in zip(codes, values, strict=True)
                ),
                dtype=bool,
                count=len(values),
            )
            if odd.any():
                labels = unknown_aux_labels([v for v, o in zip(values, odd, strict=True) if o], voc)
                described = "; ".join(
                    f"{label} (closest known: {', '.join(map(repr, close))})" if close else label
                    for label, close in labels.items()
                )
                warn(
                    f"{int(odd.sum()):,} of {len(values):,} cells ({100 * odd.mean():.1f}%) have {voc.column} labels "
                    f"that {model_name} does not know, so they are treated as {voc.column} 'unknown': {described}. "
                    f"Known labels are e.g. {sorted(k for k in voc.labels if k != 'unknown')[:4]}; fix the labels in "
                    f"adata.obs[{voc.column!r}] (set them to 'unknown' to mean unknown)."
                )
            columns.append(codes)
        else:
            warn(
                f"obs has no {voc.column!r} column, which {model_name} uses as an auxiliary token; every cell is "
                f"treated as {voc.column} 'unknown' (what an unlabelled {voc.column} means to the model). Add "
                f"adata.obs[{voc.column!r}] with labels such as {sorted(voc.labels)[:3]} to use it."
            )
            columns.append(np.full(n_obs, voc.unknown, dtype=np.int64))
    if not columns:
        return np.zeros((n_obs, 0), dtype=np.int64)
    return np.stack(columns, axis=1)


#: The largest float32: counts above it become infinite when cast (the model computes in float32).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _refuse_bad_values(values: np.ndarray, source: str, where: str = "") -> None:
    bad = ~((values >= 0) & (values <= FLOAT32_MAX))  # negative, NaN, infinite, or too large for float32
    if bad.any():
        v = values[bad].ravel()[0]
        if np.isnan(v):
            kind = "NaN values"
        elif v < 0:
            kind = f"negative values (e.g. {v:g})"
        elif np.isinf(v):
            kind = "infinite values (or values beyond float32's range, 3.4e38)"
        else:
            kind = f"values too large for float32 (e.g. {v:g}; the model computes in float32, largest 3.4e38)"
        raise ValueError(
            f"the counts in {source} contain {kind}{where}. TranscriptFormer needs raw, non-negative, finite counts: "
            "pass layer=<layer of raw counts> (or 'raw')."
        )


def _check_in_memory_values(matrix: Any, columns: np.ndarray, source: str, chunk: int = 4096) -> None:
    """Refuse negative / NaN values in the columns the model reads (the same columns for every input kind)."""
    if sp.issparse(matrix):
        used = np.zeros(matrix.shape[1], dtype=bool)
        used[columns] = True
        _refuse_bad_values(matrix.data[used[matrix.indices]], source)
    elif isinstance(matrix, np.ndarray):
        for start in range(0, matrix.shape[0], chunk):
            _refuse_bad_values(matrix[start : start + chunk, columns], source)


def _describe_chunks(matrix: Any, source: str) -> None:
    """Log how a dask matrix is chunked (a window of cells computes only the chunks holding its rows)."""
    chunks = getattr(matrix, "chunks", None)
    if not chunks or len(chunks) != 2:
        return
    rows, cols = chunks
    logger.info(
        "adata.%s is a dask array (chunks of up to %s rows x %s columns, %s blocks): read a window of cells at a time",
        source,
        f"{max(rows, default=0):,}",
        f"{max(cols, default=0):,}",
        type(getattr(matrix, "_meta", None)).__name__,
    )


def prepare_cells(
    adata,
    vocab: GeneVocab,
    aux_vocabs: Sequence[AuxVocab],
    *,
    seq_len: int,
    pad_zeros: bool = True,
    options: TokenizeOptions = TokenizeOptions(),
    model_name: str = "the model",
) -> CellSource:
    """Validate an AnnData and map its genes to the vocabulary.

    Parameters
    ----------
    adata
        Cells x genes, in memory, a view or backed.
    vocab, aux_vocabs
        The model's vocabularies.
    seq_len
        Gene slots per cell.
    pad_zeros
        Turn zero-count genes into ``[PAD]`` (``data_config.pad_zeros``).
    options
        Tokenisation options.
    model_name
        Used in messages.

    Returns
    -------
    CellSource
        The cells, ready to be read window by window.
    """
    matrix, var, source = _select_matrix(adata, options.layer)
    if matrix is None:
        raise ValueError(f"adata.{source} is empty.")
    if matrix.shape[0] != adata.n_obs or matrix.shape[1] != len(var):
        raise ValueError(f"adata.{source} has shape {matrix.shape}, which does not match obs/var.")
    raw_ids, id_source = read_gene_ids(
        var, options.gene_key, source, adata_var=as_frame(adata.var) if source == "raw.X" else None
    )
    ids, first = _first_of_each_id(raw_ids, id_source, options)
    if not first.all():
        logger.info("dropping %d duplicate gene column(s), keeping the first of each id.", int((~first).sum()))
    tokens = vocab.lookup_genes(list(ids))  # special-token names are not genes
    in_vocab = (tokens >= 0) & first
    n_matched = int(in_vocab.sum())
    if n_matched == 0:
        raise ValueError(_describe_no_match(raw_ids, ids, id_source, vocab, model_name))
    if options.filter_to_vocab:
        columns = np.flatnonzero(in_vocab)
    else:
        columns = np.flatnonzero(first & (ids != ""))
        tokens = np.where(tokens >= 0, tokens, vocab.unknown)
    logger.info("matched %s of %s genes to the vocabulary of %s", f"{n_matched:,}", f"{len(ids):,}", model_name)
    if sp.issparse(matrix) and matrix.format != "csr":
        logger.info("converting the %s matrix to CSR for row-wise reading", matrix.format.upper())
        matrix = matrix.tocsr()
    backed = not (sp.issparse(matrix) or isinstance(matrix, np.ndarray))
    if backed and _is_backed_sparse(matrix) and getattr(matrix, "format", "csr") == "csc":
        logger.warning("the backed matrix is CSC: reading it row by row is slow; store it as CSR for large data.")
    if is_lazy(matrix):
        _describe_chunks(matrix, source)
    if not backed:
        _check_in_memory_values(matrix, columns, source)
    aux = _aux_tokens(adata.obs, aux_vocabs, model_name, int(adata.n_obs))
    return CellSource(
        matrix,
        columns=columns,
        column_tokens=tokens[columns],
        aux=aux,
        vocab=vocab,
        seq_len=seq_len,
        pad_zeros=pad_zeros,
        options=options,
        source=source,
        var_names=var.index,
        n_genes=len(ids),
        n_matched=n_matched,
        check_values=backed,
    )
