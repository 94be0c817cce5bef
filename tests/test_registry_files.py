"""Issue 11, registry and files: what a checkpoint folder, a download or a damaged file can do, and SIGTERM.

A small HTTP server on 127.0.0.1 serves tarballs built from the bundled tiny checkpoint;
``TRANSCRIPTFORMER_BASE_URL`` points the registry at it and every test has its own cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import spy_on
from transcriptformer import _files
from transcriptformer.weights import checkpoint, registry

TINY = Path(transcriptformer.__file__).parent / "_data" / "tf_tiny"


# ----------------------------------------------------------------------------- a local server of tarballs


def _tar(members: dict[str, bytes | None], fmt=tarfile.PAX_FORMAT, sparse: str | None = None) -> bytes:
    """A tar.gz of ``{name: bytes, or None for a folder}``; ``sparse`` names a member written as sparse."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                if name == sparse:
                    info.type = tarfile.GNUTYPE_SPARSE
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _checkpoint_members(top: str = "tf_sapiens", drop: tuple[str, ...] = (), extra: dict | None = None) -> dict:
    members: dict[str, bytes | None] = {top: None}
    for path in sorted(TINY.rglob("*")):
        rel = path.relative_to(TINY).as_posix()
        if rel in drop:
            continue
        members[f"{top}/{rel}"] = None if path.is_dir() else path.read_bytes()
    members.update(extra or {})
    return members


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                data = owner.files.get(self.path.rsplit("/", 1)[-1])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = _Server({"tf_sapiens.tar.gz": _tar(_checkpoint_members())})
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", srv.url)
    transcriptformer.clear_cache()
    yield srv
    srv.close()
    transcriptformer.clear_cache()


@pytest.fixture
def cache(tmp_path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


def _nothing_cached(cache: Path) -> None:
    assert not (cache / "tf_sapiens").exists()
    assert not (cache / "tf_sapiens.sha256.json").exists()
    known = cache / "known_hashes.json"
    assert not known.exists() or "tf_sapiens.tar.gz" not in json.loads(known.read_text())
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tf_sapiens-")] == []


# ----------------------------------------------------------------------------- 15. layout before caching, --force


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (("model_weights.pt",), None, "missing model_weights.pt"),
        (("vocabs/homo_sapiens_gene.h5",), None, "missing vocabs/homo_sapiens_gene.h5"),
        (("config.json",), None, "missing config.json"),
        ((), {"tf_sapiens/config.json": b"\x89PNG\x00\xff"}, "config.json"),
    ],
)
def test_a_tarball_without_a_usable_checkpoint_is_neither_cached_nor_recorded(server, cache, drop, extra, message):
    server.files["tf_sapiens.tar.gz"] = _tar(_checkpoint_members(drop=drop, extra=extra))
    with pytest.raises(ValueError, match="not to a usable checkpoint") as info:
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert message in str(info.value) and "Nothing was cached or recorded" in str(info.value)
    _nothing_cached(cache)
    # the right file, served later, is accepted (no hash was pinned to the bad one)
    server.files["tf_sapiens.tar.gz"] = _tar(_checkpoint_members())
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert transcriptformer.load_model("tf-sapiens", cache_dir=cache).path == folder.resolve()


def test_force_replaces_a_hash_recorded_on_first_use_after_saying_so(server, cache, caplog):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    pinned = json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"]
    new = _tar(_checkpoint_members(extra={"tf_sapiens/README": b"republished"}))
    server.files["tf_sapiens.tar.gz"] = new
    shutil.rmtree(folder)
    with pytest.raises(ValueError, match=r"does not match the sha256 recorded.*--force"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"] == pinned
    with caplog.at_level(logging.WARNING, logger="transcriptformer"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False, force=True)
    assert "not the " + pinned in caplog.text and "replaces the recorded hash" in caplog.text
    assert json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"] == hashlib.sha256(new).hexdigest()
    assert (folder / "README").read_bytes() == b"republished"
    registry.verify_checkpoint(folder)
    # a published hash (in the registry table) is never replaced
    entry = dataclasses.replace(registry.REGISTRY["tf-sapiens"], sha256=pinned)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.REGISTRY, "tf-sapiens", entry)
        with pytest.raises(ValueError, match="does not match the sha256"):
            registry.fetch("tf-sapiens", cache_dir=cache, progress=False, force=True)


