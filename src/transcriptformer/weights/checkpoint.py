"""Checkpoints in the published layout: a folder -> :class:`~.loaded.LoadedModel`, and back.

:func:`load_model` reads a folder (:mod:`.layout`) unchanged, with ``torch.load(weights_only=True)`` and strict
key matching, and keeps loaded models in memory so repeated calls do not reload.

Loading is fast after the first time: the weights are memory-mapped (``torch.load(mmap=True)``, the
network built on the ``meta`` device and the mapped tensors assigned to it, so nothing is copied), only
the gene ids of the ESM2 tables are read (the vectors come from the weights), and the sha256 of the
weights and the check that they are finite are done once per change of the file: they are recorded with
the file's size, modification time, inode and change time, for a registry download in its manifest
(``<folder>.sha256.json``), for any other folder in a small JSON file in the user cache
(``<cache>/verified/``, keyed by the folder's resolved path; nothing is ever written into a checkpoint
folder).

This module does not import torch until a model is loaded (the imports inside functions are for start-up time).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _files
from .._files import VerificationRecord, file_stamp
from ..config import (
    ACTIVATIONS,
    MU_LINK_FUNCTIONS,
    Activation,
    DataConfig,
    LossConfig,
    ModelConfig,
    MuLink,
    TranscriptFormerConfig,
)
from ..vocab import AuxVocab, GeneVocab, read_aux_vocab, read_gene_tables, read_table_ids
from . import adapter, registry
from .layout import CONFIG_FILE, VOCAB_DIR, WEIGHTS_FILE, check_folder, check_layout, confined
from .loaded import LoadedModel

if TYPE_CHECKING:
    import torch

    from ..model import TranscriptFormer

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


def _read_state(weights: Path) -> tuple[Mapping[str, torch.Tensor], bool]:
    """The state_dict of ``weights``, memory-mapped when the file's format allows; and whether it is."""
    import torch

    try:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            mapped = True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            logger.info("%s is in torch's legacy format: read into memory (no memory-mapping)", weights)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            mapped = False
    except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(f"{weights} could not be read as a state_dict: {e}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{weights} holds a {type(state).__name__}, not a state_dict.")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{weights} is not a plain state_dict (name -> tensor): entries such as {bad[:3]}.")
    return state, mapped


def _non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (one pass, no temporary copies)."""
    import torch

    bad = []
    for name, t in state.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.detach().reshape(-1))  # NaN propagates into both
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                bad.append(name)
    return bad


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


def _skip_init_mode():
    """A torch-function mode (thread-local) under which the in-place initialisers of ``torch.nn.init`` do nothing.

    Used with the ``meta`` device while building a network whose every tensor is then assigned from the
    weights: random initialisation would be wasted work, and on ``meta`` tensors ``normal_`` imports
    ``torch._dynamo`` (1.5 s). A mode, unlike patching ``torch.nn.init``, affects only this thread.
    """
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and name[0] != "_":
                return args[0] if args else kwargs["tensor"]
            return func(*args, **kwargs)

    return SkipInit()


def _is_download(path: Path) -> bool:
    return path.name in {e.folder for e in registry.ENTRIES} and registry.manifest_path(path).is_file()


def _record(path: Path, cache_dir: str | os.PathLike | None) -> tuple[VerificationRecord | None, bool]:
    """Where what is learned about ``path``'s files is kept: ``(record, is the download manifest)``."""
    if _is_download(path):
        return registry.open_record(path), True
    try:
        root = registry.cache_path(cache_dir)
    except Exception as e:  # noqa: BLE001 - no usable home or cache folder: hash every time
        logger.info("no cache folder for the record of %s (%s)", path, e)
        return None, False
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    record = VerificationRecord.open(root / "verified" / f"{key}.json", strict=False)
    if record.data.get("path") != str(path):
        record = VerificationRecord(record.path, {"path": str(path)})
    return record, False


def _save(path: Path, record: VerificationRecord | None, download: bool) -> None:
    if record is None:
        return
    if download:
        registry.save_record(path, record)
    else:
        record.save()


def _network(config: TranscriptFormerConfig, vocab: GeneVocab, aux_vocabs: Sequence[AuxVocab], esm_dim: int):
    """The network that a config, a gene vocabulary and auxiliary vocabularies describe (weights as initialised)."""
    from ..model import TranscriptFormer  # lazily: torch

    return TranscriptFormer(
        config.model,
        vocab_size=len(vocab),
        esm_dim=esm_dim,
        aux_vocab_sizes={a.column: len(a) for a in aux_vocabs},
        aux_unknown=sorted({a.unknown for a in aux_vocabs}),
        pad_idx=vocab.pad,
        start_idx=vocab.start,
        end_idx=vocab.end,
        gene_head=config.loss.has_gene_head,
        softplus_approx=config.loss.softplus_approx,
    )


