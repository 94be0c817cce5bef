"""AnnData -> tokens -> model -> arrays: the pipeline shared by the scanpy tools, the command line and training.

:func:`infer` validates the input (fix-it errors before any compute), runs the :class:`~.engine.Engine` and
warns about what the user should look at; :func:`~.record.provenance` is the one record of how a result was made
(``uns[...]["params"]``, the command line's output, training histories).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import AttentionBackend, Precision
from ..data.tokenizer import CellSource, TokenizeOptions
from ..errors import warn
from ..model import BiasMode
from ..vocab import GeneVocab
from ..weights import registry
from ..weights.checkpoint import species_vocabulary
from ..weights.loaded import LoadedModel
from .engine import Engine
from .options import RunOptions, check_positive_int
from .outputs import HEADS, InferenceResult
from .record import provenance
from .shards import DEFAULT_SHARD_SIZE, OutputSpec, ShardStore, digest_of, frame_digest

logger = logging.getLogger(__name__)

__all__ = ["Inference", "ShardedInference", "infer", "infer_sharded", "input_identity"]


@dataclass
class Inference:
    """What :func:`infer` computed and how."""

    result: InferenceResult
    source: CellSource
    vocab: GeneVocab
    engine: Engine
    species_tables: list[Path] | None

    def params(self, loaded: LoadedModel, options: RunOptions, tool: str, **extra: Any) -> dict[str, Any]:
        """The run's :func:`provenance`, with what the input looked like to the model."""
        src = self.source
        return provenance(
            tool,
            loaded,
            options=options,
            stats=self.result.stats,
            counts_source=src.source,
            counts_look_raw=src.counts_look_raw,
            n_genes_matched=src.n_matched,
            n_genes=src.n_genes,
            species_embedding=[str(p) for p in self.species_tables] if self.species_tables else None,
            **extra,
        )


def _prepare(
    adata, loaded: LoadedModel, tokenize: TokenizeOptions, species_embedding: Any, cache_dir: Any, **engine: Any
) -> tuple[Engine, CellSource, GeneVocab, tuple | None, list | None]:
    """The engine, the cells as the model reads them, the vocabulary and (with ``species_embedding``) its tables."""
    loaded.check_weights_unchanged()
    vocab, tables, species_paths = loaded.vocab, None, None
    if species_embedding is not None:
        species_paths = registry.species_tables(species_embedding, cache_dir=cache_dir)
        vocab, esm, bias = species_vocabulary(loaded, species_paths)
        tables = (esm, bias)
    run = Engine(loaded, **engine)
    return run, loaded.cells(adata, tokenize, vocab), vocab, tables, species_paths


def infer(
    adata,
    loaded: LoadedModel,
    *,
    heads: Sequence[str] = ("embeddings",),
    tokenize: TokenizeOptions | None = None,
    species_embedding: Any = None,
    device: str | torch.device = "auto",
    precision: Precision | str = "auto",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    attention: AttentionBackend | str = "auto",
    progress: bool | None = None,
    cache_dir: Any = None,
    embeddings_out: Any | None = None,
    genes: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    distributed: bool | None = None,
    data_genes_only: bool = False,
    mode: BiasMode = "embed",
) -> Inference:
    """AnnData -> tokens -> model -> arrays: the pipeline shared by the scanpy tools and the CLI.

    Validates the input (raising fix-it errors before any compute), runs the engine, and warns
    about cells without any gene of the vocabulary. Never modifies ``adata``. ``genes`` restricts the
    per-gene outputs to those gene ids; ``data_genes_only`` to the genes of the data (smaller ``gene_sum``
    accumulators).
    """
    if any(HEADS[h].gene_head for h in heads if h in HEADS):
        if loaded.model.gene_id_head is None:
            raise ValueError(
                f"{loaded.name} has no gene-identity head, so gene-identity likelihoods are not available."
            )
        if species_embedding is not None:
            raise ValueError(
                "gene-identity likelihoods are over the model's own vocabulary and cannot be computed with "
                "species_embedding; drop one of the two."
            )
    tokenize = tokenize or TokenizeOptions()
    engine, source, vocab, tables, species_paths = _prepare(
        adata,
        loaded,
        tokenize,
        species_embedding,
        cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        attention=attention,
        progress=progress,
        distributed=distributed,
    )
    gene_tokens = None if genes is None else vocab.mask(genes, what="requested genes")
    if data_genes_only:
        in_data = np.zeros(len(vocab), dtype=bool)
        in_data[source.column_tokens] = True
        gene_tokens = in_data if gene_tokens is None else gene_tokens & in_data
    result = engine.run(
        source,
        heads,
        tables=tables,
        embeddings_out=embeddings_out,
        gene_tokens=gene_tokens,
        groups=groups,
        n_groups=n_groups,
        mode=mode,
    )
    raw_warning = source.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    empty = int((result.n_genes == 0).sum())
    if empty:
        warn(
            f"{empty:,} of {source.n_obs:,} cells have no expressed gene of the vocabulary: their embedding only "
            "reflects the assay token, and their likelihood is NaN. Consider filtering them "
            "(e.g. sc.pp.filter_cells(adata, min_genes=...))."
        )
    return Inference(result=result, source=source, vocab=vocab, engine=engine, species_tables=species_paths)


