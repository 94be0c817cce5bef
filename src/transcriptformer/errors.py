"""Warning categories of the package, and how its warnings reach the user (imported by every layer).

:func:`warn` attributes a warning to the user's own line of code, the first frame outside this package,
however deep inside the package it is raised, so that Python's warning filters and messages point at the
call that caused it (``tfs.tl.embed(...)`` in a notebook), not at an internal helper or a thread pool.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import FrameType

__all__ = ["TranscriptFormerWarning", "deprecated", "warn"]

_PACKAGE = str(Path(__file__).resolve().parent)


class TranscriptFormerWarning(UserWarning):
    """Something about the input that the user should look at (results are still computed)."""


def _outside_package_level() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from :func:`warn` that lands on the first user frame.

    :func:`warnings.warn` does not count the import system's frames (``importlib._bootstrap``) above the
    first level, so neither does this (a warning raised while the package is imported lands on the ``import``).
    """
    frame: FrameType | None = sys._getframe(2)  # the caller of warn()
    level = 2
    while frame is not None and (
        str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE)
        or frame.f_code.co_filename.startswith("<frozen")
    ):
        frame = frame.f_back
        name = frame.f_code.co_filename if frame is not None else ""
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
    return level


def warn(message: str, category: type[Warning] = TranscriptFormerWarning) -> None:
    """Warn, attributed to the first frame outside the package (the user's call)."""
    warnings.warn(message, category, stacklevel=_outside_package_level())


def deprecated(what: str, instead: str) -> None:
    """Warn (``FutureWarning``, shown to users by default) that ``what`` is deprecated, with what to write."""
    warn(f"{what}; write {instead} instead. The old form will stop working in a future release.", FutureWarning)
