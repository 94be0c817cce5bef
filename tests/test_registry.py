"""The weights registry (weights/registry.py) against a real local HTTP server (no internet, no user cache).

A :class:`helpers.RegistryServer` on 127.0.0.1 serves tarballs built from the bundled tiny checkpoint under the
published file names; ``TRANSCRIPTFORMER_BASE_URL`` points the registry at it and every test uses its own cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import requests

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import (
    TINY,
    RegistryServer,
    checkpoint_entries,
    copy_tiny,
    spy_on,
    tar_bytes,
    tar_dir,
    tar_file,
    tar_symlink,
)
from transcriptformer import _files
from transcriptformer.weights import registry
from transcriptformer.weights.registry import species_tables as resolve_species_tables

pytestmark = pytest.mark.usefixtures("registry_offline")


PREFIX = "/weights/"


@pytest.fixture
def cache(tmp_path) -> Path:
    """A cache folder that is the only thing inside ``tmp_path`` (so stray writes show)."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nothing_cached(cache: Path, folder: str = "tf_sapiens") -> None:
    """No folder, no manifest, no recorded hash, no tarball left for pooch to reuse."""
    assert not (cache / folder).exists()
    assert not (cache / f"{folder}.sha256.json").exists()
    known = cache / "known_hashes.json"
    assert not known.exists() or f"{folder}.tar.gz" not in json.loads(known.read_text())
    downloads = cache / ".downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    assert [p.name for p in cache.iterdir() if p.name.startswith(f".{folder}-")] == []  # extraction temp folders


# --- first download -------------------------------------------------------------------------------------------------


def test_first_download_unpacks_records_hashes_and_loads(registry_server, registry_tarballs, cache, capfd):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=True)

    assert folder == cache / "tf_sapiens"
    for rel in ("config.json", "model_weights.pt", "vocabs/assay_vocab.json", "vocabs/homo_sapiens_gene.h5"):
        assert (folder / rel).read_bytes() == (TINY / rel).read_bytes()
    assert registry_server.requests == [PREFIX + "tf_sapiens.tar.gz"]

    known = json.loads((cache / "known_hashes.json").read_text())
    assert known == {"tf_sapiens.tar.gz": hashlib.sha256(registry_tarballs["tf_sapiens.tar.gz"]).hexdigest()}

    manifest = json.loads((cache / "tf_sapiens.sha256.json").read_text())
    assert manifest["tarball_sha256"] == known["tf_sapiens.tar.gz"]
    assert manifest["source"] == registry_server.url + "tf_sapiens.tar.gz"
    on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == set(on_disk)
    assert len(on_disk) == 5
    for rel, path in on_disk.items():
        assert manifest["files"][rel] == _sha(path)

    # no tarball or temporary folder left behind (the inter-process lock file stays, empty)
    assert not (cache / ".downloads" / "tf_sapiens.tar.gz").exists()
    assert sorted(p.name for p in cache.iterdir() if p.name not in (".downloads", ".locks")) == [
        "known_hashes.json",
        "tf_sapiens",
        "tf_sapiens.sha256.json",
    ]

    err = capfd.readouterr().err
    assert "extracting tf_sapiens.tar.gz" in err  # tqdm bar of the extraction
    assert "100%" in err

    model = transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    assert model.name == "tf-sapiens"
    assert model.path == folder.resolve()
    assert registry_server.requests == [PREFIX + "tf_sapiens.tar.gz"]  # the load used the cache


def test_no_progress_bar_when_disabled(registry_server, cache, capfd):
    registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    err = capfd.readouterr().err
    assert "extracting" not in err
    assert "100%" not in err


