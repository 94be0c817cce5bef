"""``transcriptformer inference``: the published command, flags and output layout.

An h5ad with no genes, the input ``obs``, ``obsm['embeddings']``, with likelihoods ``uns['llh']`` (DataFrame)
and ``obsm['llh']``, with ``--emb-type cge`` ``uns['cge_embeddings' | 'cge_cell_indices' | 'cge_gene_names']``.
Unlike the published tool, embeddings and likelihoods can be asked for in one run (``--llh``). Under
``torchrun`` each process embeds a shard and rank 0 writes the file.

Inputs are h5ad files (read backed), zarr stores (read lazily) or a SOMA experiment (``--soma-uri`` with
``--obs-filter``, ``--measurement``, ``--soma-layer``, ``--var-id``; read window by window). With ``--resumable``
the per-cell results are written in shards beside the output as they are computed (``<output>.shards/``): an
interrupted run resumes with the same command, and the shards are merged into the output at the end
(``transcriptformer merge`` does it by hand).

Everything that can be checked without the model is checked before it is loaded: every option and
``--config-override`` value (by type and range, with the same rules as the Python API), the output location
(writable, not a folder, not one of the inputs), the ``--pretrained-embedding`` tables and every input (h5ad,
with cells; the matrix of counts, unique gene ids; an ``obs`` that can be written with the others'). Errors
about an input name it. The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import same_file
from ..config import ATTENTION_BACKENDS, DEVICES, PRECISION_ALIASES, PRECISIONS, TranscriptFormerConfig
from ._common import (
    GENE_COL_HELP,
    CLIError,
    _as_bool,
    _as_choice,
    _as_number,
    _as_positive_int,
    _as_text,
    _as_text_or_none,
    _as_use_raw,
    _parse_value,
    add_counts_flags,
    counts_options,
    gene_column,
    init_distributed,
    temporary_beside,
    write_atomic,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

logger = logging.getLogger("transcriptformer")

__all__ = ["add_parser", "run"]


# config overrides that change nothing here (the published runtime's own knobs)
_NO_EFFECT = {
    "model.model_config.compile_block_mask",
    "model.model_config.block_len",
    "model.model_config.aux_len",
    "model.model_config.dropout",
    "model.model_config.use_aux",
    "model.data_config.n_data_workers",
    "model.data_config.pin_memory",
    "model.data_config.aux_pad_token",
    "model.data_config.aux_vocab_path",
    "model.data_config.esm2_mappings_path",
    "model.inference_config.num_gpus",
    "model.inference_config.oom_dataloader",
    "model.inference_config.load_checkpoint",
    "model.checkpoint_path",
    "model.model_type",
}
# data_config options of the published pipeline that we implement only at their defaults
_DEFAULT_ONLY = {
    "sort_genes": False,
    "randomize_genes": False,
    "filter_outliers": 0,
    "min_expressed_genes": 0,
}


_OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "model.inference_config.batch_size": ("batch_size", _as_positive_int),
    "model.inference_config.precision": ("precision", _as_choice(*PRECISIONS, *PRECISION_ALIASES)),
    "model.inference_config.emb_type": ("emb_type", _as_choice("cell", "cge")),
    "model.inference_config.output_path": ("output_path", _as_text),
    "model.inference_config.output_filename": ("output_filename", _as_text),
    "model.inference_config.device": ("device", _as_choice(*DEVICES)),
    "model.inference_config.pretrained_embedding": ("pretrained_embedding", _as_text_or_none),
    "model.data_config.gene_col_name": ("gene_col_name", gene_column),
    "model.data_config.clip_counts": ("clip_counts", _as_number(0.0)),
    "model.data_config.filter_to_vocabs": ("filter_to_vocabs", _as_bool),
    "model.data_config.normalize_to_scale": ("normalize_to_scale", _as_number(0.0, zero_ok=True)),
    "model.data_config.use_raw": ("use_raw", _as_use_raw),
    "model.data_config.remove_duplicate_genes": ("remove_duplicate_genes", _as_bool),
}
# data_config options of the published pipeline implemented only at their defaults, and their parsers
_DEFAULT_ONLY_PARSERS: dict[str, Callable[[str], Any]] = {
    "sort_genes": _as_bool,
    "randomize_genes": _as_bool,
    "filter_outliers": _as_number(0.0, zero_ok=True),
    "min_expressed_genes": _as_number(0.0, zero_ok=True),
}
_OUTPUT_KEYS = ("embeddings", "llh", "gene_llh")


def add_parser(sub: Any) -> None:
    """Add ``inference`` to the sub-commands."""
    inf = sub.add_parser(
        "inference",
        help="embed cells of an h5ad file",
        description="Run a TranscriptFormer model on h5ad files and write the published output layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inf.add_argument("--checkpoint-path", required=True, help="checkpoint folder, or a name such as tf-sapiens")
    inf.add_argument(
        "--data-file",
        nargs="+",
        default=None,
        help="input h5ad file(s) or zarr store(s); several are concatenated (or use --soma-uri)",
    )
    inf.add_argument("--output-path", default="./inference_results", help="output folder")
    inf.add_argument("--output-filename", default="embeddings.h5ad", help="output file name")
    inf.add_argument(
        "--batch-size", type=int, default=None, help="most cells per batch; unset: limited by --max-tokens"
    )
    inf.add_argument("--max-tokens", type=int, default=None, help="token budget per batch")
    inf.add_argument("--gene-col-name", type=gene_column, default="ensembl_id", help=GENE_COL_HELP)
    inf.add_argument(
        "--precision",
        default="auto",
        choices=[*PRECISIONS, *PRECISION_ALIASES],
        help="auto: float32 on CPU, bf16 autocast on CUDA",
    )
    inf.add_argument(
        "--pretrained-embedding",
        nargs="+",
        default=None,
        metavar="H5",
        help="gene tables (or species names) for out-of-distribution species",
    )
    inf.add_argument("--clip-counts", type=float, default=30, help="clip counts to this value")
    inf.add_argument(
        "--filter-to-vocabs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop genes outside the vocabulary",
    )
    add_counts_flags(inf)
    inf.add_argument("--emb-type", choices=["cell", "cge"], default="cell", help="cell or contextual gene embeddings")
    inf.add_argument("--device", choices=DEVICES, default="auto", help="where to run")
    inf.add_argument("--llh", action="store_true", help="also write the per-cell likelihood")
    inf.add_argument("--gene-llh", action="store_true", help="also write per-position gene-identity likelihoods")
    inf.add_argument(
        "--config-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="published config keys, e.g. model.data_config.normalize_to_scale=10000 (repeatable)",
    )
    inf.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help=argparse.SUPPRESS)
    for flag in ("--oom-dataloader", "--disable-compile-block-mask"):
        inf.add_argument(flag, action="store_true", help="accepted for compatibility; no effect")
    inf.add_argument(
        "--num-gpus", type=int, default=None, help="accepted for compatibility; use torchrun for several GPUs"
    )
    inf.add_argument(
        "--n-data-workers",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="accepted for compatibility and recorded in the output's params; no effect (a background thread "
        "reads and tokenises the next window of cells while the model runs, and keeps up with it)",
    )
    inf.add_argument("--model-type", choices=["transcriptformer"], default="transcriptformer", help="model type")
    inf.add_argument("--no-progress", action="store_true", help="no progress bar")
    inf.add_argument("--adapter", default=None, help="a LoRA adapter folder (from `transcriptformer finetune`)")
    inf.add_argument(
        "--published-index",
        action="store_true",
        help="index the output cells '0'..'N-1' as the published tool does (default: the input's cell names)",
    )
    inf.add_argument(
        "--stream-output",
        action="store_true",
        help="write embeddings to the output file window by window (automatic above 2 GiB of embeddings)",
    )
    atlas = inf.add_argument_group("SOMA experiments (e.g. the CELLxGENE Census) and resumable runs")
    atlas.add_argument("--soma-uri", default=None, help="read the cells of this SOMA experiment instead of --data-file")
    atlas.add_argument(
        "--obs-filter",
        default=None,
        metavar="EXPR",
        help="SOMA value filter of cells, e.g. \"tissue == 'lung'\"",
    )
    atlas.add_argument("--measurement", default="RNA", help="the SOMA measurement with the counts")
    atlas.add_argument("--soma-layer", default="raw", help="the measurement's X layer of raw counts")
    atlas.add_argument("--var-id", default="feature_id", help="the measurement's var column with Ensembl gene ids")
    atlas.add_argument(
        "--obs-columns",
        nargs="+",
        default=None,
        metavar="COL",
        help="SOMA obs columns to read and write; unset: assay, when the experiment has it",
    )
    atlas.add_argument(
        "--resumable",
        action="store_true",
        help="write results in shards beside the output (<output>.shards/) as they are computed; the same command "
        "resumes an interrupted run; merged into the output at the end",
    )
    atlas.add_argument("--shard-size", type=int, default=16384, help="cells per shard with --resumable")
    atlas.add_argument("--keep-shards", action="store_true", help="keep the shard folder after the merge")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


#: The published tool's flags accepted without effect here, and why (logged with -v when given).
_COMPAT_FLAGS = {
    "oom_dataloader": "--oom-dataloader: backed files are always read window by window",
    "disable_compile_block_mask": "--disable-compile-block-mask: no block mask is compiled here",
    "num_gpus": "--num-gpus: one process per GPU runs under torchrun (--nproc-per-node N)",
    "n_data_workers": "--n-data-workers: one background thread reads ahead of the model",
}


def _log_compat_flags(args: argparse.Namespace) -> None:
    for dest, why in _COMPAT_FLAGS.items():
        if getattr(args, dest, None) not in (None, False):
            logger.info("%s (accepted for compatibility; no effect)", why)


def _apply_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Fold ``--config-override`` items into ``args``; return the model-config overrides.

    Every value is parsed strictly by the type of its key (booleans: true/false/1/0/yes/no; numbers finite;
    choices from their list), and every error names the key as written.
    """
    model_overrides: dict[str, Any] = {}
    args.output_keys = ["embeddings"]
    args.obs_keys = ["all"]
    args.normalize_to_scale = None
    for item in args.config_override:
        if "=" not in item:
            raise CLIError(f"--config-override {item!r}: expected KEY=VALUE.")
        key, text = item.split("=", 1)
        key = key.strip()
        full = key if key.startswith("model.") else f"model.{key}"
        parts = full.split(".")
        if full in _NO_EFFECT:
            logger.info("config override %s has no effect here", key)
            continue
        section = parts[1] if len(parts) > 2 else ""
        name = parts[2] if len(parts) > 2 else ""
        try:
            if full in _OVERRIDES:
                attr, parse = _OVERRIDES[full]
                value = parse(text)
                if attr == "pretrained_embedding":
                    value = None if value is None else [value]
                setattr(args, attr, value)
            elif section == "inference_config" and name in ("output_keys", "obs_keys"):
                if len(parts) != 4 or not parts[3].isdigit():
                    raise CLIError(
                        f"--config-override {key}: lists are set one item at a time, e.g. "
                        f"model.inference_config.{name}.0=..."
                    )
                value = _as_choice(*_OUTPUT_KEYS)(text) if name == "output_keys" else _as_text(text)
                target = getattr(args, name)
                i = int(parts[3])
                if i > len(target):
                    raise CLIError(f"--config-override {key}: index {i} is past the end of {target}.")
                target[i : i + 1] = [value]
            elif section == "data_config" and name in _DEFAULT_ONLY and len(parts) == 3:
                value = _DEFAULT_ONLY_PARSERS[name](text)
                if value not in (None, _DEFAULT_ONLY[name]):
                    raise CLIError(
                        f"--config-override {key}={text}: only the default ({_DEFAULT_ONLY[name]}) is supported."
                    )
            elif section in ("model_config", "data_config", "loss_config") and len(parts) == 3:
                model_overrides[key] = _parse_value(text)  # the key as written, for the messages
            else:
                raise CLIError(f"--config-override {key}: unknown configuration key.")
        except ValueError as e:
            raise CLIError(f"--config-override {key}={text}: {e}.") from None
    if model_overrides:
        try:  # names, types and choices now; rules between values once combined with the checkpoint's config
            TranscriptFormerConfig.parse_overrides(model_overrides)
        except ValueError as e:
            raise CLIError(f"--config-override: {str(e).replace('config.json: ', '')}") from None
    return model_overrides


