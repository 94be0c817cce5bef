"""The ``transcriptformer`` command line, compatible with the published tool.

``transcriptformer download MODEL [--checkpoint-dir DIR]`` and
``transcriptformer inference --checkpoint-path P --data-file F [...]`` accept the published
flags and write the published output layout: an h5ad with no genes, the input ``obs`` (fresh
``'0'..'N-1'`` index), ``obsm['embeddings']``, with likelihoods ``uns['llh']`` (DataFrame) and
``obsm['llh']``, with ``--emb-type cge`` ``uns['cge_embeddings' | 'cge_cell_indices' |
'cge_gene_names']``. Unlike the published tool, embeddings and likelihoods can be asked for in
one run (``--llh``). Under ``torchrun`` each process embeds a shard and rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import ATTENTION_BACKENDS, DEVICES, PRECISION_ALIASES, PRECISIONS
from .registry import REGISTRY

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
    "gene_key=None to use var_names": "a var column of Ensembl ids",
    "gene_key=<": "--gene-col-name <",
    "duplicate_genes='first'": "--remove-duplicate-genes",
    "layer=<layer of raw counts> (or 'raw')": "an input with raw counts in X or .raw (--use-raw)",
    "layer=<layer of raw counts>": "an input with raw counts in X or .raw (--use-raw)",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def _parse_value(text: str) -> Any:
    """The published override parsing: true/false/none/null and plain integers convert, the rest is a string."""
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
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if low in ("auto", "none", "null"):
        return None
    raise argparse.ArgumentTypeError(f"expected True, False or auto, got {text!r}")


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
    dl.add_argument("model", choices=DOWNLOAD_CHOICES, help="'all': the three models and the gene tables")
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
    inf.add_argument("--gene-col-name", default="ensembl_id", help="var column with Ensembl gene ids")
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
        "--stream-output",
        action="store_true",
        help="write embeddings to the output file window by window (automatic above 2 GiB of embeddings)",
    )
    from . import cli_training

    cli_training.add_parsers(sub)
    return parser


# -- inference ----------------------------------------------------------------------------


def _apply_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Fold ``--config-override`` items into ``args``; return the model-config overrides."""
    model_overrides: dict[str, Any] = {}
    args.output_keys = ["embeddings"]
    args.obs_keys = ["all"]
    args.normalize_to_scale = None
    for item in args.config_override:
        if "=" not in item:
            raise CLIError(f"--config-override {item!r}: expected KEY=VALUE.")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text)
        full = key if key.startswith("model.") else f"model.{key}"
        parts = full.split(".")
        if full in _NO_EFFECT:
            logger.info("config override %s has no effect here", key)
            continue
        section = parts[1] if len(parts) > 2 else ""
        name = parts[2] if len(parts) > 2 else ""
        if section == "inference_config":
            if name in ("output_keys", "obs_keys") and len(parts) == 4 and parts[3].isdigit():
                target = getattr(args, name)
                i = int(parts[3])
                if i > len(target):
                    raise CLIError(f"--config-override {key}: index {i} is past the end of {target}.")
                target[i : i + 1] = [str(value)]
            elif name in ("batch_size", "precision", "emb_type", "output_path", "output_filename", "device"):
                setattr(args, name, str(value) if name != "batch_size" else int(value))
            elif name == "pretrained_embedding":
                args.pretrained_embedding = None if value is None else [str(value)]
            else:
                raise CLIError(f"--config-override {key}: not a supported inference option.")
        elif section == "data_config" and name in (
            "gene_col_name",
            "clip_counts",
            "filter_to_vocabs",
            "normalize_to_scale",
            "use_raw",
            "remove_duplicate_genes",
        ):
            if name == "use_raw":
                value = _bool_or_auto(str(value))
            setattr(args, name, value)
        elif section == "data_config" and name in _DEFAULT_ONLY:
            if value not in (None, _DEFAULT_ONLY[name], False, 0):
                raise CLIError(
                    f"--config-override {key}={text}: only the default ({_DEFAULT_ONLY[name]}) is supported."
                )
        elif section in ("model_config", "data_config", "loss_config") and len(parts) == 3:
            model_overrides[f"{section}.{name}"] = value
        else:
            raise CLIError(f"--config-override {key}: unknown configuration key.")
    bad = [k for k in args.output_keys if k not in ("embeddings", "llh", "gene_llh")]
    if bad:
        raise CLIError(f"unknown output key(s) {bad}; expected embeddings, llh or gene_llh.")
    return model_overrides