def test_cached_load_works_without_network(registry_server, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    registry_server.close()
    transcriptformer.clear_cache()

    assert registry.fetch("tf-sapiens", cache_dir=cache) == folder
    model = transcriptformer.load_model("TF_Sapiens", cache_dir=cache)
    assert model.name == "tf-sapiens"
    assert model.path == folder.resolve()
    assert registry_server.requests == [PREFIX + "tf_sapiens.tar.gz"]

    # the server really is gone: anything not cached now fails to download
    with pytest.raises(registry.DownloadError, match=r"could not download .*all_embeddings.tar.gz.*refused"):
        registry.fetch("all-embeddings", cache_dir=cache, progress=False)
    _nothing_cached(cache, "all_embeddings")


def test_concurrent_fetches_download_once(registry_server, cache):
    """Several processes (e.g. torchrun ranks) asking for the same model: one download, all get the folder."""

    results, errors = [], []

    def worker():
        try:
            results.append(registry.fetch("tf-sapiens", cache_dir=cache, progress=False))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0] == cache / "tf_sapiens"
    assert registry_server.requests == [PREFIX + "tf_sapiens.tar.gz"]


def test_unknown_name_does_not_touch_network_or_cache(registry_server, cache):
    with pytest.raises(KeyError, match="tf-foo"):
        registry.fetch("tf-foo", cache_dir=cache)
    assert registry_server.requests == []
    assert list(cache.iterdir()) == []


# --- what is cached is checked --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["model_weights.pt", "config.json"])
def test_corrupted_cached_file_is_detected(registry_server, cache, rel):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    transcriptformer.load_model("tf-sapiens", cache_dir=cache)  # fine before the damage
    path = folder / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    transcriptformer.clear_cache()

    with pytest.raises(ValueError, match="corrupted") as info:
        transcriptformer.load_model("tf-sapiens", cache_dir=cache)
    msg = str(info.value)
    assert rel in msg
    assert str(folder.resolve() / rel) in msg
    assert "--force" in msg
    assert "Delete" in msg
    with pytest.raises(ValueError, match="corrupted"):
        registry.verify_checkpoint(folder)

    # the recovery the message gives works
    registry.fetch("tf-sapiens", cache_dir=cache, progress=False, force=True)
    registry.verify_checkpoint(folder)
    assert transcriptformer.load_model("tf-sapiens", cache_dir=cache).name == "tf-sapiens"


