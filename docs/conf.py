"""Sphinx configuration of the transcriptformer documentation.

Build locally (from the repository root)::

    pip install -e ".[doc]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

Notebooks under ``tutorials/`` (and the MyST notebook ``finetuning.md``) are stored without
outputs and executed by myst-nb at build time (cached in ``docs/_build/.jupyter_cache``). They
use the bundled demo model and datasets, so the build needs neither a GPU nor the published
weights. Their kernels inherit this process's environment (``PYTHONPATH`` included).
``check_rendered.py`` then checks the built pages in headless Chromium (``development.md``).

Environment variables:

``TRANSCRIPTFORMER_DOCS_OFFLINE``
    ``1`` disables intersphinx (no inventories are fetched), ``0`` forces it on. Unset: intersphinx
    is used when ``docs.python.org`` can be reached, so an offline ``-W`` build does not fail on the
    inventory downloads.
``TRANSCRIPTFORMER_DOCS_EXECUTE``
    myst-nb execution mode: ``cache`` (the default) re-runs a notebook only when its code cells or the
    package changed (``_build/.jupyter_cache/<digest of the package>/``); ``force`` re-runs every
    notebook (CI); ``off`` runs none (for edits of prose and API pages).
``TRANSCRIPTFORMER_DOCS_CACHE``
    Another folder for the execution cache (default ``docs/_build/.jupyter_cache``).

A kernel that executes a notebook turns the package's deprecation warnings into errors, so a tutorial
that uses a deprecated name fails the build, and draws no progress bars.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from datetime import datetime
from pathlib import Path

from transcriptformer._meta import REPOSITORY, our_distribution

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import notebook_execution  # local (_ext/): the kernels' start-up code, the execution cache

# sphinx-autodoc-typehints still calls an API that Sphinx 10 removes; not our concern here
warnings.filterwarnings("ignore", message=".*sphinx_autodoc_typehints", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*sphinx_autodoc_typehints", category=PendingDeprecationWarning)

# -- project information -----------------------------------------------------------------------

_dist = our_distribution()  # the distribution transcriptformer-scanpy (or an install of it from before the rename)
if _dist is None:
    raise RuntimeError('transcriptformer is not installed: pip install -e ".[doc]" first.')
_meta = _dist.metadata
project = "transcriptformer"  # the import name; the distribution is transcriptformer-scanpy
author = _meta.get("Author") or "transcriptformer developers"
copyright = f"{datetime.now():%Y}, {author}"
release = _meta["Version"]
version = release

repository_url = REPOSITORY

# -- general configuration ---------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "stale_stubs",  # local (_ext/): removes the generated pages of names no page lists any more
    "sphinx.ext.napoleon",
    "prose_returns",  # local (_ext/): after napoleon, before sphinx_autodoc_typehints
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",  # after napoleon, so it sees the converted docstrings
    "api_fixes",  # local (_ext/): after sphinx_autodoc_typehints
    "sphinx_copybutton",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
pygments_style = "default"
nitpicky = False

# -- autodoc / autosummary / napoleon / typehints ---------------------------------------------

autosummary_generate = True
autodoc_member_order = "bysource"

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True

typehints_defaults = "braces"
typehints_use_signature = False
typehints_use_signature_return = False
always_document_param_types = False
typehints_document_rtype = True
typehints_fully_qualified = False

# -- MyST / myst-nb ----------------------------------------------------------------------------

myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
    "substitution",
]
myst_heading_anchors = 3
myst_url_schemes = ("http", "https", "mailto")

_EXECUTION_MODES = ("cache", "force", "off", "auto", "inline")  # myst-nb's
nb_execution_mode = os.environ.get("TRANSCRIPTFORMER_DOCS_EXECUTE", "cache").strip().lower()
if nb_execution_mode not in _EXECUTION_MODES:
    raise ValueError(
        f"TRANSCRIPTFORMER_DOCS_EXECUTE={nb_execution_mode!r}; expected one of {', '.join(_EXECUTION_MODES)}."
    )
# one jupyter-cache folder per digest of the package, outside the HTML output so that it survives a clean of
# _build/html: a notebook re-runs when its code or the package changed (_ext/notebook_execution.py)
_cache_root = Path(os.environ.get("TRANSCRIPTFORMER_DOCS_CACHE") or Path(__file__).parent / "_build" / ".jupyter_cache")
if nb_execution_mode == "cache":
    nb_execution_cache_path = str(notebook_execution.cache_folder(_cache_root, notebook_execution.package_digest()))
if nb_execution_mode != "off":
    notebook_execution.prepare_kernels()  # deprecated names are errors; no progress bars
nb_execution_timeout = 900  # per cell; fine-tuning on two busy CPU cores can take minutes
nb_execution_raise_on_error = True  # a failing tutorial fails the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "show"

# -- intersphinx (tolerant of an offline build) ------------------------------------------------

_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "h5py": ("https://docs.h5py.org/en/stable/", None),
    "pooch": ("https://www.fatiando.org/pooch/latest/", None),
}


def _online(host: str = "docs.python.org", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


_offline_env = os.environ.get("TRANSCRIPTFORMER_DOCS_OFFLINE")
if _offline_env is not None:
    _use_intersphinx = _offline_env.strip().lower() in ("0", "false", "no", "")
else:
    _use_intersphinx = _online()
if not _use_intersphinx:
    print("transcriptformer docs: offline, intersphinx disabled (links to other projects are plain text).")
intersphinx_mapping = _INTERSPHINX if _use_intersphinx else {}
intersphinx_timeout = 10

# -- HTML output -------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "transcriptformer"
html_theme_options = {
    "repository_url": repository_url,
    "repository_branch": "main",
    "path_to_docs": "docs/",
    "use_repository_button": True,
    "use_issues_button": True,
    "use_download_button": True,
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "launch_buttons": {},
}
html_show_sphinx = False
html_context = {
    "display_github": True,
    "github_user": "transcriptformer",
    "github_repo": "transcriptformer",
    "github_version": "main",
    "conf_py_path": "/docs/",
}

copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


def setup(app):
    """Warn (an error with ``-W``) about a tutorial committed with outputs: the build executes them."""
    from sphinx.util import logging as sphinx_logging

    def check(app):
        for name in notebook_execution.notebooks_with_outputs(Path(app.srcdir)):
            sphinx_logging.getLogger("transcriptformer.docs").warning(
                f"{name} is stored with outputs; clear them before committing "
                f"(jupyter nbconvert --clear-output --inplace docs/{name})."
            )

    app.connect("builder-inited", check)
