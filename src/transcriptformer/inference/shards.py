"""Sharded, resumable runs: results written in shards of consecutive cells as they are computed, then merged.

A run over millions of cells writes its per-cell results into a *shard folder*, one file per shard of
``shard_size`` consecutive cells, as soon as the shard is complete; stopped at any point (Ctrl-C, SIGTERM, SIGKILL,
a lost node), it resumes when the same command is run again, which computes only the missing shards.
:meth:`ShardStore.merge` then streams the shards, one at a time, into one AnnData file (``.h5ad`` or ``.zarr``)
whose rows are the input's cells in input order.

The folder::

    <folder>/manifest.json          what the run is (fingerprint) and what the merged output looks like
    <folder>/cells.h5ad             the output's obs (one row per input cell, in input order), written once
    <folder>/shards/part-000000.npz one file per finished shard (numpy's npz format): the results of cells
                                    [i * shard_size, (i + 1) * shard_size), the rows and the run's digest

Rules:

* **Atomic writes.** Shards (flushed to disk), the manifest and the merged output are written under a temporary
  name and renamed when complete; temporary files of an interrupted run are never read, and removed on resume.
* **Fingerprint.** The manifest records the model (name, sha256 of the weights and adapter, config), every
  option that changes the numbers, the outputs, the input's identity (cells, genes, digests of the cell names,
  of the gene ids and of the first cells' counts) and the shard size; its sha256 (*digest*) is stored in every
  shard. A run whose fingerprint differs from the folder's is refused with the differences named, and so is a
  shard carrying another digest, so results of two runs are never mixed.
* **Resume.** Finished shards are skipped; which shards are missing is decided once (by rank 0 under
  ``torch.distributed``) and the missing ones are split into contiguous blocks over the ranks, so the number of
  processes may differ between the first run and the resumed one.
* **Merge.** Refused while a shard is missing (the message gives the first missing rows). The output is written
  under a temporary name and renamed when complete; the shard folder is removed afterwards unless kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._files import read_json, same_file, write_json_atomic
from .._meta import __version__
from .._progress import PROGRESS_DELAY_S, tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Destination",
    "OutputSpec",
    "ShardStore",
    "check_output_path",
    "digest_of",
    "frame_digest",
    "read_params",
    "shard_folder",
]

FORMAT = "transcriptformer-shards"
VERSION = 1
MANIFEST = "manifest.json"
CELLS_FILE = "cells.h5ad"
SHARD_DIR = "shards"
#: Cells per shard by default: four windows of the engine (16,384 x 2,048 float32 embeddings = 128 MiB).
DEFAULT_SHARD_SIZE = 16384
_PART = re.compile(r"^part-(\d{6,})\.npz$")
_KINDS = ("obsm", "obs", "uns", "uns_frame")


def shard_folder(output: str | os.PathLike) -> Path:
    """Where a resumable run writing ``output`` keeps its shards: beside it, ``<output name>.shards``."""
    path = Path(output).expanduser()
    return path.parent / f"{path.name}.shards"


def check_output_path(output: Any, name: str = "out") -> Path:
    """A merged output's path, checked before any compute: an ``.h5ad`` file or a ``.zarr`` store, writable."""
    if not isinstance(output, str | os.PathLike) or not str(output).strip():
        raise ValueError(f"{name} must be the path of an .h5ad file or a .zarr store, got {output!r}.")
    path = Path(output).expanduser()
    if path.suffix not in (".h5ad", ".zarr"):
        raise ValueError(f"{name}={str(output)!r}: the results are written to an .h5ad file or a .zarr store.")
    if path.suffix == ".h5ad" and path.is_dir():
        raise ValueError(f"{name}={str(output)!r} is an existing folder; pass the path of an .h5ad file.")
    if path.suffix == ".zarr" and path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(output)!r} is an existing file; pass the path of a .zarr store.")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={str(output)!r}: {existing} is not a writable folder; pass another path.")
    return path