def test_missing_cached_file_is_detected(registry_server, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    (folder / "vocabs" / "assay_vocab.json").unlink()
    with pytest.raises(ValueError, match="missing") as info:
        registry.verify_checkpoint(folder)
    assert "assay_vocab.json" in str(info.value)
    (folder / "added.txt").write_text("not from the download")
    with pytest.raises(ValueError, match="not among the files recorded"):
        registry.verify_checkpoint(folder, ["added.txt"])


def test_an_incomplete_cached_folder_is_downloaded_again(registry_server, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    (folder / "vocabs" / "assay_vocab.json").unlink()
    assert registry.fetch("tf-sapiens", cache_dir=cache, progress=False) == folder
    assert len(registry_server.requests) == 2
    assert (folder / "vocabs" / "assay_vocab.json").is_file()


def test_a_download_is_hashed_once_then_only_when_a_file_changes(registry_server, cache, monkeypatch):
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


def test_a_damaged_manifest_or_hash_record_is_named(registry_server, cache):
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


def test_the_in_memory_cache_rechecks_every_file(registry_server, cache, tmp_path):
    ckpt = copy_tiny(tmp_path)
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


# --- interrupted, damaged or hostile downloads ----------------------------------------------------------------------


def test_interrupted_download_is_not_cached(registry_server, cache):
    registry_server.mode = "short"  # Content-Length larger than what is sent, then the connection closes
    with pytest.raises(requests.exceptions.RequestException, match=r"Connection broken|IncompleteRead"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)
    assert not registry.available(cache).loc["tf-sapiens", "cached"]

    registry_server.mode = "ok"
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    registry.verify_checkpoint(folder)
    assert len(registry_server.requests) == 2  # nothing half-downloaded was reused


def test_truncated_download_without_length_is_not_cached(registry_server, cache):
    # No Content-Length: the HTTP layer cannot tell the body is short, the tarball check must.
    registry_server.mode = "short-unsized"
    with pytest.raises(ValueError, match=r"tf_sapiens\.tar\.gz is not a complete"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)

    registry_server.mode = "ok"
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    registry.verify_checkpoint(folder)
    assert (folder / "model_weights.pt").read_bytes() == (TINY / "model_weights.pt").read_bytes()
    assert len(registry_server.requests) == 2


def _malicious(kind: str, outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    good = checkpoint_entries()
    if kind == "dotdot":
        return [*good, tar_file("../evil", b"x")]
    if kind == "dotdot-deep":  # from <cache>/.tf_sapiens-xxx/ this lands in the cache's parent
        return [*good, tar_file("tf_sapiens/../../../evil", b"x")]
    if kind == "absolute":
        return [*good, tar_file(str(outside / "evil_abs"), b"x")]
    if kind == "symlink":  # then write through it
        return [*good, tar_symlink("tf_sapiens/link", "../../etc"), tar_file("tf_sapiens/link/evil", b"x")]
    if kind == "symlink-up":  # a link to the extraction folder's root (leaves tf_sapiens/ once moved)
        return [*good, tar_symlink("tf_sapiens/link", ".."), tar_file("tf_sapiens/link/evil", b"x")]
    if kind == "symlink-absolute":
        return [*good, tar_symlink("tf_sapiens/link", str(outside))]
    if kind == "other-top":
        return [*good, tar_dir("other_folder"), tar_file("other_folder/evil", b"x")]
    if kind == "top-level-file":
        return [*good, tar_file("evil", b"x")]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["dotdot", "dotdot-deep", "absolute", "symlink", "symlink-up", "symlink-absolute", "other-top", "top-level-file"],
)
def test_malicious_tarball_is_refused(registry_server, registry_tarballs, cache, tmp_path, kind):
    entries = _malicious(kind, tmp_path)
    if kind == "absolute":
        assert entries[-1][0].name.startswith("/")
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(entries)

    with pytest.raises(ValueError, match="refusing"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)

    assert sorted(os.listdir(tmp_path)) == ["cache"]  # nothing written beside the cache
    assert not (cache / "evil").exists()
    _nothing_cached(cache)  # and nothing that poisons the next download

    registry_server.files["tf_sapiens.tar.gz"] = registry_tarballs["tf_sapiens.tar.gz"]
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert not (folder / "link").exists()
    registry.verify_checkpoint(folder)


def test_tarball_without_expected_folder_is_refused(registry_server, cache):
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(checkpoint_entries(top="tf_exemplar"))
    with pytest.raises(ValueError, match="refusing"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (("model_weights.pt",), None, "missing model_weights.pt"),
        (("vocabs/homo_sapiens_gene.h5",), None, "missing vocabs/homo_sapiens_gene.h5"),
        (("config.json",), None, "missing config.json"),
        ((), {"tf_sapiens/config.json": b"\x89PNG\x00\xff"}, "config.json"),
    ],
)
def test_a_tarball_without_a_usable_checkpoint_is_neither_cached_nor_recorded(
    registry_server, cache, drop, extra, message
):
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(checkpoint_entries(drop=drop, extra=extra))
    with pytest.raises(ValueError, match="not to a usable checkpoint") as info:
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert message in str(info.value) and "Nothing was cached or recorded" in str(info.value)
    _nothing_cached(cache)
    # the right file, served later, is accepted (no hash was pinned to the bad one)
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(checkpoint_entries())
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert transcriptformer.load_model("tf-sapiens", cache_dir=cache).path == folder.resolve()


def test_extraction_is_bounded_and_sparse_members_are_refused(registry_server, cache):
    tiny = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    small = dataclasses.replace(registry.REGISTRY["tf-sapiens"], max_unpacked=tiny + 100_000)
    plain = tar_bytes(checkpoint_entries())
    bomb = tar_bytes(checkpoint_entries(extra={"tf_sapiens/zeros.bin": bytes(20_000_000)}))  # 20 MB of zeros
    assert len(bomb) < len(plain) + 50_000  # a small archive that unpacks to far more than the model needs
    registry_server.files["tf_sapiens.tar.gz"] = bomb
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.REGISTRY, "tf-sapiens", small)
        with pytest.raises(ValueError, match=r"refusing to extract.*its members unpack to more than"):
            registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)
    sparse = [*checkpoint_entries(), tar_file("tf_sapiens/holes.bin", b"", sparse=True)]
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(sparse, fmt=tarfile.GNU_FORMAT)
    with pytest.raises(ValueError, match="is a sparse file"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)
    assert all(r.startswith("/weights/") for r in registry_server.requests)


