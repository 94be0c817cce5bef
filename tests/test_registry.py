"""The weights registry against a real local HTTP server (no internet, no user cache).

A :class:`http.server.ThreadingHTTPServer` on 127.0.0.1 serves tarballs built from the bundled
tiny checkpoint under the published file names; ``TRANSCRIPTFORMER_BASE_URL`` points the registry
at it and every test uses its own cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import requests

import transcriptformer
from helpers import PROXY_VARIABLES, folder_entries
from helpers import RegistryServer as _RegistryServer
from helpers import tar_bytes as _tar_bytes
from helpers import tar_dir as _dir
from helpers import tar_file as _file
from transcriptformer.weights import registry
from transcriptformer.weights.registry import species_tables as resolve_species_tables

TINY = Path(transcriptformer.__file__).parent / "_data" / "tf_tiny"
PREFIX = "/weights/"


# --------------------------------------------------------------------------- tarballs


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _checkpoint_entries(top: str = "tf_sapiens") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The tiny checkpoint as tar entries under ``top/``."""
    return folder_entries(TINY, top)


@pytest.fixture(scope="session")
def registry_tarballs() -> dict[str, bytes]:
    """``<folder>.tar.gz`` -> bytes, for ``tf-sapiens`` and ``all-embeddings``."""
    embeddings = [_dir("all_embeddings")] + [
        _file(f"all_embeddings/{sp}_gene.h5", (TINY / "vocabs" / f"{sp}_gene.h5").read_bytes())
        for sp in ("homo_sapiens", "mus_musculus")
    ]
    return {
        "tf_sapiens.tar.gz": _tar_bytes(_checkpoint_entries()),
        "all_embeddings.tar.gz": _tar_bytes(embeddings),
    }


# --------------------------------------------------------------------------- server


