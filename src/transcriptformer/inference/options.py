"""The options every tool that runs a model shares: how cells become tokens and how the engine runs.

:class:`RunOptions` is built once per call (by the scanpy tools from their keyword arguments, by the
command line from its flags) and validates every value by type and range *before* any model is
loaded or any count is read, with messages that name the option and say what it accepts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar, overload

import numpy as np

from ..config import PRECISION_ALIASES, PRECISIONS, Device, Precision, device_name
from ..data.tokenizer import TokenizeOptions

__all__ = [
    "RUN_OPTIONS_DOC",
    "RunKwargs",
    "RunOptions",
    "SpeciesArg",
    "check_bool",
    "check_genes",
    "check_key",
    "check_positive_int",
    "documents_run_options",
    "run_options",
]

#: Gene-table files or species names for species outside a model's training set.
SpeciesArg = str | os.PathLike | Sequence[str | os.PathLike] | None


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a boolean (numpy's included); otherwise a ``ValueError`` naming the option."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


@overload
def check_positive_int(value: Any, name: str, *, allow_none: Literal[False]) -> int: ...
@overload
def check_positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None: ...
def check_positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    """``None`` (if allowed) or a positive integer; booleans, floats, strings and NaN are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def check_positive_number(value: Any, name: str, *, none_means: str) -> float | None:
    """``None`` or a finite number > 0 (booleans, strings, NaN, infinities and values <= 0 refused)."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a positive number or None ({none_means}), got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None ({none_means}), got {value!r}.")
    return float(value)


def check_key(value: Any, name: str = "key_added") -> str:
    """A non-empty string usable as an AnnData key (h5ad-writable: no ``/``)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
    if "/" in value:
        raise ValueError(f"{name}={value!r}: '/' cannot be used in an AnnData key (h5ad groups); pick another name.")
    return value


