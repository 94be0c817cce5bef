"""CELLxGENE Discover data: the ``download-data`` command and the Tabula Sapiens tissues.

:func:`download_data` is the published ``transcriptformer download-data`` command as a function: it lists the
public datasets of the CELLxGENE Discover curation API (``GET /curation/v1/datasets``), keeps the primary-data,
single-organism datasets of the requested species, and downloads their H5AD files in parallel into the published
layout::

    output_dir/
        dataset_metadata.json      every dataset the API listed (not written with metadata=False)
        download_summary.json      what this run downloaded, skipped and failed (not written with metadata=False)
        <dataset_id>/full.h5ad     the dataset
        <dataset_id>/__success__   completion marker (JSON: version, url, size, sha256, time)

Each file is written to ``full.h5ad.part`` and renamed to ``full.h5ad`` only once it has the listed size (and
checksum, should the API ever list one) and the HDF5 signature; the marker follows the rename. A complete dataset
is skipped; a ``.part`` file of an earlier run is deleted, never used; within a run, a transfer cut short resumes
with an HTTP range request.

:func:`tabula_sapiens` loads one Tabula Sapiens tissue, cached through :mod:`pooch`, with the donors of the
published ``"v1"`` (in distribution for TranscriptFormer) or ``"v2"`` set.

Environment variables: ``TRANSCRIPTFORMER_DISCOVER_URL`` (the API: its root or the full datasets-list URL) and
``TRANSCRIPTFORMER_CACHE`` (the cache folder of :func:`tabula_sapiens`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import cache_path, sha256_file, write_json_atomic

if TYPE_CHECKING:  # imported lazily: `import transcriptformer` stays fast
    import anndata

logger = logging.getLogger("transcriptformer")

__all__ = [
    "DATASETS_ENDPOINT",
    "DISCOVER_API_URL",
    "TABULA_SAPIENS_TISSUES",
    "DiscoverDataset",
    "DiscoverError",
    "DownloadReport",
    "add_arguments",
    "download_data",
    "list_datasets",
    "run",
    "tabula_sapiens",
]

#: root of the public CELLxGENE Discover API
DISCOVER_API_URL = "https://api.cellxgene.cziscience.com"
#: the curation API's list of all public datasets, under :data:`DISCOVER_API_URL`
DATASETS_ENDPOINT = "/curation/v1/datasets"
#: environment variable overriding :data:`DISCOVER_API_URL` (the root or the full datasets-list URL)
API_URL_ENV = "TRANSCRIPTFORMER_DISCOVER_URL"

# the published command's defaults and file names
DEFAULT_OUTPUT_DIR = "./data/cellxgene"
DEFAULT_PROCESSES = 4
DEFAULT_MAX_RETRIES = 5
METADATA_FILE = "dataset_metadata.json"
SUMMARY_FILE = "download_summary.json"
DATA_FILE = "full.h5ad"
SUCCESS_FILE = "__success__"
PARTIAL_SUFFIX = ".part"

#: first wait before a retry, in seconds; it doubles with each further retry, up to :data:`MAX_BACKOFF_SECONDS`
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
#: attempts at fetching the dataset list
LIST_ATTEMPTS = 3
#: seconds to connect and between bytes (the published tool waited up to 120 s for a file)
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
LIST_TIMEOUT = 60.0
_CHUNK = 1 << 20
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

#: common names accepted for ``species`` besides the names CELLxGENE lists and NCBITaxon ids
SPECIES_ALIASES: dict[str, str] = {
    "human": "homo sapiens",
    "mouse": "mus musculus",
    "rat": "rattus norvegicus",
    "zebrafish": "danio rerio",
    "fly": "drosophila melanogaster",
    "fruit fly": "drosophila melanogaster",
    "worm": "caenorhabditis elegans",
    "c. elegans": "caenorhabditis elegans",
    "c elegans": "caenorhabditis elegans",
    "macaque": "macaca mulatta",
    "rhesus macaque": "macaca mulatta",
    "marmoset": "callithrix jacchus",
    "chimpanzee": "pan troglodytes",
    "gorilla": "gorilla gorilla",
    "chicken": "gallus gallus",
    "pig": "sus scrofa",
    "rabbit": "oryctolagus cuniculus",
}


class DiscoverError(RuntimeError):
    """The CELLxGENE Discover API could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class DiscoverDataset:
    """One dataset of CELLxGENE Discover and the H5AD file that :func:`download_data` fetches.

    ``dataset_id`` names its folder in the download layout; a revised dataset gets a new ``dataset_version_id``.
    ``organisms`` are labels as CELLxGENE spells them (``"Homo sapiens"``), with their NCBITaxon ids in the same
    order; ``is_primary_data`` is ``(True,)``, ``(False,)`` or ``(True, False)`` (primary, secondary or mixed);
    ``cell_count``, ``filesize`` and ``sha256`` are ``None`` when the API does not list them (it lists no checksum
    at the time of writing); ``record`` is the API's full record.
    """

    dataset_id: str
    dataset_version_id: str | None
    collection_id: str | None
    title: str | None
    organisms: tuple[str, ...]
    organism_ontology_term_ids: tuple[str, ...]
    cell_count: int | None
    is_primary_data: tuple[bool, ...]
    url: str
    filetype: str
    filesize: int | None
    sha256: str | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)