def _load(checkpoint: str, overrides: dict[str, Any], adapter: str | None = None):
    from ..weights.checkpoint import build_model, load_model  # lazily: start-up time

    loaded = load_model(checkpoint)
    if overrides:
        assert loaded.path is not None  # loaded from a checkpoint folder
        config = loaded.config.with_overrides(overrides)
        loaded = build_model(loaded.path, name=loaded.name, config=config, weights_sha256=loaded.weights_sha256)
    return load_model(loaded, adapter=adapter) if adapter else loaded


_OPTION_FLAGS = {
    "gene_key": "--gene-col-name",
    "clip_counts": "--clip-counts",
    "normalize_to_scale": "normalize_to_scale (--config-override)",
    "filter_to_vocab": "--filter-to-vocabs",
    "batch_size": "--batch-size",
    "max_tokens": "--max-tokens",
    "device": "--device",
    "precision": "--precision",
    "species_embedding": "--pretrained-embedding",
}


def _run_options(args: argparse.Namespace, device: str):
    """The run options, validated by the same rules as the Python API (before any model is loaded)."""
    from ..inference.options import RunOptions  # lazily: numpy and pandas (start-up time)

    try:
        return RunOptions(
            gene_key=args.gene_col_name,
            **counts_options(args),
            clip_counts=args.clip_counts,
            normalize_to_scale=args.normalize_to_scale or None,
            filter_to_vocab=args.filter_to_vocabs,
            species_embedding=args.pretrained_embedding,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            device=device,
            precision=args.precision,
            progress=False if args.no_progress else None,
        )
    except ValueError as e:
        match = re.match(r"^(\w+)", str(e))
        flag = _OPTION_FLAGS.get(match.group(1)) if match else None
        raise CLIError(f"{flag}: {e}" if flag else str(e)) from None


