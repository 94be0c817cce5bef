"""AnnData -> tokens -> model -> arrays: the pipeline shared by the scanpy tools, the command line and training.

:func:`infer` validates the input (fix-it errors before any compute), runs the :class:`~.engine.Engine` and
warns about what the user should look at; :func:`~.record.provenance` is the one record of how a result was made
(``uns[...]["params"]``, the command line's output, training histories).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from .options import RunOptions
from .outputs import HEADS, InferenceResult
from .record import provenance

__all__ = ["Inference", "infer"]


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
    loaded.check_weights_unchanged()
    tokenize = tokenize or TokenizeOptions()
    vocab, tables, species_paths = loaded.vocab, None, None
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
    if species_embedding is not None:
        species_paths = registry.species_tables(species_embedding, cache_dir=cache_dir)
        vocab, esm, bias = species_vocabulary(loaded, species_paths)
        tables = (esm, bias)
    engine = Engine(
        loaded,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        attention=attention,
        progress=progress,
        distributed=distributed,
    )
    source = loaded.cells(adata, tokenize, vocab)
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
