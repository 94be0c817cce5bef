"""The ``transcriptformer`` command line, compatible with the published tool.

``transcriptformer download MODEL [--checkpoint-dir DIR]`` and
``transcriptformer inference --checkpoint-path P --data-file F [...]`` accept the published
flags and write the published output layout: an h5ad with no genes, the input ``obs`` (fresh
``'0'..'N-1'`` index), ``obsm['embeddings']``, with likelihoods ``uns['llh']`` (DataFrame) and
``obsm['llh']``, with ``--emb-type cge`` ``uns['cge_embeddings' | 'cge_cell_indices' |
'cge_gene_names']``. Unlike the published tool, embeddings and likelihoods can be asked for in
one run (``--llh``). Under ``torchrun`` each process embeds a shard and rank 0 writes the file.

Everything that can be checked without the model is checked before it is loaded: every option and
``--config-override`` value (by type and range, with the same rules as the Python API), the output
location (writable, not a folder, not one of the inputs) and the input files (h5ad, with cells). The
output is written under a temporary name and renamed when complete; an error, Ctrl-C or SIGTERM removes
the temporary file. The module imports only the standard library until a command runs, so ``--help`` and
``--version`` are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ATTENTION_BACKENDS, DEVICES, PRECISION_ALIASES, PRECISIONS, parse_bool
from .registry import REGISTRY

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("transcriptformer")

#: ``download`` takes every registry name, or ``all``.
DOWNLOAD_CHOICES = (*REGISTRY, "all")

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


#: How the library's error messages name options, and the flags that set them here.
_FLAG_NAMES = {
    "gene_key=None to use var_names": "--gene-col-name var_names to use var_names",
    "layer='raw' but adata.raw is None; pass layer='X' or the name of a layer of counts.": (
        "--use-raw True but the file has no .raw; pass --use-raw False (counts in X) or auto."
    ),
    "gene_key=<": "--gene-col-name <",
    "duplicate_genes='first'": "--remove-duplicate-genes",
    "layer=<layer of raw counts> (or 'raw')": "an input with raw counts in X or .raw (--use-raw)",
    "layer=<layer of raw counts>": "an input with raw counts in X or .raw (--use-raw)",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def _parse_value(text: str) -> Any:
    """The published override parsing: true/false/none/null and plain integers convert, the rest is a string.

    Numbers with a decimal point or exponent become floats here (the published tool kept them as strings).
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _bool_or_auto(text: str) -> bool | None:
    low = text.strip().lower()
    if low in ("auto", "none", "null"):
        return None
    try:
        return parse_bool(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected True, False or auto, got {text!r}") from None


# -- strict parsers of --config-override values: each returns the value or raises ValueError(what it expects)


def _as_bool(text: str) -> bool:
    return parse_bool(text)


def _as_positive_int(text: str) -> int | None:
    value = _parse_value(text)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer (or null), got {text!r}")
    return value


def _as_number(minimum: float, *, zero_ok: bool = False) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        import math

        value = _parse_value(text)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number (or null), got {text!r}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        if value < minimum or (value == minimum and not zero_ok):
            raise ValueError(f"expected a number {'>=' if zero_ok else '>'} {minimum:g}, got {text!r}")
        return float(value)

    return parse


def _as_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices and value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value if value in choices else value.lower()

    return parse


def _as_text(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


def _as_text_or_none(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null") else _as_text(text)


#: ``--gene-col-name`` value that reads the gene ids from ``var_names`` (the API's ``gene_key=None``)
VAR_NAMES = "var_names"
GENE_COL_HELP = f"var column with Ensembl gene ids, or {VAR_NAMES!r} for the var index"


def gene_column(text: str) -> str | None:
    """The ``gene_key`` of a ``--gene-col-name`` value: ``var_names`` (or none/null) means the var index."""
    return None if text.strip() == VAR_NAMES else _as_text_or_none(text)


def _as_use_raw(text: str) -> bool | None:
    try:
        return _bool_or_auto(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


#: ``--config-override`` keys this command implements: the argument they set and how their value is parsed.
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="transcriptformer",
        description="TranscriptFormer single-cell foundation models: download weights and run inference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="{download,inference,finetune,train}")

    dl = sub.add_parser(
        "download",
        help="download and unpack model weights",
        description="Download, verify and unpack published TranscriptFormer artifacts into DIR/<name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dl.add_argument(
        "model",
        choices=DOWNLOAD_CHOICES,
        help="'all': the three published models and the gene tables; datasets by name",
    )
    dl.add_argument("--checkpoint-dir", default="./checkpoints", help="folder that receives <name>/ folders")
    dl.add_argument("--force", action="store_true", help="download again even if present")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")

    inf = sub.add_parser(
        "inference",
        help="embed cells of an h5ad file",
        description="Run a TranscriptFormer model on h5ad files and write the published output layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inf.add_argument("--checkpoint-path", required=True, help="checkpoint folder, or a name such as tf-sapiens")
    inf.add_argument("--data-file", required=True, nargs="+", help="input h5ad file(s); several are concatenated")
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
    inf.add_argument(
        "--use-raw",
        type=_bool_or_auto,
        default="auto",
        metavar="{True,False,auto}",
        help="counts from .raw (True), from X (False), or .raw if present (auto)",
    )
    inf.add_argument("--emb-type", choices=["cell", "cge"], default="cell", help="cell or contextual gene embeddings")
    inf.add_argument("--device", choices=DEVICES, default="auto", help="where to run")
    inf.add_argument("--remove-duplicate-genes", action="store_true", help="keep the first of duplicate gene ids")
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
    from . import cli_training

    cli_training.add_parsers(sub)
    return parser


# -- inference ----------------------------------------------------------------------------


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
        from .config import TranscriptFormerConfig

        try:  # names, types and choices now; rules between values once combined with the checkpoint's config
            TranscriptFormerConfig.parse_overrides(model_overrides)
        except ValueError as e:
            raise CLIError(f"--config-override: {str(e).replace('config.json: ', '')}") from None
    return model_overrides


def _load(checkpoint: str, overrides: dict[str, Any], adapter: str | None = None):
    from .checkpoint import build_model, load_model

    loaded = load_model(checkpoint)
    if overrides:
        assert loaded.path is not None  # loaded from a checkpoint folder
        config = loaded.config.with_overrides(overrides)
        loaded = build_model(loaded.path, name=loaded.name, config=config, weights_sha256=loaded.weights_sha256)
    return load_model(loaded, adapter=adapter) if adapter else loaded


def _init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _temporary_beside(path: Path) -> str:
    """A new empty file next to ``path`` with the permissions a plain ``open(path, "w")`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".h5ad.tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
    return tmp


def _write_atomic(adata, path: Path) -> None:
    tmp = _temporary_beside(path)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The command line's flag for each run option (for messages of the shared validation).
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
    from .options import RunOptions

    try:
        return RunOptions(
            gene_key=args.gene_col_name,
            layer={True: "raw", False: "X", None: None}[args.use_raw],
            clip_counts=args.clip_counts,
            normalize_to_scale=args.normalize_to_scale or None,
            filter_to_vocab=args.filter_to_vocabs,
            duplicate_genes="first" if args.remove_duplicate_genes else "raise",
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
    for f in args.data_file:
        same = Path(f).exists() and path.exists() and os.path.samefile(f, path)
        if same or Path(f).resolve() == path.resolve():
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


def _count_cells(path: str) -> int:
    """Cells in an h5ad file, read from its ``obs`` without loading it; fix-it errors for what is not an h5ad."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise CLIError(f"data file {path!r} does not exist.")
    if p.is_dir():
        raise CLIError(f"data file {path!r} is a folder; pass an .h5ad file.")
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


def _run_file(
    path: str, loaded, args: argparse.Namespace, heads: list[str], options, embeddings_out: Any = None
) -> dict[str, Any]:
    import anndata as ad

    from .engine import infer

    adata = ad.read_h5ad(path, backed="r")
    try:
        run = infer(
            adata,
            loaded,
            heads=heads,
            tokenize=options.tokenize(),
            **{**options.engine(), "cache_dir": None},
            attention=args.attention,
            embeddings_out=embeddings_out,
        )
        obs = adata.obs.copy()
        if args.obs_keys != ["all"]:
            missing = [k for k in args.obs_keys if k not in obs.columns]
            if missing:
                raise CLIError(f"obs_keys {missing} are not columns of {path}'s obs ({list(obs.columns)}).")
            obs = obs[args.obs_keys]
    finally:
        if adata.isbacked:
            adata.file.close()
    params = run.params(loaded, options, "inference", data_file=str(path), heads=list(heads))
    return {"obs": obs, "result": run.result, "vocab": run.vocab, "params": params}


def run_inference(args: argparse.Namespace) -> Path | None:
    """Run the ``inference`` command; returns the output path (None on ranks other than 0).

    Every check that does not need the model runs first: options, overrides, the output location and the
    input files. Only then is the model loaded.
    """
    overrides = _apply_overrides(args)
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
    sizes = [_count_cells(f) for f in args.data_file]
    for f, n in zip(args.data_file, sizes, strict=True):
        if n == 0:
            raise CLIError(f"data file {f!r} has no cells.")
    from .engine import resolve_device

    resolve_device(device)  # an unavailable device is an error before the model is loaded
    rank, world = _init_distributed()
    if world > 1 and device in ("auto", "cuda") and _cuda():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        options = _run_options(args, device)
    loaded = _load(args.checkpoint_path, overrides, args.adapter)
    if "embeddings" in outputs and world == 1 and _stream_output(args, loaded, sizes):
        return _run_streaming(args, loaded, outputs, options, path, sizes)
    parts = [_run_file(p, loaded, args, outputs, options) for p in args.data_file]
    if rank != 0:
        return None
    out = _output_adata(parts, outputs, published_index=args.published_index)
    _write_atomic(out, path)
    logger.info("wrote %s (%d cells)", path, out.n_obs)
    return path


def _output_adata(parts: list[dict[str, Any]], outputs, embeddings: bool = True, published_index: bool = False):
    """The published output layout; ``embeddings=False`` leaves ``obsm['embeddings']`` out (streamed).

    Unlike the published tool, the input's cell names are kept as the index (made unique across several
    files); ``published_index`` gives the published ``'0'..'N-1'``. Rows are in input order either way.
    """
    import numpy as np
    import pandas as pd
    from anndata import AnnData

    obs = pd.concat([p["obs"] for p in parts]) if len(parts) > 1 else parts[0]["obs"].copy()
    if published_index:
        obs.index = pd.RangeIndex(len(obs)).astype(str)
    out = AnnData(obs=obs)
    if not published_index and not out.obs_names.is_unique:  # several files may share cell names
        out.obs_names_make_unique()
    # how it was made (the published output has no such record)
    out.uns["transcriptformer"] = {
        "params": {**parts[0]["params"], "data_file": [p["params"]["data_file"] for p in parts]}
    }
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


def _run_streaming(args: argparse.Namespace, loaded, outputs, options, path: Path, sizes: Sequence[int]) -> Path:
    """Write the embeddings into the output file window by window (memory does not grow with the data)."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    tmp = _temporary_beside(path)
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
                for f, off in zip(args.data_file, offsets, strict=True)
            ]
            rest = _output_adata(parts, outputs, embeddings=False, published_index=args.published_index)
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
    logger.info("wrote %s (%d cells, embeddings streamed)", path, sum(sizes))
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- download -----------------------------------------------------------------------------


def run_download(args: argparse.Namespace) -> list[Path]:
    """Run the ``download`` command."""
    from . import registry

    published = [e.name for e in registry.ENTRIES if e.kind in ("model", "tables") and e.bundled is None]
    names = published if args.model == "all" else [args.model]
    folders = []
    for name in names:
        folder = registry.fetch(name, cache_dir=args.checkpoint_dir, progress=not args.no_progress, force=args.force)
        if registry.REGISTRY[registry.canonical_name(name)].bundled is not None:
            folder = _copy_bundled(folder, Path(args.checkpoint_dir).expanduser(), force=args.force)
        print(folder)
        folders.append(folder)
    return folders


def _copy_bundled(source: Path, root: Path, *, force: bool) -> Path:
    """A copy of an artifact that ships with the package in ``root`` (as a download would put it there)."""
    import shutil
    import tempfile

    dest = root / source.name
    if dest.exists() and not force:
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=root))  # complete before it takes the name
    try:
        staged = tmp / source.name
        if source.is_dir():  # contents only: the installed package's read-only modes are not copied
            shutil.copytree(source, staged, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, staged)
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        staged.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class _Terminated(BaseException):
    """SIGTERM arrived (SLURM, containers and ``kill`` send it): unwinds like Ctrl-C, removing temporary files."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcriptformer`` command.

    Returns 0 on success, 1 on an error (one line on stderr, or a traceback with ``--verbose``), 2 for a usage
    error, 130 on Ctrl-C and 143 on SIGTERM; the last two remove any temporary output first.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # quiet by default (warnings and errors); -v: progress messages, timestamps and tracebacks
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if args.verbose else "%(message)s",
    )
    logging.getLogger("transcriptformer").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from . import cli_training

        runners = {
            "download": run_download,
            "inference": run_inference,
            "finetune": cli_training.run_finetune,
            "train": cli_training.run_train,
        }
        runners[args.command](args)
    except KeyboardInterrupt:
        print("transcriptformer: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("transcriptformer: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except Exception as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = msg.strip("\"'")
        for api, flag in _FLAG_NAMES.items():  # the library's advice, in the command line's words
            msg = msg.replace(api, flag)
        print(f"transcriptformer: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m transcriptformer.cli`
    sys.exit(main())