#: Run options that do not change the numbers (or change them only by float round-off, as the batch size can),
#: left out of a sharded run's fingerprint so a run can resume on another device or with another batch size.
_NOT_FINGERPRINTED = frozenset({"device", "progress", "batch_size", "max_tokens", "cache_dir", "attention"})


@dataclass
class ShardedInference:
    """What :func:`infer_sharded` did in this process."""

    store: ShardStore
    source: CellSource
    vocab: GeneVocab
    engine: Engine
    species_tables: list[Path] | None
    computed: list[int]
    skipped: int
    output: Path | None


def input_identity(adata: Any, source: CellSource, *, sample: int = 64) -> dict[str, Any]:
    """What identifies an input for a sharded run: its size, digests of its cell names, gene ids and first cells.

    ``tokens_sha256`` covers what the tokeniser read: the columns, the gene token of each (from ``gene_key``) and
    every cell's auxiliary tokens (its ``obs["assay"]``), so a resume after those changed is refused.

    Cheap at any size: the cell names are hashed by pandas a million at a time, and only the first ``sample``
    cells' counts are read (as stored, every column: options that change how they are read are recorded
    separately).
    """
    import hashlib

    import scipy.sparse as sp

    h = hashlib.sha256()
    if source.n_obs:
        block = source.matrix[0 : min(source.n_obs, sample)]
        if hasattr(block, "compute") and not isinstance(block, np.ndarray):
            block = block.compute()
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float32)
            block.sum_duplicates()
            parts = [block.indptr.astype(np.int64), block.indices.astype(np.int64), block.data]
        else:
            parts = [np.asarray(block, dtype=np.float32)]
        for part in parts:
            h.update(np.ascontiguousarray(part).tobytes())
    genes = source.var_names if source.var_names is not None else pd.RangeIndex(source.matrix.shape[1])
    read = hashlib.sha256()  # what the tokeniser made of the input: the columns read, their tokens, the aux tokens
    for part in (source.columns, source.column_tokens, source.aux):
        read.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    return {
        "n_obs": int(source.n_obs),
        "n_vars": int(source.matrix.shape[1]),
        "counts_source": source.source,
        "obs_names_sha256": frame_digest(adata.obs_names),
        "genes_sha256": frame_digest(pd.Index([str(g) for g in genes])),
        "tokens_sha256": read.hexdigest(),
        "first_cells_sha256": h.hexdigest(),
    }


