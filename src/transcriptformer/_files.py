"""Files: hashing (once per change of a file), JSON read and written atomically, and the cache folder.

A file's *stamp* is its size, modification time, inode and change time (``st_ctime``, which no
user command can set back). :class:`VerificationRecord` keeps, in a small JSON file, the sha256
each file had at a given stamp: a later load whose stamp is unchanged reuses the digest instead of
reading the file again; any change of the file (rewritten, replaced, touched, copied over) changes
the stamp and the file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "VerificationRecord",
    "cache_path",
    "file_stamp",
    "give_default_mode",
    "read_json",
    "same_file",
    "sha256_file",
    "write_json_atomic",
]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else ``$TRANSCRIPTFORMER_CACHE``, else the user cache of "transcriptformer"."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TRANSCRIPTFORMER_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs  # what pooch.os_cache uses (a dependency of pooch); lazily: start-up time
    except ImportError:  # pragma: no cover - platformdirs comes with pooch
        return Path.home() / ".cache" / "transcriptformer"
    return Path(platformdirs.user_cache_dir("transcriptformer"))


def file_stamp(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns, inode, ctime_ns]`` of ``path`` (symlinks followed)."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_ctime_ns)]


def read_json(path: Path, what: str, fix: str) -> Any:
    """Parse a JSON file, or raise a one-line ``ValueError`` naming the file, what it is and ``fix``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise ValueError(f"{path} ({what}) is a folder, not a file. {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e})"
        raise ValueError(f"{path} ({what}) is {reason}. {fix}") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file or folder.

    The same inode (links, other spellings), or the same resolved path when one does not exist yet.
    """
    a, b = Path(a).expanduser(), Path(b).expanduser()
    return (a.exists() and b.exists() and os.path.samefile(a, b)) or a.resolve() == b.resolve()


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no other way to read it; meanwhile, the most restrictive value
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` (a folder: ``os.mkdir``) would give it.

    That is ``0o666 & ~umask`` (a folder: ``0o777 & ~umask``). For files that :func:`tempfile.mkstemp` or a
    library (safetensors) creates owner-only (mode 0600), before they are renamed into place, and for folders
    copied with another folder's modes: what others could read had it been written directly stays readable.
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True, default: Any = None) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written).

    The file gets the permissions a plain ``open(path, "w")`` would give (not mkstemp's owner-only 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1, sort_keys=sort_keys, default=default))
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_stamp(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) for v in value)


class VerificationRecord:
    """What is known about the files of one folder, by stamp: their sha256, and whether weights are finite.

    The record is a JSON object with ``"verified": {relative path: {"stamp": [...], "sha256": "..."}}`` and
    ``"finite": {relative path: stamp}`` (weights files whose tensors were all found finite at that stamp),
    next to whatever else the file holds (the registry's manifest keeps its recorded hashes in the same file).
    Saving is best effort: a read-only cache only means hashing again next time.

    Parameters
    ----------
    path
        The JSON file (need not exist yet).
    data
        Its content.
    """

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self.dirty = False
        if not isinstance(self.data.get("verified"), dict):
            self.data["verified"] = {}
        if not isinstance(self.data.get("finite"), dict):
            self.data["finite"] = {}

    @classmethod
    def open(cls, path: Path, *, strict: bool, what: str = "", fix: str = "") -> VerificationRecord:
        """Read ``path``; an unreadable file is an error when ``strict``, else an empty record (rewritten later)."""
        if not path.exists():
            return cls(path, {})
        try:
            data = read_json(path, what or "verification record", fix)
            if not isinstance(data, dict):
                raise ValueError(f"{path} ({what or 'verification record'}) must hold a JSON object. {fix}")
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(str(e)) from None
            logger.info("ignoring the unreadable record %s (%s); it will be rewritten", path, e)
            return cls(path, {})
        return cls(path, data)

    def known_digest(self, rel: str, stamp: list[int]) -> str | None:
        """The sha256 recorded for ``rel`` at exactly this stamp, else ``None``."""
        entry = self.data["verified"].get(rel)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        return None

    def digest(self, folder: Path, rel: str) -> tuple[str, bool]:
        """``(sha256, hashed)`` of ``folder / rel``: from the record if the stamp is unchanged, else computed.

        ``hashed`` says whether the file was read. The result is recorded (saved by :meth:`save`).
        """
        path = folder / rel
        stamp = file_stamp(path)
        known = self.known_digest(rel, stamp)
        if known is not None:
            return known, False
        digest = sha256_file(path)
        self.set_digest(rel, stamp, digest)
        return digest, True

    def set_digest(self, rel: str, stamp: list[int], digest: str) -> None:
        """Record that ``rel`` had ``digest`` at ``stamp``."""
        self.data["verified"][rel] = {"stamp": stamp, "sha256": digest}
        self.dirty = True

    def is_finite(self, rel: str, stamp: list[int]) -> bool:
        """Whether ``rel`` was found to hold only finite weights at exactly this stamp."""
        value = self.data["finite"].get(rel)
        return _is_stamp(value) and value == stamp

    def set_finite(self, rel: str, stamp: list[int]) -> None:
        """Record that ``rel`` held only finite weights at ``stamp``."""
        self.data["finite"][rel] = stamp
        self.dirty = True

    def save(self) -> None:
        """Write the record if it changed; a failure (read-only cache, full disk) is logged, not raised."""
        if not self.dirty:
            return
        try:
            write_json_atomic(self.path, self.data)
            self.dirty = False
        except OSError as e:
            logger.info("could not save %s (%s); the files will be hashed again next time", self.path, e)
