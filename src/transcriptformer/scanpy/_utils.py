"""What every function of the scanpy face shares: input checks, all-or-nothing writes, keys and deprecations.

The rules these implement are written down in ``docs/conventions.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anndata import AnnData

from ..errors import deprecated as deprecated_argument
from ..inference.options import check_bool, check_key
from ..weights.loaded import LoadedModel

logger = logging.getLogger("transcriptformer")

__all__ = [
    "ModelArg",
    "Update",
    "base_key",
    "check_adata",
    "check_writable",
    "deprecated_argument",
    "fingerprint",
    "follow_scanpy_logging",
    "in_memory_copy",
    "use_rep_or_deprecated",
]


#: What ``model=`` accepts: a registry name, a checkpoint folder, a loaded model, or ``(model, adapter_folder)``.
ModelArg = str | os.PathLike | LoadedModel | tuple


class _ScanpyLevel(int):
    """A logger level set from scanpy's verbosity (a level the user sets is a plain ``int`` and is kept)."""


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
    # follow the verbosity unless the level was set by someone else (the user, a test's caplog): a level this
    # function set is a _ScanpyLevel, any other is the user's
    if logger.level == logging.NOTSET or isinstance(logger.level, _ScanpyLevel):
        logger.setLevel(_ScanpyLevel(sc.settings._root_logger.level))


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


def base_key(key_added: Any, tool: str, *, old_prefix: str = "X_") -> str:
    """``key_added`` as a base name; the former spelling with ``old_prefix`` (an obsm/varm key) is deprecated."""
    key = check_key(key_added)
    if key.startswith(old_prefix) and len(key) > len(old_prefix):
        new = key.removeprefix(old_prefix)
        deprecated_argument(
            f"{tool}(key_added={key!r}): key_added is now a base name from which every key is derived "
            f"({old_prefix}{new!r} is written for key_added={new!r})",
            f"key_added={new!r}",
        )
        return new
    return key


def fingerprint(X: Any) -> str:
    """A digest of every value of an array (and its shape): any change of the embedding changes it."""
    X = np.asarray(X)
    h = hashlib.blake2b(repr(X.shape).encode(), digest_size=16)
    for start in range(0, len(X), 65536):  # in blocks: no float32 copy of the whole array at once
        h.update(np.ascontiguousarray(X[start : start + 65536], dtype=np.float32).tobytes())
    return h.hexdigest()


#: Where an :class:`Update` can write: AnnData attributes (``"raw.var"``: the var of ``.raw``).
_SLOTS = ("obs", "var", "obsm", "varm", "obsp", "layers", "uns", "raw.var")


def _container(adata: AnnData, slot: str) -> Any:
    return adata.raw.var if slot == "raw.var" else getattr(adata, slot)


@dataclass
class Update:
    """Writes to an AnnData, collected while computing and applied all at once at the end (all or nothing).

    Nothing touches the AnnData until :meth:`apply`, so an error anywhere before leaves it as it was. The run's
    record (``uns[record]["params"]``, written with :meth:`set`) gets ``"keys"``: every ``slot/key`` this run
    wrote. A later run of the same ``tool`` under the same record removes what the earlier one wrote and still
    owns (a key rewritten since by another tool belongs to that tool), and nothing else.

    Parameters
    ----------
    tool
        The tool writing (``"embed"``).
    record
        The ``uns`` key of the run's record, or ``None`` for a tool that keeps none.
    """

    tool: str
    record: str | None = None
    writes: list[tuple[str, str, Any]] = field(default_factory=list)

    def set(self, slot: str, key: str, value: Any) -> None:
        """Queue ``adata.<slot>[key] = value``."""
        if slot not in _SLOTS:
            raise ValueError(f"cannot write to {slot!r}; slots: {_SLOTS}")
        self.writes.append((slot, key, value))

    def apply(self, adata: AnnData, *, copy: bool) -> AnnData | None:
        """Write into ``adata`` (or into a copy, returned, when ``copy``)."""
        copy = check_bool(copy, "copy")
        if copy:
            adata = in_memory_copy(adata)
        elif adata.is_view:
            adata._init_as_actual(adata.copy())  # as scanpy does: writing into a view makes it actual
        written = [f"{slot}/{key}" for slot, key, _ in self.writes]
        if self.record is not None:
            for slot, key, value in self.writes:
                if (slot, key) == ("uns", self.record) and isinstance(value.get("params"), dict):
                    value["params"]["keys"] = written
            earlier = adata.uns.get(self.record)
            params = earlier.get("params") if isinstance(earlier, dict) else None
            if isinstance(params, dict) and params.get("tool") == self.tool:
                stale = [k for k in params.get("keys", []) if k not in written]
                self._remove(adata, stale)
        self._disown(adata, written)
        for slot, key, value in self.writes:
            _container(adata, slot)[key] = value
        return adata if copy else None

    @staticmethod
    def _remove(adata: AnnData, entries: list[str]) -> None:
        removed = []
        for entry in entries:
            slot, _, key = str(entry).partition("/")
            if slot not in _SLOTS or (slot == "raw.var" and adata.raw is None):
                continue
            container = _container(adata, slot)
            if key in container:
                del container[key]
                removed.append(f"{slot}[{key!r}]")
        if removed:
            logger.info("removed what the earlier run wrote: %s", ", ".join(removed))

    def _disown(self, adata: AnnData, written: list[str]) -> None:
        """Keys this run writes now belong to it: strike them from every other run's record."""
        mine = set(written)
        for name, entry in adata.uns.items():
            if name == self.record or not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
                continue
            keys = entry["params"].get("keys")
            if keys is not None and mine & set(map(str, keys)):
                entry["params"]["keys"] = [k for k in map(str, keys) if k not in mine]


def use_rep_or_deprecated(rep: str | None, use_rep: str, tool: str) -> str:
    """``use_rep``, or the deprecated ``rep`` when given (with a warning)."""
    if rep is None:
        return use_rep
    deprecated_argument(f"{tool}(rep=...)", "use_rep=...")
    return rep