@dataclass
class DownloadReport:
    """What :func:`download_data` did.

    ``n_listed`` datasets (all species) were listed at ``api_url``; ``datasets`` are those selected. ``downloaded``
    and ``skipped`` (already complete) are files under ``output_dir``; ``failed`` maps a dataset id to why it could
    not be downloaded after all attempts. ``metadata_path`` and ``summary_path`` are the JSON files written
    (``None`` with ``metadata=False`` or ``test_only``, where only the API was queried).
    """

    api_url: str
    output_dir: Path
    n_listed: int
    datasets: list[DiscoverDataset]
    downloaded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    metadata_path: Path | None = None
    summary_path: Path | None = None
    test_only: bool = False

    @property
    def ok(self) -> bool:
        """Whether no dataset failed."""
        return not self.failed


# ---------------------------------------------------------------------------------------------------------------
# small self-contained helpers


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data, sort_keys=False, default=str)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _backoff(attempt: int, base: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based)."""
    return min(base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)


def _datasets_url(api_url: str | None) -> str:
    """The datasets-list URL from an argument, ``$TRANSCRIPTFORMER_DISCOVER_URL`` or the public API."""
    url = (api_url or os.environ.get(API_URL_ENV) or DISCOVER_API_URL).strip().rstrip("/")
    return url if url.endswith("/datasets") else url + DATASETS_ENDPOINT


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _species_list(species: str | Sequence[str] | None) -> list[str]:
    """Split comma-separated names (the published ``--species 'homo sapiens,mus musculus'``); drop empties."""
    if species is None:
        return []
    items = [species] if isinstance(species, str) else list(species)
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def _fields(ds: DiscoverDataset, *names: str) -> dict[str, Any]:
    """The named attributes of ``ds``, for a JSON file (in that order)."""
    return {name: getattr(ds, name) for name in names}


# ---------------------------------------------------------------------------------------------------------------
# listing


def _fetch_records(url: str, *, attempts: int = LIST_ATTEMPTS, backoff: float | None = None) -> list[dict[str, Any]]:
    """GET the datasets list, retrying timeouts, dropped connections and server errors."""
    import requests

    backoff = BACKOFF_SECONDS if backoff is None else backoff
    fix = f"check the network (or proxy settings), or point {API_URL_ENV} at a reachable copy of the API"
    wrong_url = f"{API_URL_ENV} should name the API root or its /curation/v1/datasets URL"
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            r = requests.get(url, headers={"Accept": "application/json"}, timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT))
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                try:
                    records = r.json()
                except ValueError:
                    raise DiscoverError(
                        f"CELLxGENE Discover API at {url} did not answer JSON (starts {r.content[:60]!r}); {fix}"
                    ) from None
                if not isinstance(records, list):
                    raise DiscoverError(
                        f"CELLxGENE Discover API at {url} answered a {type(records).__name__}, not a list of "
                        f"datasets; {wrong_url}"
                    )
                logger.info("CELLxGENE Discover lists %d datasets (%s)", len(records), url)
                return [d for d in records if isinstance(d, dict)]
            if r.status_code not in _RETRY_STATUS:
                raise DiscoverError(
                    f"CELLxGENE Discover API at {url} answered HTTP {r.status_code} {r.reason}; {wrong_url}"
                )
            last = f"HTTP {r.status_code} {r.reason}"
        if attempt < attempts:
            pause = _backoff(attempt, backoff)
            logger.warning("Listing datasets at %s failed (%s); retrying in %.1f s", url, last, pause)
            time.sleep(pause)
    raise DiscoverError(
        f"Could not reach the CELLxGENE Discover API at {url} after {attempts} attempts ({last}); {fix}"
    )


def _primary_flags(value: Any) -> tuple[bool, ...]:
    """``is_primary_data`` as booleans: the API's list, or the older PRIMARY/SECONDARY/BOTH."""
    if isinstance(value, str):
        return {"PRIMARY": (True,), "SECONDARY": (False,), "BOTH": (True, False)}.get(value.upper(), ())
    if isinstance(value, list | tuple):
        return tuple(bool(x) for x in value)
    return () if value is None else (bool(value),)