def _output_file(args: argparse.Namespace) -> Path:
    """The output file, checked before any compute: a writable place, not a folder, not one of the inputs."""
    name = args.output_filename
    if not isinstance(name, str) or not name.strip():
        raise CLIError("--output-filename is empty; pass a file name such as embeddings.h5ad.")
    if name.endswith(("/", os.sep)):
        raise CLIError(f"--output-filename {name!r} names a folder; pass a file name such as embeddings.h5ad.")
    path = Path(args.output_path).expanduser() / name
    if path.is_dir():
        raise CLIError(f"the output {path} is an existing folder; pass --output-filename <file name>.")
    for f in args.data_file or []:
        if same_file(f, path):
            raise CLIError(
                f"the output {path} is the input file {f}: writing it would replace the input. Pass another "
                "--output-path or --output-filename."
            )
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot create the output folder {folder}: {existing} is a file. Pass another --output-path.")
    if existing == folder:
        try:  # the only reliable test (permissions, ACLs, read-only file systems, quotas)
            fd, probe = tempfile.mkstemp(prefix=".transcriptformer-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CLIError(
                f"cannot write to the output folder {folder} ({e.strerror or e}); pass a writable --output-path."
            ) from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(
            f"cannot create the output folder {folder}: {existing} is not writable; pass a writable --output-path."
        )
    return path