# --- recorded hashes ------------------------------------------------------------------------------------------------


def test_recorded_tarball_hash_is_enforced(registry_server, registry_tarballs, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    recorded = json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"]
    shutil.rmtree(folder)

    entries = checkpoint_entries()
    entries.append(tar_file("tf_sapiens/extra.txt", b"the publisher changed something"))
    registry_server.files["tf_sapiens.tar.gz"] = tar_bytes(entries)
    with pytest.raises(ValueError, match="sha256") as info:
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    msg = str(info.value)
    assert recorded in msg
    assert "known_hashes.json" in msg
    assert not folder.exists()
    assert json.loads((cache / "known_hashes.json").read_text()) == {"tf_sapiens.tar.gz": recorded}
    assert list((cache / ".downloads").iterdir()) == []

    # the original tarball is accepted again
    registry_server.files["tf_sapiens.tar.gz"] = registry_tarballs["tf_sapiens.tar.gz"]
    assert registry.fetch("tf-sapiens", cache_dir=cache, progress=False) == folder
    assert not (folder / "extra.txt").exists()


def test_force_replaces_a_hash_recorded_on_first_use_after_saying_so(registry_server, cache, caplog):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    pinned = json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"]
    new = tar_bytes(checkpoint_entries(extra={"tf_sapiens/README": b"republished"}))
    registry_server.files["tf_sapiens.tar.gz"] = new
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


# --- environment, names, species tables, datasets -------------------------------------------------------------------


def test_environment_variables_are_honoured(registry_tarballs, monkeypatch, tmp_path):
    server = RegistryServer(registry_tarballs, prefix="/mirror/sub/")
    try:
        monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", server.url.rstrip("/"))  # no trailing slash
        env_cache = tmp_path / "env"
        monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(env_cache))
        assert registry.cache_path() == env_cache
        assert registry.cache_path(tmp_path / "arg") == tmp_path / "arg"

        listing = registry.available()
        assert list(listing.index[:4]) == ["tf-sapiens", "tf-exemplar", "tf-metazoa", "all-embeddings"]
        shipped = {"tf-demo", "tf-tiny", "mouse-val"}
        assert set(listing.index[listing["cached"]]) == shipped  # they ship with the package
        before = listing.iloc[:4]
        assert not before["cached"].any()
        assert before["path"].isna().all()
        assert before.loc["tf-sapiens", "url"] == server.url + "tf_sapiens.tar.gz"

        folder = registry.fetch("tf-sapiens", progress=False)
        assert server.requests == ["/mirror/sub/tf_sapiens.tar.gz"]
        assert folder == env_cache / "tf_sapiens"
        assert (env_cache / "tf_sapiens.sha256.json").is_file()
        assert (env_cache / "known_hashes.json").is_file()
        assert not (tmp_path / "arg").exists()

        after = registry.available().iloc[:4]
        assert after["cached"].to_dict() == {
            "tf-sapiens": True,
            "tf-exemplar": False,
            "tf-metazoa": False,
            "all-embeddings": False,
        }
        assert after.loc["tf-sapiens", "path"] == str(env_cache / "tf_sapiens")
        assert not registry.available(tmp_path / "arg").iloc[:4]["cached"].any()  # cache_dir wins over the variable

        assert transcriptformer.load_model("tf-sapiens").path == folder.resolve()
    finally:
        server.close()


