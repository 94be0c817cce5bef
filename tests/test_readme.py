"""The README's quickstart really runs, and .ci/run runs the README's install and test commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow  # 25 s (scanpy's UMAP compiles with numba, the demo model generates cells): run in CI's slow pass
def test_quickstart_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", _section("Quickstart"), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README-quickstart", "exec"), namespace)
    adata = namespace["adata"]
    assert adata.obsm["X_transcriptformer"].shape == (700, 64)  # the demo model's width
    assert "X_umap" in adata.obsm
    # per-gene layers: entries only at the genes the model read, and their row mean is the cell's llh
    layer = adata.layers["transcriptformer_count_nll"]
    assert layer.format == "csr" and layer.nnz == int(adata.obs["transcriptformer_n_genes"].sum())
    np.testing.assert_allclose(
        np.asarray(layer.sum(axis=1)).ravel() / np.diff(layer.indptr), adata.obs["transcriptformer_llh"], rtol=1e-5
    )
    query = namespace["query"]
    accuracy = (query.obs["bulk_labels_transferred"] == query.obs["bulk_labels"]).mean()
    assert accuracy > 0.5  # 0.73 with the demo model; 10 cell types, the largest is 34% of the cells
    fake = namespace["fake"]
    assert fake.n_obs == 4 and (fake.obs["n_genes"] <= 100).all() and fake.X.sum() > 0
    assert "genes in the vocabulary: 698 of 765" in capsys.readouterr().out  # the check_input report, printed


def test_ci_runs_the_readme_commands():
    commands = re.findall(
        r"```bash\n(.*?)```", _section("Development: install and test on a fresh machine"), flags=re.S
    )
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command.strip() in ci, f"{command.strip()!r} is not in .ci/run"
    # and whatever else in the README runs the tests
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    tests = [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert tests and all(line in ci for line in tests), tests


# ------------------------------------------------------------------ every `pip install` of the documentation

#: Other packages the documentation installs besides this one and its dependencies.
_OTHER_PACKAGES = {"torch", "triton-windows"}
#: pip options that take a value (the value is not a target).
_PIP_VALUE_OPTIONS = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint", "-t"}


def _pip_install_commands(text: str) -> list[str]:
    """Every ``pip install ...`` of a markdown text: in fenced code blocks (one per line) and inline code."""
    found = []
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    for line in lines:
        for part in re.split(r"&&|;", line.split(" #", 1)[0]):
            if "pip install" in part:
                found.append("pip install" + part.split("pip install", 1)[1])
    return found


def _targets(command: str) -> list[str]:
    words = shlex.split(command)[2:]
    targets, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _PIP_VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):  # options (-e, -q, --force-reinstall, ...) are not targets
            targets.append(word)
    return targets


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _check_target(target: str, project: dict) -> str | None:
    """Why ``target`` does not install what it means to (None: it does)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    from transcriptformer._meta import REPOSITORY

    extras_known = set(project["optional-dependencies"])
    ours = canonicalize_name(project["name"])
    if target.startswith(("./", ".[", "/")) or target == ".":  # a local folder: the repository root (a clone)
        path, _, extras = target.partition("[")
        wanted = set(extras.rstrip("]").split(",")) - {""}
        if Path(path).name or (ROOT / path / "pyproject.toml").resolve() != (ROOT / "pyproject.toml").resolve():
            return f"{target!r} is not the repository root"
        return f"{target!r}: unknown extras {wanted - extras_known}" if wanted - extras_known else None
    try:
        req = Requirement(target)
    except InvalidRequirement as e:
        return f"{target!r} is not a requirement ({e})"
    name = canonicalize_name(req.name)
    extra_dependencies = [d for v in project["optional-dependencies"].values() for d in v]
    dependencies = {canonicalize_name(Requirement(d).name) for d in [*project["dependencies"], *extra_dependencies]}
    if name == ours:
        if req.extras - extras_known:
            return f"{target!r}: unknown extras {req.extras - extras_known}"
        if req.url is not None and req.url.rstrip("/") not in (f"git+{REPOSITORY}", f"git+{REPOSITORY}.git"):
            return f"{target!r}: {req.url} is not the repository ({REPOSITORY})"
        return None
    if name == "transcriptformer":
        return f"{target!r} installs the published tool, not this package ({project['name']})"
    if req.url is not None:
        return f"{target!r}: installs {req.name} from an address"
    if name not in dependencies | _OTHER_PACKAGES:
        return f"{target!r} is neither this package nor one it uses"
    return None