def check_genes(value: Any, name: str = "genes") -> list[str] | None:
    """``None``, or gene ids: a string or an iterable of non-empty strings (returned as a list)."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            items = []
    if not items or not all(isinstance(g, str) and g for g in items):
        raise ValueError(f"{name} must be gene ids (a string or a list of strings) or None, got {value!r}.")
    return items


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(map(repr, choices))}.")
    return value


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Options shared by every tool that runs a model. Validated on construction.

    Parameters
    ----------
    gene_key
        ``var`` column with Ensembl gene ids (version suffixes are ignored). ``None`` uses ``var_names``;
        if the default column is missing and ``var_names`` are Ensembl ids, they are used.
    layer
        Source of counts: ``None`` uses ``.raw`` if present, else ``X`` (the published rule); or ``"X"``,
        ``"raw"``, or the name of a layer.
    clip_counts
        Counts are clipped to this value (after ``normalize_to_scale``). ``None``: no clipping.
    normalize_to_scale
        Rescale the counts of each cell's retained genes to this total (``None``: off, the default).
    filter_to_vocab
        Drop genes outside the vocabulary (default). Otherwise they enter as the ``unknown`` token.
    duplicate_genes
        ``"raise"``: duplicate gene ids are an error; ``"first"``: keep the first column of each.
    species_embedding
        For species outside the model's training set: gene-table file(s) in the published HDF5 format, or
        species names such as ``"mus_musculus"`` (from the ``all-embeddings`` download).
    batch_size
        Most cells per batch. By default batches are limited by ``max_tokens`` only.
    max_tokens
        Token budget per batch: cells x (longest cell + 1). Default 16,384 on CPU, 131,072 on GPU. On an
        out-of-memory error the batch is halved and retried.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision
        ``"auto"`` (float32 on CPU and MPS, bfloat16 autocast on CUDA), ``"32"``, ``"bf16"``, ``"16"``.
    progress
        Show a progress bar: ``None`` (default) once the run has taken a few seconds, ``True`` from the start,
        ``False`` never.
    cache_dir
        Where registry downloads are kept (default ``$TRANSCRIPTFORMER_CACHE`` or the user cache).
    """

    gene_key: str | None = "ensembl_id"
    layer: str | None = None
    clip_counts: float | None = 30.0
    normalize_to_scale: float | None = None
    filter_to_vocab: bool = True
    duplicate_genes: Literal["raise", "first"] = "raise"
    species_embedding: SpeciesArg = None
    batch_size: int | None = None
    max_tokens: int | None = None
    device: Device | str = "auto"
    precision: Precision = "auto"
    progress: bool | None = None
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("gene_key", "layer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}.")
        set_ = object.__setattr__
        set_(self, "clip_counts", check_positive_number(self.clip_counts, "clip_counts", none_means="no clipping"))
        scale = self.normalize_to_scale
        if scale is not None and not isinstance(scale, bool) and isinstance(scale, int | float) and scale == 0:
            scale = None  # the published spelling of "off"
        set_(self, "normalize_to_scale", check_positive_number(scale, "normalize_to_scale", none_means="off"))
        set_(self, "filter_to_vocab", check_bool(self.filter_to_vocab, "filter_to_vocab"))
        _check_choice(self.duplicate_genes, "duplicate_genes", ("raise", "first"))
        set_(self, "batch_size", check_positive_int(self.batch_size, "batch_size"))
        set_(self, "max_tokens", check_positive_int(self.max_tokens, "max_tokens"))
        device_name(self.device)  # the engine's rule; availability is checked when the run starts
        p = self.precision
        if not isinstance(p, str) or (p.lower() not in PRECISIONS and p.lower() not in PRECISION_ALIASES):
            raise ValueError(f"precision={p!r}; expected one of {', '.join(map(repr, PRECISIONS))}.")
        if self.progress is not None:
            check_bool(self.progress, "progress")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str | os.PathLike):
            raise ValueError(f"cache_dir must be a path or None, got {self.cache_dir!r}.")
        se = self.species_embedding
        if isinstance(se, str | os.PathLike):
            items = [se]
        elif isinstance(se, Iterable) and not isinstance(se, bytes | Mapping):
            items = list(se)
        else:
            items = []
        if se is not None and (not items or not all(isinstance(i, str | os.PathLike) and str(i) for i in items)):
            raise ValueError(f"species_embedding must be gene-table paths or species names, got {se!r}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names."""
        return tuple(f.name for f in fields(cls))

    def tokenize(self) -> TokenizeOptions:
        """The tokenisation part."""
        return TokenizeOptions(
            gene_key=self.gene_key,
            layer=self.layer,
            clip_counts=self.clip_counts,
            normalize_to_scale=self.normalize_to_scale,
            filter_to_vocab=self.filter_to_vocab,
            duplicate_genes=self.duplicate_genes,
        )

    def engine(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~transcriptformer.inference.pipeline.infer` besides the tokenisation."""
        return {
            "species_embedding": self.species_embedding,
            "device": self.device,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "progress": self.progress,
            "cache_dir": self.cache_dir,
        }

    def record(self) -> dict[str, Any]:
        """The options as h5ad-writable values (``None`` written as ``"none"``), for ``uns[...]["params"]``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "cache_dir":
                continue
            if f.name == "species_embedding" and value is not None:
                value = [str(v) for v in ([value] if isinstance(value, str | os.PathLike) else value)]
            elif isinstance(value, Path | os.PathLike):
                value = str(value)
            out[f.name] = "none" if value is None else value
        return out


#: The numpy-style documentation of every :class:`RunOptions` parameter (for the tools' docstrings).
RUN_OPTIONS_DOC = RunOptions.__doc__.split("Parameters\n    ----------\n", 1)[1].rstrip()  # type: ignore[union-attr]


class RunKwargs(TypedDict, total=False):
    """The run options as keyword arguments: a tool's ``**options: Unpack[RunKwargs]`` (see :class:`RunOptions`).

    IDEs and type checkers see every option with its type; :func:`run_options` validates them.
    """

    gene_key: str | None
    layer: str | None
    clip_counts: float | None
    normalize_to_scale: float | None
    filter_to_vocab: bool
    duplicate_genes: Literal["raise", "first"]
    species_embedding: SpeciesArg
    batch_size: int | None
    max_tokens: int | None
    device: Device | str
    precision: Precision
    progress: bool | None
    cache_dir: str | os.PathLike | None


assert set(RunKwargs.__annotations__) == {f.name for f in fields(RunOptions)}, "RunKwargs must list RunOptions"


def run_options(kwargs: Mapping[str, Any], tool: str, *, unsupported: Mapping[str, str] | None = None) -> RunOptions:
    """The :class:`RunOptions` of a tool's ``**options``, validated before anything else runs.

    Parameters
    ----------
    kwargs
        The keyword arguments the tool received besides its own.
    tool
        The tool's name, for messages.
    unsupported
        Options the tool cannot honour, each with the reason (given one, it is an error).

    Raises
    ------
    TypeError
        An unknown keyword, as Python says it for any function.
    ValueError
        A value of the wrong type or range, or an unsupported option; naming it.
    """
    for name in kwargs:
        if name not in RunKwargs.__annotations__:
            raise TypeError(f"{tool}() got an unexpected keyword argument {name!r}")
        if unsupported and name in unsupported and kwargs[name] is not None:
            raise ValueError(f"{tool}() does not take {name}: {unsupported[name]}")
    return RunOptions(**kwargs)


F = TypeVar("F", bound=Callable[..., Any])


def documents_run_options(func: F) -> F:
    """Put the documentation of every run option where ``func``'s docstring says ``{run_options}``."""
    func.__doc__ = (func.__doc__ or "").replace("    {run_options}", RUN_OPTIONS_DOC)
    return func