def _count_zarr(path: str) -> int:
    """Cells in a zarr store of anndata's layout (from its ``obs`` index)."""
    import zarr

    try:
        root: Any = zarr.open_group(path, mode="r")
        obs = root["obs"]
        index = str(obs.attrs.get("_index", "_index"))
        return int(obs[index].shape[0])
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise CLIError(
            f"data file {path!r} is a folder but not an AnnData zarr store ({type(e).__name__}: {e}); pass an .h5ad "
            "file or a store written by AnnData.write_zarr."
        ) from None


def _count_cells(path: str) -> int:
    """Cells in an h5ad file or zarr store, read from its ``obs`` without loading it; fix-it errors otherwise."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise CLIError(f"data file {path!r} does not exist.")
    if p.is_dir():
        if (p / ".zattrs").exists() or (p / "zarr.json").exists():
            return _count_zarr(path)
        raise CLIError(f"data file {path!r} is a folder; pass an .h5ad file or an AnnData zarr store.")
    try:
        if not h5py.is_hdf5(p):
            raise CLIError(
                f"data file {path!r} is not an h5ad file (not HDF5). Convert it with anndata first, e.g. "
                "anndata.read_csv(...).write_h5ad('data.h5ad')."
            )
        with h5py.File(p, "r") as h:
            if "obs" not in h or ("X" not in h and "raw" not in h):
                raise CLIError(f"data file {path!r} is an HDF5 file but not an AnnData (.h5ad): it has no obs or X.")
            obs = h["obs"]
            if isinstance(obs, h5py.Dataset):  # the old layout: a record array
                return int(obs.shape[0])
            index = obs.attrs.get("_index", "_index")
            if index in obs:
                return int(obs[index].shape[0])
            x = h["X"] if "X" in h else h["raw"]["X"]
            shape = x.attrs.get("shape", getattr(x, "shape", None))
            return int(shape[0]) if shape is not None else 0
    except OSError as e:
        raise CLIError(f"data file {path!r} cannot be read ({e}).") from None


def _open_input(path: str, args: argparse.Namespace):
    """The cells of one input, read lazily: an h5ad file (backed), a zarr store or the SOMA experiment."""
    import anndata as ad

    if path == getattr(args, "soma_uri", None):
        return _soma(args)
    if Path(path).is_dir():
        try:
            return ad.experimental.read_lazy(path)
        except ImportError as e:
            raise CLIError(
                f"reading the zarr store {path} lazily needs {e}: pip install 'transcriptformer-scanpy[lazy]'."
            ) from None
    return ad.read_h5ad(path, backed="r")


def _soma(args: argparse.Namespace):
    """The SOMA experiment's selected cells (opened once per command)."""
    cached = getattr(args, "_soma_adata", None)
    if cached is not None:
        return cached
    from ..data.soma import read_soma

    adata = read_soma(
        args.soma_uri,
        obs_filter=args.obs_filter,
        measurement=args.measurement,
        layer=args.soma_layer,
        obs_columns=args.obs_columns,
        var_id=args.var_id,
    )
    args._soma_adata = adata
    return adata