def read_params(output: str | os.PathLike, key: str) -> dict[str, Any]:
    """``uns[key]["params"]`` of a merged output (read alone, without the arrays)."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    path = Path(output)
    if path.suffix == ".zarr":
        import zarr

        return dict(read_elem(zarr.open_group(str(path), mode="r")[f"uns/{key}/params"]))
    import h5py

    with h5py.File(path, "r") as h:
        return dict(read_elem(h[f"uns/{key}/params"]))


def digest_of(value: Any) -> str:
    """sha256 of a JSON-able value written canonically (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def frame_digest(values: Iterable[Any] | pd.Index, chunk: int = 1 << 20) -> str:
    """sha256 of a sequence of labels (cell names, gene ids), hashed a million at a time by pandas."""
    index = values if isinstance(values, pd.Index) else pd.Index(list(values))
    h = hashlib.sha256(str(len(index)).encode())
    for start in range(0, len(index), chunk):
        part = index[start : start + chunk]
        h.update(pd.util.hash_pandas_object(part.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Destination:
    """Where one result goes in the merged AnnData.

    ``kind`` is ``"obsm"`` (a matrix; per-cell scalars become one column), ``"obs"`` (a column), ``"uns"``
    (an array at the ``/``-separated path ``name`` under ``uns``) or ``"uns_frame"`` (a one-column DataFrame
    ``uns[name]``, the published ``uns["llh"]``); ``head`` names the result (``"embeddings"``, ``"llh"``,
    ``"n_genes"``, ``"gene_llh"``, ...).
    """

    kind: str
    head: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"destination kind {self.kind!r}; expected one of {_KINDS}.")


@dataclass(frozen=True)
class OutputSpec:
    """What the merged output holds besides ``obs``: where each result goes, and ``uns``.

    ``params_key`` names the ``uns`` entry whose ``"params"`` receives how the shards were computed (devices,
    attention kernels, whether the counts looked raw, the number of shards) at merge time.
    """

    path: str
    destinations: tuple[Destination, ...]
    uns: Mapping[str, Any] = field(default_factory=dict)
    params_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "destinations": [[d.kind, d.head, d.name] for d in self.destinations],
            "uns": _jsonable(self.uns),
            "params_key": self.params_key,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputSpec:
        return cls(
            path=str(data["path"]),
            destinations=tuple(Destination(*d) for d in data["destinations"]),
            uns=data.get("uns") or {},
            params_key=data.get("params_key"),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """The leaves where two fingerprints differ, as ``key: a (this run) vs b (the folder)``."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs)):
            where = f"{path}.{key}" if path else key
            if (key in ours) != (key in theirs):  # a key one fingerprint lacks differs, whatever the other's value
                out.append(f"{where}: {'present' if key in ours else 'absent'} in this run, not in the folder's")
            else:
                out += _differences(ours[key], theirs[key], where)
        return out
    # equal as JSON, types included: 10 and 10.0, True and 1 are different fingerprints (and digests)
    if json.dumps(ours, sort_keys=True, default=str) == json.dumps(theirs, sort_keys=True, default=str):
        return []

    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{path}: {short(ours)} (this run) vs {short(theirs)} (the folder's)"]


class ShardStore:
    """A shard folder: its manifest, the finished shards, writing a shard, and the merge.

    Use :meth:`prepare` to start or resume a run (creates the folder or checks it belongs to the run) and
    :meth:`open` to merge an existing folder.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest

    # -- the manifest ---------------------------------------------------------------------------

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def n_obs(self) -> int:
        return int(self.manifest["n_obs"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_obs // self.shard_size)

    @property
    def output(self) -> OutputSpec:
        return OutputSpec.from_json(self.manifest["output"])

    def bounds(self, index: int) -> tuple[int, int]:
        """Input rows ``[start, stop)`` of shard ``index``."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.n_obs)

    def shard_path(self, index: int) -> Path:
        return self.root / SHARD_DIR / f"part-{index:06d}.npz"

    @staticmethod
    def fingerprint_manifest(
        fingerprint: Mapping[str, Any], *, n_obs: int, shard_size: int, output: OutputSpec, info: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The manifest of a run: ``fingerprint`` (compared on resume) plus what is only informative."""
        fp = _jsonable({**fingerprint, "n_obs": int(n_obs), "shard_size": int(shard_size)})
        return {
            "format": FORMAT,
            "version": VERSION,
            "digest": digest_of(fp),
            "fingerprint": fp,
            "n_obs": int(n_obs),
            "shard_size": int(shard_size),
            "output": output.to_json(),
            "info": _jsonable(dict(info)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "transcriptformer_version": __version__,
        }

    @classmethod
    def open(cls, root: str | os.PathLike) -> ShardStore:
        """An existing shard folder (to merge it, or to see what is missing)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            what = "does not exist" if not root.exists() else f"has no {MANIFEST}"
            raise ValueError(
                f"{root} {what}: it is not the shard folder of a resumable run (transcriptformer inference "
                "--resumable, or tl.embed(..., out=...), write one beside their output)."
            )
        manifest = read_json(path, "the manifest of a sharded run", f"Delete {root} and run again.")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not the manifest of a transcriptformer sharded run.")
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"{path} was written by another version of the shard format ({manifest.get('version')}; this package "
                f"reads {VERSION}): merge it with the transcriptformer version that wrote it "
                f"({manifest.get('transcriptformer_version')}), or delete {root} and run again."
            )
        return cls(root, manifest)

    @classmethod
    def prepare(cls, root: str | os.PathLike, manifest: dict[str, Any], obs: pd.DataFrame) -> ShardStore:
        """Start a run in ``root`` (created), or resume it: the folder's manifest must have the same fingerprint.

        ``obs`` (one row per input cell) is written for the merged output by every call, so the merge has the
        ``obs`` of the call that makes it. Temporary files of an interrupted run are removed and every finished
        shard is checked to belong to this run. A call that fails before its manifest is written leaves no folder.
        """
        root = Path(root)
        if len(obs) != manifest["n_obs"]:
            raise ValueError(f"obs has {len(obs):,} rows for {manifest['n_obs']:,} cells.")
        if root.exists() and not root.is_dir():
            raise ValueError(f"the shard folder {root} is a file; pass another output name or remove it.")
        if (root / MANIFEST).is_file():
            store = cls.open(root)
            diff = _differences(manifest["fingerprint"], store.manifest.get("fingerprint", {}))
            if diff:
                raise ValueError(
                    f"{root} holds the shards of another run, so they cannot be resumed by this one; what differs: "
                    f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. Run with the same model, options and "
                    f"input to resume it, or delete {root} (or choose another output) to start a new run."
                )
            store.manifest["output"] = manifest["output"]  # where to merge may change (same results)
            store._clean_temporary()
            store.finished(verify=True)
            store._write_obs(obs)
            write_json_atomic(root / MANIFEST, store.manifest)
            return store

        def leftover(f: Path) -> bool:  # temporary files and an empty shard folder: what a failed start leaves
            return not (f.name.endswith(".tmp") or (f.name == SHARD_DIR and f.is_dir() and not any(f.iterdir())))

        if root.is_dir() and any(leftover(f) for f in root.iterdir()):
            shards = root / SHARD_DIR
            if (shards.is_dir() and any(_PART.match(f.name) for f in shards.iterdir())) or (root / CELLS_FILE).exists():
                raise ValueError(
                    f"{root} has shard files but no {MANIFEST}, so nothing says which run wrote them: delete {root} "
                    "to start over."
                )
            raise ValueError(f"the shard folder {root} exists and is not empty; pass another output or remove it.")
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, manifest)
        try:
            store._write_obs(obs)
            (root / SHARD_DIR).mkdir(exist_ok=True)
            write_json_atomic(root / MANIFEST, manifest)  # last: a folder with a manifest is complete
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        logger.info("new shard folder %s: %s cells in %d shards", root, f"{store.n_obs:,}", store.n_shards)
        return store

    def _write_obs(self, obs: pd.DataFrame) -> None:
        import anndata as ad

        try:
            with _written_as(self.root / CELLS_FILE) as tmp:
                ad.AnnData(obs=obs).write_h5ad(tmp)
        except (TypeError, ValueError) as e:  # e.g. a column mixing numbers and strings
            raise ValueError(
                f"the cells' obs cannot be written to an h5ad file for the merged output ({type(e).__name__}: {e}); "
                "make such obs columns strings or categories, or drop them, and run again."
            ) from e

    def _clean_temporary(self) -> None:
        for f in [*self.root.glob(".*.tmp"), *(self.root / SHARD_DIR).glob(".*.tmp")]:
            f.unlink(missing_ok=True)

    # -- shards -----------------------------------------------------------------------------------

    def finished(self, *, verify: bool = False) -> list[int]:
        """Indices of the shards written so far; ``verify`` opens each to check it belongs to this run."""
        folder = self.root / SHARD_DIR
        done = []
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            m = _PART.match(f.name)
            if not m:
                continue
            index = int(m.group(1))
            if index >= self.n_shards:
                raise ValueError(
                    f"{f} is shard {index}, but this run has {self.n_shards} shards of {self.shard_size:,} cells: it "
                    f"is not a shard of this run; delete it (or {self.root}, to start over)."
                )
            if verify:
                with self._open_shard(f) as data:
                    self._check(f, index, data)
            done.append(index)
        return done

    def pending(self) -> list[int]:
        """Indices of the shards still to compute."""
        done = set(self.finished())
        return [i for i in range(self.n_shards) if i not in done]

    def write(self, index: int, arrays: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> Path:
        """Write shard ``index`` atomically (temporary file, fsync, rename)."""
        start, stop = self.bounds(index)
        for name, value in arrays.items():
            if len(value) != stop - start:
                raise ValueError(f"shard {index}: {name} has {len(value)} rows for cells [{start}, {stop}).")
        final = self.shard_path(index)
        final.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **{name: np.asarray(value) for name, value in arrays.items()},
            "__rows__": np.array([start, stop], dtype=np.int64),
            "__digest__": np.array(self.digest),
            "__stats__": np.array(json.dumps(_jsonable(dict(stats)), sort_keys=True)),
        }
        with _written_as(final) as tmp, open(tmp, "wb") as f:
            np.savez(f, **payload)  # type: ignore[arg-type]  # numpy's stubs: names as keyword arguments
            f.flush()
            os.fsync(f.fileno())
        return final

    def _open_shard(self, path: Path) -> Any:
        try:
            return np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(
                f"the shard file {path} cannot be read ({type(e).__name__}: {e}); delete it and run the same "
                "command again to compute it anew."
            ) from None

    def _check(self, path: Path, index: int, data: Any) -> None:
        if "__digest__" not in data.files or "__rows__" not in data.files:
            raise ValueError(f"{path} is not a shard of a transcriptformer run; delete it.")
        digest = str(data["__digest__"])
        if digest != self.digest:
            raise ValueError(
                f"the shard file {path} was written by another run (fingerprint {digest[:12]}..., this folder's run "
                f"is {self.digest[:12]}...): its results cannot be mixed with this run's. Delete it (it is computed "
                "again when the run resumes)."
            )
        rows = tuple(int(r) for r in data["__rows__"])
        if rows != self.bounds(index):
            raise ValueError(f"the shard file {path} holds cells {rows}, not {self.bounds(index)}; delete it.")

    def read(self, index: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and stats of shard ``index``, checked to belong to this run and to have its rows."""
        path = self.shard_path(index)
        if not path.is_file():
            raise ValueError(f"shard {index} ({path}) has not been computed.")
        with self._open_shard(path) as data:
            self._check(path, index, data)
            start, stop = self.bounds(index)
            arrays = {k: data[k] for k in data.files if not k.startswith("__")}
            stats = json.loads(str(data["__stats__"]))
        for name, value in arrays.items():
            if len(value) != stop - start:
                raise ValueError(f"the shard file {path} has {len(value)} rows of {name} for {stop - start} cells.")
        return arrays, stats

    # -- merge --------------------------------------------------------------------------------------

    def missing_message(self, pending: Sequence[int]) -> str:
        """What is missing, in rows, and how to compute it."""
        spans = [self.bounds(i) for i in pending[:3]]
        rows = ", ".join(f"[{a:,}, {b:,})" for a, b in spans) + (" ..." if len(pending) > 3 else "")
        return (
            f"{len(pending):,} of {self.n_shards:,} shards of {self.root} are not computed yet (cells {rows}). Run the "
            "same command again to compute them (the finished shards are kept), then merge."
        )

    def merge(
        self, output: str | os.PathLike | None = None, *, keep: bool = False, progress: bool | None = None
    ) -> Path:
        """Assemble the merged AnnData (``.zarr`` folder or ``.h5ad`` file) from every shard, in input order.

        The shards are copied one by one into a temporary output, renamed when complete; ``keep=False`` then
        removes the shard folder.
        """
        import anndata as ad

        pending = self.pending()
        if pending:
            raise ValueError(self.missing_message(pending))
        spec = self.output
        path = Path(output if output is not None else spec.path).expanduser()
        zarr_out = path.suffix == ".zarr"
        self._check_output(path, zarr_out)
        obs = ad.read_h5ad(self.root / CELLS_FILE).obs
        if len(obs) != self.n_obs:
            raise ValueError(f"{self.root / CELLS_FILE} has {len(obs):,} cells for {self.n_obs:,}; delete the folder.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with _written_as(path, _replace) as tmp:
            ad.AnnData(obs=obs).write_zarr(tmp) if zarr_out else ad.AnnData(obs=obs).write_h5ad(tmp)
            with _editing(tmp, zarr_out) as handle:
                small, stats = self._copy_shards(handle, spec, progress)
                self._finish(handle, obs, spec, small, stats)
            if zarr_out:
                import zarr

                zarr.consolidate_metadata(str(tmp))
        logger.info("merged %d shards of %s into %s (%s cells)", self.n_shards, self.root, path, f"{self.n_obs:,}")
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return path

    def _check_output(self, path: Path, zarr_out: bool) -> None:
        """The merge replaces only a file, or a zarr store where a ``.zarr`` is asked for; never the run's input."""
        if path.resolve() == self.root.resolve() or self.root.resolve() in path.resolve().parents:
            raise ValueError(f"the output {path} is inside the shard folder {self.root}; pass another path.")
        is_store = (path / ".zgroup").is_file() or (path / "zarr.json").is_file()
        if path.is_dir() and not (zarr_out and is_store):
            raise ValueError(
                f"the output {path} is an existing folder{' that is not a zarr store' if zarr_out else ''}: the merge "
                "would replace it and everything in it; pass another path (or remove the folder)."
            )
        if zarr_out and path.exists() and not path.is_dir():
            raise ValueError(f"the output {path} is an existing file, not a zarr store; pass another path.")
        info = self.manifest.get("info", {})
        inputs = [info.get("input"), *info.get("inputs", [])]
        for source in (Path(f).expanduser() for f in inputs if isinstance(f, str) and f):
            if same_file(source, path):
                raise ValueError(
                    f"the output {path} is the run's input {source}: writing it would replace the input; pass another "
                    "path."
                )

    def _copy_shards(
        self, handle: Any, spec: OutputSpec, progress: bool | None
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Stream every shard's matrices into the output; return the per-cell values kept for obs/uns, and stats."""
        small: dict[str, np.ndarray] = {}
        stats: list[dict[str, Any]] = []
        datasets: dict[str, Any] = {}
        delay = 0.0 if progress else PROGRESS_DELAY_S
        bar = tqdm(total=self.n_obs, unit="cell", desc="merging shards", delay=delay, disable=progress is False)
        for index in range(self.n_shards):
            arrays, shard_stats = self.read(index)
            stats.append(shard_stats)
            start, stop = self.bounds(index)
            for dest in spec.destinations:
                if dest.head not in arrays:
                    raise ValueError(f"the shards of {self.root} have no {dest.head!r} results.")
                value = arrays[dest.head]
                if dest.kind == "obsm":
                    value = value.reshape(len(value), -1) if value.ndim == 1 else value
                    if dest.name not in datasets:
                        shape = (self.n_obs, *value.shape[1:])
                        datasets[dest.name] = _create_matrix(handle["obsm"], dest.name, shape, value.dtype)
                    datasets[dest.name][start:stop] = value
                else:
                    if dest.head not in small:
                        small[dest.head] = np.empty((self.n_obs, *value.shape[1:]), dtype=value.dtype)
                    small[dest.head][start:stop] = value
            bar.update(stop - start)
        bar.close()
        return small, stats

    def _finish(
        self,
        handle: Any,
        obs: pd.DataFrame,
        spec: OutputSpec,
        small: dict[str, np.ndarray],
        stats: list[dict[str, Any]],
    ) -> None:
        """Write obs (with the per-cell columns) and uns (with the run's record) into the output."""
        try:
            from anndata.io import write_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import write_elem

        obs = obs.copy()
        uns: dict[str, Any] = json.loads(json.dumps(spec.uns))
        for dest in spec.destinations:
            if dest.kind == "obs":
                obs[dest.name] = small[dest.head]
            elif dest.kind == "uns_frame":
                uns[dest.name] = pd.DataFrame({dest.head: small[dest.head]})
            elif dest.kind == "uns":
                *parents, leaf = dest.name.split("/")
                node = uns
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = small[dest.head]
        if spec.params_key is not None:
            params = uns.setdefault(spec.params_key, {}).setdefault("params", {})
            params.update(_summarise(stats, self))
        del handle["obs"]
        write_elem(handle, "obs", obs)
        for key, value in uns.items():
            if key in handle["uns"]:
                del handle["uns"][key]
            write_elem(handle["uns"], key, value)


def _summarise(stats: list[dict[str, Any]], store: ShardStore) -> dict[str, Any]:
    """How the shards were computed, for ``params`` (h5ad-writable values)."""

    def values(key: str) -> list[str]:
        return sorted({str(s[key]) for s in stats if key in s})

    out: dict[str, Any] = {
        "device": ", ".join(values("device")),
        "precision": ", ".join(values("precision")),
        "attention": ", ".join(values("attention")),
        "counts_look_raw": all(bool(s.get("counts_look_raw", True)) for s in stats),
        "max_tokens": min((int(s["max_tokens"]) for s in stats if "max_tokens" in s), default=0),
        "n_shards": store.n_shards,
        "shard_size": store.shard_size,
        "run_digest": store.digest,
    }
    fallbacks = values("attention_fallback")
    if fallbacks:
        out["attention_fallback"] = "; ".join(fallbacks)
    return out


@contextmanager
def _editing(path: Path, zarr_out: bool) -> Iterator[Any]:
    """The store anndata wrote at ``path`` (a zarr group, else an h5py file), opened for editing."""
    if not zarr_out:
        import h5py

        with h5py.File(path, "r+") as handle:
            yield handle
        return
    import zarr

    try:  # its consolidated metadata is rewritten at the end
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    except TypeError:  # zarr 2
        group = zarr.open_group(str(path), mode="r+")
    yield group


def _create_matrix(group: Any, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """An empty array in an h5py or zarr group, with anndata's encoding attributes."""
    rows = max(1, min(shape[0], (1 << 22) // max(1, int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)))
    chunks = (rows, *shape[1:])
    create = getattr(group, "create_array", None)
    if create is not None and not hasattr(group, "id"):  # zarr 3
        array = create(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    else:  # h5py (and zarr 2)
        array = group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)
    array.attrs["encoding-type"] = "array"
    array.attrs["encoding-version"] = "0.2.0"
    return array


@contextmanager
def _written_as(path: Path, rename: Callable[[Path, Path], Any] = os.replace) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` if the block completes, else removed."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        rename(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing folder (zarr) is moved aside first and removed afterwards."""
    if path.is_dir() and not path.is_symlink():
        aside = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
        os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