def _organisms(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in record.get("organism") or [] if isinstance(o, dict)]


def _as_dataset(record: dict[str, Any]) -> DiscoverDataset | None:
    """The record as a :class:`DiscoverDataset`, or None when it has no H5AD asset."""
    h5ad = [a for a in record.get("assets") or [] if isinstance(a, dict) and str(a.get("filetype")).upper() == "H5AD"]
    asset = next((a for a in h5ad if a.get("url") or a.get("presigned_url")), None)
    if asset is None or not record.get("dataset_id"):
        return None
    organisms = _organisms(record)
    size = asset.get("filesize")
    cells = record.get("cell_count")
    return DiscoverDataset(
        dataset_id=str(record["dataset_id"]),
        dataset_version_id=record.get("dataset_version_id"),
        collection_id=record.get("collection_id"),
        title=record.get("title"),
        organisms=tuple(str(o.get("label", "")) for o in organisms),
        organism_ontology_term_ids=tuple(str(o.get("ontology_term_id", "")) for o in organisms),
        cell_count=int(cells) if isinstance(cells, int | float) else None,
        is_primary_data=_primary_flags(record.get("is_primary_data")),
        url=str(asset.get("url") or asset.get("presigned_url")),
        filetype="H5AD",
        filesize=int(size) if isinstance(size, int | float) and size >= 0 else None,
        sha256=asset.get("sha256") or None,
        record=record,
    )


