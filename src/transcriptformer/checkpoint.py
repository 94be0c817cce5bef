"""Checkpoints in the published layout: a folder -> model, vocabularies and config.

A checkpoint folder holds ``config.json``, ``model_weights.pt`` (a plain state_dict) and
``vocabs/`` (``<column>_vocab.json`` per auxiliary column, the ESM2 gene tables named in
``data_config.esm2_mappings``). :func:`load_model` reads it unchanged, with
``torch.load(weights_only=True)`` and strict key matching, and keeps loaded models in memory
so repeated calls do not reload.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._hash import sha256_file
from .config import TranscriptFormerConfig
from .model import TranscriptFormer
from .vocab import AuxVocab, GeneVocab, read_aux_vocab, read_gene_tables

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "build_model", "clear_cache", "load_model", "species_vocabulary"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model_weights.pt"
VOCAB_DIR = "vocabs"


@dataclass
class LoadedModel:
    """A checkpoint in memory: the network (on CPU, eval mode) and everything needed to feed it.

    Attributes
    ----------
    model
        The network, float32 on CPU. Do not modify it: it is shared by every call that loads
        the same checkpoint.
    config
        The parsed ``config.json``.
    vocab
        Gene vocabulary (token ids).
    aux_vocabs
        Auxiliary vocabularies, in sequence order.
    path
        The checkpoint folder.
    name
        Registry name (``"tf-sapiens"``) or the folder's name.
    weights_sha256
        sha256 of ``model_weights.pt``.
    runtime
        What is kept per device across runs: the network's copy on each accelerator and the engine's
        per-device state (attention kernels, compiled code). Guarded by :attr:`lock`.
    """

    model: TranscriptFormer
    config: TranscriptFormerConfig
    vocab: GeneVocab
    aux_vocabs: tuple[AuxVocab, ...]
    path: Path
    name: str
    weights_sha256: str
    runtime: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    @property
    def seq_len(self) -> int:
        """Gene slots per cell ``S``."""
        return self.config.model.seq_len

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings."""
        return self.config.model.embed_dim

    def on(self, device: torch.device | str) -> TranscriptFormer:
        """The network on ``device`` (copied once per device and kept in :attr:`runtime`)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.model
        key = f"model:{device}"
        with self.lock:
            if key not in self.runtime:
                import copy

                self.runtime[key] = copy.deepcopy(self.model).to(device).eval()
            return self.runtime[key]


def _check_layout(path: Path, config: TranscriptFormerConfig | None = None) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(path)!r} does not exist. Pass a folder in the published layout "
            "(config.json, model_weights.pt, vocabs/) or a registry name such as 'tf-sapiens'."
        )
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_DIR) if not (path / n).exists()]
    if config is not None:
        missing += [f"{VOCAB_DIR}/{f}" for f in config.data.esm2_mappings if not (path / VOCAB_DIR / f).is_file()]
        missing += [
            f"{VOCAB_DIR}/{c}_vocab.json"
            for c in config.data.aux_cols
            if not (path / VOCAB_DIR / f"{c}_vocab.json").is_file()
        ]
    if missing:
        raise FileNotFoundError(
            f"checkpoint folder {str(path)!r} is incomplete: missing {', '.join(missing)}. "
            "Download it again (`transcriptformer download ...`) or check the path."
        )


def _describe_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if shapes:
        parts.append(f"shape differences ({len(shapes)}): {'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
    return "; ".join(parts)


def build_model(
    path: str | Path,
    *,
    name: str | None = None,
    config: TranscriptFormerConfig | None = None,
    weights_sha256: str | None = None,
) -> LoadedModel:
    """Load a checkpoint folder without the in-memory cache (see :func:`load_model`).

    ``weights_sha256``, if already known (verified), saves hashing ``model_weights.pt`` again.
    """
    path = Path(path).expanduser().resolve()
    _check_layout(path)
    config = config or TranscriptFormerConfig.from_json(path / CONFIG_FILE)
    _check_layout(path, config)
    dc = config.data
    table = read_gene_tables(path / VOCAB_DIR / f for f in dc.esm2_mappings)
    vocab = GeneVocab(dc.special_tokens, table.ids, pad_token=dc.gene_pad_token)
    aux_vocabs = tuple(read_aux_vocab(path / VOCAB_DIR / f"{c}_vocab.json") for c in dc.aux_cols)
    model = TranscriptFormer(
        config.model,
        vocab_size=len(vocab),
        esm_dim=table.dim,
        aux_vocab_sizes={a.column: len(a) for a in aux_vocabs},
        aux_unknown=sorted({a.unknown for a in aux_vocabs}),
        pad_idx=vocab.pad,
        start_idx=vocab.start,
        end_idx=vocab.end,
        gene_head=config.loss.has_gene_head,
        softplus_approx=config.loss.softplus_approx,
    )
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(f"{path / WEIGHTS_FILE} could not be read as a state_dict: {e}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path / WEIGHTS_FILE} holds a {type(state).__name__}, not a state_dict.")
    problem = _describe_mismatch(model, state)
    if problem:
        raise ValueError(
            f"the weights in {path / WEIGHTS_FILE} do not fit config.json and vocabs/ "
            f"(vocabulary: {len(vocab)} tokens, ESM width {table.dim}): {problem}."
        )
    model.load_state_dict(state, strict=True)
    model.float().eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        config=config,
        vocab=vocab,
        aux_vocabs=aux_vocabs,
        path=path,
        name=name or path.name,
        weights_sha256=weights_sha256 or sha256_file(path / WEIGHTS_FILE),
    )


_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(path: Path) -> tuple:
    files = [path / CONFIG_FILE, path / WEIGHTS_FILE]
    stats = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())
    return (str(path), stats)


def load_model(model: str | os.PathLike | LoadedModel, *, cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a TranscriptFormer checkpoint.

    Parameters
    ----------
    model
        A checkpoint folder in the published layout, a registry name (``"tf-sapiens"``,
        ``"tf-exemplar"``, ``"tf-metazoa"``; downloaded and verified on first use), or an already
        loaded model (returned as is).
    cache_dir
        Where registry downloads are kept (default: ``$TRANSCRIPTFORMER_CACHE`` or the user cache).

    Returns
    -------
    LoadedModel
        The loaded model. Loaded models are kept in memory per folder, so calling this again with the
        same checkpoint (unchanged on disk) returns the same object.

    Examples
    --------
    >>> import transcriptformer
    >>> import transcriptformer.scanpy as tfs
    >>> m = transcriptformer.load_model(tfs.datasets.tiny_model_path())
    >>> m.embed_dim
    32
    """
    if isinstance(model, LoadedModel):
        return model
    from . import registry

    name = None
    verify = None
    if isinstance(model, str) and registry.is_registered(model):
        name = registry.canonical_name(model)
        path = registry.fetch(name, cache_dir=cache_dir)
        verify = registry.verify_checkpoint
    else:
        path = Path(model).expanduser()
        if not path.exists() and isinstance(model, str) and os.sep not in model and "/" not in model:
            raise FileNotFoundError(
                f"{model!r} is neither a checkpoint folder nor a known model; "
                f"known models: {', '.join(registry.MODEL_NAMES)}."
            )
    path = Path(path).resolve()
    _check_layout(path)
    key = _cache_key(path)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    digests = verify(path) if verify is not None else {}
    loaded = build_model(path, name=name, weights_sha256=digests.get(WEIGHTS_FILE))
    with _CACHE_LOCK:
        for k in [k for k in _CACHE if k[0] == key[0]]:
            del _CACHE[k]  # the folder changed on disk: drop the stale copy
        _CACHE[key] = loaded
    logger.info("loaded %s from %s", loaded.name, path)
    return loaded