def test_an_incomplete_cached_folder_is_downloaded_again(server, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    (folder / "vocabs" / "assay_vocab.json").unlink()
    assert registry.fetch("tf-sapiens", cache_dir=cache, progress=False) == folder
    assert len(server.requests) == 2
    assert (folder / "vocabs" / "assay_vocab.json").is_file()


# ----------------------------------------------------------------------------- 16. extraction bounded, hash once


def test_extraction_is_bounded_and_sparse_members_are_refused(server, cache):
    tiny = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    small = dataclasses.replace(registry.REGISTRY["tf-sapiens"], max_unpacked=tiny + 100_000)
    plain = _tar(_checkpoint_members())
    bomb = _tar(_checkpoint_members(extra={"tf_sapiens/zeros.bin": bytes(20_000_000)}))  # 20 MB of zeros
    assert len(bomb) < len(plain) + 50_000  # a small archive that unpacks to far more than the model needs
    server.files["tf_sapiens.tar.gz"] = bomb
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.REGISTRY, "tf-sapiens", small)
        with pytest.raises(ValueError, match=r"refusing to extract.*its members unpack to more than"):
            registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)
    members = _checkpoint_members(extra={"tf_sapiens/holes.bin": b""})
    server.files["tf_sapiens.tar.gz"] = _tar(members, fmt=tarfile.GNU_FORMAT, sparse="tf_sapiens/holes.bin")
    with pytest.raises(ValueError, match="is a sparse file"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)
    assert all(r.startswith("/weights/") for r in server.requests)


def test_a_download_is_hashed_once_then_only_when_a_file_changes(server, cache, monkeypatch):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    hashes = spy_on(monkeypatch, _files, "sha256_file")
    loaded = transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    transcriptformer.clear_cache()  # as a new process
    transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    assert hashes == []  # the stamps recorded at download are enough
    manifest = json.loads((cache / "tf_sapiens.sha256.json").read_text())
    assert manifest["finite"]["model_weights.pt"] == manifest["verified"]["model_weights.pt"]["stamp"]
    assert loaded.weights_sha256 == manifest["files"]["model_weights.pt"]
    # the same bytes written again (new mtime and ctime): hashed once, verified, then known again
    config = folder / "config.json"
    config.write_bytes(config.read_bytes())
    transcriptformer.clear_cache()
    transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    assert [Path(a[0]).name for a in hashes] == ["config.json"]
    transcriptformer.clear_cache()
    transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    assert len(hashes) == 1