def _inputs(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The inputs (files, or the SOMA URI) and their numbers of cells, checked before the model is loaded."""
    if args.soma_uri is not None and args.data_file:
        raise CLIError("pass either --data-file or --soma-uri, not both.")
    if args.soma_uri is None:
        if not args.data_file:
            raise CLIError("pass the cells: --data-file <h5ad files or zarr stores> or --soma-uri <SOMA experiment>.")
        soma_only = [f for f, v in (("--obs-filter", args.obs_filter), ("--obs-columns", args.obs_columns)) if v]
        if soma_only:
            raise CLIError(f"{', '.join(soma_only)} select cells of a SOMA experiment: pass --soma-uri too.")
        sizes = [_count_cells(f) for f in args.data_file]
        for f, n in zip(args.data_file, sizes, strict=True):
            if n == 0:
                raise CLIError(f"data file {f!r} has no cells.")
        return list(args.data_file), sizes
    try:
        adata = _soma(args)
    except ImportError as e:
        raise CLIError(str(e)) from None
    return [args.soma_uri], [adata.n_obs]


def _run_file(
    path: str, loaded, args: argparse.Namespace, heads: list[str], options, embeddings_out: Any = None
) -> dict[str, Any]:
    from ..inference.pipeline import infer  # lazily: torch

    adata = _open_input(path, args)
    try:
        with _about_input(path, args):
            run = infer(
                adata,
                loaded,
                heads=heads,
                tokenize=options.tokenize(),
                **{**options.engine(), "cache_dir": None},
                attention=args.attention,
                embeddings_out=embeddings_out,
            )
    finally:
        if adata.isbacked:
            adata.file.close()
    params = run.params(
        loaded,
        options,
        "inference",
        data_file=str(path),
        heads=list(heads),
        n_data_workers=getattr(args, "n_data_workers", None),  # the published flag's value, without effect
    )
    return {"result": run.result, "vocab": run.vocab, "params": params}


def _input_name(source: str, args: argparse.Namespace) -> str:
    """How messages name an input."""
    return f"--soma-uri {source!r}" if source == getattr(args, "soma_uri", None) else f"data file {source!r}"


@contextlib.contextmanager
def _about_input(source: str, args: argparse.Namespace) -> Iterator[None]:
    """Errors about the data (ValueError, KeyError) raised inside name the input they concern."""
    try:
        yield
    except (ValueError, KeyError) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise CLIError(f"{_input_name(source, args)}: {message}") from e


def _check_inputs(inputs: Sequence[str], args: argparse.Namespace, options) -> list[pd.DataFrame]:
    """Check every input before the model is loaded; return their ``obs`` (as written to the output).

    Each input's matrix of counts (``--use-raw``) and gene ids (``--gene-col-name``, unique unless
    ``--remove-duplicate-genes``); an error names the input.
    """
    from ..data.tokenizer import check_readable  # lazily: pandas (start-up time)

    obs = []
    for source in inputs:
        adata = _open_input(source, args)
        try:
            with _about_input(source, args):
                check_readable(adata, options.tokenize())
            obs.append(_obs(adata, args, source))
        finally:
            if adata.isbacked:
                adata.file.close()
    return obs


def _obs(adata, args: argparse.Namespace, path: str):
    """The input's obs as written to the output (every column, or ``obs_keys``)."""
    from ..data.tokenizer import as_frame

    obs = as_frame(adata.obs).copy()
    if args.obs_keys != ["all"]:
        missing = [k for k in args.obs_keys if k not in obs.columns]
        if missing:
            raise CLIError(f"obs_keys {missing} are not columns of {path}'s obs ({list(obs.columns)}).")
        obs = obs[args.obs_keys]
    return obs


