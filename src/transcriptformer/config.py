"""Model configuration: dataclasses with documented defaults, parsed from a checkpoint's ``config.json``.

The published ``config.json`` nests three objects under ``"model"``: ``model_config``,
``data_config`` and ``loss_config``. We treat the file as data: ``_target_`` entries and
keys we do not use are ignored, ``null`` and missing keys fall back to the defaults below
(which are the values of the released TF-Sapiens model), and values we cannot honour
(an unknown link function or activation) are rejected with a clear error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ._files import read_json

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "DEVICES",
    "MU_LINK_FUNCTIONS",
    "PRECISIONS",
    "RELEASED_SPECIAL_TOKENS",
    "Activation",
    "AttentionBackend",
    "DataConfig",
    "Device",
    "LossConfig",
    "ModelConfig",
    "MuLink",
    "Precision",
    "TranscriptFormerConfig",
    "device_name",
    "parse_bool",
    "split_names",
]

# -- the choices of every option, each defined once (the Literal types are used in public signatures) --------

#: Special tokens of the released checkpoints, in index order (``[PAD]`` = 1, ``[START]`` = 2, ``[END]`` = 3).
RELEASED_SPECIAL_TOKENS: tuple[str, ...] = ("unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]")

#: Activations of the feed-forward block (``gelu`` is the exact erf form).
Activation = Literal["gelu", "relu", "silu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

#: Link functions of the count head. ``softmax`` (released models) is a masked softmax over the
#: cell's genes times the cell's total count; the others apply elementwise.
MuLink = Literal["softmax", "exp", "log", "relu", "sigmoid", "softplus", "linear", "tanh"]
MU_LINK_FUNCTIONS: tuple[str, ...] = get_args(MuLink)

#: Numeric precision of a run: ``auto`` (float32 on CPU and MPS, bfloat16 autocast on CUDA), ``32``, ``bf16``
#: or ``16`` (autocast; float16 runs as bfloat16 on CPU, as the published tool does). On a CPU without native
#: bfloat16 (no AVX512-BF16 or AMX) ``bf16`` and ``16`` run in float32 with a warning; ``bf16!`` and ``16!``
#: insist on them (see :func:`~transcriptformer.inference.devices.resolve_precision`).
Precision = Literal["auto", "32", "bf16", "16", "bf16!", "16!"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: Other spellings accepted for :data:`Precision` (the published tool's Lightning names among them).
PRECISION_ALIASES: dict[str, str] = {
    "32-true": "32",
    "fp32": "32",
    "float32": "32",
    "bf16-mixed": "bf16",
    "bfloat16": "bf16",
    "16-mixed": "16",
    "bf16-mixed!": "bf16!",
    "16-mixed!": "16!",
    "fp16": "16",
    "float16": "16",
}

#: Attention implementations. ``auto``: flex_attention on CUDA when it compiles and agrees with the chunked
#: kernel, else ``chunked``; ``chunked``: exact, blocked, memory linear in length; ``flex``: compiled per
#: shape; ``flex-dynamic``: compiled once for varying shapes; ``dense``: the reference, materialises the
#: score matrix.
AttentionBackend = Literal["auto", "chunked", "dense", "flex", "flex-dynamic"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

#: Devices by kind; ``"cuda:1"`` and other indexed names are accepted too.
Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(Device)


def device_name(device: Any) -> str:
    """The normalised name of a device option (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Accepts those strings (any case, surrounding spaces ignored) and ``torch.device`` objects of those kinds.
    Whether the device exists here is checked when a run starts
    (:func:`~transcriptformer.inference.devices.resolve_device`).

    Raises
    ------
    ValueError
        Anything else (``"tpu"``, ``""``, ``None``, ``0``, ``"meta"``, ``"cpu:0"``, ...).
    """
    if type(device).__name__ == "device" and hasattr(device, "type"):  # torch.device, without importing torch
        name = str(device)
    elif isinstance(device, str) and device.strip():
        name = device.strip().lower()
    else:
        name = ""
    kind, sep, index = name.partition(":")
    if kind not in DEVICES or (sep and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"device={device!r}; expected one of {', '.join(map(repr, DEVICES))} or e.g. 'cuda:1'.")
    return name


def split_names(value: Any) -> tuple[str, ...]:
    """A comma-separated string (``"assay,batch"``), a list, or null as a tuple of names (empty items dropped)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v).strip() for v in value if str(v).strip())


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the network (``model.model_config`` in ``config.json``).

    Parameters
    ----------
    embed_dim
        Residual width ``E``.
    model_dim
        Hidden width ``F`` of the feed-forward block.
    num_layers
        Number of encoder layers ``L``.
    num_heads
        Number of attention heads ``H``; ``embed_dim`` must be divisible by it.
    seq_len
        Gene slots per cell ``S``. The cell embedding divides by this number.
    aux_len
        Read by nothing at inference; kept for round-tripping.
    block_len
        Block size of the published flex-attention kernel; no numerical effect.
    softcap
        Attention scores are soft-capped as ``softcap * tanh(score / softcap)``; ``0`` disables it.
    log_counts_eps
        ``eps`` in the attention count bias ``log1p(count + eps)`` and in the likelihood.
    mu_link_fn
        Link function of the count head, one of :data:`MU_LINK_FUNCTIONS`.
    activation
        Feed-forward activation, one of :data:`ACTIVATIONS`.
    attn_bias, fw_bias
        Whether the attention projections / feed-forward linears carry a bias.
    dropout
        Dropout rate (no effect at inference).
    gene_head_hidden_dim
        Hidden width of the gene-identity head.
    """

    embed_dim: int = 2048
    model_dim: int = 2048
    num_layers: int = 12
    num_heads: int = 16
    seq_len: int = 2047
    aux_len: int = 1
    block_len: int = 128
    softcap: float = 10.0
    log_counts_eps: float = 1e-6
    mu_link_fn: MuLink = "softmax"
    activation: Activation = "gelu"
    attn_bias: bool = False
    fw_bias: bool = False
    dropout: float = 0.1
    gene_head_hidden_dim: int = 2048

    def __post_init__(self) -> None:
        if self.mu_link_fn not in MU_LINK_FUNCTIONS:
            raise ValueError(
                f"config.json: model_config.mu_link_fn={self.mu_link_fn!r} is not supported; "
                f"expected one of {', '.join(MU_LINK_FUNCTIONS)}."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"config.json: model_config.activation={self.activation!r} is not supported; "
                f"expected one of {', '.join(ACTIVATIONS)}."
            )
        for name in ("embed_dim", "model_dim", "num_layers", "num_heads", "seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(
                    f"config.json: model_config.{name} must be a positive integer, got {getattr(self, name)}."
                )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"config.json: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
        if self.softcap < 0 or not math.isfinite(self.softcap):
            raise ValueError(f"config.json: softcap must be a finite number >= 0, got {self.softcap}.")
        if not (math.isfinite(self.log_counts_eps) and self.log_counts_eps >= 0):
            raise ValueError(f"config.json: log_counts_eps must be a finite number >= 0, got {self.log_counts_eps}.")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"config.json: dropout must be between 0 and 1, got {self.dropout}.")
        if self.gene_head_hidden_dim <= 0:
            raise ValueError(
                f"config.json: model_config.gene_head_hidden_dim must be a positive integer, got "
                f"{self.gene_head_hidden_dim}."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class DataConfig:
    """Vocabulary and tokenisation settings stored with a checkpoint (``model.data_config``).

    Parameters
    ----------
    aux_cols
        ``obs`` columns that give each cell an auxiliary token (``("assay",)`` for the released
        models). ``null`` in ``config.json`` means none; a missing key means ``("assay",)``.
    esm2_mappings
        Gene-table files in ``vocabs/``, in vocabulary order.
    special_tokens
        Special tokens in index order.
    pad_zeros
        Whether zero-count genes become ``[PAD]`` (the released models: yes).
    gene_pad_token
        Name of the padding token.
    """

    aux_cols: tuple[str, ...] = ("assay",)
    esm2_mappings: tuple[str, ...] = ("homo_sapiens_gene.h5",)
    special_tokens: tuple[str, ...] = RELEASED_SPECIAL_TOKENS
    pad_zeros: bool = True
    gene_pad_token: str = "[PAD]"

    def __post_init__(self) -> None:
        for token in (self.gene_pad_token, "[START]", "[END]", "unknown"):
            if token not in self.special_tokens:
                raise ValueError(
                    f"config.json: data_config.special_tokens must contain {token!r}; got {list(self.special_tokens)}."
                )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"config.json: data_config.special_tokens has duplicates: {list(self.special_tokens)}.")
        if not self.esm2_mappings:
            raise ValueError("config.json: data_config.esm2_mappings lists no gene table.")


@dataclass(frozen=True)
class LossConfig:
    """Heads and likelihood settings (``model.loss_config``).

    Parameters
    ----------
    gene_id_loss_weight
        ``> 0`` means the checkpoint has a gene-identity head (``gene_id_head.*``).
    softplus_approx
        Form of the zero-truncated-Poisson normaliser in the likelihood.
    """

    gene_id_loss_weight: float = 1.0
    softplus_approx: bool = True

    def __post_init__(self) -> None:
        w = self.gene_id_loss_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not (math.isfinite(w) and 0 <= w <= 1e6):
            raise ValueError(
                f"config.json: loss_config.gene_id_loss_weight must be a finite number from 0 to 1e6 (0: no "
                f"gene-identity head), got {w!r}."
            )

    @property
    def has_gene_head(self) -> bool:
        """Whether the checkpoint carries the gene-identity head."""
        return self.gene_id_loss_weight > 0


@dataclass(frozen=True)
class TranscriptFormerConfig:
    """Everything a checkpoint's ``config.json`` says about the model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TranscriptFormerConfig:
        """Build a config from the parsed JSON of a published ``config.json``.

        The top-level ``"model"`` object is optional (a dict holding the three sections
        directly is accepted too).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}.")
        root = raw.get("model", raw)
        if not isinstance(root, Mapping):
            raise ValueError(f"config.json: 'model' must be a JSON object, got {type(root).__name__}.")
        sections = {}
        for label in ("model_config", "data_config", "loss_config"):
            section = root.get(label)
            if section is not None and not isinstance(section, Mapping):
                raise ValueError(f"config.json: {label} must be a JSON object, got {type(section).__name__}.")
            sections[label] = dict(section or {})
        model = _build(ModelConfig, sections["model_config"], "model_config")
        data_section = sections["data_config"]
        if "aux_cols" in data_section:  # null (or "") means the checkpoint has no auxiliary token
            try:
                data_section["aux_cols"] = split_names(data_section["aux_cols"])
            except TypeError:
                raise ValueError(
                    f"config.json: data_config.aux_cols must be a comma-separated string or a list of column "
                    f"names, got {data_section['aux_cols']!r}."
                ) from None
        data = _build(DataConfig, data_section, "data_config")
        loss = _build(LossConfig, sections["loss_config"], "loss_config")
        return cls(model=model, data=data, loss=loss)

    @classmethod
    def from_json(cls, path: str | Path) -> TranscriptFormerConfig:
        """Read ``config.json`` from ``path``."""
        path = Path(path)
        raw = read_json(path, "the checkpoint's config", "Restore it from the checkpoint's download.")
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The published ``config.json`` layout (``model`` -> ``model_config``, ``data_config``, ``loss_config``).

        Every key the published loader reads is present (it raises on a missing key, SPEC §2), including the
        runtime keys it overrides anyway, with the values of the released configs.
        """
        m, d, loss = self.model, self.data, self.loss
        model_config = {
            "_target_": "transcriptformer.data.dataclasses.ModelConfig",
            **{f.name: getattr(m, f.name) for f in fields(m)},
            "use_aux": bool(d.aux_cols),
            "compile_block_mask": False,
        }
        data_config = {
            "_target_": "transcriptformer.data.dataclasses.DataConfig",
            "aux_cols": ",".join(d.aux_cols) if d.aux_cols else None,
            "esm2_mappings": list(d.esm2_mappings),
            "special_tokens": list(d.special_tokens),
            "pad_zeros": d.pad_zeros,
            "gene_pad_token": d.gene_pad_token,
            "aux_pad_token": "unknown",
            "gene_col_name": "ensembl_id",
            "pin_memory": True,
            "aux_vocab_path": None,
            "esm2_mappings_path": None,
            "clip_counts": None,
            "filter_to_vocabs": None,
            "filter_outliers": None,
            "normalize_to_scale": 0,
            "n_data_workers": 1,
            "sort_genes": None,
            "randomize_genes": None,
            "min_expressed_genes": None,
        }
        loss_config = {
            "_target_": "transcriptformer.data.dataclasses.LossConfig",
            "gene_id_loss_weight": loss.gene_id_loss_weight,
            "softplus_approx": loss.softplus_approx,
        }
        return {"model": {"model_config": model_config, "data_config": data_config, "loss_config": loss_config}}

    def with_overrides(self, overrides: Mapping[str, Any]) -> TranscriptFormerConfig:
        """Return a copy with dotted keys replaced, e.g. ``{"model_config.softcap": 0}``.

        Section names may be given as ``model_config``/``data_config``/``loss_config`` (the
        published spelling, with or without a leading ``model.``) or ``model``/``data``/``loss``.
        Every error names the key.
        """
        cfg = self
        for key, (section, name, coerced) in self.parse_overrides(overrides).items():
            sub = getattr(cfg, section)
            try:
                cfg = replace(cfg, **{section: replace(sub, **{name: coerced})})
            except ValueError as e:
                raise ValueError(f"config override {key!r}: {str(e).removeprefix('config.json: ')}") from None
        return cfg

    @staticmethod
    def parse_overrides(overrides: Mapping[str, Any]) -> dict[str, tuple[str, str, Any]]:
        """Check the keys and the type of each value of config overrides (no checkpoint needed).

        Returns
        -------
        dict
            ``key -> (section, field, value converted to the field's type)``. Rules that involve other
            values (``embed_dim`` divisible by ``num_heads``) are checked when the overrides are applied.

        Raises
        ------
        ValueError
            An unknown section or key, a value of the wrong type, or one outside its choices; naming the key.
        """
        out = {}
        for key, value in overrides.items():
            parts = key.split(".")
            if parts[0] == "model" and len(parts) == 3:
                parts = parts[1:]
            if len(parts) != 2:
                raise ValueError(f"config override {key!r}: expected 'section.key', e.g. 'model_config.softcap'.")
            section = {"model_config": "model", "data_config": "data", "loss_config": "loss"}.get(parts[0], parts[0])
            if section not in ("model", "data", "loss"):
                raise ValueError(f"config override {key!r}: unknown section {parts[0]!r}.")
            cls = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig}[section]
            if parts[1] not in {f.name for f in fields(cls)}:
                raise ValueError(f"config override {key!r}: {section} config has no key {parts[1]!r}.")
            try:
                out[key] = (section, parts[1], _coerce(cls, parts[1], value))
            except ValueError as e:
                raise ValueError(f"config override {key!r}: {e}.") from None
        return out


