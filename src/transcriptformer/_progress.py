"""Progress bars: tqdm's notebook bar where it can be drawn, its text bar elsewhere."""

from __future__ import annotations

import warnings
from typing import Any


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
