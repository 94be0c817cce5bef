"""The README's quickstart really runs, and .ci/run runs the README's install and test commands."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


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
