"""The distribution's name and version, and the warning when the published ``transcriptformer`` is installed too.

Each case runs ``import transcriptformer`` in a new interpreter without site-packages (``python -S``; the import
needs only the standard library) with this source tree and a folder of made-up ``*.dist-info`` folders on
``PYTHONPATH``, so that the installed distributions are exactly the ones a case writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import transcriptformer
from transcriptformer import _meta

SRC = Path(transcriptformer.__file__).resolve().parents[1]

PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import transcriptformer, transcriptformer.scanpy, transcriptformer.cli
    from transcriptformer import _meta
    _meta.check_published_conflict()  # again: still one warning
print(json.dumps({
    "version": transcriptformer.__version__,
    "published": _meta.published_versions(),
    "warnings": [str(w.message) for w in caught],
    "categories": [w.category.__name__ for w in caught],
    "where": [w.filename for w in caught],
    "modules": [m for m in ("torch", "numpy", "pandas") if m in __import__("sys").modules],
}))
"""

OURS = {"Project-URL": "Documentation, https://transcriptformer.readthedocs.io"}
PUBLISHED = {"Project-URL": "Homepage, https://github.com/czi-ai/transcriptformer"}


def _dist_info(root: Path, name: str, version: str, fields: dict[str, str]) -> None:
    folder = root / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    lines = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *(f"{k}: {v}" for k, v in fields.items())]
    (folder / "METADATA").write_text("\n".join(lines) + "\n")


def _import(site: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE],
        env={"PYTHONPATH": os.pathsep.join([str(SRC), str(site)]), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("installed", "version", "published"),
    [
        ([("transcriptformer-scanpy", "1.2.3", OURS)], "1.2.3", []),
        # an install of this package made before the rename: still its version, and no warning
        ([("transcriptformer", "0.1.0.dev0", OURS)], "0.1.0.dev0", []),
        # the published tool beside it
        ([("transcriptformer-scanpy", "1.2.3", OURS), ("transcriptformer", "0.6.1", PUBLISHED)], "1.2.3", ["0.6.1"]),
        ([("transcriptformer", "0.6.1", PUBLISHED)], "0.0.0+unknown", ["0.6.1"]),
        ([], "0.0.0+unknown", []),
    ],
)
def test_version_and_published_conflict(tmp_path, installed, version, published):
    for name, v, fields in installed:
        _dist_info(tmp_path, name, v, fields)
    result = _import(tmp_path)
    assert result["version"] == version
    assert result["published"] == published
    assert not result["modules"]  # the check stays cheap: no torch, numpy or pandas
    if not published:
        assert result["warnings"] == []
        return
    assert len(result["warnings"]) == 1, result["warnings"]  # once, however often the package is imported
    message = result["warnings"][0]
    assert result["categories"] == ["TranscriptFormerWarning"]
    assert result["where"] == ["<string>"]  # attributed to the `import transcriptformer` that raised it
    assert "transcriptformer 0.6.1" in message
    assert f"pip uninstall -y transcriptformer {_meta.DIST_NAME}" in message
    assert f"{_meta.DIST_NAME} @ git+{_meta.REPOSITORY}" in message and "own virtual environment" in message


def test_this_environment_has_no_conflict():
    """The test environment itself: our distribution (under either name), and no published package."""
    assert _meta.our_distribution() is not None
    assert _meta.published_versions() == []
    assert transcriptformer.__version__ == _meta.our_distribution().version


def test_versions_reports_a_published_package(monkeypatch):
    monkeypatch.setattr(_meta, "published_versions", lambda: ["0.6.1"])
    info = _meta.versions()
    assert info["transcriptformer"] == transcriptformer.__version__
    assert info["transcriptformer (published)"] == "0.6.1"
