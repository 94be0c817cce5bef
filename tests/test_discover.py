"""download-data and tabula_sapiens against a local stand-in for CELLxGENE Discover (no internet)."""

from __future__ import annotations

import _thread
import argparse
import hashlib
import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from transcriptformer.data import discover

LIST_PATH = "/curation/v1/datasets"


def _h5ad_bytes(path: Path, n_obs: int, n_vars: int, seed: int, obs: dict | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=rng.poisson(3.0, size=(n_obs, n_vars)).astype(np.float32),
        obs=pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_vars)]),
    )
    adata.write_h5ad(path)
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the internet: the public addresses are replaced by a closed local port."""
    url = _closed_port_url()
    monkeypatch.setenv(discover.API_URL_ENV, url)
    monkeypatch.setattr(discover, "DISCOVER_API_URL", url)
    monkeypatch.setattr(discover, "TABULA_SAPIENS_BASE_URL", url + "/")


@pytest.fixture(scope="module")
def h5ads(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("h5ad")
    files = {f"v-{name}": _h5ad_bytes(d / f"{name}.h5ad", 4 + i, 3 + i, i) for i, name in enumerate("abcdef")}
    donors = ["TSP1", "TSP2", "TSP16", "TSP17", "TSP20", "TSP2"]
    files["ts-heart"] = _h5ad_bytes(d / "ts.h5ad", 6, 5, 42, obs={"donor_id": donors})
    return files


class Server:
    """A threaded HTTP server with the curation API's datasets list and the files its assets point to.

    ``fail[path] = n`` answers HTTP 500 n times (-1: always); ``truncate`` paths send half the body once then
    close; ``delay`` seconds are waited before each file; ``ranges`` records the Range headers received.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {f"/files/{k}.h5ad": v for k, v in files.items()}
        self.records: list[dict] = []
        self.fail: dict[str, int] = {}
        self.truncate: set[str] = set()
        self.delay = 0.0
        self.on_file = None  # called (once) when the first file request arrives
        self.hits: dict[str, int] = {}
        self.ranges: list[str] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def file_url(self, key: str) -> str:
        return f"{self.url}/files/{key}.h5ad"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                with server.lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                if path == LIST_PATH:
                    return self._send(200, json.dumps(server.records).encode(), {"Content-Type": "application/json"})
                if path not in server.files:
                    return self._send(404, b"not found")
                with server.lock:
                    left = server.fail.get(path, 0)
                    if left:
                        server.fail[path] = left - 1 if left > 0 else left
                if left:
                    return self._send(500, b"injected failure")
                body = server.files[path]
                with server.lock:
                    on_file, server.on_file = server.on_file, None
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    if on_file is not None:
                        on_file()
                    time.sleep(server.delay)
                    rng = self.headers.get("Range")
                    if rng:
                        server.ranges.append(rng)
                        start = int(rng.split("=")[1].split("-")[0])
                        part = body[start:]
                        cr = f"bytes {start}-{len(body) - 1}/{len(body)}"
                        return self._send(206, part, {"Content-Range": cr})
                    if path in server.truncate:
                        server.truncate.discard(path)
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._send(200, body)
                finally:
                    with server.lock:
                        server.inflight -= 1

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _record(server: Server, dataset_id: str, key: str, organisms: list[tuple[str, str]], primary=(True,), **asset):
    body = server.files[f"/files/{key}.h5ad"]
    return {
        "dataset_id": dataset_id,
        "dataset_version_id": key,
        "collection_id": f"col-{dataset_id}",
        "collection_name": "A collection",
        "title": f"Dataset {dataset_id}",
        "organism": [{"label": label, "ontology_term_id": term} for label, term in organisms],
        "is_primary_data": list(primary),
        "cell_count": 4,
        "tissue": [{"label": "lung", "ontology_term_id": "UBERON:0002048"}],
        "assets": [{"filetype": "H5AD", "filesize": len(body), "url": server.file_url(key)} | asset],
    }


HUMAN = [("Homo sapiens", "NCBITaxon:9606")]
MOUSE = [("Mus musculus", "NCBITaxon:10090")]