def _resolve_species(requested: list[str], records: list[dict[str, Any]], url: str) -> set[str]:
    """The normalised CELLxGENE organism labels for ``requested``; ValueError naming the ones the API lacks."""
    labels: Counter[str] = Counter()
    by_name: dict[str, str] = {}  # normalised label or lower-case NCBITaxon id -> normalised label
    for o in (o for rec in records for o in _organisms(rec) if o.get("label")):
        label = str(o["label"])
        labels[label] += 1
        by_name[_norm(label)] = _norm(label)
        if o.get("ontology_term_id"):
            by_name[str(o["ontology_term_id"]).lower()] = _norm(label)
    wanted, unknown = set(), []
    for name in requested:
        key = SPECIES_ALIASES.get(_norm(name), _norm(name))
        found = next((by_name[k] for k in (key, name.strip().lower()) if k in by_name), None)
        if found is None:
            unknown.append(name)
        else:
            wanted.add(found)
    if unknown:
        listed = ", ".join(f"{label} ({n})" for label, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
        raise ValueError(
            f"Unknown species {', '.join(repr(u) for u in unknown)}: CELLxGENE Discover ({url}) lists datasets "
            f"for {listed or 'no organism'}. Give the names as listed (any case, '_' for spaces), NCBITaxon ids, "
            f"or one of {', '.join(sorted(SPECIES_ALIASES))}."
        )
    return wanted


def _select(
    records: list[dict[str, Any]], species: list[str], url: str, *, primary_only: bool = True
) -> list[DiscoverDataset]:
    """The published filter: primary data, exactly one organism among ``species``, an H5AD file."""
    wanted = _resolve_species(species, records, url) if species else None
    out: list[DiscoverDataset] = []
    no_h5ad = 0
    for rec in records:
        if primary_only and _primary_flags(rec.get("is_primary_data"))[:1] != (True,):
            continue
        organisms = _organisms(rec)
        if wanted is not None and (len(organisms) != 1 or _norm(str(organisms[0].get("label", ""))) not in wanted):
            continue
        ds = _as_dataset(rec)
        if ds is None:
            no_h5ad += 1
        else:
            out.append(ds)
    if no_h5ad:
        logger.warning("%d matching datasets have no H5AD file and are left out", no_h5ad)
    return out


def list_datasets(
    species: str | Sequence[str] | None = None,
    api_url: str | None = None,
    *,
    primary_only: bool = True,
    backoff: float | None = None,
) -> list[DiscoverDataset]:
    """The CELLxGENE Discover datasets that ``download-data`` would download for ``species``.

    Parameters
    ----------
    species
        Organisms, as a list or one comma-separated string: names as CELLxGENE lists them in any case, with ``_`` or
        spaces (``"Mus_musculus"``), NCBITaxon ids (``"NCBITaxon:9606"``) or :data:`SPECIES_ALIASES` (``"human"``).
        ``None``: all organisms, datasets of several organisms included.
    api_url
        The API root or its datasets-list URL (default ``$TRANSCRIPTFORMER_DISCOVER_URL``, else
        :data:`DISCOVER_API_URL`).
    primary_only
        Keep only datasets whose ``is_primary_data`` starts with True (primary or mixed), as the published tool.
    backoff
        First wait between attempts, in seconds (default :data:`BACKOFF_SECONDS`).

    Returns
    -------
    list of DiscoverDataset
        In the API's order (most recent first); with ``species``, only datasets of one organism, as published.

    Raises
    ------
    ValueError
        A species the API has no dataset for (the message lists those it has).
    DiscoverError
        The API could not be reached or did not answer a list of datasets.
    """
    url = _datasets_url(api_url)
    records = _fetch_records(url, backoff=backoff)
    return _select(records, _species_list(species), url, primary_only=primary_only)


# ---------------------------------------------------------------------------------------------------------------
# downloading


class _Mismatch(Exception):
    """The downloaded bytes are not the listed file: start again from nothing."""


class _Fatal(Exception):
    """An answer that another attempt will not change (HTTP 404, ...)."""


class _Cancelled(Exception):
    """The caller was interrupted (Ctrl-C, SIGTERM): stop at the next chunk."""


class _Progress:
    """One byte counter for all threads (a tqdm bar, or nothing)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._lock = threading.Lock()
        self._bar = tqdm(
            total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="download-data", disable=not enabled
        )

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def discard(self, part: Path) -> None:
        """Delete a partial file and take its bytes off the count."""
        if part.exists():
            self.update(-part.stat().st_size)
        part.unlink(missing_ok=True)

    def close(self) -> None:
        self._bar.close()


def _is_complete(ds: DiscoverDataset, final: Path, marker: Path) -> bool:
    """Whether ``final`` is a finished download of the listed version of ``ds``."""
    if not (final.is_file() and marker.is_file()):
        return False
    size = final.stat().st_size
    if ds.filesize is not None and size != ds.filesize:
        logger.info("%s: %s has %d bytes, the API lists %d: downloading again", ds.dataset_id, final, size, ds.filesize)
        return False
    try:  # the published tool's marker is plain text ("success"): the size check above decides
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        info = None
    info = info if isinstance(info, dict) else {}
    version = info.get("dataset_version_id")
    if version and ds.dataset_version_id and version != ds.dataset_version_id:
        logger.info("%s: a new version (%s) is listed: downloading again", ds.dataset_id, ds.dataset_version_id)
        return False
    return not (isinstance(info.get("size"), int) and info["size"] != size)


def _fetch_to(ds: DiscoverDataset, part: Path, progress: _Progress, stop: threading.Event) -> None:
    """Stream ``ds.url`` into ``part``, continuing ``part`` with a range request when it has bytes of this run."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # sizes are those of the stored file
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(ds.url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), headers=headers) as r:
        if have and r.status_code == 416:  # the part is already as long as the file, or longer
            progress.discard(part)
            raise _Mismatch("the server refused to continue the partial file; starting again")
        if r.status_code >= 400:
            error = f"HTTP {r.status_code} {r.reason} from {ds.url}"
            raise (
                requests.HTTPError(error) if r.status_code in _RETRY_STATUS or r.status_code >= 500 else _Fatal(error)
            )
        resumed = (
            bool(have) and r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        )
        if have and not resumed:
            progress.update(-have)
            have = 0
        length = r.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f:
            for chunk in r.iter_content(_CHUNK):
                if stop.is_set():
                    raise _Cancelled
                f.write(chunk)
                progress.update(len(chunk))
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise ConnectionError(f"the transfer stopped after {got} of {expected} bytes")


def _verify(ds: DiscoverDataset, part: Path) -> str:
    """Check size, checksum and HDF5 signature of ``part``; return its sha256."""
    size = part.stat().st_size
    if ds.filesize is not None and size != ds.filesize:
        raise _Mismatch(f"size mismatch: got {size} bytes, the API lists {ds.filesize}")
    digest = sha256_file(part)
    if ds.sha256 and digest != ds.sha256.lower():
        raise _Mismatch(f"sha256 mismatch: got {digest}, the API lists {ds.sha256}")
    with open(part, "rb") as f:  # an HDF5 superblock sits at 0, 512, 1024, 2048, ... bytes
        head = f.read(4096)
    if not any(head[o : o + 8] == _HDF5_SIGNATURE for o in (0, 512, 1024, 2048)):
        raise _Mismatch(f"not an HDF5/H5AD file (it starts with {head[:40]!r})")
    return digest