def run(args: argparse.Namespace) -> Path | None:
    """Run the ``inference`` command; returns the output path (None on ranks other than 0).

    Every check that does not need the model runs first: options, overrides, the output location, every input
    (counts, gene ids, obs) and the ``--pretrained-embedding`` tables. Only then is the model loaded.
    """
    overrides = _apply_overrides(args)
    _log_compat_flags(args)
    if args.model_type != "transcriptformer":
        raise CLIError(f"--model-type {args.model_type} is not supported.")
    keys = set(args.output_keys)
    if args.llh:
        keys.add("llh")
    if args.gene_llh:
        keys.add("gene_llh")
    cge = args.emb_type == "cge"
    outputs = [h for h in ("embeddings", "llh", "gene_llh") if h in keys and not (h == "embeddings" and cge)]
    outputs += ["cge"] if cge else []
    device = args.device
    options = _run_options(args, device)
    path = _output_file(args)
    if args.resumable:
        _check_resumable(args, outputs, path)
    elif path.suffix == ".zarr":
        raise CLIError("a .zarr output is written by --resumable runs; pass --resumable or an .h5ad file name.")
    inputs, sizes = _inputs(args)
    obs_parts = _check_inputs(inputs, args, options)
    # the output's obs, checked writable now rather than after every cell was computed
    obs = None if args.resumable else _output_obs(obs_parts, inputs, args)
    del obs_parts
    _check_species_tables(args)
    from ..inference.devices import resolve_device  # lazily: torch

    resolve_device(device)  # an unavailable device is an error before the model is loaded
    rank, world = init_distributed()
    if world > 1 and device in ("auto", "cuda") and _cuda():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        options = _run_options(args, device)
    loaded = _load(args.checkpoint_path, overrides, args.adapter)
    if args.resumable:
        return _run_resumable(args, loaded, outputs, options, path, inputs[0])
    assert obs is not None
    if "embeddings" in outputs and world == 1 and _stream_output(args, loaded, sizes):
        return _run_streaming(args, loaded, outputs, options, path, sizes, inputs, obs)
    parts = [_run_file(p, loaded, args, outputs, options) for p in inputs]
    if rank != 0:
        return None
    out = _output_adata(parts, outputs, obs)
    write_atomic(out, path)
    _wrote(path, out.n_obs, outputs)
    return path


def _output_adata(parts: list[dict[str, Any]], outputs, obs: pd.DataFrame, embeddings: bool = True):
    """The published output layout, with ``obs`` from :func:`_output_obs`.

    ``embeddings=False`` leaves ``obsm['embeddings']`` out (streamed).
    """
    import numpy as np
    import pandas as pd
    from anndata import AnnData

    out = AnnData(obs=obs)
    # how it was made (the published output has no such record)
    out.uns["transcriptformer"] = {"params": _run_record(parts)}
    results = [p["result"] for p in parts]
    if "embeddings" in outputs and embeddings:
        out.obsm["embeddings"] = np.concatenate([r.embeddings for r in results]).astype(np.float32)
    if "llh" in outputs:
        llh = np.concatenate([r.llh for r in results]).astype(np.float32)
        out.uns["llh"] = pd.DataFrame({"llh": llh})
        out.obsm["llh"] = llh[:, None]
    if "gene_llh" in outputs:
        out.obsm["gene_llh"] = np.concatenate([r.gene_llh for r in results]).astype(np.float32)
    if "cge" in outputs:
        offsets = np.cumsum([0] + [len(r.n_genes) for r in results[:-1]])
        out.uns["cge_embeddings"] = np.concatenate([r.genes["cge"] for r in results]).astype(np.float32)
        out.uns["cge_cell_indices"] = np.concatenate(
            [r.genes["cell"] + off for r, off in zip(results, offsets, strict=True)]
        ).astype(np.int64)
        names = [p["vocab"].names()[p["result"].genes["token"]] for p in parts]
        out.uns["cge_gene_names"] = np.concatenate(names).astype(str)
    return out


def _output_obs(parts: Sequence[pd.DataFrame], inputs: Sequence[str], args: argparse.Namespace) -> pd.DataFrame:
    """The output's ``obs``: the inputs' concatenated, made writable, and checked by writing it (in memory).

    Unlike the published tool, the input's cell names are kept as the index (made unique across several
    files by appending ``-1``, ``-2``, ...); ``--published-index`` gives the published ``'0'..'N-1'``. Rows are in
    input order either way. Columns whose types differ between the inputs are unified (:func:`_writable_column`),
    and strings become categoricals where ``write_h5ad`` would make them so, so that a streamed output is the
    same. A column that still cannot be written is an error naming it and its type in each input.
    """
    import pandas as pd
    from anndata import AnnData
    from anndata.utils import make_index_unique

    obs = pd.concat(list(parts)) if len(parts) > 1 else parts[0].copy()
    for name in obs.columns:
        obs[name] = _writable_column(obs[name])
    if args.published_index:
        obs.index = pd.RangeIndex(len(obs)).astype(str)
    elif not obs.index.is_unique:  # several files may share cell names (as obs_names_make_unique, without its advice)
        obs.index = make_index_unique(obs.index.astype(str))
    holder = AnnData(obs=obs)
    holder.strings_to_categoricals()  # what write_h5ad does (the streamed output is written without it)
    _check_writable(holder.obs, parts, inputs, args)
    return holder.obs


