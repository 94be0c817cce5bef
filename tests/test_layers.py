"""The package's layering, as a test: no import circle, and every sub-package imports only from the layers below it.

Every module of ``src/transcriptformer`` is parsed with :mod:`ast` (nothing is imported); every ``import`` and
``from ... import`` counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike. The layers,
bottom first:

* ground: ``config``, ``vocab``, ``errors``, ``_files``, ``_progress``, ``_meta``;
* ``model``; ``data``; ``weights``; ``inference``; ``training``;
* the faces: ``scanpy`` and ``cli`` (and ``__main__``), which may import everything below them.

Nothing below the faces imports them, and nothing imports the top-level package ``transcriptformer`` itself (its
``__init__`` is the root namespace: it may name anything, lazily). Inside a layer a module may import another of
the same layer, as long as no circle forms. Inside the ``scanpy`` face, ``pl`` may import ``tl``, and every part
may import the face's private helpers ``scanpy._utils``; no other part of the face imports another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import transcriptformer

PACKAGE = "transcriptformer"
ROOT = Path(transcriptformer.__file__).resolve().parent

GROUND = ("config", "vocab", "errors", "_files", "_progress", "_meta")
#: The layers, bottom first: the first part of a module's name under the package -> its rank.
RANKS = {
    **dict.fromkeys(GROUND, 0),
    "model": 1,
    "data": 2,
    "weights": 3,
    "inference": 4,
    "training": 5,
    "scanpy": 6,
    "cli": 6,
    "__main__": 6,
}
FACES = {"scanpy", "cli", "__main__"}
#: The parts of the scanpy face, and which other parts each may import (besides ``scanpy._utils``).
#: What each part of the scanpy face may import of the others: plots draw what tools wrote, and the datasets are
#: built with the preprocessing helpers (symbols to Ensembl ids) and point at the models for deprecated names.
FACE_PARTS = {"tl": set(), "pl": {"tl"}, "pp": set(), "datasets": {"pp", "models"}, "models": set()}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """``(imported module of the package, line)`` for every import statement anywhere in module ``name``.

    ``from X import y`` is an edge to ``X.y`` when that is a module of the package (``from .. import _files``),
    else to ``X``; relative imports are resolved against the module's package.
    """
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            edges += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level - 1 < len(parts), f"{path}:{node.lineno}: relative import beyond the package"
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                edges.append((sub if sub in MODULES else module, node.lineno))
    return edges


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {name: _imports(name) for name in MODULES}


GRAPH = _graph()


def _parts(name: str) -> list[str]:
    return name.split(".")[1:]  # without "transcriptformer"


def _where(name: str, line: int) -> str:
    path = MODULES[name][0].relative_to(ROOT.parent) if name in MODULES else name
    return f"{path}:{line}"


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(t == v for t, _ in graph.get(v, [])):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer_violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for source, edges in graph.items():
        if source == PACKAGE:  # the root namespace names everything (lazily)
            continue
        src = _parts(source)
        for target, line in edges:
            if target == PACKAGE:
                bad.append(f"{_where(source, line)}: {source} imports the top-level package {PACKAGE}")
                continue
            tgt = _parts(target)
            if tgt[0] not in RANKS:
                bad.append(f"{_where(source, line)}: {source} -> {target}: {tgt[0]!r} is in no layer")
                continue
            if src[0] not in RANKS:
                bad.append(f"{_where(source, line)}: {source} is in no layer")
                continue
            if tgt[0] in FACES and tgt[0] != src[0] and not (src[0] == "__main__" and tgt[0] == "cli"):
                bad.append(f"{_where(source, line)}: {source} -> {target} (a face is imported by another module)")
            elif RANKS[tgt[0]] > RANKS[src[0]]:
                bad.append(f"{_where(source, line)}: {source} (layer {src[0]}) -> {target} (higher layer {tgt[0]})")
    return bad


def _face_violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for source, edges in graph.items():
        src = _parts(source)
        if src[:1] != ["scanpy"] or len(src) < 2 or src[1] not in FACE_PARTS:
            continue
        for target, line in edges:
            tgt = _parts(target)
            if tgt[:1] != ["scanpy"] or len(tgt) < 2 or tgt[1] == "_utils" or tgt[1] == src[1]:
                continue
            if tgt[1] not in FACE_PARTS[src[1]]:
                bad.append(f"{_where(source, line)}: {source} -> {target}")
    return bad


def _show(lines: list[str]) -> str:
    return "\n  " + "\n  ".join(lines)


def test_every_module_is_found_and_in_a_layer():
    assert len(MODULES) > 40 and "transcriptformer.weights.checkpoint" in MODULES
    assert all(n == PACKAGE or _parts(n)[0] in RANKS for n in MODULES), [
        n for n in MODULES if n != PACKAGE and _parts(n)[0] not in RANKS
    ]
    # imports inside functions count: the command line imports the library only when a command runs
    assert "transcriptformer.training.fit" in {t for t, _ in GRAPH["transcriptformer.cli.training"]}
    # relative imports resolve to modules: `from .. import _files` is an edge to transcriptformer._files
    assert "transcriptformer._files" in {t for t, _ in GRAPH["transcriptformer.weights.checkpoint"]}


def test_no_import_circle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles among the package's modules:" + _show([" <-> ".join(c) for c in cycles])


def test_each_layer_imports_only_from_below():
    bad = _layer_violations(GRAPH)
    assert not bad, "imports from a layer above (or of a face, or of the top-level package):" + _show(bad)


def test_parts_of_the_scanpy_face_import_only_what_is_declared():
    bad = _face_violations(GRAPH)
    assert not bad, "imports between parts of the scanpy face other than those declared in FACE_PARTS:" + _show(bad)


# -- the checks themselves can fail: each catches what it is for, on a made-up graph ---------------------------


def test_the_checks_catch_circles_and_upward_imports():
    t = PACKAGE
    fake = {
        f"{t}.model.network": [(f"{t}.config", 1)],
        f"{t}.config": [(f"{t}.model.network", 2)],  # ground -> model: upward, and a circle
        f"{t}.weights.loaded": [(f"{t}.scanpy.tl", 3), (t, 4)],  # a face, and the top-level package
        f"{t}.scanpy.pp": [(f"{t}.scanpy.pl", 5), (f"{t}.scanpy._utils", 6)],
    }
    assert _cycles(fake) == [[f"{t}.config", f"{t}.model.network"]]
    bad = "\n".join(_layer_violations(fake))
    assert "config (layer config) -> transcriptformer.model.network (higher layer model)" in bad
    assert "weights.loaded -> transcriptformer.scanpy.tl (a face is imported" in bad
    assert "imports the top-level package transcriptformer" in bad
    assert len(_layer_violations(fake)) == 3  # the network -> config edge is downward: fine
    face = _face_violations(fake)
    assert len(face) == 1 and face[0].endswith(f":5: {t}.scanpy.pp -> {t}.scanpy.pl")