def test_names():
    assert registry.canonical_name("TF_Sapiens") == "tf-sapiens"
    assert registry.canonical_name(" tf_metazoa ") == "tf-metazoa"
    assert registry.canonical_name("all_embeddings") == "all-embeddings"
    with pytest.raises(KeyError, match="tf-foo"):
        registry.canonical_name("tf-foo")
    assert registry.is_registered("tf-exemplar")
    assert not registry.is_registered("tf-foo")
    assert not registry.is_registered("./tf_sapiens/")
    assert set(registry.MODEL_NAMES) < set(registry.REGISTRY)
    downloads = [e for e in registry.ENTRIES if e.kind != "dataset" and e.bundled is None]
    assert all(e.file == f"{e.folder}.tar.gz" for e in downloads)
    assert "tf-demo" in registry.MODEL_NAMES and "human-val" in registry.DATASET_NAMES


def test_bundled_demo_model_by_name():
    m = transcriptformer.load_model("tf-demo")
    assert m.path == registry.bundled_path(registry.REGISTRY["tf-demo"]).resolve()
    assert registry.fetch("tf-demo") == registry.bundled_path(registry.REGISTRY["tf-demo"])


def test_species_table(registry_server, cache):
    path = registry.species_table("mus_musculus", cache_dir=cache, progress=False)
    assert path == cache / "all_embeddings" / "mus_musculus_gene.h5"
    assert path.read_bytes() == (TINY / "vocabs" / "mus_musculus_gene.h5").read_bytes()
    assert registry_server.requests == [PREFIX + "all_embeddings.tar.gz"]
    assert registry.species_table("Mus musculus", cache_dir=cache) == path
    assert resolve_species_tables("mus_musculus", cache_dir=cache) == [path]
    assert len(registry_server.requests) == 1

    with pytest.raises(KeyError, match="danio_rerio") as info:
        registry.species_table("danio_rerio", cache_dir=cache)
    assert "homo_sapiens" in str(info.value)
    assert "mus_musculus" in str(info.value)

    # a species name cannot reach files outside the gene tables
    (cache / "secret_gene.h5").write_bytes(b"x")
    for bad in ("../secret", "../tf_sapiens/vocabs/mus_musculus", "/etc/passwd"):
        with pytest.raises(KeyError, match="available"):
            registry.species_table(bad, cache_dir=cache)


def test_unreachable_gene_tables_advise_passing_a_table_not_a_checkpoint(cache):
    """all_embeddings holds gene tables: offline, the advice is species_embedding=<table>, not model=<folder>."""
    with pytest.raises(registry.DownloadError, match="could not download") as info:
        registry.species_table("mus_musculus", cache_dir=cache, progress=False)
    message = str(info.value)
    assert "species_embedding=<folder>/<species>_gene.h5" in message
    assert "--pretrained-embedding <folder>/<species>_gene.h5" in message
    assert "model=<folder>" not in message and "--checkpoint-path" not in message
    with pytest.raises(registry.DownloadError) as info:  # a checkpoint keeps the checkpoint's advice
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    assert "--checkpoint-path <folder>" in str(info.value) and "species_embedding" not in str(info.value)


def test_datasets_are_pinned_and_recorded(monkeypatch, tmp_path):
    """Published test files: git blob ids checked on download, sha256 recorded at the first one."""
    mouse = registry.fetch_dataset("mouse-val")  # bundled: no download
    assert registry.git_blob_sha1(mouse) == registry.REGISTRY["mouse-val"].git_blob_sha1
    fake = b"not the published human_val.h5ad"
    server = RegistryServer(
        {"human_val.h5ad": fake, "Macaca_mulatta_ERP132582_droplet_based_curated.h5ad": b"cells"}, prefix="/data/"
    )
    try:
        monkeypatch.setenv("TRANSCRIPTFORMER_DATA_URL", server.url)
        with pytest.raises(ValueError, match="git blob id differs"):  # pinned by the published repository
            registry.fetch_dataset("human-val", cache_dir=tmp_path, progress=False)
        assert not (tmp_path / "datasets" / "human_val.h5ad").exists()
        path = registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False)  # no pin: recorded
        assert path.read_bytes() == b"cells"
        mask = os.umask(0)
        os.umask(mask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain open() gives (pooch's file is 0600)
        recorded = json.loads((tmp_path / "known_hashes.json").read_text())[path.name]
        assert recorded == hashlib.sha256(b"cells").hexdigest()
        assert registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False) == path
        assert len(server.requests) == 2  # the second call is served from the cache
        path.write_bytes(b"cellz")
        with pytest.raises(ValueError, match="corrupted"):
            registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False)
        server.files["Macaca_mulatta_ERP132582_droplet_based_curated.h5ad"] = b"other"
        path.unlink()
        with pytest.raises(ValueError, match="does not match the sha256 recorded"):  # the first download's pin
            registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False)
        assert not path.exists()
        # force: the server's new file replaces the recorded pin (as for the weights), with a warning
        assert registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False, force=True) == path
        assert (
            json.loads((tmp_path / "known_hashes.json").read_text())[path.name] == hashlib.sha256(b"other").hexdigest()
        )
    finally:
        server.close()


