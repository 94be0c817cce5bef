"""What the tools that run a model share: loading it, running the pipeline, naming genes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ..._files import same_file
from ...data.gene_ids import names_to_ids
from ...data.tokenizer import as_frame, check_readable, counts_var, source_files
from ...inference.options import RunOptions, check_genes, check_positive_int
from ...inference.shards import OutputSpec, check_output_path, read_params, shard_folder
from ...weights.checkpoint import load_model
from ...weights.loaded import LoadedModel
from .._utils import ModelArg, check_adata

if TYPE_CHECKING:
    from ...inference.pipeline import Inference
    from ...inference.shards import Destination

__all__ = ["ModelArg", "check_out", "genes_to_ids", "genes_var", "group_codes", "load", "run_model", "run_to_file"]


def run_model(
    adata: AnnData, model: ModelArg, options: RunOptions, heads: Sequence[str], *, genes: Any = None, **extra: Any
) -> tuple[Inference, LoadedModel]:
    """Validate, load the model and run the pipeline (nothing is written to ``adata``).

    ``genes`` (names as users write them) restricts the per-gene outputs (:func:`genes_to_ids`).
    """
    from ...inference.devices import resolve_device  # lazily: torch (start-up time of `import tfs.tl`)
    from ...inference.pipeline import infer

    check_adata(adata)
    check_readable(adata, options.tokenize())  # the layer and the gene ids, before the model is loaded
    resolve_device(options.device)  # an unavailable device is an error before the model is loaded
    loaded = load_model(model, cache_dir=options.cache_dir)
    ids = genes_to_ids(genes, adata, loaded, options)
    run = infer(adata, loaded, heads=heads, tokenize=options.tokenize(), **options.engine(), genes=ids, **extra)
    return run, loaded


def check_out(out: Any, shard_size: Any, adata: AnnData) -> tuple[Path | None, int]:
    """``out`` (``None``, or an ``.h5ad`` / ``.zarr`` path) and ``shard_size``, checked before any compute.

    ``out`` may not be a file ``adata`` reads (backed, or read lazily): writing it would replace the input's counts.
    """
    size = check_positive_int(shard_size, "shard_size", allow_none=False)
    if out is None:
        return None, size
    path = check_output_path(out)
    for source in source_files(adata):
        if same_file(source, path):
            raise ValueError(
                f"out={str(out)!r} is the file this AnnData reads its cells from ({source}): writing it would "
                "replace the input. Pass another path."
            )
    return path, size


def run_to_file(
    adata: AnnData,
    model: ModelArg,
    options: RunOptions,
    heads: Sequence[str],
    *,
    out: Path,
    shard_size: int,
    tool: str,
    key: str,
    destinations: Sequence[Destination],
    **extra: Any,
) -> dict[str, Any]:
    """Run the model writing per-cell results into the file ``out`` as they are computed (resumable).

    The results go into a shard folder beside ``out`` (``<out>.shards``), merged into ``out`` when every shard
    is done: an AnnData with ``adata``'s ``obs``, the ``destinations`` and ``uns[key]["params"]``. A call that
    was interrupted resumes when made again with the same arguments. Returns the record of the merged file
    (``params``, with ``"out"`` and how the shards were computed), for ``adata``'s ``uns[key]["params"]``.
    """
    from ...inference.devices import resolve_device  # lazily: torch (start-up time of `import tfs.tl`)
    from ...inference.pipeline import ShardedInference, infer_sharded

    check_adata(adata)
    resolve_device(options.device)
    loaded = load_model(model, cache_dir=options.cache_dir)
    written = [f"{d.kind}/{d.name}" for d in destinations]

    def describe(run: Inference) -> OutputSpec:
        params = run.params(loaded, options, tool, out=str(out), **extra)
        params["keys"] = [*written, f"uns/{key}"]
        uns = {key: {"params": params}}
        return OutputSpec(path=str(out), destinations=tuple(destinations), uns=uns, params_key=key)

    info = {
        "tool": tool,
        "inputs": sorted(str(f) for f in source_files(adata)),  # files the merge must not write over
        **({"soma": dict(adata.uns["soma"])} if isinstance(adata.uns.get("soma"), dict) else {}),
    }
    run: ShardedInference = infer_sharded(
        adata,
        loaded,
        shard_folder(out),
        describe=describe,
        obs=as_frame(adata.obs),
        heads=heads,
        options=options.record(),
        tokenize=options.tokenize(),
        **options.engine(),
        shard_size=shard_size,
        info=info,
    )
    return read_params(out, key) if run.output is not None else {}


def genes_to_ids(genes: Any, adata: AnnData | None, loaded: LoadedModel, options: RunOptions) -> list[str] | None:
    """Gene names as the user knows them (Ensembl ids, ``var_names``, symbols) -> vocabulary ids (``None``: all).

    ``var_names`` are looked up where the counts come from (:func:`genes_var`): ``raw.var`` for ``.raw``'s counts.
    """
    names = check_genes(genes)
    if names is None:
        return None
    var = None if adata is None else genes_var(names, adata, loaded, options, "requested genes")
    return names_to_ids(names, loaded.vocab, var=var, gene_key=options.gene_key)


def genes_var(
    names: Sequence[str], adata: AnnData, loaded: LoadedModel, options: RunOptions, what: str
) -> pd.DataFrame:
    """The ``var`` in which the gene names of ``genes=`` (or ``candidates=``) are looked up: the counts' own.

    With the counts read from ``.raw`` (``layer=None`` and ``.raw`` present, or ``layer="raw"``), the genes and
    their ids are those of ``raw.var``. A name found nowhere else than in ``adata.var`` (not in ``raw.var``) is
    refused, saying so, rather than reported as a gene the vocabulary lacks.
    """
    var, where = counts_var(adata, options.layer)
    if where == "var":
        return var
    own = as_frame(adata.var).index
    try:
        ids = names_to_ids(names, loaded.vocab, var=var, gene_key=options.gene_key)
    except ImportError:  # no symbol tables: ids and var_names still work
        ids = [str(n) for n in names]
    found = loaded.vocab.lookup_genes([i.split(".", 1)[0] for i in ids]) >= 0
    only_in_var = [n for n, ok in zip(names, found, strict=True) if not ok and n in own and n not in var.index]
    if only_in_var:
        how = "layer='raw'" if options.layer == "raw" else "layer=None and .raw present"
        raise ValueError(
            f"{len(only_in_var)} of the {what} are var_names of adata.var but not of adata.raw.var: "
            f"{only_in_var[:8]}{' ...' if len(only_in_var) > 8 else ''}. With {how} the counts and their gene ids "
            "come from adata.raw, so genes are looked up in adata.raw.var: name genes of adata.raw, or pass "
            "layer='X' (or the name of a layer of counts) to read adata's own genes."
        )
    return var


def group_codes(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Each cell's group (``-1``: none) and the groups with cells, their labels as strings.

    Labels equal as strings (``1`` and ``"1"``) are one group. The groups are in a categorical's category order,
    else in the order pandas sorts the values (numbers as numbers), as scanpy's tools order groups.
    """
    known = column.notna().to_numpy()
    text = column.astype(str).to_numpy(dtype=object)
    if isinstance(column.dtype, pd.CategoricalDtype):
        order = list(column.cat.categories)
    else:
        values = pd.unique(column[known])
        try:
            order = sorted(values)
        except TypeError:  # mixed types (1 and "1"): by their text
            order = sorted(values, key=str)
    present = set(text[known])
    labels = [c for c in dict.fromkeys(str(c) for c in order) if c in present]
    codes = pd.Categorical(np.where(known, text, None), categories=labels).codes.astype(np.int64)
    return codes, labels


def load(model: ModelArg, options: RunOptions, *cells: AnnData | None) -> LoadedModel:
    """The model, loaded (and kept in memory) before a run, e.g. to check a request against its size.

    The AnnData in ``cells`` (those the run will read) are first checked for the layer and gene ids the options
    name, so that a typo is not reported after a model was loaded or downloaded.
    """
    for adata in cells:
        if adata is not None:
            check_readable(adata, options.tokenize())
    return load_model(model, cache_dir=options.cache_dir)