def _on_rank0(rank: int, world: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its value (or its error) broadcast to every rank."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - every rank raises it, rank 0 the original
            error = e
            box = [("error", f"{e}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise ValueError(f"(rank 0) {value}")
    return value


def infer_sharded(
    adata,
    loaded: LoadedModel,
    directory: str | os.PathLike,
    *,
    describe: Callable[[Inference], OutputSpec],
    obs: pd.DataFrame,
    heads: Sequence[str] = ("embeddings",),
    options: Mapping[str, Any] | None = None,
    tokenize: TokenizeOptions | None = None,
    species_embedding: Any = None,
    device: str | torch.device = "auto",
    precision: Precision | str = "auto",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    attention: AttentionBackend | str = "auto",
    progress: bool | None = None,
    cache_dir: Any = None,
    distributed: bool | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    merge: bool = True,
    keep_shards: bool = False,
    info: Mapping[str, Any] | None = None,
) -> ShardedInference:
    """Run the model over ``adata`` writing per-cell results into a resumable shard folder, then merge them.

    ``directory`` is created (a new run) or must hold the shards of the same run (same model, options,
    outputs, input and shard size: a resumed run), in which case finished shards are skipped. Under
    ``torch.distributed`` rank 0 decides which shards are missing and every rank computes a contiguous block
    of them. With ``merge``, rank 0 then assembles the output named by ``describe`` (every rank waits for it).

    Parameters
    ----------
    adata
        The cells (in memory, backed, lazy: dask, zarr, :func:`~transcriptformer.data.soma.read_soma`).
    loaded
        The model.
    directory
        The shard folder.
    describe
        Given the run's :class:`Inference` (no results yet; its ``result.stats`` describe the engine), the
        merged output's :class:`~.shards.OutputSpec` (its path, where each result goes, its ``uns``).
    obs
        One row per cell, the merged output's ``obs`` (written into the folder once).
    heads
        Per-cell (``"cell"`` layout) and per-slot outputs; per-gene outputs are not sharded.
    options
        The run's options as recorded (``RunOptions.record()``): all but the device, batch size, token budget and
        progress enter the fingerprint.
    tokenize, species_embedding, device, precision, batch_size, max_tokens, attention, progress, cache_dir, distributed
        As for :func:`infer`.
    shard_size
        Cells per shard.
    merge, keep_shards
        Merge when every shard is done (on rank 0); keep the shard folder afterwards.
    info
        Recorded in the manifest, not compared (e.g. where the input came from).
    """
    shard_size = check_positive_int(shard_size, "shard_size", allow_none=False)
    bad = [h for h in heads if h not in HEADS or HEADS[h].layout not in ("cell", "slot")]
    if bad:
        raise ValueError(
            f"{bad} cannot be written in shards (only per-cell and per-slot outputs: "
            f"{[n for n, h in HEADS.items() if h.layout in ('cell', 'slot')]})."
        )
    tokenize = tokenize or TokenizeOptions()
    engine, source, vocab, tables, species_paths = _prepare(
        adata,
        loaded,
        tokenize,
        species_embedding,
        cache_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        attention=attention,
        progress=progress,
        distributed=distributed,
    )
    if len(obs) != source.n_obs:
        raise ValueError(f"obs has {len(obs):,} rows for {source.n_obs:,} cells.")
    stats = {
        "device": str(engine.device),
        "precision": engine.precision,
        "attention": engine.attention,
        "max_tokens": engine.max_tokens,
    }
    run = Inference(
        result=InferenceResult(stats=stats), source=source, vocab=vocab, engine=engine, species_tables=species_paths
    )
    fingerprint = {
        "model": {
            "name": loaded.name,
            "weights_sha256": loaded.weights_sha256,
            "adapter_sha256": loaded.adapter["sha256"] if loaded.adapter else None,
            "config_sha256": digest_of(loaded.config.to_dict()),
            "species_tables": [str(p) for p in species_paths] if species_paths else None,
        },
        "options": {k: v for k, v in (options or {}).items() if k not in _NOT_FINGERPRINTED},
        "precision": engine.precision,
        "tokenize": dataclasses.asdict(tokenize),
        "heads": list(heads),
        "input": input_identity(adata, source),
    }
    rank, world = engine.rank, engine.world
    spec = describe(run)
    manifest = ShardStore.fingerprint_manifest(
        fingerprint, n_obs=source.n_obs, shard_size=shard_size, output=spec, info=info or {}
    )

    def prepare() -> list[int]:
        return ShardStore.prepare(directory, manifest, obs).pending()

    pending: list[int] = _on_rank0(rank, world, prepare)
    store = ShardStore(directory, manifest)
    skipped = store.n_shards - len(pending)
    if skipped:
        logger.info("resuming %s: %d of %d shards are done", directory, skipped, store.n_shards)
    mine = [int(i) for i in np.array_split(np.asarray(pending, dtype=np.int64), world)[rank]]
    results = engine.run_ranges(source, heads, [store.bounds(i) for i in mine], tables=tables)
    for index, result in zip(mine, results, strict=True):
        arrays = {**result.cells, **result.slots}
        shard_stats = {**result.stats, "seconds": result.seconds, "rank": rank, "world_size": world}
        shard_stats["counts_look_raw"] = source.counts_look_raw
        store.write(index, arrays, shard_stats)
    if world > 1:
        torch.distributed.barrier()
    raw_warning = source.raw_count_warning()
    if raw_warning:
        warn(raw_warning)
    output = None
    if merge:
        output = _on_rank0(rank, world, lambda: store.merge(keep=keep_shards, progress=progress))
    return ShardedInference(
        store=store,
        source=source,
        vocab=vocab,
        engine=engine,
        species_tables=species_paths,
        computed=mine,
        skipped=skipped,
        output=output,
    )
