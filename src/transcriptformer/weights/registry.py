"""The published weights: where they are, how they are downloaded, cached and verified.

Each name maps to a tarball that unpacks to one folder (``tf_sapiens/``, ...). Downloads go
through :mod:`pooch` into the cache (``$TRANSCRIPTFORMER_CACHE``, or the user cache folder),
a temporary name first, so an interrupted download never counts as cached. The tarball is
unpacked into a temporary folder with the ``data`` extraction filter (no absolute paths, no
``..``, no links leaving the folder, no devices, no sparse files), at most
:attr:`Entry.max_unpacked` bytes, and its layout is checked (``config.json`` parses, the weights and
every table it names are there) before it is moved into place.

Integrity: the weights' publisher gives no checksums. Where :data:`REGISTRY` carries none, the
first successful download records the tarball's sha256 (``known_hashes.json`` in the cache)
and the sha256 of every extracted file (``<folder>.sha256.json`` beside the folder); later
downloads must reproduce the tarball's hash (``force=True`` replaces the recorded hash, with a
warning), and every load of a cached checkpoint checks its files against the recorded hashes. A file
is hashed once per change: the manifest also records each file's size, modification time, inode and
change time, and a file whose record is unchanged is not read again. A mismatch is an error naming
the file and how to recover.

Environment variables: ``TRANSCRIPTFORMER_CACHE`` (cache folder), ``TRANSCRIPTFORMER_BASE_URL``
(a mirror serving the same file names).

This module imports nothing heavy (no pandas, pooch or requests) until a download or a listing needs it,
so that the command line starts fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import _files
from .._files import VerificationRecord, cache_path, file_stamp, read_json, write_json_atomic
from .._progress import tqdm
from .layout import check_folder

if TYPE_CHECKING:
    import pandas as pd
    from filelock import FileLock

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_URL",
    "DATASET_NAMES",
    "ENTRIES",
    "MODEL_NAMES",
    "REGISTRY",
    "DownloadError",  # noqa: F822 - defined on first access (module __getattr__)
    "Entry",
    "available",
    "cache_path",
    "canonical_name",
    "fetch",
    "fetch_dataset",
    "git_blob_sha1",
    "is_complete",
    "is_registered",
    "not_a_model",
    "species_table",
    "species_tables",
    "verify_checkpoint",
]

#: Where the published tarballs live.
BASE_URL = "https://czi-transcriptformer.s3.amazonaws.com/weights/"

GiB = 1 << 30


@dataclass(frozen=True)
class Entry:
    """One downloadable item of the registry.

    Attributes
    ----------
    name
        Registry name (``"tf-sapiens"``); ``_`` and case are ignored when looking it up.
    kind
        ``"model"`` (a checkpoint folder, usable as ``model=``), ``"tables"`` (gene tables) or ``"dataset"``
        (one h5ad file of cells).
    file
        File name under the base URL (``$TRANSCRIPTFORMER_BASE_URL`` or :data:`BASE_URL`); for datasets, the
        file's name (under ``$TRANSCRIPTFORMER_DATA_URL`` when that mirror is set, else at ``url``).
    folder
        The folder the tarball unpacks to (datasets: the cache sub-folder that holds the file).
    sha256
        sha256 of the file, or ``None`` where the publisher gives none (then the first download is recorded
        and later ones must match it: trust on first use).
    size
        Size in bytes, or ``None`` where unknown.
    description
        One line for listings.
    max_unpacked
        Most bytes the unpacked folder may take. A tarball whose members add up to more (a small archive
        can expand to anything) is refused before anything is written. The limits are about three times
        the sizes the models' parameter counts imply.
    url
        Datasets: the public URL of the file.
    git_blob_sha1
        Datasets from a git repository: the file's git blob id, a content pin checked after every download
        (the sha1 of ``blob <size>``, a NUL byte, then the content) where no sha256 is published.
    bundled
        Path inside the package of an entry that ships with it (no download).
    """

    name: str
    kind: Literal["model", "tables", "dataset"]
    file: str
    folder: str
    sha256: str | None
    size: int | None
    description: str
    max_unpacked: int = 8 * GiB
    url: str | None = None
    git_blob_sha1: str | None = None
    bundled: str | None = None

    def source_url(self, base: str | None = None, data: str | None = None) -> str | None:
        """Where the entry is downloaded from (``None``: it ships with the package)."""
        if self.kind == "dataset":
            mirror = data or os.environ.get("TRANSCRIPTFORMER_DATA_URL")
            if mirror:
                return (mirror if mirror.endswith("/") else mirror + "/") + self.file
            return self.url
        if self.bundled is not None:
            return None
        return base_url(base) + self.file


#: Everything the registry can download. The command line's choices, :func:`available` and the docs derive
#: from this table.
ENTRIES: tuple[Entry, ...] = (
    Entry(
        "tf-sapiens",
        "model",
        "tf_sapiens.tar.gz",
        "tf_sapiens",
        None,
        None,
        "TF-Sapiens: human only, 368M trainable parameters",
        max_unpacked=6 * GiB,
    ),
    Entry(
        "tf-exemplar",
        "model",
        "tf_exemplar.tar.gz",
        "tf_exemplar",
        None,
        None,
        "TF-Exemplar: 5 species (human, mouse, zebrafish, fly, worm)",
        max_unpacked=16 * GiB,
    ),
    Entry(
        "tf-metazoa",
        "model",
        "tf_metazoa.tar.gz",
        "tf_metazoa",
        None,
        None,
        "TF-Metazoa: 12 species",
        max_unpacked=32 * GiB,
    ),
    Entry(
        "all-embeddings",
        "tables",
        "all_embeddings.tar.gz",
        "all_embeddings",
        None,
        None,
        "ESM2 gene tables of 24 species, for out-of-distribution species",
        max_unpacked=32 * GiB,
    ),
)

#: The published repository's test data, at the commit that added it (plain git blobs, no LFS).
_TEST_DATA = (
    "https://raw.githubusercontent.com/czi-ai/transcriptformer/241fa556e8b70c9cef073300020e6a825f6f8c55/test/data/"
)
#: The cross-species testis data of the published notebook (Murat et al. 2023), public S3 bucket.
_TESTIS = "https://cz-benchmarks-data.s3.amazonaws.com/datasets/v1/evo_distance/testis/"
_TESTIS_FILES = {
    "marmoset": "Callithrix_jacchus_ERP132588",
    "chicken": "Gallus_gallus_ERP132576",
    "gorilla": "Gorilla_gorilla_ERP132581",
    "human": "Homo_sapiens_ERP132584",
    "macaque": "Macaca_mulatta_ERP132582",
    "opossum": "Monodelphis_domestica_ERP132579",
    "mouse": "Mus_musculus_ERP132577",
    "platypus": "Ornithorhynchus_anatinus_ERP132578",
    "chimpanzee": "Pan_troglodytes_ERP139683",
}

ENTRIES += (
    Entry(
        "tf-demo",
        "model",
        "",
        "tf_demo",
        None,
        None,
        "Demo model trained here on 1,190 real human and mouse cells (ships with the package; not the "
        "published weights)",
        bundled="_data/tf_demo",
    ),
    Entry(
        "tf-tiny",
        "model",
        "",
        "tf_tiny",
        None,
        None,
        "Tiny random checkpoint in the published layout (ships with the package; for examples and tests)",
        bundled="_data/tf_tiny",
    ),
    Entry(
        "human-val",
        "dataset",
        "human_val.h5ad",
        "datasets",
        None,
        None,
        "The published repository's human test cells (test/data/human_val.h5ad)",
        url=_TEST_DATA + "human_val.h5ad",
        git_blob_sha1="7be18b5f093c5e97731295dd4490a24b973922d6",
    ),
    Entry(
        "mouse-val",
        "dataset",
        "mouse_val.h5ad",
        "datasets",
        "f109995258daf776ceae48def5f5fc81cf478e3b4369aee22c394423aa549281",
        1_440_602,
        "The published repository's 1,000 mouse MERFISH test cells (test/data/mouse_val.h5ad; also bundled)",
        url=_TEST_DATA + "mouse_val.h5ad",
        git_blob_sha1="342d7772b1539f414c915aa7b2ebceb582dabc27",
        bundled="_data/mouse_val.h5ad",
    ),
    Entry(
        "chicken-val",
        "dataset",
        "chicken_val.h5ad",
        "datasets",
        None,
        None,
        "The published repository's chicken test cells (test/data/chicken_val.h5ad)",
        url=_TEST_DATA + "chicken_val.h5ad",
        git_blob_sha1="0b9e7beabb964505b4d91a3b0a39b037682f5da3",
    ),
    *(
        Entry(
            f"testis-{organism}",
            "dataset",
            f"{stem}_droplet_based_curated.h5ad",
            "datasets",
            None,
            None,
            f"Testis cells of {organism} (Murat et al. 2023), used by the published cross-species notebook",
            url=f"{_TESTIS}{stem}_droplet_based_curated.h5ad",
        )
        for organism, stem in _TESTIS_FILES.items()
    ),
)

#: Registry name -> entry.
REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}

#: Names usable as ``model=``.
MODEL_NAMES: tuple[str, ...] = tuple(e.name for e in ENTRIES if e.kind == "model")

#: Names of the datasets (:func:`fetch_dataset`).
DATASET_NAMES: tuple[str, ...] = tuple(e.name for e in ENTRIES if e.kind == "dataset")

KNOWN_HASHES_FILE = "known_hashes.json"

#: Most members a tarball may hold.
MAX_MEMBERS = 10_000

_DOWNLOAD_ERROR: type | None = None
_DOWNLOAD_ERROR_LOCK = threading.Lock()


def _download_error() -> type:
    """:class:`DownloadError`, defined on first use (it derives from ``requests``' exception, imported lazily)."""
    global _DOWNLOAD_ERROR
    with _DOWNLOAD_ERROR_LOCK:
        if _DOWNLOAD_ERROR is None:
            import requests

            class DownloadError(requests.exceptions.RequestException):
                """A download failed (network, server, or cut short); nothing was cached."""

            DownloadError.__module__ = __name__
            DownloadError.__qualname__ = "DownloadError"
            _DOWNLOAD_ERROR = DownloadError
        return _DOWNLOAD_ERROR


def __getattr__(name: str) -> Any:
    if name == "DownloadError":
        return _download_error()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def not_a_model(name: str) -> str:
    """What a registry name that is not a model is, and how to use it (for errors where a model is expected)."""
    entry = REGISTRY[canonical_name(name)]
    if entry.kind == "dataset":
        if entry.name.endswith("-val"):
            how = f"tfs.datasets.published_test_data({entry.name.removesuffix('-val')!r})"
        elif entry.name.startswith("testis-"):
            how = f"tfs.datasets.bgee_testis_evolution({entry.name.removeprefix('testis-')!r})"
        else:
            how = f"transcriptformer.weights.registry.fetch_dataset({entry.name!r})"
        what = f"a dataset (cells: read it with {how})"
    else:
        what = "a set of gene tables (used through species_embedding=<species name>)"
    return f"{entry.name!r} is {what}, not a model; known models: {', '.join(MODEL_NAMES)}."


def canonical_name(name: str) -> str:
    """``"TF_Sapiens"`` / ``"tf-sapiens"`` / ``"tf_sapiens"`` -> ``"tf-sapiens"``."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in REGISTRY:
        raise KeyError(f"unknown name {name!r}; known: {', '.join(REGISTRY)}.")
    return key


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registry name (not a path)."""
    try:
        canonical_name(name)
    except KeyError:
        return False
    return True


def base_url(url: str | None = None) -> str:
    """The argument, else ``$TRANSCRIPTFORMER_BASE_URL``, else the publisher's URL; with a trailing slash."""
    url = url or os.environ.get("TRANSCRIPTFORMER_BASE_URL") or BASE_URL
    return url if url.endswith("/") else url + "/"


def manifest_path(folder: Path) -> Path:
    """Where the record of a downloaded folder's files lies: ``<folder>.sha256.json`` beside it."""
    return folder.parent / f"{folder.name}.sha256.json"


def _redownload_hint(folder: Path) -> str:
    name = folder.name.replace("_", "-")
    return (
        f"Delete {folder} and {manifest_path(folder).name} (or run `transcriptformer download {name} --force`) "
        "to download it again."
    )


def _open_manifest(folder: Path) -> VerificationRecord:
    """The manifest written when ``folder`` was unpacked, validated; a damaged one is an error with the fix."""
    path = manifest_path(folder)
    record = VerificationRecord.open(
        path, strict=True, what=f"the record of the files of {folder.name}", fix=_redownload_hint(folder)
    )
    files = record.data.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(
            f"{path} (the record of the files of {folder.name}) has no valid 'files' table. {_redownload_hint(folder)}"
        )
    return record


def _is_cached(folder: Path) -> bool:
    return folder.is_dir() and manifest_path(folder).is_file()


def is_complete(folder: Path) -> bool:
    """Cached, and every file recorded at download still there (a damaged manifest raises, with the fix)."""
    if not _is_cached(folder):
        return False
    missing = [rel for rel in _open_manifest(folder).data["files"] if not (folder / rel).is_file()]
    if missing:
        logger.warning("%s is incomplete (missing %s).", folder, ", ".join(missing[:3]))
        return False
    return True


def _hash_tree(folder: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """sha256 and stamp of every regular file under ``folder``, by relative path."""
    digests, stamps = {}, {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(folder).as_posix()
            stamps[rel] = file_stamp(p)
            digests[rel] = _files.sha256_file(p)
    return digests, stamps


def _read_known_hashes(root: Path) -> dict[str, str]:
    path = root / KNOWN_HASHES_FILE
    if not path.is_file():
        return {}
    fix = (
        "It records the sha256 of each tarball at its first download: repair it, or delete it to record the "
        "hashes again at the next download."
    )
    data = read_json(path, "the recorded sha256 of downloaded tarballs", fix)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} (the recorded sha256 of downloaded tarballs) must map file names to hashes. {fix}")
    return data


def _recorded_hash(root: Path, fname: str) -> str | None:
    return _read_known_hashes(root).get(fname)


def _lock(root: Path, name: str) -> FileLock:
    """An inter-process lock in ``<cache>/.locks/`` (the lock files stay, empty)."""
    from filelock import FileLock

    (root / ".locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".locks" / f"{name}.lock"))


def _record_hash(root: Path, fname: str, digest: str) -> None:
    path = root / KNOWN_HASHES_FILE
    with _lock(root, KNOWN_HASHES_FILE):  # shared by every model's download
        data = _read_known_hashes(root)
        data[fname] = digest
        write_json_atomic(path, data)


def _refuse(tarball: Path, what: str) -> ValueError:
    return ValueError(f"refusing to extract {tarball.name}: {what}")


def _check_member(m: tarfile.TarInfo, tarball: Path, expected_top: str) -> None:
    """Raise unless ``m`` stays inside ``expected_top/`` (links included) and is a plain file, folder or link."""
    name = m.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts:
        raise _refuse(tarball, f"member {name!r} points outside the target folder.")
    if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
        raise _refuse(tarball, f"member {name!r} is a device or pipe.")
    if m.issparse():
        raise _refuse(tarball, f"member {name!r} is a sparse file (a few bytes that unpack to {m.size:,}).")
    if not parts:  # "." or "./": only harmless as a folder
        if not m.isdir():
            raise _refuse(tarball, f"member {name!r} is not a folder.")
        return
    if parts[0] != expected_top:
        raise _refuse(tarball, f"member {name!r} is outside the expected folder {expected_top!r}/.")
    if m.issym() or m.islnk():
        if len(parts) == 1:
            raise _refuse(tarball, f"the folder {expected_top!r} itself is a link.")
        # a symlink's target is relative to the link's folder, a hard link's to the archive root
        target = os.path.normpath(os.path.join(os.path.dirname(name), m.linkname)) if m.issym() else m.linkname
        tparts = Path(target).parts
        if os.path.isabs(m.linkname) or not tparts or ".." in tparts or tparts[0] != expected_top:
            raise _refuse(tarball, f"link {name!r} -> {m.linkname!r} points outside the folder {expected_top!r}/.")


def _safe_extract(tarball: Path, target: Path, expected_top: str, progress: bool, max_bytes: int | None = None) -> None:
    """Unpack ``tarball`` into ``target`` refusing anything that would land outside ``target/expected_top``.

    Every member is checked before anything is written: the members' sizes must add up to at most
    ``max_bytes`` and fit in the free space of ``target``'s disk.

    Raises
    ------
    ValueError
        A member leaves the folder, is sparse, a device or pipe, the archive is too large ("refusing ..."), or
        the archive is damaged or cut short.

    """
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = []
            total = 0
            for m in tar:  # reads the headers only (and decompresses the archive once)
                _check_member(m, tarball, expected_top)
                members.append(m)
                total += m.size if m.isfile() else 0
                if len(members) > MAX_MEMBERS:
                    raise _refuse(tarball, f"more than {MAX_MEMBERS:,} members.")
                if max_bytes is not None and total > max_bytes:
                    raise _refuse(
                        tarball,
                        f"its members unpack to more than {_size(max_bytes)}, more than this download can take "
                        "(the archive is not the published one).",
                    )
            free = shutil.disk_usage(target).free
            if total > free:
                raise ValueError(
                    f"{tarball.name} unpacks to {_size(total)} but {target} has {_size(free)} free; "
                    "free some space or set TRANSCRIPTFORMER_CACHE to a larger disk."
                )
            for m in tqdm(members, desc=f"extracting {tarball.name}", unit="file", disable=not progress):
                tar.extract(m, target, filter="data")
    except tarfile.FilterError as e:  # our checks should have caught it first
        raise _refuse(tarball, str(e)) from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{tarball.name} is not a complete tar.gz archive ({e}); the download was probably cut short. "
            "Nothing was cached: download it again."
        ) from e


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def _check_unpacked(entry: Entry, folder: Path, tarball: str) -> None:
    """The unpacked folder has the layout its kind needs (before it is cached or its hash recorded)."""
    try:
        if entry.kind == "model":
            check_folder(folder)
        elif not any(folder.glob("*_gene.h5")):
            raise ValueError("it holds no gene table (<species>_gene.h5).")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{tarball} unpacked, but not to a usable {'checkpoint' if entry.kind == 'model' else 'folder of tables'}: "
            f"{e} Nothing was cached or recorded; the file at the server is not the published one."
        ) from None


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download (once) and unpack a registry entry; return its folder.

    Parameters
    ----------
    name
        ``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"`` or ``"all-embeddings"``.
    cache_dir
        Cache folder (see :func:`cache_path`).
    progress
        Progress bars while downloading and extracting.
    force
        Download and unpack again even if cached. Where the sha256 of the tarball was recorded at its first
        download (no hash is published) and the server now serves another file, the new file replaces the
        recorded hash, with a warning.

    Returns
    -------
    pathlib.Path
        The unpacked folder, e.g. ``<cache>/tf_sapiens``. A cached folder with a file missing is downloaded
        again.

    """
    entry = REGISTRY[canonical_name(name)]
    if entry.kind == "dataset":
        return fetch_dataset(entry.name, cache_dir=cache_dir, progress=progress, force=force)
    if entry.bundled is not None:
        return bundled_path(entry)
    root = cache_path(cache_dir)  # the environment is read here, at the entry point
    folder = root / entry.folder
    if root.exists() and not root.is_dir():
        raise ValueError(f"the cache folder {root} is a file; pass another folder or remove the file.")
    _check_layout(root, folders=[folder], files=[manifest_path(folder)])
    if not force and is_complete(folder):
        return folder
    _writable(root)
    # one download per cache folder at a time (several torchrun processes may ask at once)
    with _lock(root, entry.folder):
        if not force and is_complete(folder):
            return folder
        _download_and_unpack(entry, base_url() + entry.file, root, folder, progress, force)
    logger.info("%s ready in %s", entry.name, folder)
    return folder


def bundled_path(entry: Entry) -> Path:
    """Where an entry that ships with the package lies."""
    assert entry.bundled is not None
    return Path(str(files("transcriptformer").joinpath(entry.bundled)))


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: the sha1 of ``blob <size>``, a NUL byte, then the content."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch_dataset(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download (once) one of the registry's datasets; return the h5ad file.

    A dataset that ships with the package (``mouse-val``) is returned from there. Downloads are checked
    against the published sha256 where there is one, against the file's git blob id where it comes from a
    git repository, and otherwise against the sha256 recorded at their first download (trust on first
    use, as for the weights; ``known_hashes.json`` in the cache). ``$TRANSCRIPTFORMER_DATA_URL`` points at a
    mirror serving the same file names.

    Parameters
    ----------
    name
        One of :data:`DATASET_NAMES` (``"human-val"``, ``"mouse-val"``, ``"chicken-val"``,
        ``"testis-macaque"``, ...).
    cache_dir, progress, force
        As in :func:`fetch`.

    Returns
    -------
    pathlib.Path
        The h5ad file.
    """
    entry = REGISTRY[canonical_name(name)]
    if entry.kind != "dataset":
        raise ValueError(f"{entry.name!r} is not a dataset; datasets: {', '.join(DATASET_NAMES)}.")
    mirror = os.environ.get("TRANSCRIPTFORMER_DATA_URL")
    if entry.bundled is not None and not (mirror and force):
        path = bundled_path(entry)
        if path.is_file():
            digest = _files.sha256_file(path)
            if entry.sha256 and digest != entry.sha256:
                raise ValueError(f"the bundled {path} is corrupted (sha256 {digest[:16]}...); reinstall the package.")
            return path
    url = entry.source_url(data=mirror)
    assert url is not None
    root = cache_path(cache_dir)
    folder = root / entry.folder
    target = folder / entry.file
    _check_layout(root, folders=[folder], files=[target])
    if target.is_file() and not force:  # cached: readable from a read-only (shared) cache
        _check_dataset(entry, target, root)
        return target
    _writable(folder)
    with _lock(root, f"{entry.folder}-{entry.file}"):
        if target.is_file() and not force:
            _check_dataset(entry, target, root)
            return target
        known = entry.sha256 or (None if force else _recorded_hash(root, entry.file))
        downloads = root / ".downloads"
        tmp = downloads / entry.file
        tmp.unlink(missing_ok=True)
        try:
            _retrieve(url, known, entry.file, downloads, progress, root, entry.kind)
            if entry.git_blob_sha1 and git_blob_sha1(tmp) != entry.git_blob_sha1:
                raise ValueError(
                    f"the downloaded {entry.file} is not the published file (its git blob id differs from "
                    f"{entry.git_blob_sha1}); nothing was cached. Retry, or check the mirror."
                )
            digest = _files.sha256_file(tmp)
            if known is None:
                previous = _recorded_hash(root, entry.file)
                if previous is not None and previous != digest:
                    logger.warning(
                        "%s changed on the server (sha256 %s... recorded at its first download, now %s...); "
                        "force: recording the new file.",
                        entry.file,
                        previous[:16],
                        digest[:16],
                    )
                _record_hash(root, entry.file, digest)
            _files.give_default_mode(tmp)  # pooch's temporary file is owner-only
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    logger.info("%s ready in %s", entry.name, target)
    return target


def _check_dataset(entry: Entry, path: Path, root: Path) -> None:
    """A cached dataset file still has the sha256 it was pinned to (published or recorded at download)."""
    expected = entry.sha256 or _recorded_hash(root, entry.file)
    if expected is None:
        return
    digest = _files.sha256_file(path)
    if digest != expected:
        raise ValueError(
            f"cached file {path} is corrupted: sha256 {digest[:16]}... differs from {expected[:16]}...; delete it "
            f"(or pass force=True) to download it again."
        )


def _check_layout(root: Path, folders: Sequence[Path] = (), files: Sequence[Path] = ()) -> None:
    """Refuse, before any download, a cache entry of the wrong kind (a file where a folder goes, or the reverse)."""
    wanted = [(p, True) for p in (*folders, root / ".downloads", root / ".locks")]
    wanted += [(p, False) for p in (*files, root / KNOWN_HASHES_FILE)]
    for path, folder in wanted:
        if path.exists() and path.is_dir() != folder:
            raise ValueError(
                f"{path} is a {'file' if folder else 'folder'} where the cache {root} keeps a "
                f"{'folder' if folder else 'file'}: remove it and run again."
            )


def _writable(folder: Path) -> None:
    """Create ``folder`` if needed; a cache that cannot be written to is an error naming it, with the fix."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the cache folder {folder} is a file; pass another cache_dir or remove the file.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the cache folder {folder} ({e.strerror or e}); pass a writable cache_dir (or set "
            "TRANSCRIPTFORMER_CACHE)."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"the cache folder {folder} is not writable; pass a writable cache_dir (or set TRANSCRIPTFORMER_CACHE)."
        )


def _retrieve(url: str, known: str | None, fname: str, downloads: Path, progress: bool, root: Path, kind: str) -> None:
    """Download ``url`` to ``downloads / fname``.

    An unreachable server is an error whose advice suits ``kind``, the registry entry's: a checkpoint (``model``),
    gene tables (``tables``) or a dataset.
    """
    import pooch
    import requests

    try:
        pooch.retrieve(
            url,
            known_hash=f"sha256:{known}" if known else None,
            fname=fname,
            path=downloads,
            progressbar=progress,
        )
    except requests.exceptions.RequestException as e:
        root_cause: BaseException = e
        while (inner := root_cause.__cause__ or root_cause.__context__) is not None:
            root_cause = inner
        reason = f"{type(root_cause).__name__}: {str(root_cause).splitlines()[0][:200] if str(root_cause) else ''}"
        if kind == "model":
            advice = (
                f"point TRANSCRIPTFORMER_BASE_URL at a mirror, or fetch {fname} on a machine that can reach it, unpack "
                "it and pass the folder itself (model=<folder> / --checkpoint-path <folder>)"
            )
        elif kind == "tables":  # gene tables, not a checkpoint: they are passed one file per species
            advice = (
                f"point TRANSCRIPTFORMER_BASE_URL at a mirror, or fetch {fname} on a machine that can reach it, unpack "
                "it and pass the species' gene table itself (species_embedding=<folder>/<species>_gene.h5 / "
                "--pretrained-embedding <folder>/<species>_gene.h5)"
            )
        else:
            advice = (
                f"point TRANSCRIPTFORMER_DATA_URL at a mirror serving {fname}, or fetch it on a machine that can "
                "reach it and read it with anndata.read_h5ad"
            )
        raise _download_error()(
            f"could not download {url} ({reason}). Nothing was cached. Check the connection and retry, {advice}."
        ) from e
    except ValueError as e:
        if "hash" in str(e).lower():
            raise ValueError(
                f"the downloaded {fname} does not match the sha256 recorded for it ({known}). The file at "
                f"{url} changed or the download was corrupted. Retry; if the publisher really replaced it, "
                f"download with --force (force=True), which records the new hash, or delete {root / KNOWN_HASHES_FILE} "
                f"(or its {fname!r} entry)."
            ) from None
        raise


def _download_and_unpack(entry: Entry, url: str, root: Path, folder: Path, progress: bool, force: bool) -> None:
    import pooch

    folder_name = entry.folder
    fname = entry.file
    logger.info("downloading %s from %s", fname, url)
    downloads = root / ".downloads"
    tarball = downloads / fname
    pinned = None if entry.sha256 else _recorded_hash(root, fname)
    # force replaces a hash recorded on first use (never one published in REGISTRY)
    known = entry.sha256 or (None if force else pinned)
    if known is None:
        # pooch reuses an existing file when it has no hash to check it against: never trust a leftover
        tarball.unlink(missing_ok=True)
    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)  # its "use this as known_hash" advice does not apply here
    try:
        _retrieve(url, known, fname, downloads, progress, root, entry.kind)
        digest = _files.sha256_file(tarball)
        repin = pinned is not None and digest != pinned
        if repin:
            logger.warning(
                "%s now has sha256 %s, not the %s recorded at its first download; as asked (--force), the new "
                "file replaces the recorded hash in %s once it has unpacked and checked out.",
                url,
                digest,
                pinned,
                root / KNOWN_HASHES_FILE,
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=root))
        try:
            _safe_extract(tarball, tmp, folder_name, progress, entry.max_unpacked)
            unpacked = tmp / folder_name
            if not unpacked.is_dir():
                raise ValueError(f"{fname} did not unpack to a folder named {folder_name!r}.")
            _check_unpacked(entry, unpacked, fname)
            digests, stamps = _hash_tree(unpacked)
            manifest = {
                "source": url,
                "tarball_sha256": digest,
                "files": digests,
                "verified": {rel: {"stamp": stamps[rel], "sha256": digests[rel]} for rel in digests},
            }
            if pinned is None or repin:  # only a download that unpacked cleanly is recorded
                _record_hash(root, fname, digest)
            if folder.exists():
                shutil.rmtree(folder)
            # the record first: a folder is cached only with its record beside it, so an interruption between
            # the two steps leaves a record without a folder (not cached), never a folder without its record
            write_json_atomic(manifest_path(folder), manifest)
            os.replace(unpacked, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        pooch_logger.setLevel(level)
        # the folder is what is used (its hashes are recorded); a tarball that failed must not be reused
        tarball.unlink(missing_ok=True)


def open_record(folder: Path) -> VerificationRecord | None:
    """The manifest of a downloaded folder as a :class:`~transcriptformer._files.VerificationRecord` (or None)."""
    return _open_manifest(folder) if manifest_path(folder).is_file() else None


def save_record(folder: Path, record: VerificationRecord) -> None:
    """Save what a load learned (stamps, finite weights) into the manifest, unless the folder was replaced since.

    Taken under the download lock and merged into the manifest as it is now, so that a concurrent
    ``--force`` download is never overwritten with the old hashes.
    """
    if not record.dirty:
        return
    root = folder.parent
    try:
        # never wait long: a download of this folder may hold the lock (then what we learned is moot anyway)
        with _lock(root, folder.name).acquire(timeout=2):
            current = _open_manifest(folder)
            if current.data.get("files") != record.data.get("files"):
                return  # downloaded again meanwhile: what we learned is about the old files
            current.data["verified"].update(record.data["verified"])
            current.data["finite"].update(record.data["finite"])
            current.dirty = True
            current.save()
            record.dirty = False
    except (OSError, ValueError) as e:  # a read-only shared cache, or a download under way: hash again next time
        logger.info("could not update %s (%s)", manifest_path(folder), e)


def verify_checkpoint(
    folder: str | os.PathLike, files: Iterable[str] | None = None, *, record: VerificationRecord | None = None
) -> dict[str, str]:
    """Check the files of a downloaded folder against the sha256 recorded when it was unpacked.

    A file whose size, modification time, inode and change time equal those recorded when it was last
    verified is not read again; any other is hashed (and the new stamp recorded in the manifest).

    Parameters
    ----------
    folder
        The unpacked folder.
    files
        Relative paths to check (default: every file recorded at download).
    record
        The manifest, already open (the caller then saves it).

    Returns
    -------
    dict[str, str]
        The verified files' sha256 by relative path (empty for a folder that was not downloaded).

    Raises
    ------
    ValueError
        A file is missing or differs, or the manifest is damaged; the message names it and how to recover.

    """
    folder = Path(folder)
    own = record is None
    if own:
        if not manifest_path(folder).is_file():
            return {}
        record = _open_manifest(folder)
    assert record is not None  # given, or just opened
    recorded = record.data["files"]
    hint = _redownload_hint(folder)
    checked = {}
    for rel in files if files is not None else recorded:
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"cached file {path} is missing. {hint}")
        if rel not in recorded:
            raise ValueError(f"{path} is not among the files recorded when {folder.name} was downloaded. {hint}")
        stamp = file_stamp(path)
        digest = record.known_digest(rel, stamp)
        if digest is None:
            digest = _files.sha256_file(path)
            if digest == recorded[rel]:
                record.set_digest(rel, stamp, digest)
        if digest != recorded[rel]:
            raise ValueError(
                f"cached file {path} is corrupted: sha256 {digest[:16]}... differs from {recorded[rel][:16]}... "
                f"recorded at download. {hint}"
            )
        checked[rel] = digest
    if own:
        save_record(folder, record)
    return checked


def species_table(species: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The gene table of ``species`` (e.g. ``"mus_musculus"``) from the ``all-embeddings`` download."""
    folder = fetch("all-embeddings", cache_dir=cache_dir, progress=progress)
    have = sorted(p.name.removesuffix("_gene.h5") for p in folder.glob("*_gene.h5"))
    key = species.strip().lower().replace(" ", "_")
    if key not in have:  # also keeps names such as "../x" from reaching files outside the folder
        raise KeyError(f"no gene table for species {species!r}; available: {', '.join(have)}.")
    path = folder / f"{key}_gene.h5"
    verify_checkpoint(folder, [path.name])
    return path


def species_tables(
    species_embedding: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Gene-table files from paths and/or species names (``"mus_musculus"`` -> the ``all-embeddings`` table).

    An existing file always wins over a species name of the same spelling.
    """
    items = [species_embedding] if isinstance(species_embedding, str | os.PathLike) else list(species_embedding)
    if not items:
        raise ValueError("species_embedding is empty; pass gene-table files or species names.")
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            raise ValueError(f"species_embedding: {str(item)!r} is a folder; pass gene-table files (.h5).")
        if path.is_file():
            paths.append(path)
        elif path.suffix in (".h5", ".hdf5") or os.sep in str(item) or "/" in str(item):
            raise FileNotFoundError(f"gene table {str(item)!r} does not exist.")
        else:
            paths.append(species_table(str(item), cache_dir=cache_dir))
    return paths


def available(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """What the registry offers and what is already in the cache.

    Returns
    -------
    pandas.DataFrame
        One row per name: ``description``, ``url``, ``cached`` (bool), ``path`` (the folder, if cached).

    """
    import pandas as pd

    root = cache_path(cache_dir)
    url = base_url()
    rows = []
    for e in ENTRIES:
        if e.bundled is not None:
            path, cached = bundled_path(e), True
        elif e.kind == "dataset":
            path = root / e.folder / e.file
            cached = path.is_file()
        else:
            path = root / e.folder
            cached = _is_cached(path)
        rows.append(
            {
                "name": e.name,
                "kind": e.kind,
                "description": e.description,
                "url": e.source_url(url),
                "sha256": e.sha256,
                "cached": cached,
                "path": str(path) if cached else None,
            }
        )
    return pd.DataFrame(rows).set_index("name")