def _download_one(
    ds: DiscoverDataset, out: Path, max_retries: int, backoff: float, progress: _Progress, stop: threading.Event
) -> tuple[str, Path, str]:
    """Download one dataset: ``("downloaded" | "skipped" | "failed" | "cancelled", path, reason)``."""
    import requests
    from filelock import FileLock

    folder = out / ds.dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    final, marker, part = folder / DATA_FILE, folder / SUCCESS_FILE, folder / (DATA_FILE + PARTIAL_SUFFIX)
    with FileLock(str(folder / ".lock")):  # another process on the same folder: wait for it, then skip
        if _is_complete(ds, final, marker):
            logger.info("%s: already downloaded, skipping", ds.dataset_id)
            progress.update(final.stat().st_size)
            return "skipped", final, ""
        marker.unlink(missing_ok=True)
        part.unlink(missing_ok=True)  # left by an earlier run: its origin is unknown, never trusted
        reason = ""
        for attempt in range(1, max_retries + 1):
            try:
                if stop.is_set():
                    raise _Cancelled
                _fetch_to(ds, part, progress, stop)
                digest = _verify(ds, part)
                os.replace(part, final)
                size = final.stat().st_size
                info = _fields(ds, "dataset_id", "dataset_version_id", "collection_id", "title", "organisms", "url")
                _write_json(
                    marker,
                    {**info, "filetype": ds.filetype, "size": size, "sha256": digest, "downloaded_at": _now()},
                )
                logger.info("%s: downloaded %s", ds.dataset_id, _gib(size))
                return "downloaded", final, ""
            except _Cancelled:
                part.unlink(missing_ok=True)
                return "cancelled", folder, "interrupted"
            except _Fatal as e:
                reason = str(e)
                break
            except _Mismatch as e:
                reason = str(e)
                progress.discard(part)
            except (requests.RequestException, OSError) as e:
                reason = f"{type(e).__name__}: {e}"
            if attempt < max_retries:
                pause = _backoff(attempt, backoff)
                logger.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                    ds.dataset_id,
                    attempt,
                    max_retries,
                    reason,
                    pause,
                )
                stop.wait(pause)
        progress.discard(part)
        logger.error("%s: failed after %d attempt(s): %s", ds.dataset_id, attempt, reason)
        return "failed", folder, f"{reason} (after {attempt} attempt{'s' if attempt > 1 else ''})"


