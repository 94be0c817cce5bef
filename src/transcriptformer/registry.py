"""The published weights: where they are, how they are downloaded, cached and verified.

Each name maps to a tarball that unpacks to one folder (``tf_sapiens/``, ...). Downloads go
through :mod:`pooch` into the cache (``$TRANSCRIPTFORMER_CACHE``, or the user cache folder),
a temporary name first, so an interrupted download never counts as cached. The tarball is
unpacked into a temporary folder with the ``data`` extraction filter (no absolute paths, no
``..``, no links leaving the folder, no devices), then moved into place.

Integrity: the weights' publisher gives no checksums. Where :data:`REGISTRY` carries none, the
first successful download records the tarball's sha256 (``known_hashes.json`` in the cache)
and the sha256 of every extracted file (``<folder>.sha256.json`` beside the folder); later
downloads must reproduce the tarball's hash and every load of a cached checkpoint re-verifies
its files. A mismatch is an error naming the file and how to recover.

Environment variables: ``TRANSCRIPTFORMER_CACHE`` (cache folder), ``TRANSCRIPTFORMER_BASE_URL``
(a mirror serving the same file names).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pooch
import requests
from filelock import FileLock

from ._hash import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_URL",
    "ENTRIES",
    "MODEL_NAMES",
    "REGISTRY",
    "DownloadError",
    "Entry",
    "available",
    "cache_path",
    "canonical_name",
    "fetch",
    "is_registered",
    "species_table",
    "species_tables",
    "verify_checkpoint",
]

#: Where the published tarballs live.
BASE_URL = "https://czi-transcriptformer.s3.amazonaws.com/weights/"


@dataclass(frozen=True)
class Entry:
    """One downloadable item of the registry.

    Attributes
    ----------
    name
        Registry name (``"tf-sapiens"``); ``_`` and case are ignored when looking it up.
    kind
        ``"model"`` (a checkpoint folder, usable as ``model=``) or ``"tables"`` (gene tables).
    file
        File name under the base URL (``$TRANSCRIPTFORMER_BASE_URL`` or :data:`BASE_URL`).
    folder
        The folder the tarball unpacks to.
    sha256
        sha256 of the file, or ``None`` where the publisher gives none (then the first download is recorded
        and later ones must match it: trust on first use).
    size
        Size in bytes, or ``None`` where unknown.
    description
        One line for listings.
    """

    name: str
    kind: Literal["model", "tables"]
    file: str
    folder: str
    sha256: str | None
    size: int | None
    description: str


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
    ),
    Entry(
        "tf-exemplar",
        "model",
        "tf_exemplar.tar.gz",
        "tf_exemplar",
        None,
        None,
        "TF-Exemplar: 5 species (human, mouse, zebrafish, fly, worm)",
    ),
    Entry(
        "tf-metazoa",
        "model",
        "tf_metazoa.tar.gz",
        "tf_metazoa",
        None,
        None,
        "TF-Metazoa: 12 species",
    ),
    Entry(
        "all-embeddings",
        "tables",
        "all_embeddings.tar.gz",
        "all_embeddings",
        None,
        None,
        "ESM2 gene tables of 24 species, for out-of-distribution species",
    ),
)

#: Registry name -> entry.
REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}

#: Names usable as ``model=``.
MODEL_NAMES: tuple[str, ...] = tuple(e.name for e in ENTRIES if e.kind == "model")

KNOWN_HASHES_FILE = "known_hashes.json"


class DownloadError(requests.exceptions.RequestException):
    """A download failed (network, server, or cut short); nothing was cached."""


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


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else ``$TRANSCRIPTFORMER_CACHE``, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TRANSCRIPTFORMER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(pooch.os_cache("transcriptformer"))


def base_url(url: str | None = None) -> str:
    """The argument, else ``$TRANSCRIPTFORMER_BASE_URL``, else the publisher's URL; with a trailing slash."""
    url = url or os.environ.get("TRANSCRIPTFORMER_BASE_URL") or BASE_URL
    return url if url.endswith("/") else url + "/"


def _manifest_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.sha256.json"


def _is_cached(folder: Path) -> bool:
    return folder.is_dir() and _manifest_path(folder).is_file()


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _hash_tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _recorded_hash(root: Path, fname: str) -> str | None:
    path = root / KNOWN_HASHES_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(fname)


