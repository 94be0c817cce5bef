"""How the tutorials are executed while the pages are built: the kernels' start-up code, and the cache.

Imported by ``conf.py`` (not a Sphinx extension: it only computes settings and prepares the kernels).

**The kernels' start-up code** (:data:`STARTUP`), run by every kernel that executes a notebook, as an IPython
start-up file of a temporary ``IPYTHONDIR`` that the kernels inherit from ``sphinx-build``:

- *Deprecated names are errors.* The tutorials must use the current API: the package's deprecation warnings (a
  ``FutureWarning`` from :func:`transcriptformer.errors.deprecated`) become errors, so a tutorial that uses an
  old name fails the build, even where its cell hides stderr.
- *No progress bars.* A static page cannot update a bar: each update would be a line of the cell's output. The
  package shows a bar for every run that takes more than a few seconds and has no global switch, so ``tqdm``'s
  bars are disabled in these kernels.

**The execution cache.** myst-nb's ``cache`` mode keeps each notebook's outputs in a jupyter-cache folder and
re-runs a notebook only when its code cells change. The outputs also depend on the package and on the start-up
code, which jupyter-cache does not know about, so the folder is keyed on a digest of both (the package's files:
its source, the bundled demo model and datasets): after a change of either, every notebook runs once again,
never showing outputs of other code; with both unchanged, only the notebooks whose code changed run. The
folders of the few most recently used digests are kept (switching branches back and forth stays fast), older
ones are removed.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

#: How every deprecation warning of the package reads (``transcriptformer.errors.deprecated``).
DEPRECATION_MESSAGE = r".*The old form will stop working in a future release"

#: Cache folders (one per package digest) kept beside the current one.
KEEP = 3

STARTUP = f"""\
# written by docs/_ext/notebook_execution.py for the documentation build
import os
import warnings

import tqdm.auto
import tqdm.std

# deprecated names are errors
warnings.filterwarnings("error", message={DEPRECATION_MESSAGE!r}, category=FutureWarning)


# no progress bars: a static page would show every update as a line. The bars are drawn into os.devnull (not
# disabled: the package switches a bar on after creating it) as plain text bars (no notebook widget).
class _NoBar(tqdm.std.tqdm):
    _devnull = open(os.devnull, "w")  # noqa: SIM115 - for the kernel's lifetime

    def __init__(self, *args, **kwargs):
        kwargs["file"] = self._devnull
        super().__init__(*args, **kwargs)


tqdm.auto.tqdm = _NoBar
del _NoBar
"""


def package_digest(package: str = "transcriptformer", extra: str = STARTUP) -> str:
    """A digest of every file of the importable ``package`` (compiled files left out) and ``extra``, 16 hex digits."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not importable: install it (pip install -e .) or set PYTHONPATH=src.")
    root = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256(extra.encode() + b"\0")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def cache_folder(root: Path, digest: str, keep: int = KEEP) -> Path:
    """``root / digest``, created; the other digests' folders under ``root`` but the ``keep`` newest removed."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / digest
    fresh = not folder.exists()
    folder.mkdir(exist_ok=True)
    os.utime(folder)  # "most recently used"
    others = [p for p in root.iterdir() if p.is_dir() and p != folder and re.fullmatch(r"[0-9a-f]{16}", p.name)]
    for old in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    if fresh and others:
        print(
            f"transcriptformer docs: the package (or the kernels' start-up code) changed since the cached tutorial "
            f"outputs were made; every notebook runs once ({folder})."
        )
    return folder


def prepare_kernels() -> None:
    """Make every kernel started from now on run :data:`STARTUP` first."""
    from transcriptformer.errors import deprecated  # without torch: cheap

    with warnings.catch_warnings(record=True) as caught:  # the filter below must match what the package says
        warnings.simplefilter("always")
        deprecated("old", "new")
    if not any(re.match(DEPRECATION_MESSAGE, str(w.message)) for w in caught):
        raise RuntimeError(
            "transcriptformer.errors.deprecated no longer says 'The old form will stop working in a future release': "
            "update DEPRECATION_MESSAGE in docs/_ext/notebook_execution.py."
        )
    ipython_dir = Path(tempfile.mkdtemp(prefix="transcriptformer-docs-ipython-"))
    atexit.register(shutil.rmtree, ipython_dir, ignore_errors=True)
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-transcriptformer-docs.py").write_text(STARTUP)
    os.environ["IPYTHONDIR"] = str(ipython_dir)


def notebooks_with_outputs(docs: Path) -> list[str]:
    """The notebooks under ``docs`` stored with outputs (they must be stored without: the build executes them)."""
    import json

    found = []
    for path in sorted(docs.rglob("*.ipynb")):
        if "_build" in path.relative_to(docs).parts or ".ipynb_checkpoints" in path.parts:
            continue
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        if any(c.get("outputs") or c.get("execution_count") for c in cells if c.get("cell_type") == "code"):
            found.append(str(path.relative_to(docs)))
    return found
