"""Remove the autosummary pages of names that no page lists any more, before autosummary writes the others.

autosummary writes one page per listed name into ``generated/`` and never removes one: after a name leaves
``api.md`` its old page stays in the source tree, in no toctree, and a ``-W`` build fails on it at the very end
(after every tutorial ran). Only ``.rst`` files in the folders autosummary writes to are considered, and only
those that no ``autosummary`` directive of the sources (the generated pages included) lists.

List it in ``extensions`` after ``sphinx.ext.autosummary``.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.ext.autosummary.generate import find_autosummary_in_files
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _listed(files: list[Path]) -> set[Path]:
    """The stub of every name an ``autosummary`` directive of ``files`` lists with a ``:toctree:``."""
    entries = find_autosummary_in_files([str(f) for f in files])
    return {Path(e.path).resolve() / f"{e.name}.rst" for e in entries if e.path}


def remove_stale_stubs(app: Sphinx) -> None:
    src = Path(app.srcdir).resolve()
    sources = [
        p
        for p in src.rglob("*")
        if p.suffix in (".md", ".rst")
        and p.is_file()
        and not {"_build", "_templates", ".ipynb_checkpoints"} & set(p.relative_to(src).parts)
    ]
    listed = _listed(sources)  # the generated pages are among the sources: names they list (templates) count
    folders = {p.parent for p in listed}
    existing = {p.resolve() for folder in folders if folder.is_dir() for p in folder.glob("*.rst")}
    for stale in sorted(existing - listed):
        stale.unlink()
        logger.info(f"removed {stale.relative_to(src)}: no page lists it any more")


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", remove_stale_stubs, priority=400)  # before autosummary's (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