def test_a_failed_dataset_download_advises_the_data_mirror(cache):
    # registry_offline points TRANSCRIPTFORMER_DATA_URL at a closed port
    with pytest.raises(
        registry.DownloadError, match=r"could not download http://127\.0\.0\.1:9/.*human_val\.h5ad"
    ) as info:
        registry.fetch_dataset("human-val", cache_dir=cache, progress=False)
    message = str(info.value)
    assert "point TRANSCRIPTFORMER_DATA_URL at a mirror serving human_val.h5ad" in message
    assert "TRANSCRIPTFORMER_BASE_URL" not in message  # the weights' mirror is no help for a dataset
    assert not list((cache / "datasets").glob("*.h5ad"))


def test_an_unusable_dataset_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(
        ValueError, match=rf"cannot create the cache folder {blocker}/datasets .*pass a writable cache_dir"
    ):
        registry.fetch_dataset("human-val", cache_dir=blocker, progress=False)
    monkeypatch.setattr(registry.os, "access", lambda *args, **kwargs: False)  # root ignores permission bits
    with pytest.raises(ValueError, match=rf"the cache folder {tmp_path / 'cache'}/datasets is not writable"):
        registry.fetch_dataset("human-val", cache_dir=tmp_path / "cache", progress=False)


def test_registry_names_end_to_end(registry_server, cache, tmp_path, cli, monkeypatch):
    """model="tf-sapiens", species_embedding="mus_musculus" and the CLI's --checkpoint-path tf-sapiens."""
    import anndata as ad
    import numpy as np

    ref = ad.read_h5ad(Path(__file__).parent / "data" / "reference" / "human_cell.h5ad").obsm["embeddings"]
    adata = tfs.datasets.tiny_human()
    tfs.tl.embed(adata, model="tf-sapiens", cache_dir=cache)
    np.testing.assert_allclose(adata.obsm["X_transcriptformer"], ref, atol=1e-5)
    assert adata.uns["transcriptformer"]["params"]["model"] == "tf-sapiens"
    own = tfs.tl.embed(
        adata, model="tf-sapiens", species_embedding=["homo_sapiens", "mus_musculus"], cache_dir=cache, copy=True
    )
    np.testing.assert_allclose(own.obsm["X_transcriptformer"], ref, atol=1e-6)
    data = tmp_path / "cells.h5ad"
    tfs.datasets.tiny_human().write_h5ad(data)
    transcriptformer.clear_cache()  # the command resolves the name itself, as a new process would
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(cache))
    proc = cli(
        "inference",
        "--checkpoint-path",
        "tf-sapiens",
        "--data-file",
        data,
        "--output-path",
        tmp_path / "out",
        "--no-progress",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad").obsm["embeddings"], ref, atol=1e-5)


@pytest.mark.parametrize(
    ("entry", "make"),
    [
        ("tf_sapiens", "file"),
        ("tf_sapiens.sha256.json", "folder"),
        ("known_hashes.json", "folder"),
        (".downloads", "file"),
        (".locks", "file"),
    ],
)
def test_a_cache_entry_of_the_wrong_kind_is_named_before_downloading(registry_server, tmp_path, entry, make):
    path = tmp_path / entry
    path.mkdir() if make == "folder" else path.write_text("x")
    match = rf"{entry} is a {make} where the cache .* keeps a .*: remove it and run again"
    with pytest.raises(ValueError, match=match):
        registry.fetch("tf-sapiens", cache_dir=tmp_path, progress=False)
    assert registry_server.requests == []


def test_a_folder_without_its_record_is_never_used(registry_server, tmp_path, monkeypatch):
    """The record is written before the folder moves into place: an interruption between leaves no usable folder."""
    import transcriptformer.scanpy as tfs

    real = os.replace

    def interrupted(src, dst, *args, **kwargs):
        if Path(dst).name == "tf_sapiens":
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(registry.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            registry.fetch("tf-sapiens", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "tf_sapiens").exists()
    folder = registry.fetch("tf-sapiens", cache_dir=tmp_path, progress=False)  # downloaded again, and recorded
    assert registry.manifest_path(folder).is_file() and tfs.models.path("tf-sapiens", cache_dir=tmp_path) == folder
    registry.manifest_path(folder).unlink()  # a record lost: the folder is not handed out as downloaded
    assert not tfs.models.available(tmp_path).loc["tf-sapiens", "cached"]
    with pytest.raises(FileNotFoundError, match=r"is incomplete .*tfs\.models\.download\('tf-sapiens', force=True\)"):
        tfs.models.path("tf-sapiens", cache_dir=tmp_path)


def test_a_read_only_cache_that_holds_everything_is_used(registry_server, cli, tmp_path, monkeypatch):
    """A shared cache is often read-only: what it holds is read (checked) without writing anything."""
    from transcriptformer.cli import download as cli_download

    root = tmp_path / "shared"
    cli("download", "tf-sapiens", "--checkpoint-dir", root, "--no-progress")  # filled while writable
    cli("download", "tf-tiny", "--checkpoint-dir", root, "--no-progress")
    data = RegistryServer({"Macaca_mulatta_ERP132582_droplet_based_curated.h5ad": b"cells"}, prefix="/data/")
    try:
        monkeypatch.setenv("TRANSCRIPTFORMER_DATA_URL", data.url)
        cached = registry.fetch_dataset("testis-macaque", cache_dir=root, progress=False)
    finally:
        data.close()

    def read_only(*args, **kwargs):
        raise ValueError("read-only")

    monkeypatch.setattr(registry, "_writable", read_only)
    monkeypatch.setattr(cli_download, "_check_checkpoint_dir", read_only)
    n = len(registry_server.requests)
    assert registry.fetch_dataset("testis-macaque", cache_dir=root, progress=False) == cached
    assert registry.fetch("tf-sapiens", cache_dir=root, progress=False) == root / "tf_sapiens"
    for model in ("tf-sapiens", "tf-tiny"):
        assert cli("download", model, "--checkpoint-dir", root, "--no-progress").returncode == 0
    assert len(registry_server.requests) == n  # nothing downloaded again
    for asked in (("tf-exemplar",), ("tf-sapiens", "--force")):  # not there yet, or asked again: the check runs
        proc = cli("download", *asked, "--checkpoint-dir", root, "--no-progress", check=False)
        assert proc.returncode == 1 and "read-only" in proc.stderr


@pytest.mark.parametrize("model", ["tf-sapiens", "tf-tiny"])
@pytest.mark.parametrize("below", [False, True], ids=["a-file", "below-a-file"])
def test_download_to_a_file_names_the_flag_before_downloading(registry_server, cli, tmp_path, model, below):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub" if below else tmp_path / "afile"
    proc = cli("download", model, "--checkpoint-dir", target, "--no-progress", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"transcriptformer: error: --checkpoint-dir {target} "
        + (f"cannot be created: {tmp_path / 'afile'} is a file" if below else "is a file, not a folder")
        + "; pass a folder (new or existing) to receive the <name>/ folders, e.g. --checkpoint-dir ./checkpoints."
    ]
    assert registry_server.requests == []  # checked before anything is downloaded
    assert (tmp_path / "afile").read_text() == "x"