def test_a_damaged_manifest_or_hash_record_is_named(server, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    manifest = cache / "tf_sapiens.sha256.json"
    good = manifest.read_bytes()
    for bad in (b"{not json", b"\xff\xfe\x00", b"[]", b'{"files": 5}'):
        manifest.write_bytes(bad)
        transcriptformer.clear_cache()
        with pytest.raises(ValueError, match=r"tf_sapiens\.sha256\.json") as info:
            transcriptformer.load_model("tf-sapiens", cache_dir=cache)
        assert "--force" in str(info.value) and "\n" not in str(info.value)
    manifest.write_bytes(good)
    known = cache / "known_hashes.json"
    for bad in (b"{not json", b'["a"]', b'{"tf_sapiens.tar.gz": 5}'):
        known.write_bytes(bad)
        shutil.rmtree(folder, ignore_errors=True)
        with pytest.raises(ValueError, match=r"known_hashes\.json .*repair it, or delete it"):
            registry.fetch("tf-sapiens", cache_dir=cache, progress=False)


# ----------------------------------------------------------------------------- 17. files confined to the folder


def _copy(tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    return ckpt


def _edit_config(ckpt: Path, section: str, key: str, value) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"][section][key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("esm2_mappings", ["../../outside_gene.h5"], "is not a file name inside vocabs/"),
        ("esm2_mappings", ["/etc/passwd"], "is not a file name inside vocabs/"),
        ("esm2_mappings", ["homo_sapiens_gene.h5", "~/x.h5"], "is not a file name inside vocabs/"),
        ("aux_cols", "../assay", "is not a file name inside vocabs/"),
        ("esm2_mappings", ["link_gene.h5"], "is a link to .* outside the checkpoint folder"),
    ],
)
def test_files_named_by_config_stay_in_the_folder(tmp_path, key, value, message):
    ckpt = _copy(tmp_path)
    shutil.copy(TINY / "vocabs" / "homo_sapiens_gene.h5", tmp_path / "outside_gene.h5")
    (ckpt / "vocabs" / "link_gene.h5").symlink_to(tmp_path / "outside_gene.h5")
    _edit_config(ckpt, "data_config", key, value)
    with pytest.raises(ValueError, match=message):
        transcriptformer.load_model(ckpt)
    # a link inside the folder is fine
    (ckpt / "vocabs" / "link_gene.h5").unlink()
    (ckpt / "vocabs" / "link_gene.h5").symlink_to(ckpt / "vocabs" / "homo_sapiens_gene.h5")
    _edit_config(ckpt, "data_config", "esm2_mappings", ["link_gene.h5", "mus_musculus_gene.h5"])
    _edit_config(ckpt, "data_config", "aux_cols", "assay")
    assert len(transcriptformer.load_model(ckpt).vocab) == len(checkpoint.load_model(TINY).vocab)


# ----------------------------------------------------------------------------- 10. malformed config.json, vocabularies


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "must hold a JSON object"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "is not UTF-8 text"),
        (b"{", "is not valid JSON"),
        ({"model": [1]}, "'model' must be a JSON object"),
        ({"model": {"model_config": "big"}}, "model_config must be a JSON object"),
        ({"model": {"model_config": {"embed_dim": "big"}}}, r"model_config\.embed_dim: expected a number"),
        ({"model": {"model_config": {"embed_dim": True}}}, r"model_config\.embed_dim: expected a number"),
        ({"model": {"model_config": {"num_layers": 2.5}}}, r"model_config\.num_layers: expected an integer"),
        ({"model": {"model_config": {"log_counts_eps": float("nan")}}}, "expected a finite number"),
        ({"model": {"model_config": {"softcap": float("inf")}}}, "expected a finite number"),
        ({"model": {"model_config": {"attn_bias": "maybe"}}}, r"attn_bias: expected a boolean"),
        ({"model": {"model_config": {"mu_link_fn": 5}}}, r"mu_link_fn: expected a string"),
        ({"model": {"data_config": {"esm2_mappings": 5}}}, r"esm2_mappings: expected a list of names"),
        ({"model": {"data_config": {"aux_cols": 5}}}, r"aux_cols must be a comma-separated string"),
        ({"model": {"data_config": {"esm2_mappings": [1, 2]}}}, r"esm2_mappings: expected a list of names"),
        ({"model": {"loss_config": {"softplus_approx": 2}}}, r"softplus_approx: expected a boolean"),
    ],
)
def test_a_malformed_config_is_one_line_naming_the_file_and_key(tmp_path, content, message):
    ckpt = _copy(tmp_path)
    if isinstance(content, dict):
        base = json.loads((TINY / "config.json").read_text())
        for section, values in content["model"].items() if isinstance(content["model"], dict) else []:
            base["model"][section] = values if not isinstance(values, dict) else {**base["model"][section], **values}
        if not isinstance(content["model"], dict):
            base["model"] = content["model"]
        content = json.dumps(base).encode()
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        transcriptformer.load_model(ckpt)
    assert str(ckpt / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_config_json_that_is_a_folder(tmp_path):
    ckpt = _copy(tmp_path)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=r"config\.json.* not a file|is a folder"):
        transcriptformer.load_model(ckpt)


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ({"unknown": 0, "10x": -1}, "must be non-negative integers"),
        ({"unknown": 0, "10x": True}, "must be non-negative integers"),
        ({"unknown": 0, "10x": "1"}, "must be non-negative integers"),
        ({"10x": 1}, "must contain the label 'unknown'"),
        ([0, 1], "must hold a JSON object"),
        (b"\xff\x00", "is not UTF-8 text"),
    ],
)
def test_a_malformed_assay_vocabulary_is_refused_at_load(tmp_path, tiny_adata, vocab, message):
    ckpt = _copy(tmp_path)
    path = ckpt / "vocabs" / "assay_vocab.json"
    path.write_bytes(vocab if isinstance(vocab, bytes) else json.dumps(vocab).encode())
    with pytest.raises(ValueError, match=message) as info:
        tfs.tl.embed(tiny_adata, model=ckpt)
    assert "assay_vocab.json" in str(info.value)
    assert "X_transcriptformer" not in tiny_adata.obsm