def _writable_column(column: pd.Series) -> pd.Series:
    """One concatenated ``obs`` column in a type the output can hold.

    Concatenating inputs whose column types differ, or where some input lacks the column, can give a column of
    Python objects of several types, which h5ad cannot hold: booleans with missing values become pandas'
    nullable ``boolean``, numbers numbers (floats where some are missing, as pandas makes them), and any other mix
    text (missing values stay missing). Other columns are kept as they are.
    """
    import pandas as pd
    from pandas.api.types import infer_dtype

    if column.dtype != object:
        return column
    kind = infer_dtype(column, skipna=True)
    if kind in ("string", "empty"):
        return column
    try:
        if kind == "boolean":
            return column.astype("boolean")
        if kind in ("integer", "floating", "mixed-integer-float"):
            return pd.to_numeric(column)
    except (TypeError, ValueError, OverflowError):  # e.g. integers beyond int64: text, as any other mix
        pass
    return column.where(column.isna(), column.astype(str))


def _check_writable(obs: pd.DataFrame, parts: Sequence[pd.DataFrame], inputs: Sequence[str], args) -> None:
    """``obs`` can be written to an h5ad file (written to memory); otherwise an error naming the column."""
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    def error(frame: pd.DataFrame) -> Exception | None:
        try:
            with h5py.File(io.BytesIO(), "w") as h:
                write_elem(h, "obs", frame)
        except Exception as e:  # noqa: BLE001 - whatever the writer refuses is reported below
            return e
        return None

    failure = error(obs)
    if failure is None:
        return
    reason = f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0][:200]}"
    bad = next((c for c in obs.columns if error(obs[[c]]) is not None), None)
    if bad is None:
        raise CLIError(f"the inputs' obs cannot be written to the output ({reason}).")
    types = "; ".join(
        f"{_input_name(source, args)}: {part[bad].dtype if bad in part.columns else 'no such column'}"
        for source, part in zip(inputs, parts, strict=True)
    )
    raise CLIError(
        f"obs column {bad!r} cannot be written to the output ({reason}); its type in each input: {types}. Convert "
        "or drop it in the input, or pick the obs columns to keep with --config-override "
        "model.inference_config.obs_keys.0=<column> (and .1=, .2=, ...). Nothing was computed."
    )


#: The facts of one input in the run record; with several inputs, lists in the order of ``data_file``.
_PER_INPUT = ("counts_source", "n_genes", "n_genes_matched")


