"""Progress bars: tqdm's notebook bar where it can be drawn, its text bar elsewhere."""

from __future__ import annotations

import sys
import warnings
from typing import Any

#: Seconds a long task runs before its progress bar appears: quick calls stay quiet, long ones always show it.
PROGRESS_DELAY_S = 2.0


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, without tqdm's warning when a notebook lacks ``ipywidgets``.

    In a Jupyter kernel without ``ipywidgets``, ``tqdm.auto`` falls back to the text bar and warns
    ("IProgress not found") in every notebook that shows a bar; the fallback is the same without the warning.
    """
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm as auto

    return auto(*args, **kwargs)


def write_above(line: str) -> None:
    """Print a line above any progress bar on screen (a bar's own ``write``), to standard error."""
    from tqdm import tqdm as plain

    plain.write(line, file=sys.stderr)