def test_every_pip_install_installs_the_right_package():
    """README.md and docs/: this package by its distribution name (or a clone, or its repository), known extras."""
    from transcriptformer._meta import DIST_NAME, REPOSITORY

    project = _project()
    assert project["name"] == DIST_NAME and project["urls"]["Source"] == REPOSITORY  # what the code looks up
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    commands = {doc.relative_to(ROOT): _pip_install_commands(doc.read_text()) for doc in documents}
    readme = commands[Path("README.md")]
    assert any(_installs_this_package(c) for c in readme), readme  # the README installs this package
    problems = [
        f"{doc}: {command}: {why}"
        for doc, found in commands.items()
        for command in found
        for target in _targets(command)  # none: the command named in prose ("`pip install` of ...")
        if (why := _check_target(target, project))
    ]
    assert not problems, "\n".join(problems)
    assert _check_target("transcriptformer", project)  # the published tool is refused
    assert _check_target("transcriptformer-scanpy[nope]", project)


def _installs_this_package(command: str) -> bool:
    return "transcriptformer-scanpy" in command or any(t.startswith(".") for t in _targets(command))


def test_docstring_examples_run():
    import doctest

    import transcriptformer.scanpy.pp
    import transcriptformer.weights.checkpoint
    from transcriptformer.scanpy.tl import _embed, _generate, _likelihood

    for module in (transcriptformer.weights.checkpoint, transcriptformer.scanpy.pp, _embed, _generate, _likelihood):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_show_versions(capsys, monkeypatch):
    import sys

    import transcriptformer

    # session_info looks every top-level name of sys.modules up again and fails (KeyError) on the entry
    # that coverage registers under a non-module name ("$coverage.debug..."): hide it while this runs
    for name in [m for m in sys.modules if m.startswith("$coverage")]:
        monkeypatch.delitem(sys.modules, name)
    info = transcriptformer.versions()
    assert info["transcriptformer"] == transcriptformer.__version__
    assert info["torch"].startswith("2.")
    transcriptformer.show_versions()
    out = capsys.readouterr().out
    assert "anndata" in out and "cuda" in out


def test_every_public_name_has_an_api_entry():
    """Each name a public module exports has an autosummary entry in docs/api.md (an alias or a deprecated name
    is named in the page's prose or in the CHANGELOG's "Deprecated" section instead)."""
    import transcriptformer
    import transcriptformer.scanpy as tfs

    api = (ROOT / "docs" / "api.md").read_text()
    entries = set(re.findall(r"^ {3}([\w.]+)\s*$", api, re.M))
    leaves = {e.rsplit(".", 1)[-1] for e in entries}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    deprecated = changelog[changelog.index("### Deprecated") :].split("\n### ", 1)[0]
    missing = []
    for face in ("pp", "tl", "pl", "datasets", "models"):
        for name in getattr(tfs, face).__all__:
            named = f"{face}.{name}" in entries or f"tfs.{face}.{name}" in api
            if not named and f"{face}.{name}" not in deprecated:
                missing.append(f"tfs.{face}.{name}")
    for name in transcriptformer.__all__:
        if name not in leaves and name != "__version__":
            missing.append(f"transcriptformer.{name}")
    assert not missing, f"no entry in docs/api.md: {missing}"
