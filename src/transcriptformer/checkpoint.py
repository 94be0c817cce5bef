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
from .config import Activation, MuLink, TranscriptFormerConfig
from .model import TranscriptFormer
from .vocab import AuxVocab, GeneVocab, read_aux_vocab, read_gene_tables

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "build_model",
    "clear_cache",
    "load_model",
    "new_model",
    "save_checkpoint",
    "species_vocabulary",
    "state_sha256",
]

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
        The checkpoint folder (``None`` for a model built in memory, e.g. by :func:`new_model`).
    name
        Registry name (``"tf-sapiens"``) or the folder's name.
    weights_sha256
        sha256 of ``model_weights.pt``.
    vocab_files
        The gene-table files the vocabulary was read from, by file name (copied by :func:`save_checkpoint`).
    adapter
        For a model with a LoRA adapter applied (:func:`load_model` with ``adapter=``): its folder, sha256 and
        whether it was merged into the weights; ``weights_sha256`` is then the base's.
    runtime
        What is kept per device across runs: the network's copy on each accelerator and the engine's
        per-device state (attention kernels, compiled code). Guarded by :attr:`lock`.
    """

    model: TranscriptFormer
    config: TranscriptFormerConfig
    vocab: GeneVocab
    aux_vocabs: tuple[AuxVocab, ...]
    path: Path | None
    name: str
    weights_sha256: str
    vocab_files: dict[str, Path] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
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
        vocab_files={f: path / VOCAB_DIR / f for f in dc.esm2_mappings},
    )


_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(path: Path) -> tuple:
    files = [path / CONFIG_FILE, path / WEIGHTS_FILE]
    stats = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())
    return (str(path), stats)


def load_model(
    model: str | os.PathLike | LoadedModel | tuple,
    *,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a TranscriptFormer checkpoint.

    Parameters
    ----------
    model
        A checkpoint folder in the published layout, a registry name (``"tf-sapiens"``,
        ``"tf-exemplar"``, ``"tf-metazoa"``; downloaded and verified on first use), or an already
        loaded model (returned as is). ``(model, adapter_folder)`` is the same as passing ``adapter``: this
        form works wherever ``model=`` is accepted.
    adapter
        A LoRA adapter folder (written by :func:`transcriptformer.finetune`) to apply to the model. The
        loaded base model is not modified: the result is a copy, and the base keeps giving its own numbers.
        An adapter trained on other weights is refused (their sha256 differ).
    merge_adapter
        Fold the adapter into the weights (default: as fast as the base model); ``False`` keeps the adapter
        layers (the same outputs).
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
    if isinstance(model, tuple):
        if len(model) != 2 or adapter is not None:
            raise ValueError("model=(checkpoint, adapter_folder) takes exactly two items (and no adapter=).")
        model, adapter = model
    if adapter is not None:
        return _with_adapter(load_model(model, cache_dir=cache_dir), adapter, merge_adapter)
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
        path = Path(model).expanduser()  # type: ignore[arg-type]  # a (model, adapter) tuple was unpacked above
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
        _ADAPTED.clear()


_ADAPTED: dict[tuple, LoadedModel] = {}


def _with_adapter(base: LoadedModel, folder: str | os.PathLike, merge: bool) -> LoadedModel:
    """``base`` with a LoRA adapter applied, kept in memory per (base weights, adapter file, merge)."""
    from . import lora

    folder = Path(folder).expanduser().resolve()
    lora.read_adapter_info(folder)  # a clear error when it is not an adapter folder
    stat = (folder / "adapter_model.safetensors").stat()
    key = (id(base), base.weights_sha256, str(folder), stat.st_mtime_ns, stat.st_size, bool(merge))
    with _CACHE_LOCK:
        hit = _ADAPTED.get(key)
    if hit is not None:
        return hit
    adapted = lora.load_adapter(base, folder, merge=merge)
    with _CACHE_LOCK:
        _ADAPTED[key] = adapted
    logger.info("applied the adapter %s to %s", folder, base.name)
    return adapted


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


# -- new models and saving ----------------------------------------------------------------------------


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and values (the identity of weights held in memory)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def new_model(
    gene_tables: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    assay_vocab: Sequence[str] | Mapping[str, int] | None = None,
    embed_dim: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    model_dim: int | None = None,
    seq_len: int = 2047,
    gene_head_hidden_dim: int | None = None,
    dropout: float = 0.1,
    softcap: float = 10.0,
    activation: Activation = "gelu",
    mu_link_fn: MuLink = "softmax",
    gene_id_loss_weight: float = 1.0,
    seed: int = 0,
    name: str = "new-model",
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """A new, randomly initialised TranscriptFormer with the published architecture and config schema.

    The vocabulary is built as the published loader builds it: the released special tokens, then the
    genes of ``gene_tables`` in order (first occurrence wins). The frozen gene vectors are the tables' ESM2
    vectors (special-token rows: uniform ``[0, 1)`` from ``numpy.random.RandomState(42)``, as the published
    model initialises them); everything else gets PyTorch's default initialisation, seeded by ``seed``.
    The result can be passed as ``model=`` anywhere, trained with :func:`transcriptformer.train` and saved
    in the published layout with :func:`save_checkpoint`.

    Parameters
    ----------
    gene_tables
        Gene-table files in the published HDF5 format (``keys`` + ``arrays``), or species names of the
        ``all-embeddings`` download (``"homo_sapiens"``), in vocabulary order.
    assay_vocab
        Assay labels (a list, or ``{label: index}`` with ``"unknown"``): the cells' ``obs["assay"]`` becomes an
        auxiliary token. ``None``: no auxiliary token.
    embed_dim, num_layers, num_heads, model_dim, seq_len, gene_head_hidden_dim, dropout, softcap, activation, mu_link_fn
        The ``model_config`` entries (``model_dim`` default ``4 * embed_dim``, ``gene_head_hidden_dim``
        default ``embed_dim``); see :class:`~transcriptformer.config.ModelConfig`.
    gene_id_loss_weight
        ``> 0``: the model has the gene-identity head, weighted so in the training loss.
    seed
        Seed of the initialisation.
    name
        Name of the model in results and messages.
    cache_dir
        Where the ``all-embeddings`` download is kept, for species names.

    Returns
    -------
    LoadedModel
        The model (``path`` is ``None`` until it is saved).
    """
    import numpy as np

    from . import registry
    from .config import DataConfig, LossConfig, ModelConfig, TranscriptFormerConfig

    paths = registry.species_tables(gene_tables, cache_dir=cache_dir)
    table = read_gene_tables(paths)
    files = {p.name: p for p in paths}
    if len(files) != len(paths):
        raise ValueError(f"gene tables must have distinct file names (they are saved side by side): {paths}.")
    if assay_vocab is None:
        labels: dict[str, int] = {}
    elif isinstance(assay_vocab, Mapping):
        labels = {str(k): int(v) for k, v in assay_vocab.items()}
    else:
        labels = {"unknown": 0, **{str(a): i + 1 for i, a in enumerate(x for x in assay_vocab if x != "unknown")}}
    config = TranscriptFormerConfig(
        model=ModelConfig(
            embed_dim=embed_dim,
            model_dim=model_dim or 4 * embed_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            seq_len=seq_len,
            aux_len=1 if labels else 0,
            softcap=softcap,
            mu_link_fn=mu_link_fn,
            activation=activation,
            dropout=dropout,
            gene_head_hidden_dim=gene_head_hidden_dim or embed_dim,
        ),
        data=DataConfig(aux_cols=("assay",) if labels else (), esm2_mappings=tuple(files)),
        loss=LossConfig(gene_id_loss_weight=gene_id_loss_weight),
    )
    dc = config.data
    vocab = GeneVocab(dc.special_tokens, table.ids, pad_token=dc.gene_pad_token)
    aux_vocabs = (AuxVocab("assay", labels),) if labels else ()
    torch.manual_seed(seed)
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
    special = np.random.RandomState(42).rand(vocab.n_special, table.dim)
    esm = torch.from_numpy(np.concatenate([special, table.vectors.astype(np.float64)])).float()
    with torch.no_grad():
        model.gene_embeddings.embedding.weight.copy_(esm)
    model.float().eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        config=config,
        vocab=vocab,
        aux_vocabs=aux_vocabs,
        path=None,
        name=name,
        weights_sha256=state_sha256(model.state_dict()),
        vocab_files=files,
    )


def save_checkpoint(
    loaded: LoadedModel,
    folder: str | os.PathLike,
    *,
    model: TranscriptFormer | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model in the published checkpoint layout (``config.json``, ``model_weights.pt``, ``vocabs/``).

    The folder is what :func:`load_model`, the registry layout and the published ``transcriptformer
    inference --checkpoint-path`` read. Everything is written into a temporary folder first and then moved
    into place, so a failure while writing never leaves a half-written checkpoint; other files in the
    folder (training logs, say) are left alone.

    Parameters
    ----------
    loaded
        The model and its vocabularies.
    folder
        The checkpoint folder to write.
    model
        Weights to save instead of ``loaded.model`` (same architecture; e.g. a trained copy).
    overwrite
        Replace a checkpoint already in the folder (otherwise that is an error).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    import json
    import shutil
    import tempfile

    folder = Path(folder).expanduser()
    parts = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_DIR)
    if any((folder / p).exists() for p in parts) and not overwrite:
        raise FileExistsError(f"{folder} already holds a checkpoint; pass overwrite=True or choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        (tmp / VOCAB_DIR).mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(loaded.config.to_dict(), indent=2) + "\n")
        net = model if model is not None else loaded.model
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        for a in loaded.aux_vocabs:
            (tmp / VOCAB_DIR / f"{a.column}_vocab.json").write_text(json.dumps(dict(a.labels), indent=1) + "\n")
        for name in loaded.config.data.esm2_mappings:
            source = loaded.vocab_files.get(name) or (loaded.path / VOCAB_DIR / name if loaded.path else None)
            if source is None or not Path(source).is_file():
                raise FileNotFoundError(f"the gene table {name} of {loaded.name} is not available to copy.")
            shutil.copyfile(source, tmp / VOCAB_DIR / name)
        # everything is written: move it into place (other files in the folder are left alone)
        old = tmp / ".previous-vocabs"
        if (folder / VOCAB_DIR).exists():
            os.replace(folder / VOCAB_DIR, old)
        for part in parts:
            os.replace(tmp / part, folder / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s to %s", loaded.name, folder)
    return folder