@pytest.fixture(autouse=True)
def _registry_isolation(monkeypatch, tmp_path_factory):
    """Never the user's cache or a proxy; no model kept in memory across tests."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(tmp_path_factory.mktemp("env-cache")))
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")
    transcriptformer.clear_cache()
    yield
    transcriptformer.clear_cache()


@pytest.fixture
def registry_server(registry_tarballs, monkeypatch):
    server = _RegistryServer(registry_tarballs)
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", server.url)
    yield server
    server.close()


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


# --------------------------------------------------------------------------- 1. first download


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


# --------------------------------------------------------------------------- 2. cached, offline


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


# --------------------------------------------------------------------------- 3. corrupted cache


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


# --------------------------------------------------------------------------- 4. interrupted download


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


# --------------------------------------------------------------------------- 5. malicious tarballs


def _malicious(kind: str, outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    good = _checkpoint_entries()
    if kind == "dotdot":
        return [*good, _file("../evil", b"x")]
    if kind == "dotdot-deep":  # from <cache>/.tf_sapiens-xxx/ this lands in the cache's parent
        return [*good, _file("tf_sapiens/../../../evil", b"x")]
    if kind == "absolute":
        return [*good, _file(str(outside / "evil_abs"), b"x")]
    if kind == "symlink":  # then write through it
        return [*good, _symlink("tf_sapiens/link", "../../etc"), _file("tf_sapiens/link/evil", b"x")]
    if kind == "symlink-up":  # a link to the extraction folder's root (leaves tf_sapiens/ once moved)
        return [*good, _symlink("tf_sapiens/link", ".."), _file("tf_sapiens/link/evil", b"x")]
    if kind == "symlink-absolute":
        return [*good, _symlink("tf_sapiens/link", str(outside))]
    if kind == "other-top":
        return [*good, _dir("other_folder"), _file("other_folder/evil", b"x")]
    if kind == "top-level-file":
        return [*good, _file("evil", b"x")]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["dotdot", "dotdot-deep", "absolute", "symlink", "symlink-up", "symlink-absolute", "other-top", "top-level-file"],
)
def test_malicious_tarball_is_refused(registry_server, registry_tarballs, cache, tmp_path, kind):
    entries = _malicious(kind, tmp_path)
    if kind == "absolute":
        assert entries[-1][0].name.startswith("/")
    registry_server.files["tf_sapiens.tar.gz"] = _tar_bytes(entries)

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
    registry_server.files["tf_sapiens.tar.gz"] = _tar_bytes(_checkpoint_entries(top="tf_exemplar"))
    with pytest.raises(ValueError, match="refusing"):
        registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    _nothing_cached(cache)


# --------------------------------------------------------------------------- 6. environment variables, available()


def test_environment_variables_are_honoured(registry_tarballs, monkeypatch, tmp_path):
    server = _RegistryServer(registry_tarballs, prefix="/mirror/sub/")
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


# --------------------------------------------------------------------------- 7. recorded tarball hash enforced


def test_recorded_tarball_hash_is_enforced(registry_server, registry_tarballs, cache):
    folder = registry.fetch("tf-sapiens", cache_dir=cache, progress=False)
    recorded = json.loads((cache / "known_hashes.json").read_text())["tf_sapiens.tar.gz"]
    shutil.rmtree(folder)

    entries = _checkpoint_entries()
    entries.append(_file("tf_sapiens/extra.txt", b"the publisher changed something"))
    registry_server.files["tf_sapiens.tar.gz"] = _tar_bytes(entries)
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


# --------------------------------------------------------------------------- 8. species tables


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


# --------------------------------------------------------------------------- 9. names


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


def test_datasets_are_pinned_and_recorded(monkeypatch, tmp_path):
    """Published test files: git blob ids checked on download, sha256 recorded at the first one."""
    mouse = registry.fetch_dataset("mouse-val")  # bundled: no download
    assert registry.git_blob_sha1(mouse) == registry.REGISTRY["mouse-val"].git_blob_sha1
    fake = b"not the published human_val.h5ad"
    server = _RegistryServer(
        {"human_val.h5ad": fake, "Macaca_mulatta_ERP132582_droplet_based_curated.h5ad": b"cells"}, prefix="/data/"
    )
    try:
        monkeypatch.setenv("TRANSCRIPTFORMER_DATA_URL", server.url)
        with pytest.raises(ValueError, match="git blob id differs"):  # pinned by the published repository
            registry.fetch_dataset("human-val", cache_dir=tmp_path, progress=False)
        assert not (tmp_path / "datasets" / "human_val.h5ad").exists()
        path = registry.fetch_dataset("testis-macaque", cache_dir=tmp_path, progress=False)  # no pin: recorded
        assert path.read_bytes() == b"cells"
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


def test_unknown_name_does_not_touch_network_or_cache(registry_server, cache):
    with pytest.raises(KeyError, match="tf-foo"):
        registry.fetch("tf-foo", cache_dir=cache)
    assert registry_server.requests == []
    assert list(cache.iterdir()) == []


def test_concurrent_fetches_download_once(registry_server, cache):
    """Several processes (e.g. torchrun ranks) asking for the same model: one download, all get the folder."""
    import threading

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


# --------------------------------------------------------------------------- end to end


def test_cli_download_published_layout(registry_server, tmp_path, cli, monkeypatch):
    for top in ("tf_exemplar", "tf_metazoa"):
        registry_server.files[f"{top}.tar.gz"] = _tar_bytes(_checkpoint_entries(top=top))
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", registry_server.url)
    proc = cli("download", "tf-sapiens", "--checkpoint-dir", tmp_path / "ckpts", "--no-progress", check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ckpts" / "tf_sapiens" / "model_weights.pt").read_bytes() == (
        TINY / "model_weights.pt"
    ).read_bytes()
    assert (tmp_path / "ckpts" / "tf_sapiens" / "vocabs" / "assay_vocab.json").is_file()
    proc = cli("download", "all", "--checkpoint-dir", tmp_path / "ckpts", "--no-progress", check=False)
    assert proc.returncode == 0, proc.stderr
    for top in ("tf_sapiens", "tf_exemplar", "tf_metazoa", "all_embeddings"):
        assert (tmp_path / "ckpts" / top).is_dir()
    assert registry_server.requests.count(PREFIX + "tf_sapiens.tar.gz") == 1  # cached the second time
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")
    proc = cli("download", "tf-sapiens", "--checkpoint-dir", tmp_path / "none", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("transcriptformer: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "could not download" in errors[0], proc.stderr


def test_cli_download_of_what_ships_with_the_package(tmp_path, cli):
    """tf-demo and mouse-val are bundled: download copies them into --checkpoint-dir like any artifact."""
    import transcriptformer.scanpy as tfs

    proc = cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", check=False)
    assert proc.returncode == 0, proc.stderr
    copied = tmp_path / "ckpts" / "tf_demo"
    assert proc.stdout.strip().endswith(str(copied))
    assert (copied / "model_weights.pt").read_bytes() == (
        tfs.models.path("tf-demo") / "model_weights.pt"
    ).read_bytes()
    assert transcriptformer.load_model(copied).name == "tf_demo"
    (copied / "config.json").write_text("{}")  # present: kept as it is, unless --force
    assert cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", check=False).returncode == 0
    assert (copied / "config.json").read_text() == "{}"
    assert cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", "--force", check=False).returncode == 0
    assert (copied / "config.json").read_text() != "{}"
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["tf_demo"]  # no staging folder left
    proc = cli("download", "mouse-val", "--checkpoint-dir", tmp_path / "data", check=False)
    assert proc.returncode == 0 and (tmp_path / "data" / "mouse_val.h5ad").stat().st_size > 1e6


def test_registry_names_end_to_end(registry_server, cache, tmp_path, cli, monkeypatch):
    """model="tf-sapiens", species_embedding="mus_musculus" and the CLI's --checkpoint-path tf-sapiens."""
    import anndata as ad
    import numpy as np

    import transcriptformer.scanpy as tfs

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