def build_model(
    path: str | Path,
    *,
    name: str | None = None,
    config: TranscriptFormerConfig | None = None,
    weights_sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a checkpoint folder without the in-memory cache (see :func:`load_model`).

    ``weights_sha256``, if already known (verified), saves hashing ``model_weights.pt`` again. ``cache_dir``
    is where the record of the weights' hash is kept for folders that were not downloaded by the registry.
    """
    import torch

    path = Path(path).expanduser().resolve()
    config = check_folder(path, config)
    dc = config.data
    tables = [confined(path, f, "esm2_mappings entry") for f in dc.esm2_mappings]
    aux_files = [confined(path, f"{c}_vocab.json", "aux_cols entry") for c in dc.aux_cols]
    ids, esm_dim = read_table_ids(tables)
    vocab = GeneVocab(dc.special_tokens, ids, pad_token=dc.gene_pad_token)
    aux_vocabs = tuple(read_aux_vocab(f) for f in aux_files)
    with (
        torch.device("meta"),
        _skip_init_mode(),
    ):  # no memory, no random initialisation: every tensor comes from the weights
        model = _network(config, vocab, aux_vocabs, esm_dim)
    weights = path / WEIGHTS_FILE
    files = {str(f): file_stamp(f) for f in (path / CONFIG_FILE, weights, *tables, *aux_files)}
    stamp = files[str(weights)]
    record, download = _record(path, cache_dir)
    state, mapped = _read_state(weights)
    problem = _describe_mismatch(model, state)
    if problem:
        raise ValueError(
            f"the weights in {weights} do not fit config.json and vocabs/ "
            f"(vocabulary: {len(vocab)} tokens, ESM width {esm_dim}): {problem}."
        )
    if record is None or not record.is_finite(WEIGHTS_FILE, stamp):
        bad = _non_finite(state)
        if bad:
            raise ValueError(
                f"the weights in {weights} hold NaN or infinite values ({len(bad)} tensor(s), e.g. "
                f"{', '.join(bad[:3])}), which would make every output NaN. The file is damaged or comes from a "
                "diverged training run: download or export it again."
            )
        if record is not None:
            record.set_finite(WEIGHTS_FILE, stamp)
    model.load_state_dict(state, strict=True, assign=True)
    model.float().eval().requires_grad_(False)
    if weights_sha256 is None:
        known = record.known_digest(WEIGHTS_FILE, stamp) if record is not None else None
        if known is None:
            known = _files.sha256_file(weights)
            if record is not None and not download:  # a download's hashes are recorded (and checked) by the registry
                record.set_digest(WEIGHTS_FILE, stamp, known)
        weights_sha256 = known
    _save(path, record, download)
    return LoadedModel(
        model=model,
        config=config,
        vocab=vocab,
        aux_vocabs=aux_vocabs,
        path=path,
        name=name or path.name,
        weights_sha256=weights_sha256,
        vocab_files={f: path / VOCAB_DIR / f for f in dc.esm2_mappings},
        files=files,
        mapped=mapped,
    )


# --------------------------------------------------------------------------------------------
# load_model and its in-memory cache


_CACHE: dict[str, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def _resolve(model: Any, cache_dir: str | os.PathLike | None) -> tuple[Path, str | None]:
    """The checkpoint folder of ``model`` and its registry name (``None`` for a folder given by path)."""
    if not isinstance(model, str | os.PathLike) or not str(model).strip():
        raise ValueError(
            f"model must be a checkpoint folder, a registry name ({', '.join(registry.MODEL_NAMES)}) or a loaded "
            f"model, got {model!r}."
        )
    candidate = Path(model).expanduser()
    if candidate.exists():  # an existing path always wins over a registry name of the same spelling
        if isinstance(model, str) and registry.is_registered(model):
            logger.info(
                "model=%r: using the local folder %s (an existing path wins over the registry name %s)",
                model,
                candidate.resolve(),
                registry.canonical_name(model),
            )
        return candidate, None
    if isinstance(model, str) and registry.is_registered(model):
        name = registry.canonical_name(model)
        if registry.REGISTRY[name].kind != "model":
            raise ValueError(registry.not_a_model(name))
        path = registry.fetch(name, cache_dir=cache_dir)
        logger.info("model=%r: using the registry download %s", model, path)
        return path, name
    if isinstance(model, str) and os.sep not in model and "/" not in model:
        raise FileNotFoundError(
            f"{model!r} is neither a checkpoint folder nor a known model; "
            f"known models: {', '.join(registry.MODEL_NAMES)}."
        )
    return candidate, None


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
        loaded model (returned as is). **An existing path always wins over a registry name**: with a
        folder ``./tf_sapiens`` present (what ``transcriptformer download tf-sapiens --checkpoint-dir .``
        makes), ``model="tf_sapiens"`` loads that folder; the log says which was used.
        ``(model, adapter_folder)`` is the same as passing ``adapter``: this form works wherever ``model=`` is
        accepted.
    adapter
        A LoRA adapter folder (written by :func:`transcriptformer.finetune`) to apply to the model. The
        loaded base model is not modified: the result is a copy, and the base keeps giving its own numbers.
        An adapter trained on other weights is refused (their sha256 differ).
    merge_adapter
        Fold the adapter into the weights (default: as fast as the base model); ``False`` keeps the adapter
        layers (the same outputs).
    cache_dir
        Where registry downloads (and the records of hashed files) are kept (default:
        ``$TRANSCRIPTFORMER_CACHE`` or the user cache).

    Returns
    -------
    LoadedModel
        The loaded model. Loaded models are kept in memory per folder. Every call checks the size,
        modification time, inode and change time of every file the checkpoint was read from (a few
        ``stat`` calls): if none changed, the same object is returned; if one did, the checkpoint is read
        again and, for a registry download (or a folder made by ``transcriptformer download``, with its
        ``<folder>.sha256.json`` beside it), the changed files are hashed and checked against the sha256
        recorded at download. An unchanged file is never hashed twice, in this process or a later one.

    Raises
    ------
    FileNotFoundError
        The folder or one of its files is missing, or ``model`` is neither a folder nor a known name.
    ValueError
        A file is damaged (unreadable config, weights that do not fit the config, NaN or infinite weights, a
        download whose files differ from the recorded hashes), or ``config.json`` names files outside the
        folder.

    Examples
    --------
    >>> import transcriptformer
    >>> import transcriptformer.scanpy as tfs
    >>> m = transcriptformer.load_model("tf-tiny")
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
    path, name = _resolve(model, cache_dir)
    check_layout(path)
    path = path.resolve()
    with _CACHE_LOCK:
        hit = _CACHE.get(str(path))
    if hit is not None and not hit.changed_files():
        return hit
    digests = {}
    if _is_download(path):
        digests = registry.verify_checkpoint(path)
    loaded = build_model(path, name=name, weights_sha256=digests.get(WEIGHTS_FILE), cache_dir=cache_dir)
    with _CACHE_LOCK:
        _CACHE[str(path)] = loaded  # replaces a stale copy of a folder that changed on disk
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
    folder = Path(folder).expanduser().resolve()
    adapter.read_adapter_info(folder)  # a clear error when it is not an adapter folder
    stat = (folder / "adapter_model.safetensors").stat()
    key = (id(base), base.weights_sha256, str(folder), stat.st_mtime_ns, stat.st_size, bool(merge))
    with _CACHE_LOCK:
        hit = _ADAPTED.get(key)
    if hit is not None:
        return hit
    adapted = adapter.load_adapter(base, folder, merge=merge)
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
    import torch

    table = read_gene_tables(tables)
    weight = loaded.model.gene_embeddings.embedding.weight.detach()
    bias = loaded.model.mu.gene_embedding.weight.detach()
    if table.dim != weight.shape[1]:
        raise ValueError(
            f"the gene tables have vectors of width {table.dim}, but {loaded.name} expects ESM2 vectors of width "
            f"{weight.shape[1]}; use tables made with the same protein language model."
        )
    if not bool(torch.isfinite(torch.from_numpy(table.vectors)).all()):
        raise ValueError("the gene tables hold NaN or infinite vectors; use intact tables.")
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
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _positive_int(value: Any, name: str, *, none_means: str = "") -> int:
    """A positive integer as a Python int; bools, floats, strings refused (the message names the argument)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        expected = f"a positive integer or None ({none_means})" if none_means else "a positive integer"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def _number(value: Any, name: str, low: float, high: float, expected: str) -> float:
    """A finite number from ``low`` to ``high`` (bools and strings refused)."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not (math.isfinite(value) and low <= value <= high)
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return float(value)


def _assay_labels(assay_vocab: Any) -> dict[str, int]:
    """``{label: index}`` of new_model's ``assay_vocab`` (see there); ``{}`` for ``None``."""
    if assay_vocab is None:
        return {}
    if isinstance(assay_vocab, Mapping):
        labels = dict(assay_vocab)
        bad = {k: v for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 100_000}
        if bad or len(set(labels.values())) != len(labels):
            raise ValueError(
                f"assay_vocab: every label needs its own index, an integer from 0 to 99,999 (one embedding row "
                f"each), got {bad or assay_vocab}."
            )
        return {str(k): int(v) for k, v in labels.items()}
    # one label given as a string is that label (not its characters)
    items = [assay_vocab] if isinstance(assay_vocab, str) else assay_vocab
    if not isinstance(items, Iterable) or isinstance(items, bytes):
        raise ValueError(
            f"assay_vocab must be an assay label, a list of labels or {{label: index}}, got {assay_vocab!r}."
        )
    items = list(items)
    bad_labels = [a for a in items if not isinstance(a, str) or not a.strip()]
    if bad_labels:
        raise ValueError(f"assay_vocab: every label must be a non-empty string, got {bad_labels[0]!r}.")
    labels = {"unknown": 0}
    for label in items:  # in order, each label once ("unknown" is index 0)
        labels.setdefault(label, len(labels))
    return labels


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
        Assay labels (a list, numbered in order from 1 after ``"unknown"`` = 0, each label once; a single string
        is one label), or ``{label: index}`` with ``"unknown"``: the cells' ``obs["assay"]`` becomes an
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

    Raises
    ------
    ValueError
        An argument of the wrong type or out of range (``embed_dim=16.0``, ``num_heads="2"``, ``dropout=2``), the
        message naming it; checked before any table is read.
    """
    import torch

    # plain Python numbers from here on (numpy's would not survive config.json)
    embed_dim = _positive_int(embed_dim, "embed_dim")
    num_layers = _positive_int(num_layers, "num_layers")
    num_heads = _positive_int(num_heads, "num_heads")
    seq_len = _positive_int(seq_len, "seq_len")
    if model_dim is not None:
        model_dim = _positive_int(model_dim, "model_dim", none_means="4 * embed_dim")
    if gene_head_hidden_dim is not None:
        gene_head_hidden_dim = _positive_int(gene_head_hidden_dim, "gene_head_hidden_dim", none_means="embed_dim")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pick a divisor.")
    dropout = _number(dropout, "dropout", 0.0, 1.0, "a number from 0 to 1")
    softcap = _number(softcap, "softcap", 0.0, math.inf, "a finite number >= 0 (0: no soft-capping)")
    for option, choice, choices in (
        ("activation", activation, ACTIVATIONS),
        ("mu_link_fn", mu_link_fn, MU_LINK_FUNCTIONS),
    ):
        if not isinstance(choice, str) or choice not in choices:
            raise ValueError(f"{option}={choice!r}; expected one of {', '.join(map(repr, choices))}.")
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}.")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    labels = _assay_labels(assay_vocab)
    paths = registry.species_tables(gene_tables, cache_dir=cache_dir)
    table = read_gene_tables(paths)
    files = {p.name: p for p in paths}
    if len(files) != len(paths):
        raise ValueError(f"gene tables must have distinct file names (they are saved side by side): {paths}.")
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
    torch.manual_seed(int(seed))
    model = _network(config, vocab, aux_vocabs, table.dim)
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


def _merged_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state_dict with every PEFT (LoRA) layer folded into its base layer, as ``merge_adapter=True`` does.

    A model loaded with ``merge_adapter=False`` (or a network being fine-tuned) holds its linear layers wrapped:
    their weights are named ``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``, ... Each wrapped layer
    is merged on a copy of that layer only (``net`` is not modified), giving the names and weights of a plain
    network that computes the same outputs. A network without such layers gives its own state_dict.
    """
    try:
        from peft import PeftModel  # lazily: an optional dependency (a network can hold its layers only if installed)
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except ImportError:
        return dict(net.state_dict())
    if isinstance(net, PeftModel):
        net = net.get_base_model()
    if isinstance(net, BaseTuner):
        net = net.model
    state = dict(net.state_dict())
    done: list[str] = []
    for prefix, layer in net.named_modules():
        if not isinstance(layer, BaseTunerLayer) or any(prefix.startswith(f"{d}.") for d in done):
            continue
        done.append(prefix)
        plain = copy.deepcopy(layer)
        if plain.disable_adapters:  # the layer computes its base layer alone
            if plain.merged:
                plain.unmerge()
        else:
            pending = [a for a in plain.active_adapters if a not in plain.merged_adapters]
            if pending:
                with warnings.catch_warnings():  # PEFT warns when some adapters were merged before
                    warnings.simplefilter("ignore", UserWarning)
                    plain.merge(adapter_names=pending)
        for key in [k for k in state if k.startswith(f"{prefix}.")]:
            del state[key]
        state.update({f"{prefix}.{k}": v for k, v in plain.get_base_layer().state_dict().items()})
    if done:
        logger.info("save_checkpoint: merged the adapter layers of %d module(s) into their weights", len(done))
    return state


def _check_save_folder(folder: Path) -> None:
    """``folder`` is a folder or can be made one (a file there, or above it, is an error with the fix)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        return
    if existing == folder:
        raise NotADirectoryError(f"cannot save a checkpoint to {folder}: it is a file, not a folder; pass a folder.")
    raise NotADirectoryError(
        f"cannot create the checkpoint folder {folder}: {existing} is a file; pass another folder."
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
    folder (training logs, say) are left alone. Nothing is written that :func:`load_model` would refuse: the
    weights are checked against the config and the vocabularies first, and a network whose layers carry a
    LoRA adapter (:func:`load_model` with ``merge_adapter=False``) is saved with the adapter merged into its
    weights (a copy is merged; the network is not modified).

    Parameters
    ----------
    loaded
        The model and its vocabularies: what :func:`load_model` or :func:`new_model` returns.
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

    Raises
    ------
    TypeError
        ``loaded`` is not a loaded model (a registry name or a folder: call :func:`load_model` first), or
        ``model`` is not a network.
    ValueError
        The weights do not fit ``loaded``'s config and vocabularies (another architecture), or hold NaN or
        infinite values.
    FileExistsError, NotADirectoryError
        The folder holds a checkpoint and ``overwrite`` is false; ``folder`` (or a folder above it) is a file.
    """
    import torch

    if not isinstance(loaded, LoadedModel):
        if isinstance(loaded, str | os.PathLike):
            raise TypeError(
                f"save_checkpoint takes a loaded model, got the {type(loaded).__name__} {str(loaded)!r}: call "
                f"transcriptformer.load_model({str(loaded)!r}) first and pass what it returns."
            )
        raise TypeError(
            f"save_checkpoint takes a loaded model (from transcriptformer.load_model or new_model), got a "
            f"{type(loaded).__name__}."
        )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model= must be a network (a torch.nn.Module such as loaded.model), got a {type(model).__name__}."
        )
    folder = Path(folder).expanduser()
    _check_save_folder(folder)
    parts = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_DIR)
    if any((folder / p).exists() for p in parts) and not overwrite:
        raise FileExistsError(f"{folder} already holds a checkpoint; pass overwrite=True or choose another folder.")
    dc = loaded.config.data
    sources = []
    for name in dc.esm2_mappings:
        source = loaded.vocab_files.get(name) or (loaded.path / VOCAB_DIR / name if loaded.path else None)
        if source is None or not Path(source).is_file():
            raise FileNotFoundError(f"the gene table {name} of {loaded.name} is not available to copy.")
        sources.append(Path(source))
    # what load_model will build from the files written here, and check the weights against
    net = model if model is not None else loaded.model
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _merged_state(net).items()}
    ids, esm_dim = read_table_ids(sources)
    vocab = GeneVocab(dc.special_tokens, ids, pad_token=dc.gene_pad_token)
    with torch.device("meta"), _skip_init_mode():
        reference = _network(loaded.config, vocab, loaded.aux_vocabs, esm_dim)
    problem = _describe_mismatch(reference, state)
    if problem:
        what = "model=" if model is not None else f"{loaded.name}'s network"
        raise ValueError(
            f"{what} does not fit the config and vocabularies of {loaded.name} (vocabulary: {len(vocab)} tokens, "
            f"ESM width {esm_dim}), so load_model could not read the checkpoint; nothing was written: {problem}. "
            "Pass a network of the same architecture (e.g. a trained copy of loaded.model)."
        )
    bad = _non_finite(state)
    if bad:
        raise ValueError(
            f"the weights to save hold NaN or infinite values ({len(bad)} tensor(s), e.g. {', '.join(bad[:3])}), "
            "which load_model refuses; nothing was written."
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        (tmp / VOCAB_DIR).mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(loaded.config.to_dict(), indent=2) + "\n")
        torch.save(state, tmp / WEIGHTS_FILE)
        for a in loaded.aux_vocabs:
            (tmp / VOCAB_DIR / f"{a.column}_vocab.json").write_text(json.dumps(dict(a.labels), indent=1) + "\n")
        for name, source in zip(dc.esm2_mappings, sources, strict=True):
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