def test_a_gene_table_that_is_not_one(tmp_path):
    ckpt = _copy(tmp_path)
    (ckpt / "vocabs" / "homo_sapiens_gene.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"homo_sapiens_gene\.h5 is not a readable HDF5 gene table"):
        transcriptformer.load_model(ckpt)


# ----------------------------------------------------------------------------- 18. the in-memory cache re-checks


def test_the_in_memory_cache_rechecks_every_file(server, cache, tmp_path):
    ckpt = _copy(tmp_path)
    first = transcriptformer.load_model(ckpt)
    assert transcriptformer.load_model(ckpt) is first
    vocab = ckpt / "vocabs" / "assay_vocab.json"
    labels = json.loads(vocab.read_text())
    vocab.write_text(json.dumps({**labels, "new assay": max(labels.values())}))
    second = transcriptformer.load_model(ckpt)  # a vocabulary changed: read again
    assert second is not first and "new assay" in second.aux_vocabs[0].labels
    # a download damaged after it was loaded is noticed by the next load, with no clear_cache()
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    weights = folder / "model_weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = folder / "w.tmp"
    tmp.write_bytes(bytes(data))
    os.replace(tmp, weights)
    with pytest.raises(ValueError, match=r"model_weights\.pt is corrupted"):
        transcriptformer.load_model("tf-sapiens", cache_dir=cache)


# ----------------------------------------------------------------------------- 20. non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, tiny_adata, value):
    ckpt = _copy(tmp_path)
    state = torch.load(ckpt / "model_weights.pt", weights_only=True)
    state["transformer_encoder.encoder_layers.1.linear2.weight"][3, 4] = value
    torch.save(state, ckpt / "model_weights.pt")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(1 tensor\(s\), e\.g\. transformer_encoder"):
        tfs.tl.embed(tiny_adata, model=ckpt)
    assert "X_transcriptformer" not in tiny_adata.obsm


# ----------------------------------------------------------------------------- 19. SIGTERM during --stream-output

SLOW_RUN = """
import sys, time
import transcriptformer.inference.outputs as engine
from transcriptformer.cli import main

original = engine.Accumulator.end_window

def slow(self, *args, **kwargs):
    original(self, *args, **kwargs)
    time.sleep(60)

engine.Accumulator.end_window = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_temporary_output_of_stream_output(tmp_path, tiny_path):
    """SLURM and containers stop jobs with SIGTERM: the streamed output's temporary file must go, as on Ctrl-C."""
    data = tmp_path / "cells.h5ad"
    tfs.datasets.tiny_human().write_h5ad(data)
    out = tmp_path / "out"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(SLOW_RUN))
    args = ["inference", "--checkpoint-path", str(tiny_path), "--data-file", str(data), "--output-path", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(transcriptformer.__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--stream-output", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".*.tmp")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert list(out.glob(".*.tmp")), "no temporary file to clean up"
        time.sleep(0.5)  # into the run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert list(out.iterdir()) == []
