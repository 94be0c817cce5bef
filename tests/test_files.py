"""Files the package writes (_files.py): the permissions of what is written through a temporary file."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from transcriptformer import _files

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=["umask-022", "umask-027", "umask-002"])
def umask(request):
    """Run the test under this umask (restored afterwards)."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_json_written_atomically_gets_the_mode_of_a_plain_open(tmp_path, umask):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    _files.write_json_atomic(tmp_path / "record.json", {"a": 1})
    assert _mode(tmp_path / "record.json") == _mode(plain) == 0o666 & ~umask  # not mkstemp's 0600
    _files.write_json_atomic(tmp_path / "record.json", {"a": 2})  # replacing it too
    assert _mode(tmp_path / "record.json") == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from transcriptformer.weights import adapter

    state = {"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}
    folder = adapter.write_adapter(tmp_path / "adapter", {"r": 2}, state, {"base_weights_sha256": "0" * 64})
    modes = {p.name: _mode(p) for p in folder.iterdir()}
    expected = 0o666 & ~umask
    assert modes == dict.fromkeys([adapter.CONFIG_FILE, adapter.WEIGHTS_FILE, adapter.ADAPTER_INFO_FILE], expected)


def test_the_umask_is_found_without_proc(tmp_path, umask, monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(_files, "open", no_proc, raising=False)  # macOS, BSD: no /proc/self/status
    assert _files._umask() == umask
    assert os.umask(umask) == umask  # and it is left as it was


def test_a_copy_of_a_read_only_bundled_folder_gets_the_modes_of_new_folders(tmp_path, umask):
    from transcriptformer.cli.download import _copy_bundled

    source = tmp_path / "installed" / "tf_demo"  # a package installed read-only (system, conda, nix)
    (source / "vocabs").mkdir(parents=True)
    (source / "vocabs" / "table.h5").write_bytes(b"x")
    (source / "config.json").write_text("{}")
    for path in (source / "vocabs" / "table.h5", source / "config.json", source / "vocabs", source):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        copied = _copy_bundled(source, tmp_path / "ckpts", force=False)
        for folder in (copied, copied / "vocabs"):
            assert _mode(folder) == 0o777 & ~umask, folder
        assert _mode(copied / "config.json") == _mode(copied / "vocabs" / "table.h5") == 0o666 & ~umask
        (copied / "config.json").write_text('{"edited": 1}')
        assert _copy_bundled(source, tmp_path / "ckpts", force=True) == copied  # replaceable with --force
        assert (copied / "config.json").read_text() == "{}"
    finally:
        for path in (source, source / "vocabs"):
            path.chmod(0o755)
