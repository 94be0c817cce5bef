"""Shared machinery of the scanpy tools: the run options in signatures, derived keys, all-or-nothing writes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from anndata import AnnData

from ..inference.options import check_bool, with_run_options

logger = logging.getLogger("transcriptformer")

__all__ = [
    "Keys",
    "Update",
    "check_adata",
    "check_writable",
    "follow_scanpy_logging",
    "in_memory_copy",
    "with_run_options",
]


class _ScanpyHandler(logging.Handler):
    """Shows the package's log messages the way scanpy shows its own, at ``sc.settings.verbosity``."""

    def emit(self, record: logging.LogRecord) -> None:
        sc = sys.modules.get("scanpy")
        if sc is None:
            return
        root = sc.settings._root_logger
        if record.levelno >= root.level:
            record = logging.makeLogRecord(record.__dict__)  # a copy with the fields scanpy's formatter reads
            for extra in ("time_passed", "deep"):
                if not hasattr(record, extra):
                    setattr(record, extra, None)
            for handler in root.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


def follow_scanpy_logging() -> None:
    """Route the package's messages through scanpy's logging when scanpy is in use (it is not imported here).

    Once scanpy has been imported, messages go to scanpy's handler (its format, its stream) and their level
    follows ``sc.settings.verbosity`` (``"info"`` shows progress messages such as the genes matched), unless
    the user set the ``transcriptformer`` logger's level themselves. Messages still propagate to the root
    logger for users who configure :mod:`logging` directly.
    """
    sc = sys.modules.get("scanpy")
    if sc is None or not hasattr(sc, "settings"):
        return
    if not any(isinstance(h, _ScanpyHandler) for h in logger.handlers):
        logger.addHandler(_ScanpyHandler())
    # follow the verbosity unless the level was set by someone else (the user, a test's caplog)
    if logger.level in (logging.NOTSET, getattr(logger, "_scanpy_level", None)):
        logger.setLevel(sc.settings._root_logger.level)
        logger._scanpy_level = logger.level  # type: ignore[attr-defined]


def check_adata(adata: Any, name: str = "adata") -> None:
    """An AnnData with at least one cell (and scanpy's logging followed: every tool checks its input)."""
    follow_scanpy_logging()
    if not isinstance(adata, AnnData):
        raise TypeError(f"{name} must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError(f"{name} has no cells.")


def check_writable(adata: AnnData, copy: bool | None) -> None:
    """Refuse up front what could only fail after the compute: writing into a view of a backed file.

    ``copy=None``: the function has no ``copy`` option, so the message does not offer it.
    """
    if adata.is_view and adata.isbacked and not copy:
        offer = "Pass copy=True (returns an in-memory copy with the results), or load" if copy is not None else "Load"
        raise ValueError(
            f"adata is a view of a backed AnnData, which cannot take results in place. {offer} the subset "
            "first: adata = adata[...].to_memory()."
        )


def in_memory_copy(adata: AnnData) -> AnnData:
    """A copy in memory (a backed AnnData, or a view of one, cannot be copied with ``.copy()``)."""
    return adata.to_memory() if adata.isbacked else adata.copy()


@dataclass(frozen=True)
class Keys:
    """The keys one base name owns, derived in one place (as ``sc.tl.umap`` derives its keys).

    The embedding family (written by :func:`~transcriptformer.scanpy.tl.embed`) is ``obsm[obsm]`` and
    ``uns[base]``; the likelihood family (written by :func:`~transcriptformer.scanpy.tl.likelihood` and by
    ``embed(llh=True)``) is ``obs[f"{base}_llh" | "_n_genes" | "_gene_nll" | "_end_nll"]``,
    ``layers[f"{base}_count_nll" | "_gene_nll"]`` and ``uns[f"{base}_llh"]``.
    """

    base: str
    obsm: str

    @classmethod
    def from_embedding_key(cls, key_added: str) -> Keys:
        """``"X_transcriptformer"`` -> base ``"transcriptformer"``; a key without ``X_`` is its own base."""
        return cls(base=key_added.removeprefix("X_") or key_added, obsm=key_added)

    @classmethod
    def from_base(cls, base: str) -> Keys:
        """``"transcriptformer"`` -> embedding ``"X_transcriptformer"``."""
        return cls(base=base, obsm=f"X_{base}")

    @property
    def uns(self) -> str:
        return self.base

    @property
    def llh_uns(self) -> str:
        return f"{self.base}_llh"

    def obs(self, what: str) -> str:
        return f"{self.base}_{what}"

    def layer(self, what: str) -> str:
        return f"{self.base}_{what}"

    def embedding_family(self) -> list[tuple[str, str]]:
        return [("obsm", self.obsm), ("uns", self.uns)]

    def likelihood_family(self) -> list[tuple[str, str]]:
        obs = [("obs", self.obs(w)) for w in ("llh", "n_genes", "gene_nll", "end_nll")]
        layers = [("layers", self.layer(w)) for w in ("count_nll", "gene_nll")]
        return [*obs, *layers, ("uns", self.llh_uns)]


@dataclass
class Update:
    """Writes to an AnnData collected while computing, applied all at once at the end.

    Nothing touches the AnnData until :meth:`apply`, so an error anywhere before leaves it as it was.
    ``remove`` lists keys an earlier run owned that this run replaces (so results of two runs are never
    mixed under one key).
    """

    writes: list[tuple[str, str, Any]] = field(default_factory=list)
    removals: list[tuple[str, str]] = field(default_factory=list)

    def set(self, slot: str, key: str, value: Any) -> None:
        self.writes.append((slot, key, value))

    def remove(self, entries: Iterable[tuple[str, str]]) -> None:
        self.removals.extend(entries)

    def apply(self, adata: AnnData, *, copy: bool) -> AnnData | None:
        """Write into ``adata`` (or into a copy, returned, when ``copy``)."""
        copy = check_bool(copy, "copy")
        if copy:
            adata = in_memory_copy(adata)
        elif adata.is_view:
            adata._init_as_actual(adata.copy())  # as scanpy does: writing into a view makes it actual
        written = {(slot, key) for slot, key, _ in self.writes}
        removed = []
        for slot, key in self.removals:
            container = getattr(adata, slot)
            if (slot, key) not in written and key in container:
                del container[key]
                removed.append(f"{slot}[{key!r}]")
        if removed:
            logger.info("removed the earlier run's %s (replaced by this run)", ", ".join(removed))
        for slot, key, value in self.writes:
            getattr(adata, slot)[key] = value
        return adata if copy else None


def fingerprint(X) -> str:
    """A cheap digest of an embedding (shape and a sample of rows), to notice that it changed."""
    import hashlib

    import numpy as np

    X = np.asarray(X)
    sample = np.ascontiguousarray(X[:: max(1, len(X) // 1000)], dtype=np.float32)
    return hashlib.sha1(repr(X.shape).encode() + sample.tobytes()).hexdigest()