@pytest.fixture
def api(h5ads, monkeypatch):
    server = Server(h5ads)
    server.records = [
        _record(server, "h1", "v-a", HUMAN),
        _record(server, "h2", "v-b", HUMAN, primary=(True, False)),
        _record(server, "m1", "v-c", MOUSE),
        _record(server, "h-secondary", "v-d", HUMAN, primary=(False,)),
        _record(server, "xeno", "v-e", HUMAN + MOUSE),
        {**_record(server, "z-rds", "v-f", [("Danio rerio", "NCBITaxon:7955")]), "assets": [
            {"filetype": "RDS", "filesize": 10, "url": server.url + "/files/nothing.rds"}]},
    ]  # fmt: skip
    monkeypatch.setenv(discover.API_URL_ENV, server.url)
    monkeypatch.setattr(discover, "BACKOFF_SECONDS", 0.01)
    yield server
    server.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="transcriptformer download-data")
    discover.add_arguments(parser)
    ns = parser.parse_args(argv)
    ns.no_progress = True
    return ns


def _ids(datasets) -> set[str]:
    return {d.dataset_id for d in datasets}


# ---------------------------------------------------------------------------------------------------------------
# listing


def test_list_datasets_filters_species(api):
    assert _ids(discover.list_datasets("homo sapiens")) == {"h1", "h2"}  # primary or mixed, one organism
    for spelling in ("Homo_sapiens", "human", "NCBITaxon:9606", ["HOMO SAPIENS"]):
        assert _ids(discover.list_datasets(spelling)) == {"h1", "h2"}
    assert _ids(discover.list_datasets("homo sapiens, mouse")) == {"h1", "h2", "m1"}
    assert _ids(discover.list_datasets(["human"], primary_only=False)) == {"h1", "h2", "h-secondary"}
    assert _ids(discover.list_datasets()) == {"h1", "h2", "m1", "xeno"}  # all species; no H5AD: left out
    (h1,) = [d for d in discover.list_datasets("human") if d.dataset_id == "h1"]
    assert h1.organisms == ("Homo sapiens",) and h1.organism_ontology_term_ids == ("NCBITaxon:9606",)
    assert h1.url == api.file_url("v-a") and h1.filesize == len(api.files["/files/v-a.h5ad"])
    assert h1.dataset_version_id == "v-a" and h1.collection_id == "col-h1" and h1.is_primary_data == (True,)
    assert h1.record["tissue"][0]["label"] == "lung"


def test_api_url_argument_and_env(api, monkeypatch):
    monkeypatch.delenv(discover.API_URL_ENV)
    assert _ids(discover.list_datasets("mouse", api_url=api.url)) == {"m1"}
    assert _ids(discover.list_datasets("mouse", api_url=api.url + LIST_PATH)) == {"m1"}
    monkeypatch.setenv(discover.API_URL_ENV, api.url + LIST_PATH + "/")
    assert _ids(discover.list_datasets("mouse")) == {"m1"}


def test_unknown_species_names_what_the_api_has(api, tmp_path, capsys):
    with pytest.raises(ValueError, match="Unknown species 'homo sapien'") as e:
        discover.list_datasets("homo sapien")
    assert "Homo sapiens (4)" in str(e.value) and "Mus musculus (2)" in str(e.value) and "Danio rerio" in str(e.value)
    assert discover.run(_args("--species", "human,homo sapien", "--output-dir", str(tmp_path / "out"))) == 1
    assert capsys.readouterr().err.startswith("transcriptformer: error: Unknown species 'homo sapien'")
    assert not (tmp_path / "out").exists()