def download_data(
    species: str | Sequence[str] | None,
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT_DIR,
    *,
    processes: int = DEFAULT_PROCESSES,
    max_retries: int = DEFAULT_MAX_RETRIES,
    metadata: bool = True,
    test_only: bool = False,
    progress: bool = True,
    api_url: str | None = None,
    backoff: float | None = None,
) -> DownloadReport:
    """Download the CELLxGENE Discover datasets of some species (the ``download-data`` command).

    Parameters
    ----------
    species, api_url, backoff
        As for :func:`list_datasets`; ``species`` may be empty only with ``test_only``.
    output_dir
        Download folder (created); layout in the module's description.
    processes
        Number of datasets downloaded at once (threads: the work is waiting on the network).
    max_retries
        Attempts per dataset, the first included. Timeouts, dropped connections, HTTP 408/429/5xx and files of the
        wrong size are tried again after 1, 2, 4, ... s (``backoff``); other HTTP errors are not.
    metadata
        Write ``dataset_metadata.json`` (every dataset the API lists) and ``download_summary.json`` (this run).
    test_only
        Only list and select the datasets (``report.datasets``); write nothing.
    progress
        Show a progress bar of the bytes downloaded.

    Returns
    -------
    DownloadReport
        Files downloaded and skipped, and ``failed`` (dataset id -> reason): a failed dataset does not stop the
        others; check ``report.ok``.

    Raises
    ------
    ValueError
        No species (without ``test_only``), an unknown species, or ``processes``/``max_retries`` below 1.
    DiscoverError
        The API could not be reached.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if max_retries < 1:
        raise ValueError(f"max_retries must be at least 1 (it counts the first attempt), got {max_retries}")
    names = _species_list(species)
    if not names and not test_only:
        raise ValueError("no species given: name one or more, e.g. 'homo sapiens,mus musculus' (or use test_only)")
    backoff = BACKOFF_SECONDS if backoff is None else backoff
    url = _datasets_url(api_url)
    out = Path(output_dir).expanduser()
    records = _fetch_records(url, backoff=backoff)
    selected = _select(records, names, url) if names else []
    report = DownloadReport(api_url=url, output_dir=out, n_listed=len(records), datasets=selected, test_only=test_only)
    if test_only:
        return report

    out.mkdir(parents=True, exist_ok=True)
    if metadata:
        report.metadata_path = out / METADATA_FILE
        _write_json(report.metadata_path, records)
        logger.info("Wrote the metadata of %d datasets to %s", len(records), report.metadata_path)
    if not selected:
        logger.warning("No primary-data H5AD datasets listed for %s", ", ".join(names))

    started = _now()
    bar = _Progress(sum(ds.filesize or 0 for ds in selected), progress and bool(selected))
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="download-data")
    try:
        futures = [pool.submit(_download_one, ds, out, max_retries, backoff, bar, stop) for ds in selected]
        pending = set(futures)
        while pending:  # short waits: Ctrl-C and SIGTERM reach this thread within half a second
            _, pending = wait(pending, timeout=0.5)
        results = [f.result() for f in futures]
    except BaseException:
        stop.set()  # the workers delete their partial files and end at their next chunk
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown()
    outcome = []
    for ds, (status, path, reason) in zip(selected, results, strict=True):
        if status == "downloaded":
            report.downloaded.append(path)
        elif status == "skipped":
            report.skipped.append(path)
        else:
            report.failed[ds.dataset_id] = reason
        info = _fields(ds, "dataset_id", "dataset_version_id", "title", "organisms")
        outcome.append({**info, "status": status, "path": str(path), "error": reason or None})
    if metadata:
        report.summary_path = out / SUMMARY_FILE
        _write_json(
            report.summary_path,
            {
                "api_url": url,
                "species": names,
                "started_at": started,
                "finished_at": _now(),
                "n_listed": len(records),
                "n_selected": len(selected),
                "n_downloaded": len(report.downloaded),
                "n_skipped": len(report.skipped),
                "n_failed": len(report.failed),
                "failed": report.failed,
                "datasets": outcome,
            },
        )
    if report.failed:
        logger.error(
            "%d of %d datasets failed: %s", len(report.failed), len(selected), ", ".join(sorted(report.failed))
        )
    return report


# ---------------------------------------------------------------------------------------------------------------
# the download-data command


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the published ``download-data`` flags to ``parser`` (defaults shown by ArgumentDefaultsHelpFormatter)."""
    parser.add_argument(
        "--species",
        action="append",
        metavar="SPECIES",
        help="organisms, comma-separated, e.g. 'homo sapiens,mus musculus' (repeatable): names as CELLxGENE lists "
        "them (any case, '_' for spaces), NCBITaxon ids, or human, mouse, zebrafish, ...; required unless --test-only",
    )
    parser.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"folder that receives <dataset_id>/{DATA_FILE} folders"
    )
    parser.add_argument(
        "--processes", type=_positive_int, default=DEFAULT_PROCESSES, help="datasets downloaded at once"
    )
    parser.add_argument(
        "--max-retries",
        type=_positive_int,
        default=DEFAULT_MAX_RETRIES,
        help="attempts per dataset (the first included), with growing waits between them",
    )
    parser.add_argument(
        "--no-metadata",
        action="store_true",
        help=f"do not write {METADATA_FILE} (every listed dataset) and {SUMMARY_FILE} (this run's outcome)",
    )
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="only check that the CELLxGENE Discover API answers (with --species: count what would be "
        "downloaded); write nothing",
    )


def run(args: argparse.Namespace) -> int:
    """Execute ``download-data`` with parsed ``args``; print what was written where; return the exit status.

    Returns 0 when every selected dataset is complete (or, with ``--test-only``, the API answered), 1 otherwise.
    """
    species = _species_list(args.species)
    if not species and not args.test_only:
        print(
            "transcriptformer: error: --species is required unless --test-only (e.g. --species 'homo sapiens')",
            file=sys.stderr,
        )
        return 1
    try:
        report = download_data(
            species,
            args.output_dir,
            processes=args.processes,
            max_retries=args.max_retries,
            metadata=not args.no_metadata,
            test_only=args.test_only,
            progress=not getattr(args, "no_progress", False),
        )
    except (DiscoverError, ValueError, OSError) as e:
        if getattr(args, "verbose", False):
            raise
        hint = "" if args.test_only or not isinstance(e, DiscoverError) else " (--test-only checks the connection)"
        print(f"transcriptformer: error: {e}{hint}", file=sys.stderr)
        return 1
    print(_summary(report, species))
    return 0 if report.ok else 1