def clear_cache() -> None:
    """Forget every model loaded by :func:`load_model`."""
    with _CACHE_LOCK:
        _CACHE.clear()


def species_vocabulary(
    loaded: LoadedModel, tables: Sequence[str | os.PathLike]
) -> tuple[GeneVocab, torch.Tensor, torch.Tensor]:
    """A vocabulary for genes outside the model's training species, from ESM2 gene tables.

    Unlike the published ``--pretrained-embedding`` surgery, the special tokens keep their
    indices and embedding rows (so ``[START]``, ``[PAD]`` and masking behave as in the model's own
    vocabulary), each gene of the tables gets its vector from the table, and the count head's
    per-gene bias is the gene's own where the gene is in the model's vocabulary, else 0. The loaded
    model is not modified: the tables are passed alongside it.

    Parameters
    ----------
    loaded
        The model.
    tables
        Gene-table files in the published HDF5 format, in vocabulary order (first occurrence wins).

    Returns
    -------
    tuple[GeneVocab, torch.Tensor, torch.Tensor]
        The new vocabulary, its ESM matrix ``(V', D)`` and its count-head bias ``(V', 1)`` (float32, CPU).
    """
    table = read_gene_tables(tables)
    weight = loaded.model.gene_embeddings.embedding.weight.detach()
    bias = loaded.model.mu.gene_embedding.weight.detach()
    if table.dim != weight.shape[1]:
        raise ValueError(
            f"the gene tables have vectors of width {table.dim}, but {loaded.name} expects ESM2 vectors of width "
            f"{weight.shape[1]}; use tables made with the same protein language model."
        )
    old = loaded.vocab
    vocab = GeneVocab(old.special_tokens, table.ids, pad_token=old.pad_token)
    n_special = old.n_special
    known = old.lookup_genes(list(table.ids))
    gene_bias = torch.zeros(len(table.ids), 1, dtype=bias.dtype)
    present = torch.from_numpy(known >= 0)
    gene_bias[present] = bias[torch.from_numpy(known[known >= 0])]
    esm = torch.cat([weight[:n_special], torch.from_numpy(table.vectors).to(weight.dtype)])
    return vocab, esm, torch.cat([bias[:n_special], gene_bias])