def test_unreachable_api(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(discover, "BACKOFF_SECONDS", 0.01)
    url = _closed_port_url()
    with pytest.raises(discover.DiscoverError, match=r"Could not reach the CELLxGENE Discover API at .*after 3"):
        discover.list_datasets("human", api_url=url)
    monkeypatch.setenv(discover.API_URL_ENV, url)
    assert discover.run(_args("--species", "human", "--output-dir", str(tmp_path / "out"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("transcriptformer: error: Could not reach") and discover.API_URL_ENV in err
    assert "--test-only" in err
    assert not (tmp_path / "out").exists()


def test_api_not_a_list(api, tmp_path):
    api.records = {"detail": "oops"}  # type: ignore[assignment]
    with pytest.raises(discover.DiscoverError, match="not a list of datasets"):
        discover.list_datasets("human")


# ---------------------------------------------------------------------------------------------------------------
# downloading


def test_parallel_download_layout_and_metadata(api, tmp_path):
    api.delay = 0.3
    out = tmp_path / "cellxgene"
    report = discover.download_data("human,mouse", out, processes=3, progress=False)
    assert report.ok and not report.skipped and report.n_listed == 6
    assert sorted(p.parent.name for p in report.downloaded) == ["h1", "h2", "m1"]
    assert api.max_inflight >= 2  # downloads overlapped
    for ds in report.datasets:
        f = out / ds.dataset_id / "full.h5ad"
        body = api.files[f"/files/{ds.dataset_version_id}.h5ad"]
        assert f.read_bytes() == body
        marker = json.loads((out / ds.dataset_id / "__success__").read_text())
        assert marker["dataset_version_id"] == ds.dataset_version_id and marker["size"] == len(body)
        assert marker["sha256"] == hashlib.sha256(body).hexdigest() and marker["url"] == ds.url
        assert ad.read_h5ad(f).n_obs > 0
        assert not list((out / ds.dataset_id).glob("*.part"))
    # dataset_metadata.json: every listed dataset, as the published tool
    assert json.loads((out / "dataset_metadata.json").read_text()) == api.records
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["n_downloaded"] == 3 and summary["n_failed"] == 0 and summary["species"] == ["human", "mouse"]
    assert {d["dataset_id"]: d["status"] for d in summary["datasets"]} == dict.fromkeys(
        ["h1", "h2", "m1"], "downloaded"
    )
    assert (
        report.metadata_path == out / "dataset_metadata.json" and report.summary_path == out / "download_summary.json"
    )


def test_retry_after_server_errors(api, tmp_path):
    api.fail["/files/v-a.h5ad"] = 2
    report = discover.download_data("human", tmp_path, max_retries=3, progress=False)
    assert report.ok and len(report.downloaded) == 2
    assert api.hits["/files/v-a.h5ad"] == 3
    assert (tmp_path / "h1" / "full.h5ad").read_bytes() == api.files["/files/v-a.h5ad"]


def test_truncated_transfer_resumes_with_a_range_request(api, tmp_path, monkeypatch):
    monkeypatch.setattr(discover, "_CHUNK", 1024)  # the bytes before the break reach the .part file
    api.truncate.add("/files/v-a.h5ad")
    report = discover.download_data("human", tmp_path, progress=False)
    assert report.ok
    body = api.files["/files/v-a.h5ad"]
    assert len(api.ranges) == 1 and 0 < int(api.ranges[0][len("bytes=") : -1]) <= len(body) // 2
    assert (tmp_path / "h1" / "full.h5ad").read_bytes() == body


def test_failing_dataset_does_not_stop_the_others(api, tmp_path, capsys):
    api.fail["/files/v-b.h5ad"] = -1  # always HTTP 500
    out = tmp_path / "out"
    code = discover.run(
        _args("--species", "human", "--species", "mouse", "--output-dir", str(out), "--max-retries", "2")
    )
    assert code == 1
    assert api.hits["/files/v-b.h5ad"] == 2
    printed = capsys.readouterr().out
    assert "Downloaded 2 datasets" in printed and "1 failed" in printed
    assert "FAILED (1" in printed and "h2: HTTPError: HTTP 500" in printed and "after 2 attempts" in printed
    assert (out / "h1" / "full.h5ad").exists() and (out / "m1" / "full.h5ad").exists()
    assert not (out / "h2" / "full.h5ad").exists() and not (out / "h2" / "__success__").exists()
    assert not list((out / "h2").glob("*.part"))
    summary = json.loads((out / "download_summary.json").read_text())
    assert list(summary["failed"]) == ["h2"] and summary["n_downloaded"] == 2
    # a second run retries only the failed one
    api.fail.clear()
    report = discover.download_data("human,mouse", out, progress=False)
    assert [p.parent.name for p in report.downloaded] == ["h2"] and len(report.skipped) == 2


def test_not_found_is_not_retried(api, tmp_path):
    api.records[0]["assets"][0]["url"] = api.url + "/files/missing.h5ad"
    report = discover.download_data("human", tmp_path, max_retries=4, progress=False)
    assert "HTTP 404" in report.failed["h1"] and api.hits["/files/missing.h5ad"] == 1


def test_resume_skips_complete_and_distrusts_partial_files(api, tmp_path):
    first = discover.download_data("human", tmp_path, progress=False)
    assert len(first.downloaded) == 2
    hits = dict(api.hits)
    second = discover.download_data("human", tmp_path, progress=False)
    assert not second.downloaded and sorted(p.parent.name for p in second.skipped) == ["h1", "h2"]
    assert api.hits["/files/v-a.h5ad"] == hits["/files/v-a.h5ad"]  # nothing fetched again
    # h1: interrupted earlier run (only a .part of garbage); h2: a full.h5ad without a marker
    for name in ("full.h5ad", "__success__"):
        (tmp_path / "h1" / name).unlink()
    (tmp_path / "h1" / "full.h5ad.part").write_bytes(b"\x89HDF\r\n\x1a\n" + b"junk" * 10)
    (tmp_path / "h2" / "__success__").unlink()
    (tmp_path / "h2" / "full.h5ad").write_bytes(b"truncated")
    third = discover.download_data("human", tmp_path, progress=False)
    assert sorted(p.parent.name for p in third.downloaded) == ["h1", "h2"] and not api.ranges  # no Range: restarted
    assert (tmp_path / "h1" / "full.h5ad").read_bytes() == api.files["/files/v-a.h5ad"]
    assert (tmp_path / "h2" / "full.h5ad").read_bytes() == api.files["/files/v-b.h5ad"]
    assert not (tmp_path / "h1" / "full.h5ad.part").exists()


def test_resume_honours_published_markers_and_new_versions(api, tmp_path):
    discover.download_data("human", tmp_path, progress=False)
    (tmp_path / "h1" / "__success__").write_text("success")  # the published tool's marker: size decides
    marker = json.loads((tmp_path / "h2" / "__success__").read_text())
    marker["dataset_version_id"] = "an-older-version"
    (tmp_path / "h2" / "__success__").write_text(json.dumps(marker))
    report = discover.download_data("human", tmp_path, progress=False)
    assert [p.parent.name for p in report.skipped] == ["h1"] and [p.parent.name for p in report.downloaded] == ["h2"]


@pytest.mark.parametrize(
    ("asset", "message"),
    [({"filesize": 123}, "size mismatch: got"), ({"sha256": "0" * 64}, "sha256 mismatch")],
    ids=["size", "sha256"],
)
def test_mismatching_file_is_refused(api, tmp_path, asset, message):
    api.records[0]["assets"][0].update(asset)
    report = discover.download_data("human", tmp_path, max_retries=2, progress=False)
    assert message in report.failed["h1"] and api.hits["/files/v-a.h5ad"] == 2
    assert not (tmp_path / "h1" / "full.h5ad").exists() and not (tmp_path / "h1" / "__success__").exists()
    assert not (tmp_path / "h1" / "full.h5ad.part").exists()
    assert (tmp_path / "h2" / "full.h5ad").exists()


def test_non_hdf5_answer_is_refused(api, tmp_path):
    api.files["/files/v-a.h5ad"] = b"<html>maintenance</html>"
    api.records[0]["assets"][0]["filesize"] = -1  # size unknown to the API
    report = discover.download_data("human", tmp_path, max_retries=1, progress=False)
    assert "not an HDF5/H5AD file" in report.failed["h1"] and not (tmp_path / "h1" / "full.h5ad").exists()


def test_interrupt_stops_the_downloads_and_leaves_no_partial_files(api, tmp_path, monkeypatch):
    monkeypatch.setattr(discover, "_CHUNK", 1024)
    api.delay = 1.5  # each file's answer starts late
    interrupted = []

    def ctrl_c() -> None:  # Ctrl-C while the first file is being fetched
        interrupted.append(time.monotonic())
        _thread.interrupt_main()

    api.on_file = ctrl_c
    # interrupt_main does nothing unless SIGINT has Python's handler: make sure it has, whatever ran before
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = discover.download_data("human,mouse", tmp_path, progress=False)
    except KeyboardInterrupt:
        ended = time.monotonic()
    else:
        pytest.fail(f"download_data returned without the interrupt (interrupt sent: {bool(interrupted)}): {report}")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ended - interrupted[0] < 1.0  # did not wait for the downloads (1.5 s each; margin for a loaded machine)
    for t in threading.enumerate():
        if t.name.startswith("download-data"):
            t.join(5)
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")
    assert left == ["dataset_metadata.json"]


def test_no_metadata_flag(api, tmp_path, capsys):
    out = tmp_path / "out"
    assert discover.run(_args("--species", "mus musculus", "--output-dir", str(out), "--no-metadata")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["m1"]
    assert sorted(p.name for p in (out / "m1").iterdir() if not p.name.startswith(".")) == ["__success__", "full.h5ad"]
    printed = capsys.readouterr().out
    assert "Downloaded 1 datasets" in printed and str(out) in printed and "dataset_metadata" not in printed


def test_test_only(api, tmp_path, capsys):
    out = tmp_path / "out"
    assert discover.run(_args("--test-only", "--output-dir", str(out))) == 0
    assert f"API reachable at {api.url}{LIST_PATH}: 6 datasets listed" in capsys.readouterr().out
    assert discover.run(_args("--test-only", "--species", "human", "--output-dir", str(out))) == 0
    printed = capsys.readouterr().out
    assert "2 datasets" in printed and "of human would be downloaded" in printed and "nothing was written" in printed
    assert not out.exists() and not any(k.startswith("/files/") for k in api.hits)
    report = discover.download_data("human", out, test_only=True)
    assert report.test_only and _ids(report.datasets) == {"h1", "h2"} and not report.downloaded
    api.close()
    assert discover.run(_args("--test-only", "--output-dir", str(out))) == 1


def test_arguments_and_their_defaults(capsys):
    args = _args()
    assert (args.species, args.output_dir, args.processes, args.max_retries) == (None, "./data/cellxgene", 4, 5)
    assert args.no_metadata is False and args.test_only is False
    with pytest.raises(SystemExit) as e:
        _args("--processes", "0")
    assert e.value.code == 2
    assert discover.run(_args()) == 1  # no --species without --test-only
    assert "--species is required unless --test-only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_retries must be at least 1"):
        discover.download_data("human", ".", max_retries=0)


# ---------------------------------------------------------------------------------------------------------------
# tabula_sapiens


def test_tabula_sapiens_through_pooch(api, tmp_path, monkeypatch):
    monkeypatch.setattr(discover, "TABULA_SAPIENS_BASE_URL", api.url + "/files/")
    monkeypatch.setitem(discover.TABULA_SAPIENS_FILES, "heart", "ts-heart.h5ad")
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ref.h5ad").write_bytes(api.files["/files/ts-heart.h5ad"])
    full = ad.read_h5ad(tmp_path / "ref.h5ad")

    v1 = discover.tabula_sapiens("heart", version="v1", progress=False)
    assert list(v1.obs["donor_id"]) == ["TSP1", "TSP2", "TSP2"]
    cells = full.obs["donor_id"].isin(["TSP1", "TSP2"]).to_numpy()
    keep = np.asarray(full.X[cells].sum(axis=0)).ravel() >= 10
    assert list(v1.var_names) == list(full.var_names[keep]) and 0 < v1.n_vars
    v2 = discover.tabula_sapiens("heart", progress=False)  # default v2; TSP16 in neither, as published
    assert list(v2.obs["donor_id"]) == ["TSP17", "TSP20"]
    backed = discover.tabula_sapiens("heart", progress=False, backed="r")  # the donors' subset comes to memory
    assert list(backed.obs["donor_id"]) == ["TSP17", "TSP20"] and not backed.isbacked
    cached = tmp_path / "cache" / "tabula_sapiens" / "heart.h5ad"
    assert cached.read_bytes() == api.files["/files/ts-heart.h5ad"]
    assert api.hits["/files/ts-heart.h5ad"] == 1  # both versions share one download

    discover.tabula_sapiens("heart", force_download=True, progress=False, min_gene_counts=0)
    assert api.hits["/files/ts-heart.h5ad"] == 2
    other = discover.tabula_sapiens("heart", tmp_path / "mine", version="v1", progress=False, cache_dir=tmp_path / "x")
    assert (tmp_path / "mine.h5ad").exists() and other.n_obs == 3 and not (tmp_path / "x").exists()

    with pytest.raises(ValueError, match=r"Unknown Tabula Sapiens tissue 'lymphnode'.*lymph_node"):
        discover.tabula_sapiens("lymphnode")
    with pytest.raises(ValueError, match="version must be 'v1' or 'v2'"):
        discover.tabula_sapiens("heart", version="v3")
