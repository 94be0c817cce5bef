"""Two fixes for how the API reference renders the package's docstrings.

**Signatures of functions with shared run options.** :func:`transcriptformer.inference.options.with_run_options`
gives a tool the keyword-only parameters of :class:`~transcriptformer.inference.options.RunOptions` through the
wrapper's ``__signature__`` and ``__annotations__`` (what :func:`inspect.signature` and :func:`help`
show). sphinx-autodoc-typehints unwraps every function completely (``inspect.unwrap`` without a
``stop``), so it would document the inner function instead: a parameter ``options`` in the signature
and no types for ``gene_key``, ``device``, .... Here its ``unwrap`` stops, as :func:`inspect.signature`
does, at a wrapper that carries its own ``__signature__``.

**Attributes documented together.** A numpy ``Attributes`` entry naming several attributes
(``count_head, gene_head``) is rendered by napoleon (``napoleon_use_ivar``) as one garbled field;
``Parameters`` entries are fine. Before napoleon runs, such an entry is split into one entry per
name with the same description.

List it in ``extensions`` after ``sphinx_autodoc_typehints``.
"""

from __future__ import annotations

import inspect
import re
import types

_NAMES = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(, *[A-Za-z_][A-Za-z0-9_]*)+$")


class _InspectStoppingAtSignatures(types.ModuleType):
    """The :mod:`inspect` module, with an ``unwrap`` that keeps wrappers having a ``__signature__``."""

    def __init__(self) -> None:
        super().__init__("inspect")

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def unwrap(func, *, stop=None):
        def stop_here(f):
            return hasattr(f, "__signature__") or (stop is not None and stop(f))

        return inspect.unwrap(func, stop=stop_here)


def _split_attribute_entries(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    i, section = 0, None
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and set(lines[i + 1].strip()) == {"-"} and not line.startswith(" "):
            section = line.strip()
        if section == "Attributes" and not line.startswith((" ", "\t")) and _NAMES.match(line.strip()):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                if not lines[j].strip() and (j + 1 >= len(lines) or not lines[j + 1].startswith((" ", "\t"))):
                    break
                j += 1
            body = lines[i + 1 : j]
            for attribute in (n.strip() for n in line.split(",")):
                out += [attribute, *body]
            i = j
            continue
        out.append(line)
        i += 1
    lines[:] = out


def setup(app):
    import sphinx_autodoc_typehints

    sphinx_autodoc_typehints.inspect = _InspectStoppingAtSignatures()
    app.connect("autodoc-process-docstring", _split_attribute_entries, priority=300)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