def _lock(root: Path, name: str) -> FileLock:
    """An inter-process lock in ``<cache>/.locks/`` (the lock files stay, empty)."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".locks" / f"{name}.lock"))


def _record_hash(root: Path, fname: str, digest: str) -> None:
    path = root / KNOWN_HASHES_FILE
    with _lock(root, KNOWN_HASHES_FILE):  # shared by every model's download
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[fname] = digest
        _write_json_atomic(path, data)


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


def _safe_extract(tarball: Path, target: Path, expected_top: str, progress: bool) -> None:
    """Unpack ``tarball`` into ``target`` refusing anything that would land outside ``target/expected_top``.

    Raises
    ------
    ValueError
        A member leaves the folder ("refusing ..."), or the archive is damaged or cut short.

    """
    from tqdm.auto import tqdm

    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, tarball, expected_top)
            for m in tqdm(members, desc=f"extracting {tarball.name}", unit="file", disable=not progress):
                tar.extract(m, target, filter="data")
    except tarfile.FilterError as e:  # our checks should have caught it first
        raise _refuse(tarball, str(e)) from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{tarball.name} is not a complete tar.gz archive ({e}); the download was probably cut short. "
            "Nothing was cached: download it again."
        ) from e


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
        Download and unpack again even if cached.

    Returns
    -------
    pathlib.Path
        The unpacked folder, e.g. ``<cache>/tf_sapiens``.

    """
    entry = REGISTRY[canonical_name(name)]
    root = cache_path(cache_dir)  # the environment is read here, at the entry point
    folder = root / entry.folder
    if _is_cached(folder) and not force:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # one download per cache folder at a time (several torchrun processes may ask at once)
    with _lock(root, entry.folder):
        if _is_cached(folder) and not force:
            return folder
        _download_and_unpack(entry, base_url() + entry.file, root, folder, progress)
    logger.info("%s ready in %s", entry.name, folder)
    return folder


def _download_and_unpack(entry: Entry, url: str, root: Path, folder: Path, progress: bool) -> None:
    folder_name = entry.folder
    fname = entry.file
    logger.info("downloading %s from %s", fname, url)
    downloads = root / ".downloads"
    tarball = downloads / fname
    known = entry.sha256 or _recorded_hash(root, fname)
    if known is None:
        # pooch reuses an existing file when it has no hash to check it against: never trust a leftover
        tarball.unlink(missing_ok=True)
    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)  # its "use this as known_hash" advice does not apply here
    try:
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
            raise DownloadError(
                f"could not download {url} ({reason}). Nothing was cached. Check the connection and retry, "
                f"point TRANSCRIPTFORMER_BASE_URL at a mirror, or fetch {fname} on a machine that can reach it, "
                "unpack it and pass the folder itself (model=<folder> / --checkpoint-path <folder>)."
            ) from e
        except ValueError as e:
            if "hash" in str(e).lower():
                raise ValueError(
                    f"the downloaded {fname} does not match the sha256 recorded for it ({known}). The file at "
                    f"{url} changed or the download was corrupted. Retry; if the publisher really replaced it, "
                    f"delete {root / KNOWN_HASHES_FILE} (or its {fname!r} entry) and download again."
                ) from None
            raise
        digest = sha256_file(tarball)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=root))
        try:
            _safe_extract(tarball, tmp, folder_name, progress)
            unpacked = tmp / folder_name
            if not unpacked.is_dir():
                raise ValueError(f"{fname} did not unpack to a folder named {folder_name!r}.")
            manifest = {"source": url, "tarball_sha256": digest, "files": _hash_tree(unpacked)}
            if known is None:  # only a download that unpacked cleanly is recorded
                _record_hash(root, fname, digest)
            if folder.exists():
                shutil.rmtree(folder)
            _manifest_path(folder).unlink(missing_ok=True)
            os.replace(unpacked, folder)
            _write_json_atomic(_manifest_path(folder), manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        pooch_logger.setLevel(level)
        # the folder is what is used (its hashes are recorded); a tarball that failed must not be reused
        tarball.unlink(missing_ok=True)


def verify_checkpoint(folder: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, str]:
    """Check the files of a downloaded folder against the sha256 recorded when it was unpacked.

    Returns
    -------
    dict[str, str]
        The verified files' sha256 by relative path (empty for a folder that was not downloaded).

    Raises
    ------
    ValueError
        A file is missing or differs; the message names it and how to recover.

    """
    folder = Path(folder)
    manifest_path = _manifest_path(folder)
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest.get("files", {})
    checked = {}
    for rel in files if files is not None else recorded:
        path = folder / rel
        hint = (
            f"Delete {folder} and {manifest_path.name} (or run `transcriptformer download <name> --force`) "
            "to download it again."
        )
        if not path.is_file():
            raise ValueError(f"cached file {path} is missing. {hint}")
        if rel not in recorded:
            raise ValueError(f"{path} is not among the files recorded when {folder.name} was downloaded. {hint}")
        digest = sha256_file(path)
        if digest != recorded[rel]:
            raise ValueError(
                f"cached file {path} is corrupted: sha256 {digest[:16]}... differs from {recorded[rel][:16]}... "
                f"recorded at download. {hint}"
            )
        checked[rel] = digest
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
    """Gene-table files from paths and/or species names (``"mus_musculus"`` -> the ``all-embeddings`` table)."""
    items = [species_embedding] if isinstance(species_embedding, str | os.PathLike) else list(species_embedding)
    if not items:
        raise ValueError("species_embedding is empty; pass gene-table files or species names.")
    paths = []
    for item in items:
        path = Path(item).expanduser()
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
    root = cache_path(cache_dir)
    url = base_url()
    rows = []
    for e in ENTRIES:
        folder = root / e.folder
        cached = _is_cached(folder)
        rows.append(
            {
                "name": e.name,
                "kind": e.kind,
                "description": e.description,
                "url": url + e.file,
                "sha256": e.sha256,
                "cached": cached,
                "path": str(folder) if cached else None,
            }
        )
    return pd.DataFrame(rows).set_index("name")
