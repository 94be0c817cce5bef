"""Start-up: lazy imports, memory-mapped weights, and hashing once per change of a checkpoint's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import transcriptformer
from helpers import spy_on
from transcriptformer import _files
from transcriptformer.weights import checkpoint

PROBE = """
import json, sys
{code}
print(json.dumps({{m: m in sys.modules for m in ("torch", "scanpy", "anndata", "numpy", "pandas")}}))
"""


def _modules_after(code: str) -> dict[str, bool]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_does_not_import_torch_or_scanpy():
    loaded = _modules_after("import transcriptformer, transcriptformer.scanpy as tfs")
    assert not loaded["torch"] and not loaded["scanpy"] and not loaded["anndata"] and not loaded["pandas"]
    # the tools' modules themselves import neither torch nor scanpy: only running a model or a plot does
    loaded = _modules_after(
        "import transcriptformer, transcriptformer.scanpy as tfs\n"
        "tfs.tl, tfs.pp, tfs.pl, tfs.datasets, transcriptformer.load_model, transcriptformer.TranscriptFormerConfig"
    )
    assert not loaded["torch"] and not loaded["scanpy"]
    assert loaded["anndata"]  # tfs.tl is imported: anndata is part of its signatures


def test_lazy_attributes_are_the_real_objects():
    from transcriptformer.model import TranscriptFormer
    from transcriptformer.weights.checkpoint import load_model
    from transcriptformer.weights.loaded import LoadedModel

    assert transcriptformer.load_model is load_model
    assert transcriptformer.LoadedModel is LoadedModel
    assert transcriptformer.TranscriptFormer is TranscriptFormer
    assert {"load_model", "scanpy", "TranscriptFormer"} <= set(dir(transcriptformer))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = transcriptformer.nope
    import transcriptformer.scanpy as tfs

    with pytest.raises(AttributeError):
        _ = tfs.nope


def test_help_and_version_import_only_the_standard_library():
    code = (
        "from transcriptformer.cli import main\n"
        "for argv in (['--help'], ['--version'], ['inference', '--help'], ['download', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
    )
    loaded = _modules_after(code)
    assert not any(loaded.values()), loaded


def _copy_tiny(tiny_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    return ckpt


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(cache))
    transcriptformer.clear_cache()
    yield cache
    transcriptformer.clear_cache()


def test_second_load_reads_the_hash_record_not_the_weights(tiny_path, tmp_path, user_cache, monkeypatch):
    ckpt = _copy_tiny(tiny_path, tmp_path)
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    first = transcriptformer.load_model(ckpt)
    assert first.mapped  # weights memory-mapped, not copied
    records = list((user_cache / "verified").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["path"] == str(ckpt.resolve())
    assert record["verified"]["model_weights.pt"]["sha256"] == _files.sha256_file(ckpt / "model_weights.pt")
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before  # nothing written into the checkpoint

    # a new process would start from the record: no hash, no finiteness scan
    transcriptformer.clear_cache()
    hashes = spy_on(monkeypatch, _files, "sha256_file")
    scans = spy_on(monkeypatch, checkpoint, "_non_finite")
    second = transcriptformer.load_model(ckpt)
    assert hashes == [] and scans == []
    assert second is not first and second.weights_sha256 == first.weights_sha256

    # any change of the file (here only its modification time) means reading it again
    st = os.stat(ckpt / "model_weights.pt")
    os.utime(ckpt / "model_weights.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    transcriptformer.clear_cache()
    third = transcriptformer.load_model(ckpt)
    assert len(hashes) == 1 and len(scans) == 1
    assert third.weights_sha256 == first.weights_sha256


def test_a_replaced_weights_file_is_hashed_again(tiny_path, tmp_path, user_cache, monkeypatch):
    """Same size and modification time but a new inode (a copy renamed over it): hashed again."""
    ckpt = _copy_tiny(tiny_path, tmp_path)
    first = transcriptformer.load_model(ckpt)
    weights = ckpt / "model_weights.pt"
    st = os.stat(weights)
    shutil.copy2(weights, tmp_path / "new.pt")  # keeps the modification time
    os.replace(tmp_path / "new.pt", weights)
    now = os.stat(weights)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and now.st_ino != st.st_ino
    hashes = spy_on(monkeypatch, _files, "sha256_file")
    second = transcriptformer.load_model(ckpt)  # the in-memory cache notices too
    assert second is not first and len(hashes) == 1
    assert second.weights_sha256 == first.weights_sha256


def test_unwritable_cache_only_means_hashing_again(tiny_path, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(blocker))
    transcriptformer.clear_cache()
    ckpt = _copy_tiny(tiny_path, tmp_path)
    assert transcriptformer.load_model(ckpt).weights_sha256 == _files.sha256_file(ckpt / "model_weights.pt")
    transcriptformer.clear_cache()


def test_weights_rewritten_in_place_are_refused_before_a_run(tiny_path, tmp_path, user_cache, tiny_adata):
    import transcriptformer.scanpy as tfs

    ckpt = _copy_tiny(tiny_path, tmp_path)
    weights = ckpt / "model_weights.pt"
    loaded = transcriptformer.load_model(ckpt)
    # written over in place (same inode): the mapped weights may change under the model
    data = weights.read_bytes()
    time.sleep(0.01)
    with open(weights, "r+b") as f:
        f.write(data)
    with pytest.raises(ValueError, match="written over since"):
        tfs.tl.embed(tiny_adata, model=loaded)
    reloaded = transcriptformer.load_model(ckpt)  # loading again is the fix
    assert reloaded is not loaded
    tfs.tl.embed(tiny_adata, model=reloaded)
    # replaced by a rename (what downloads do): the mapping keeps the old file, nothing to fear
    shutil.copy(weights, tmp_path / "copy.pt")
    os.replace(tmp_path / "copy.pt", weights)
    reloaded.check_weights_unchanged()
    tfs.tl.embed(tiny_adata, model=reloaded)
    weights.unlink()  # deleted: the same
    reloaded.check_weights_unchanged()


def test_on_device_copies_without_touching_the_cpu_model(tiny_model):
    meta = tiny_model.on("meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(p.device.type == "cpu" for p in tiny_model.model.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in tiny_model.model.parameters())
    tiny_model.runtime.pop("model:meta")


@pytest.mark.parametrize("face", ["pp", "tl", "pl", "datasets", "models"])
def test_the_faces_list_only_their_api(face):
    import transcriptformer.scanpy as tfs

    module = getattr(tfs, face)
    names = dir(module)
    assert names == sorted(module.__all__) and names, names
    assert not {"np", "os", "pd", "sp", "ad", "sc", "plt", "logger", "logging", "annotations", "Any"} & set(names)
    for name in names:  # every listed name is there, and is the API (a function, a class or a constant table)
        value = getattr(module, name)
        assert callable(value) or name.isupper(), (face, name)
    assert {"tl": "embed", "pl": "umap", "pp": "check_input", "datasets": "pbmc68k_counts", "models": "path"}[
        face
    ] in names
