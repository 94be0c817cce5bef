"""The package's version, and the versions of everything that matters for a bug report (``show_versions()``).

The distribution is called ``transcriptformer-scanpy``; the module it installs is ``transcriptformer``, the
same module name as the published TranscriptFormer tool's distribution (``transcriptformer`` on PyPI). Both in
one environment overwrite each other's files, so importing the package checks, once, whether the published
distribution is installed here too and warns with the fix (:func:`check_published_conflict`). The check reads
only the names of the installed distributions' metadata folders on ``sys.path`` (well under a millisecond).
"""

from __future__ import annotations

import platform
import sys
import warnings
from importlib.metadata import Distribution, distributions

from .errors import warn

#: Our distribution's name (what ``pip install`` takes); the import name stays ``transcriptformer``.
DIST_NAME = "transcriptformer-scanpy"
#: The published TranscriptFormer tool's distribution, which installs a ``transcriptformer`` module as well.
PUBLISHED_NAME = "transcriptformer"
#: Where the sources are: ``pip install "transcriptformer-scanpy @ git+<REPOSITORY>"``.
REPOSITORY = "https://github.com/transcriptformer/transcriptformer"
# Our project URLs: how an install of ours made before the rename (distribution "transcriptformer") is told apart
_OUR_URLS = ("transcriptformer.readthedocs.io", "github.com/transcriptformer/transcriptformer")


def _is_ours(dist: Distribution) -> bool:
    """Whether a distribution is this package (under its current name, or ``transcriptformer`` before the rename)."""
    meta = dist.metadata  # get_all: None where a field is missing (a missing key is deprecated from Python 3.12)
    if any(name.lower().replace("_", "-") == DIST_NAME for name in meta.get_all("Name") or []):
        return True
    urls = " ".join([*(meta.get_all("Project-URL") or []), *(meta.get_all("Home-page") or [])])
    return any(url in urls for url in _OUR_URLS)


def our_distribution() -> Distribution | None:
    """The installed distribution of this package (under its name, or under the name it had before), if any."""
    for name in (DIST_NAME, PUBLISHED_NAME):
        for dist in distributions(name=name):
            if _is_ours(dist):
                return dist
    return None


def published_versions() -> list[str]:
    """Versions of the published ``transcriptformer`` distribution installed on ``sys.path`` (usually none)."""
    found = {dist.version for dist in distributions(name=PUBLISHED_NAME) if not _is_ours(dist)}
    return sorted(found)


def conflict_message(published: list[str]) -> str:
    """What the warning about an installed published package says: the problem and how to fix it."""
    return (
        f"The published TranscriptFormer tool ({PUBLISHED_NAME} {', '.join(published)}, from "
        f"github.com/czi-ai/transcriptformer) is installed in this environment as well as this package "
        f"({DIST_NAME}). Both install a Python package named 'transcriptformer' and a 'transcriptformer' "
        "command, so whichever was installed last has overwritten files of the other, and neither may work. "
        f"Fix: pip uninstall -y {PUBLISHED_NAME} {DIST_NAME}, then reinstall this package (pip install -e . in "
        f'a clone, or pip install "{DIST_NAME} @ git+{REPOSITORY}"); to use both tools, install each in its own '
        "virtual environment."
    )


def check_published_conflict() -> bool:
    """Warn (once per process) if the published ``transcriptformer`` distribution is installed here too.

    Returns
    -------
    bool
        Whether it is.
    """
    global _checked
    if _checked is not None:
        return _checked
    published = published_versions()
    _checked = bool(published)
    if published:
        warn(conflict_message(published))
    return _checked


_checked: bool | None = None
_ours = our_distribution()
__version__ = _ours.version if _ours is not None else "0.0.0+unknown"  # unknown: a source tree, not installed
check_published_conflict()

PACKAGES = (
    "torch",
    "anndata",
    "scanpy",
    "numpy",
    "scipy",
    "pandas",
    "h5py",
    "pooch",
    "scikit-learn",
)


def versions() -> dict[str, str]:
    """Package versions, Python, platform and the accelerators torch can see.

    ``transcriptformer`` is this package's version; a published ``transcriptformer`` installed beside it (a
    conflict: see :func:`check_published_conflict`) is listed as ``transcriptformer (published)``.
    """
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"transcriptformer": __version__}
    published = published_versions()
    if published:
        out["transcriptformer (published)"] = ", ".join(published)
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = sys.version.split()[0]
    out["platform"] = platform.platform()
    out["torch threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = f"{torch.version.cuda}: {', '.join(names)}"
    else:
        out["cuda"] = "not available"
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = "available" if mps is not None and mps.is_available() else "not available"
    return out


def show_versions() -> None:
    """Print :func:`versions`, then the session report of :mod:`session_info` (modules the session imported)."""
    info = versions()
    width = max(map(len, info))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    import session_info

    try:
        print()
        with warnings.catch_warnings():  # it reads `module.__version__`, which many packages now deprecate
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            session_info.show(html=False, dependencies=True)
    except ValueError:  # nothing imported in __main__ to report (e.g. called from a library)
        pass
    except Exception as e:  # noqa: BLE001 - a diagnostic must not fail: session_info walks every module
        print(f"(session_info could not list the imported modules: {type(e).__name__}: {e})")