def _run_record(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``uns['transcriptformer']['params']``: how the output was made, from every input's record.

    ``data_file`` lists the inputs. With several, the facts of each input (:data:`_PER_INPUT`, and any other
    value that differs between them) are lists in the order of ``data_file``; ``counts_look_raw`` is true only if
    the counts of every input look raw, and ``counts_look_raw_per_file`` gives each input's.
    """
    records = [p["params"] for p in parts]
    files = [str(r["data_file"]) for r in records]
    if len(records) == 1:
        return {**records[0], "data_file": files}

    def same(a: Any, b: Any) -> bool:
        try:
            return bool(a == b)
        except ValueError:  # arrays
            return False

    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r.get(key, "none") for r in records]
        if key in _PER_INPUT or not all(same(v, values[0]) for v in values[1:]):
            scalar = all(isinstance(v, str | int | float | bool) for v in values)
            out[key] = values if scalar else [str(v) for v in values]
        else:
            out[key] = values[0]
    out["data_file"] = files
    looks_raw = [bool(r.get("counts_look_raw", True)) for r in records]
    out["counts_look_raw"] = all(looks_raw)
    out["counts_look_raw_per_file"] = looks_raw
    return out


def _check_species_tables(args: argparse.Namespace) -> None:
    """``--pretrained-embedding``: every file exists and every species name has a table.

    The tables of species names are downloaded now, before the model is loaded; the run reads them from the cache.
    """
    if not args.pretrained_embedding:
        return
    from ..weights.registry import species_tables

    try:
        species_tables(args.pretrained_embedding)
    except (ValueError, KeyError, FileNotFoundError) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise CLIError(f"--pretrained-embedding: {message}") from e


#: Above this size the embeddings go straight to the output file instead of through memory.
STREAM_BYTES = 2 << 30


def _stream_output(args: argparse.Namespace, loaded, sizes: Sequence[int]) -> bool:
    return bool(args.stream_output) or sum(sizes) * loaded.embed_dim * 4 > STREAM_BYTES


class _Rows:
    """``dataset[offset + i]`` seen as ``view[i]``: one input file's rows of the output matrix."""

    def __init__(self, dataset, offset: int):
        self.dataset, self.offset = dataset, offset

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        self.dataset[self.offset + rows.start : self.offset + rows.stop] = values


def _run_streaming(
    args: argparse.Namespace,
    loaded,
    outputs,
    options,
    path: Path,
    sizes: Sequence[int],
    inputs: Sequence[str],
    obs: pd.DataFrame,
) -> Path:
    """Write the embeddings into the output file window by window (memory does not grow with the data)."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    tmp = temporary_beside(path)
    try:
        ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(sum(sizes)).astype(str))).write_h5ad(tmp)  # obs: below
        with h5py.File(tmp, "r+") as h:
            E = loaded.embed_dim
            ds = h["obsm"].create_dataset(
                "embeddings", shape=(sum(sizes), E), dtype="f4", chunks=(max(1, min(sum(sizes), (1 << 20) // E)), E)
            )
            ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
            offsets = np.cumsum([0, *sizes[:-1]])
            parts = [
                _run_file(f, loaded, args, outputs, options, embeddings_out=_Rows(ds, int(off)))
                for f, off in zip(inputs, offsets, strict=True)
            ]
            rest = _output_adata(parts, outputs, obs, embeddings=False)
            del h["obs"]
            write_elem(h, "obs", rest.obs)
            for key, value in rest.obsm.items():
                write_elem(h["obsm"], key, value)
            for key, value in rest.uns.items():
                write_elem(h["uns"], key, value)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _wrote(path, sum(sizes), outputs)
    return path


def _check_resumable(args: argparse.Namespace, outputs: Sequence[str], path: Path) -> None:
    if args.data_file and len(args.data_file) > 1:
        raise CLIError("--resumable takes one input (one --data-file, or --soma-uri); run one command per file.")
    if "cge" in outputs:
        raise CLIError("--resumable writes per-cell results; --emb-type cge (per gene of every cell) is not sharded.")
    if args.stream_output:
        logger.info("--stream-output has no effect with --resumable (results are always written as they come)")
    if args.published_index:
        raise CLIError("--published-index is not available with --resumable (rows keep the input's cell names).")
    if not isinstance(args.shard_size, int) or args.shard_size < 1:
        raise CLIError(f"--shard-size must be a positive integer, got {args.shard_size!r}.")
    if path.suffix not in (".h5ad", ".zarr"):
        raise CLIError(
            f"--resumable writes an .h5ad file or a .zarr store; --output-filename {path.name!r} is neither."
        )


def _run_resumable(args: argparse.Namespace, loaded, outputs, options, path: Path, source: str) -> Path | None:
    """Compute the missing shards of ``<output>.shards`` (this rank's share), then merge them into ``path``."""
    from ..inference.pipeline import infer_sharded
    from ..inference.shards import Destination, OutputSpec, shard_folder

    destinations = [Destination("obsm", h, h) for h in outputs]
    if "llh" in outputs:
        destinations.append(Destination("uns_frame", "llh", "llh"))
    soma = args.soma_uri is not None
    where = {"soma_uri": source, "obs_filter": args.obs_filter or "none"} if soma else {"data_file": str(source)}

    def describe(run) -> OutputSpec:
        params = run.params(loaded, options, "inference", heads=list(outputs), **where)
        return OutputSpec(
            path=str(path),
            destinations=tuple(destinations),
            uns={"transcriptformer": {"params": params}},
            params_key="transcriptformer",
        )

    folder = shard_folder(path)
    adata = _open_input(source, args)
    try:
        run = infer_sharded(
            adata,
            loaded,
            folder,
            describe=describe,
            obs=_obs(adata, args, source),
            heads=outputs,
            options=options.record(),
            tokenize=options.tokenize(),
            **{**options.engine(), "cache_dir": None},
            attention=args.attention,
            shard_size=args.shard_size,
            keep_shards=args.keep_shards,
            info={"input": str(Path(source).resolve()) if Path(source).exists() else str(source), **where},
        )
    finally:
        if adata.isbacked:
            adata.file.close()
    logger.info("%d shards computed here, %d were done before", len(run.computed), run.skipped)
    if run.output is None:
        return None
    _wrote(Path(run.output), run.store.n_obs, outputs)
    return Path(run.output)


def _wrote(path: Path, n_cells: int, outputs: Sequence[str]) -> None:
    """Say what was written where (standard output: the command's result)."""
    where = {"embeddings": "obsm['embeddings']", "llh": "uns['llh'], obsm['llh']", "gene_llh": "obsm['gene_llh']"}
    where["cge"] = "uns['cge_embeddings', 'cge_cell_indices', 'cge_gene_names']"
    print(f"wrote {path}: {n_cells:,} cells; {', '.join(where[o] for o in outputs)}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
