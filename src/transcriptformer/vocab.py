"""Gene and auxiliary vocabularies, and the ESM2 gene tables they are read from.

A gene table is an HDF5 file with a dataset ``keys`` (gene ids, in vocabulary order) and a
group ``arrays`` holding one vector per key. The gene vocabulary of a checkpoint is its
special tokens (in ``special_tokens`` order), then the genes of each table named in
``esm2_mappings`` (in list order, each file in ``keys`` order), the first occurrence of an id
winning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import read_json
from .errors import warn

logger = logging.getLogger(__name__)

__all__ = [
    "AuxVocab",
    "GeneTable",
    "GeneVocab",
    "read_aux_vocab",
    "read_gene_tables",
    "read_table_ids",
    "write_gene_table",
]


@dataclass(frozen=True)
class GeneTable:
    """Gene ids and their ESM2 vectors, in file order, duplicates removed (first occurrence wins)."""

    ids: tuple[str, ...]
    vectors: np.ndarray  # (n, D) float32

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.ids):
            raise ValueError(f"gene table: {len(self.ids)} ids but vectors of shape {self.vectors.shape}.")

    @property
    def dim(self) -> int:
        """Width ``D`` of the gene vectors."""
        return int(self.vectors.shape[1])


def _decode(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


def _open_table(path: Path):
    import h5py

    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an HDF5 gene table.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 gene table: {e}") from None
    if "keys" not in f or "arrays" not in f:
        found = sorted(f.keys())
        f.close()
        raise ValueError(
            f"{path} is not a gene table in the published format: expected a dataset 'keys' and a "
            f"group 'arrays', found {found}."
        )
    return f


def _read_keys(f, path: Path) -> list[str]:
    keys = f["keys"]
    if keys.ndim != 1:
        raise ValueError(f"{path}: 'keys' must be a 1-D dataset of gene ids, found shape {keys.shape}.")
    try:
        return [_decode(k) for k in keys[:]]
    except (UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'keys' does not hold gene id strings ({e}).") from None


def _read_one_table(path: Path, vectors: bool) -> tuple[list[str], np.ndarray | None, int | None]:
    """A table's keys, its vectors (``None`` unless asked for) and their width (``None`` for an empty table).

    Without ``vectors`` only the first key's vector is looked at, for the width: what a checkpoint needs from its
    tables (the vectors themselves are in its weights; a table of 24,000 genes is read in milliseconds).
    """
    if not path.exists():
        raise FileNotFoundError(f"gene table {path} does not exist.")
    with _open_table(path) as f:
        keys = _read_keys(f, path)
        arrays = f["arrays"]
        if not keys:
            return [], None, None
        wanted = keys if vectors else keys[:1]
        missing = [k for k in wanted if k not in arrays]
        if missing:
            raise ValueError(f"{path}: 'arrays' has no vector for {len(missing)} key(s), e.g. {missing[:3]}.")
        if not vectors:
            return keys, None, int(np.prod(arrays[keys[0]].shape))
        rows = [np.asarray(arrays[k][:], dtype=np.float32).reshape(-1) for k in keys]
        widths = {v.shape[0] for v in rows}
        if len(widths) > 1:
            raise ValueError(f"{path}: the vectors have different widths {sorted(widths)}.")
        table = np.stack(rows)
    return keys, table, table.shape[1]


def _read_tables(paths: Iterable[str | os.PathLike], vectors: bool) -> tuple[list[str], list[np.ndarray], int]:
    """Tables in order, an id seen before dropped (first occurrence wins): ids, kept vectors, width."""
    ids: list[str] = []
    kept: list[np.ndarray] = []
    seen: set[str] = set()
    dim = None
    for path in map(Path, paths):
        keys, table, width = _read_one_table(path, vectors)
        if width is not None:
            if dim is not None and width != dim:
                raise ValueError(f"{path}: vectors have width {width}, earlier tables have {dim}.")
            dim = width
        keep = _dedup(keys, seen, path)
        ids.extend(keys[i] for i in keep)
        if table is not None and keep:
            kept.append(table[keep])
    if not ids or dim is None:
        raise ValueError("the gene tables hold no gene.")
    return ids, kept, dim


def write_gene_table(path: str | Path, ids: Sequence[str], vectors: np.ndarray) -> Path:
    """Write a gene table in the published HDF5 format (``keys`` in order, ``arrays/<id>`` float32 vectors).

    Such a file can be a model's vocabulary table (:func:`transcriptformer.new_model`) or a
    ``species_embedding`` for species outside a model's training set.
    """
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids but vectors of shape {vectors.shape}.")
    if len(set(ids)) != len(ids):
        raise ValueError("gene ids must be unique.")
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.array([str(i).encode() for i in ids], dtype="S"))
        group = f.create_group("arrays")
        for key, vector in zip(ids, vectors, strict=True):
            group.create_dataset(str(key), data=vector)
    return path


def _dedup(keys: list[str], seen: set[str], path: Path) -> list[int]:
    """Positions of ``keys`` not seen before (first occurrence wins); ``seen`` is updated."""
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    if len(keep) < len(keys):
        logger.info(
            "%s: %d gene id(s) already in an earlier table; keeping the first occurrence.",
            path.name,
            len(keys) - len(keep),
        )
    return keep


def read_table_ids(paths: Iterable[str | os.PathLike]) -> tuple[tuple[str, ...], int]:
    """The gene ids of gene tables in vocabulary order (first occurrence wins) and the vectors' width.

    What a checkpoint needs from its tables: the vectors themselves are in its weights, so they are not read
    (a table of 24,000 genes is read in milliseconds instead of seconds).
    """
    ids, _, dim = _read_tables(paths, vectors=False)
    return tuple(ids), dim


def read_gene_tables(paths: Iterable[str | os.PathLike]) -> GeneTable:
    """Read gene tables in order and concatenate them; an id seen before keeps its first vector.

    Parameters
    ----------
    paths
        HDF5 gene-table files, in vocabulary order.

    Returns
    -------
    GeneTable
        The combined table.
    """
    ids, vectors, _ = _read_tables(paths, vectors=True)
    return GeneTable(tuple(ids), np.concatenate(vectors).astype(np.float32, copy=False))


@dataclass(frozen=True)
class GeneVocab:
    """Token ids of a model: special tokens first, then genes.

    Parameters
    ----------
    special_tokens
        Special token names in index order.
    genes
        Gene ids in index order (indices start at ``len(special_tokens)``).
    pad_token
        Name of the padding token.
    """

    special_tokens: tuple[str, ...]
    genes: tuple[str, ...]
    pad_token: str = "[PAD]"
    index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {name: i for i, name in enumerate(self.special_tokens)}
        offset = len(self.special_tokens)
        for j, g in enumerate(self.genes):
            index.setdefault(g, offset + j)
        object.__setattr__(self, "index", index)

    def __len__(self) -> int:
        return len(self.special_tokens) + len(self.genes)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    @property
    def pad(self) -> int:
        """Index of the padding token."""
        return self.index[self.pad_token]

    @property
    def start(self) -> int:
        """Index of ``[START]``."""
        return self.index["[START]"]

    @property
    def end(self) -> int:
        """Index of ``[END]``."""
        return self.index["[END]"]

    @property
    def unknown(self) -> int:
        """Index of ``unknown``."""
        return self.index["unknown"]

    @property
    def n_special(self) -> int:
        """Number of special tokens."""
        return len(self.special_tokens)

    def names(self) -> np.ndarray:
        """All token names in index order."""
        return np.asarray(list(self.special_tokens) + list(self.genes), dtype=object)

    def lookup(self, ids: Sequence[str], default: int = -1) -> np.ndarray:
        """Token index of each id, ``default`` where an id is not in the vocabulary."""
        get = self.index.get
        return np.fromiter((get(i, default) for i in ids), dtype=np.int64, count=len(ids))

    def lookup_genes(self, ids: Sequence[str], default: int = -1) -> np.ndarray:
        """Like :meth:`lookup`, but only genes match: special-token names (``[START]``, ``unknown``, ...) do not."""
        tokens = self.lookup(ids, default)
        return np.where(tokens >= self.n_special, tokens, default)

    def mask(self, genes: Sequence[str], *, what: str = "genes") -> np.ndarray:
        """Boolean mask over the vocabulary marking ``genes`` (version suffixes ignored).

        Raises if none is in the vocabulary; warns about (and skips) those that are not.
        """
        if isinstance(genes, str):
            genes = [genes]
        ids = np.asarray([str(g).split(".", 1)[0] for g in genes], dtype=object)
        tokens = self.lookup_genes(list(ids))
        known = tokens >= 0
        if not known.any():
            raise ValueError(
                f"none of the {len(ids)} {what} is in the vocabulary (e.g. {list(ids[:3])}; vocabulary ids look "
                f"like {list(self.genes[:3])})."
            )
        if not known.all():
            warn(
                f"{int((~known).sum())} of the {what} are not in the vocabulary and are skipped, "
                f"e.g. {list(ids[~known][:3])}.",
            )
        out = np.zeros(len(self), dtype=bool)
        out[tokens[known]] = True
        return out


@dataclass(frozen=True)
class AuxVocab:
    """An auxiliary vocabulary (``<column>_vocab.json``): ``obs`` label -> token index."""

    column: str
    labels: Mapping[str, int]

    def __post_init__(self) -> None:
        if "unknown" not in self.labels:
            raise ValueError(f"{self.column}_vocab.json must contain the label 'unknown'.")
        bad = {k: v for k, v in self.labels.items() if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v}
        if bad:
            raise ValueError(f"{self.column} vocabulary: indices must be non-negative integers, got {bad}.")

    def __len__(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def unknown(self) -> int:
        """Index of the label ``unknown`` (also the index given to labels not in the vocabulary)."""
        return int(self.labels["unknown"])

    def encode(self, values: Iterable[object]) -> np.ndarray:
        """Map labels to indices; labels not in the vocabulary and missing values map to ``unknown``."""
        get = self.labels.get
        unk = self.unknown
        return np.fromiter((get(v, unk) if isinstance(v, str) else unk for v in values), dtype=np.int64)


def read_aux_vocab(path: str | Path) -> AuxVocab:
    """Read ``<column>_vocab.json``; indices are taken from the values, not the key order.

    Raises
    ------
    ValueError
        The file is not a JSON object of label -> non-negative integer index, or lacks ``"unknown"``.
    """
    path = Path(path)
    column = path.name.removesuffix("_vocab.json")
    fix = "Restore it from the checkpoint's download."
    labels = read_json(path, f"the {column!r} vocabulary", fix)
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path} must hold a JSON object mapping labels to integer indices. {fix}")
    bad = {k: v for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        k, v = next(iter(bad.items()))
        raise ValueError(
            f"{path}: the index of label {k!r} is {v!r}; indices must be non-negative integers ({len(bad)} bad). {fix}"
        )
    if "unknown" not in labels:
        raise ValueError(f"{path} must contain the label 'unknown'. {fix}")
    return AuxVocab(column, {str(k): int(v) for k, v in labels.items()})