def _summary(report: DownloadReport, species: list[str]) -> str:
    if report.test_only:
        lines = [f"CELLxGENE Discover API reachable at {report.api_url}: {report.n_listed} datasets listed."]
        if species:
            size = sum(ds.filesize or 0 for ds in report.datasets)
            lines.append(
                f"{len(report.datasets)} datasets ({_gib(size)}) of {', '.join(species)} would be downloaded "
                f"to {report.output_dir}; nothing was written."
            )
        return "\n".join(lines)
    size = sum(p.stat().st_size for p in report.downloaded if p.exists())
    lines = [
        f"Downloaded {len(report.downloaded)} datasets ({_gib(size)}) of {', '.join(species)} to {report.output_dir}"
        f" ({len(report.skipped)} already complete, {len(report.failed)} failed, {len(report.datasets)} selected "
        f"of {report.n_listed} listed)."
    ]
    if report.metadata_path is not None:
        lines.append(f"Metadata of all listed datasets: {report.metadata_path}")
    if report.summary_path is not None:
        lines.append(f"Outcome per dataset: {report.summary_path}")
    if report.failed:
        lines.append(f"FAILED ({len(report.failed)}; run the command again to retry them):")
        lines.extend(f"  {dataset_id}: {reason}" for dataset_id, reason in sorted(report.failed.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Tabula Sapiens

#: where :func:`tabula_sapiens` downloads from (``<base><file>``)
TABULA_SAPIENS_BASE_URL = "https://datasets.cellxgene.cziscience.com/"
#: the published tool's files: tissue -> file under :data:`TABULA_SAPIENS_BASE_URL` (CELLxGENE dataset versions)
TABULA_SAPIENS_FILES: dict[str, str] = {
    "endothelium": "de698978-3267-45c6-b492-4b0636ef564d.h5ad",
    "epithelium": "f4f99331-40cf-4bc7-bbb5-c4dc4c150840.h5ad",
    "germline": "d81eae50-e96d-44a6-876a-540a3a4610dd.h5ad",
    "immune": "7f2e355e-9944-4477-98f0-2184943d9d2c.h5ad",
    "neural": "74d7bc5e-ac01-43d6-ae70-8ffe82b8afde.h5ad",
    "stromal": "1c63b188-d097-441f-8922-b7ebaf715cca.h5ad",
    "bladder": "01ef7ded-020c-4292-b253-a234f7331757.h5ad",
    "blood": "4eb58518-23ce-43e8-89ca-9e9fa87c081d.h5ad",
    "bone_marrow": "bbf12ff4-7f22-4cf5-83cf-9cd37ce4d6f4.h5ad",
    "ear": "51233375-325e-4e8e-b05d-208fd8cc4ba4.h5ad",
    "eye": "a77c03ba-0748-4382-94bd-e1c358175d5a.h5ad",
    "fat": "4ccbfe8d-0e59-4433-b53c-55a717a32d16.h5ad",
    "heart": "832cf70d-ffdd-48c1-b2cc-ffbb30b42e6c.h5ad",
    "kidney": "b7581463-9676-46fd-9b84-73132109b2a4.h5ad",
    "large_intestine": "8a18fafb-9d37-4bae-9a18-00e35368ca23.h5ad",
    "liver": "c264e09f-7c3b-4294-b0f4-82a790bd0014.h5ad",
    "lung": "7c5ee207-950a-4ae3-bd85-2483f75111d7.h5ad",
    "lymph_node": "b439da44-6128-483f-9424-10c5618a8b7e.h5ad",
    "mammary": "c207bca6-a5c8-472e-be14-83b7b8cc83a6.h5ad",
    "muscle": "9bea986b-f7f1-479b-92d9-61a893629399.h5ad",
    "ovary": "6e4ccce5-532e-401e-b1bf-ce01f4883eff.h5ad",
    "pancreas": "240e2b84-6893-4651-830b-5baebe8b8bfe.h5ad",
    "prostate": "250cb362-68b4-426e-b4b6-1f7c478197d2.h5ad",
    "salivary_gland": "ded561fb-8668-4ed9-b239-f03a01584dda.h5ad",
    "skin": "c458ba64-399b-4afb-b4b9-8ac91b8f43b3.h5ad",
    "small_intestine": "a77da5e7-8a67-4351-9ec3-49a9c80060ab.h5ad",
    "spleen": "79dd0749-aba8-40b8-80b8-2937377c2bdd.h5ad",
    "stomach": "70b2a188-2183-4b20-80e2-8c870e6b01f0.h5ad",
    "testis": "7ffe124c-b1ac-4998-932c-43e2038aacf9.h5ad",
    "thymus": "3c5738bc-da1e-4b98-a2a6-685a7748e747.h5ad",
    "tongue": "9e6d1c2e-b77d-4b36-b747-fad671e245f0.h5ad",
    "trachea": "f950a2b4-0761-4ec3-b74e-4d951e2fe30b.h5ad",
    "uterus": "e53087ec-74a9-4a37-b5fb-36911c3a68c7.h5ad",
    "vasculature": "866ad7f6-bf26-4da4-b078-1b5eebee0fd6.h5ad",
}
TABULA_SAPIENS_TISSUES: tuple[str, ...] = tuple(sorted(TABULA_SAPIENS_FILES))
#: the published split: donors TSP1-TSP15 are "v1" (seen in training), TSP17 onwards "v2"; TSP16 is in neither
_TS_NEITHER = 16


def _tabula_sapiens_split(adata: anndata.AnnData, version: str, min_gene_counts: float) -> anndata.AnnData:
    """The published donor split and gene filter."""
    import numpy as np

    if "donor_id" not in adata.obs:
        raise ValueError("the Tabula Sapiens file has no obs['donor_id'] to split donors by; is it the right file?")
    numbers = adata.obs["donor_id"].astype(str).str.extract(r"TSP(\d+)$", expand=False)
    if numbers.isna().any():
        odd = sorted(set(adata.obs["donor_id"].astype(str)[numbers.isna()]))[:5]
        raise ValueError(f"donor ids not of the form TSP<number>: {odd}")
    donor = numbers.astype(int).to_numpy()
    subset = adata[donor < _TS_NEITHER if version == "v1" else donor > _TS_NEITHER]
    subset = subset.to_memory() if adata.isbacked else subset.copy()  # a backed file's subset cannot be copied
    totals = np.asarray(subset.X.sum(axis=0)).ravel()
    return subset[:, totals >= min_gene_counts].copy()


def tabula_sapiens(
    tissue: str,
    path: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    version: str = "v2",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    min_gene_counts: float = 10,
    progress: bool = True,
    **kwargs: Any,
) -> anndata.AnnData:
    """One Tabula Sapiens tissue from CELLxGENE Discover, restricted to the donors of ``version``.

    As published: the tissue's file is downloaded once (by :mod:`pooch`), then the cells of the donors of
    ``version`` are kept, and the genes with at least ``min_gene_counts`` in total over them.

    Parameters
    ----------
    tissue
        One of :data:`TABULA_SAPIENS_TISSUES`: organs (``"heart"``, ``"lymph_node"``, ...) or compartments
        (``"endothelium"``, ``"epithelium"``, ``"germline"``, ``"immune"``, ``"neural"``, ``"stromal"``).
    path
        File to keep the download in (``.h5ad`` appended if missing). Default: ``<cache>/tabula_sapiens/<tissue>.h5ad``
        (both versions share it).
    force_download
        Download again even if the file is there.
    version
        ``"v1"``: donors TSP1-TSP15, in distribution for TranscriptFormer; ``"v2"``: TSP17 and later, out of
        distribution (as published, TSP16 is in neither).
    cache_dir
        Cache folder when ``path`` is not given (default ``$TRANSCRIPTFORMER_CACHE``, else the user cache folder).
    min_gene_counts
        Genes whose total over the kept cells (in ``X``) is below this are dropped (the published 10).
    progress
        Show a progress bar while downloading.
    **kwargs
        Passed to :func:`anndata.read_h5ad` (e.g. ``backed="r"``).

    Returns
    -------
    anndata.AnnData
        The kept cells and genes (a copy in memory).
    """
    import pooch
    from filelock import FileLock

    if tissue not in TABULA_SAPIENS_FILES:
        raise ValueError(f"Unknown Tabula Sapiens tissue {tissue!r}; choose one of {', '.join(TABULA_SAPIENS_TISSUES)}")
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    dest = cache_path(cache_dir) / "tabula_sapiens" / f"{tissue}.h5ad" if path is None else Path(path).expanduser()
    if dest.suffix != ".h5ad":
        dest = dest.with_name(dest.name + ".h5ad")
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = TABULA_SAPIENS_BASE_URL.rstrip("/") + "/" + TABULA_SAPIENS_FILES[tissue]
    with FileLock(str(dest.with_name(dest.name + ".lock"))):
        if force_download:
            dest.unlink(missing_ok=True)
        if not dest.exists():
            logger.info("Downloading Tabula Sapiens %s from %s to %s", tissue, url, dest)
        pooch.retrieve(url, known_hash=None, fname=dest.name, path=dest.parent, progressbar=progress)
    import anndata as ad

    try:
        adata = ad.read_h5ad(dest, **kwargs)
    except OSError as e:
        raise ValueError(f"{dest} is not a readable H5AD file ({e}); pass force_download=True to fetch it again") from e
    return _tabula_sapiens_split(adata, version, min_gene_counts)