def _load(checkpoint: str, overrides: dict[str, Any], adapter: str | None = None):
    from .checkpoint import build_model, load_model
    from .config import TranscriptFormerConfig

    loaded = load_model(checkpoint)
    if overrides:
        path: Path = loaded.path  # type: ignore[assignment]  # loaded from a checkpoint folder
        config = TranscriptFormerConfig.from_json(path / "config.json").with_overrides(overrides)
        loaded = build_model(path, name=loaded.name, config=config)
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


def _run_options(args: argparse.Namespace, device: str):
    from .options import RunOptions

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


def _run_file(
    path: str, loaded, args: argparse.Namespace, heads: list[str], device: str, embeddings_out: Any = None
) -> dict[str, Any]:
    import anndata as ad

    from .engine import infer

    if not Path(path).is_file():
        raise CLIError(f"data file {path!r} does not exist.")
    adata = ad.read_h5ad(path, backed="r")
    options = _run_options(args, device)
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
    if adata.isbacked:
        adata.file.close()
    return {"obs": obs, "result": run.result, "vocab": run.vocab}


def run_inference(args: argparse.Namespace) -> Path | None:
    """Run the ``inference`` command; returns the output path (None on ranks other than 0)."""
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
    rank, world = _init_distributed()
    device = args.device
    if world > 1 and device in ("auto", "cuda") and _cuda():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    loaded = _load(args.checkpoint_path, overrides, args.adapter)
    path = Path(args.output_path) / args.output_filename
    if "embeddings" in outputs and world == 1 and _stream_output(args, loaded):
        return _run_streaming(args, loaded, outputs, device, path)
    parts = [_run_file(p, loaded, args, outputs, device) for p in args.data_file]
    if rank != 0:
        return None
    out = _output_adata(parts, outputs)
    _write_atomic(out, path)
    logger.info("wrote %s (%d cells)", path, out.n_obs)
    return path


def _output_adata(parts: list[dict[str, Any]], outputs, embeddings: bool = True):
    """The published output layout; ``embeddings=False`` leaves ``obsm['embeddings']`` out (streamed)."""
    from anndata import AnnData

    obs = pd.concat([p["obs"] for p in parts], ignore_index=True) if len(parts) > 1 else parts[0]["obs"].copy()
    obs.index = pd.RangeIndex(len(obs)).astype(str)
    out = AnnData(obs=obs)
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


def _stream_output(args: argparse.Namespace, loaded) -> bool:
    if args.stream_output:
        return True
    import h5py

    n = 0
    for f in args.data_file:
        if Path(f).is_file():
            with h5py.File(f, "r") as h:
                index = h["obs"].attrs.get("_index", "_index")
                n += len(h["obs"][index]) if index in h["obs"] else 0
    return n * loaded.embed_dim * 4 > STREAM_BYTES


class _Rows:
    """``dataset[offset + i]`` seen as ``view[i]``: one input file's rows of the output matrix."""

    def __init__(self, dataset, offset: int):
        self.dataset, self.offset = dataset, offset

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        self.dataset[self.offset + rows.start : self.offset + rows.stop] = values


def _run_streaming(args: argparse.Namespace, loaded, outputs, device: str, path: Path) -> Path:
    """Write the embeddings into the output file window by window (memory does not grow with the data)."""
    import anndata as ad
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    sizes = []
    for f in args.data_file:
        if not Path(f).is_file():
            raise CLIError(f"data file {f!r} does not exist.")
        backed = ad.read_h5ad(f, backed="r")
        sizes.append(backed.n_obs)
        backed.file.close()
    tmp = _temporary_beside(path)
    try:
        ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(sum(sizes)).astype(str))).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as h:
            E = loaded.embed_dim
            ds = h["obsm"].create_dataset(
                "embeddings", shape=(sum(sizes), E), dtype="f4", chunks=(max(1, min(sum(sizes), (1 << 20) // E)), E)
            )
            ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
            offsets = np.cumsum([0, *sizes[:-1]])
            parts = [
                _run_file(f, loaded, args, outputs, device, embeddings_out=_Rows(ds, int(off)))
                for f, off in zip(args.data_file, offsets, strict=True)
            ]
            rest = _output_adata(parts, outputs, embeddings=False)
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

    names = list(REGISTRY) if args.model == "all" else [args.model]
    folders = []
    for name in names:
        folder = registry.fetch(name, cache_dir=args.checkpoint_dir, progress=not args.no_progress, force=args.force)
        print(folder)
        folders.append(folder)
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcriptformer`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command != "download" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if args.verbose else "%(message)s",
    )
    if not args.verbose:
        logging.getLogger("transcriptformer").setLevel(logging.INFO)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m transcriptformer.cli`
    sys.exit(main())