def parse_bool(value: Any) -> bool:
    """A boolean from JSON or text: ``true``/``false``/``1``/``0``/``yes``/``no`` (any case), or a bool/0/1.

    Raises
    ------
    ValueError
        Anything else (``2``, ``"off"``, ``None``, ...).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
    raise ValueError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a JSON value to the type of dataclass field ``name`` (ints stay ints, lists become tuples).

    Strict: booleans are not numbers, numbers must be finite, text must be text.
    """
    default = next(f for f in fields(cls) if f.name == name).default
    if isinstance(default, bool):
        return parse_bool(value)
    if isinstance(default, int | float):
        if isinstance(value, str):
            try:
                value = float(value.strip()) if default.__class__ is float else int(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, str | list | tuple) or not all(isinstance(v, str) for v in split_list(value)):
            raise ValueError(f"expected a list of names, got {value!r}")
        return split_names(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    choices = _CHOICES.get((cls.__name__, name))
    if choices is not None and value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(choices)}")
    return value


#: Fields whose value must be one of a list.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("ModelConfig", "mu_link_fn"): MU_LINK_FUNCTIONS,
    ("ModelConfig", "activation"): ACTIVATIONS,
}


def split_list(value: str | list | tuple) -> list:
    """The items of a comma-separated string or a list (for type checks)."""
    return value.split(",") if isinstance(value, str) else list(value)


def _build(cls: type, section: Mapping[str, Any] | None, label: str) -> Any:
    section = dict(section or {})
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in section.items():
        if key == "_target_":
            continue
        if key not in known:
            logger.debug("config.json: ignoring %s.%s", label, key)
            continue
        if value is None:
            continue  # null means "use the documented default"
        try:
            kwargs[key] = _coerce(cls, key, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.json: {label}.{key}: {e}.") from None
    return cls(**kwargs)
