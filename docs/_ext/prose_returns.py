"""Render prose ``Returns`` sections of numpy docstrings as prose.

The docstrings follow scanpy's habit of describing the return value in words::

    Returns
    -------
    ``None``, or a copy of ``adata`` with ...

napoleon reads every unindented line of a numpy ``Returns`` section as a new field whose text is
the *type*, which turns such prose into a bogus return type split over several bullets. This
extension rewrites, before napoleon runs, a section whose first line is not followed by an
indented description into one field (a placeholder type, the prose indented under it, kept
verbatim so that definition lists in it still render). After napoleon, the placeholder
``:rtype:`` is dropped, so that sphinx-autodoc-typehints documents the annotated return type.

List it in ``extensions`` after ``sphinx.ext.napoleon`` and before ``sphinx_autodoc_typehints``.
"""

from __future__ import annotations

PLACEHOLDER = "PROSE_RETURNS_PLACEHOLDER"


def _is_header(lines: list[str], i: int) -> bool:
    if i + 1 >= len(lines):
        return False
    title, rule = lines[i].strip(), lines[i + 1].strip()
    return bool(title) and len(rule) >= 3 and set(rule) == {"-"} and not lines[i].startswith((" ", "\t"))


def _before_napoleon(app, what, name, obj, options, lines: list[str]) -> None:
    for i in range(len(lines) - 1):
        if lines[i].strip() not in ("Returns", "Return") or not _is_header(lines, i):
            continue
        start = i + 2
        end = next((j for j in range(start, len(lines)) if _is_header(lines, j)), len(lines))
        body = lines[start:end]
        first = next((k for k, line in enumerate(body) if line.strip()), None)
        if first is None:
            return
        nxt = body[first + 1] if first + 1 < len(body) else ""
        if nxt.strip() and nxt.startswith((" ", "\t")):
            return  # numpy style already: "type" or "name : type" with an indented description
        body = body[first:]
        while body and not body[-1].strip():
            body.pop()
        lines[start:end] = [PLACEHOLDER, *(f"    {line}" if line.strip() else "" for line in body), ""]
        return


def _after_napoleon(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = [line for line in lines if line.strip() != f":rtype: {PLACEHOLDER}"]
    for k, line in enumerate(lines):
        if PLACEHOLDER in line:  # napoleon_use_rtype = False puts the type inline
            lines[k] = line.replace(f"*{PLACEHOLDER}* -- ", "").replace(PLACEHOLDER, "")


def setup(app):
    app.connect("autodoc-process-docstring", _before_napoleon, priority=400)
    app.connect("autodoc-process-docstring", _after_napoleon, priority=500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
