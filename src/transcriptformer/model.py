"""The TranscriptFormer network in plain PyTorch.

A cell is a sequence of gene tokens with counts. Genes are embedded by an MLP over frozen ESM2
protein-language-model vectors, so genes of any species share one space. An optional auxiliary
token (the assay) is prepended. A causal transformer without positional encodings reads the
genes in order; every attention score is biased by ``log1p(count)`` of its key and soft-capped.
Three read-outs exist:

* the cell embedding: the mean of the hidden states over the cell's positions, divided by the
  full sequence length ``S`` (not the number of genes), as the published model does;
* the count head (``mu``): a zero-truncated-Poisson rate per gene, giving the likelihood;
* the gene-identity head: logits over the vocabulary for the next gene.

The module's parameter names equal the keys of the published ``model_weights.pt``, so the
published state_dict loads with ``strict=True``. Quirks of the published model that change
numbers are reproduced on purpose and marked "published:" below.

Attention never materialises the full ``T x T`` score matrix: :func:`chunked_attention` walks
over query blocks (keys only up to the block's end, since attention is causal). On CUDA a
``flex_attention`` kernel computing the same function can be used instead.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

__all__ = [
    "AttentionBackend",
    "TranscriptFormer",
    "chunked_attention",
    "dense_attention",
]

AttentionBackend = Literal["chunked", "dense", "flex", "flex-dynamic"]

#: Score elements held at once by :func:`chunked_attention` on CPU (8 MiB in float32: blocks stay in
#: cache) and on GPUs (1 GiB: few, large kernels).
DEFAULT_MAX_SCORES = 1 << 21
DEFAULT_MAX_SCORES_GPU = 1 << 28


# --------------------------------------------------------------------------------------------
# attention


def dense_attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, key_valid: Tensor, softcap: float) -> Tensor:
    """Reference attention: the full score matrix, as the published (eager flex) kernel computes it.

    Parameters
    ----------
    q, k, v
        ``(B, H, T, dk)``.
    key_bias
        ``(B, T)``: added to the score of every pair whose key is at that position.
    key_valid
        ``(B, T)`` bool: keys that may be attended to.
    softcap
        Soft cap applied after the bias; ``0`` for none.

    Returns
    -------
    torch.Tensor
        ``(B, H, T, dk)``; query rows with no allowed key are zero.
    """
    T = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores + key_bias[:, None, None, :].float()
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype)


def _chunks(BH: int, T: int, max_scores: int, rows: int = 128) -> tuple[int, int]:
    """(heads per group, query rows per block) with about ``max_scores`` scores per block.

    128 query rows keep the products efficient (measured on CPU: ~75% of matmul peak against ~60% at
    32-64 rows) while the wasted upper triangle of each diagonal block stays small (``rows / 2`` keys
    per query).
    """
    rows = max(1, min(T, rows))
    heads = max(1, min(BH, max_scores // max(1, rows * T)))
    return heads, rows


def _mask(sc: Tensor, blocked, value: float, s: int, num_aux: int | None) -> None:
    """Fill the disallowed scores of a block of query rows starting at ``s``.

    ``blocked`` is a full boolean mask, or (fast path) the causal triangle of the diagonal sub-block,
    the rows whose auxiliary keys are unknown, and those keys' mask.
    """
    if num_aux is None:
        sc.masked_fill_(blocked, value)
        return
    triangle, rows, aux_blocked = blocked
    sc[:, :, s:].masked_fill_(triangle, value)
    if aux_blocked is not None:
        sc[rows, :, :num_aux] = sc[rows, :, :num_aux].masked_fill(aux_blocked, value)


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    num_aux: int | None = None,
    max_scores: int | None = None,
) -> Tensor:
    """Causal attention with count bias and soft cap, computed in blocks of query rows.

    The same function as :func:`dense_attention`, but a block of queries ``[s, e)`` only meets keys
    ``[0, e)`` and at most about ``max_scores`` scores exist at a time: memory is ``O(B·H·T·block)``
    instead of ``O(B·H·T²)``, and most of the masked upper triangle is never computed.

    With a soft cap ``c`` the attention weight of a score ``x`` is ``exp(c·tanh(x/c))``, which is
    ``exp(2c·σ(2x/c))`` up to a constant factor that the softmax cancels. Sigmoid and ``exp2`` have
    fast vectorised CPU kernels (``tanh`` does not), and the result is bounded, so no
    max-subtraction is needed in float32 (for reduced precision, or a cap above ~40, the weights are
    taken relative to each row's largest). In float32 the count bias rides along in the first product
    (``[α·q, 1]·[k, β·bias]``); under autocast the scores, the bias and the normaliser are float32 and
    only the products use the reduced type.

    Parameters
    ----------
    q, k, v, key_bias, key_valid, softcap
        As in :func:`dense_attention`.
    num_aux
        ``None`` honours ``key_valid`` everywhere. An integer ``A`` selects the fast path for
        TranscriptFormer sequences, whose allowed keys are the first ``A`` (auxiliary) positions
        permitted by ``key_valid`` plus a *prefix* of the later positions: then a query inside the
        prefix can never meet an invalid later key (attention is causal), so only the auxiliary
        columns and the causal triangle are masked. Query rows inside their sequence's valid prefix
        are exact; rows after it (padding, never read) are computed without the padding mask.
    max_scores
        Scores held at once (default: :data:`DEFAULT_MAX_SCORES`, or :data:`DEFAULT_MAX_SCORES_GPU` on a GPU).

    Returns
    -------
    torch.Tensor
        ``(B, H, T, dk)``; query rows with no allowed key are zero.
    """
    B, H, T, dk = q.shape
    BH = B * H
    capped = softcap > 0
    exact_fp32 = q.dtype == torch.float32
    # with a cap the block computes 2x/c (so that the sigmoid gives σ(2x/c)); else x itself
    alpha = 2.0 / (math.sqrt(dk) * softcap) if capped else 1.0 / math.sqrt(dk)
    beta = 2.0 / softcap if capped else 1.0
    gain = 2.0 * softcap / math.log(2.0)  # exp(2c·σ) = exp2(gain·σ)
    # weights up to exp2(gain) fit float32 (with room for the sum over keys), not float16
    stable = capped and (not exact_fp32 or gain > 100)
    vx = v.reshape(BH, T, dk)
    if exact_fp32 and capped:
        qx = torch.cat([q * alpha, q.new_ones(B, H, T, 1)], dim=-1).reshape(BH, T, dk + 1)
        kx = torch.cat([k, (key_bias * beta)[:, None, :, None].expand(B, H, T, 1)], dim=-1).reshape(BH, T, dk + 1)
        bias = None
    else:
        qx, kx = q.reshape(BH, T, dk), k.reshape(BH, T, dk)
        bias = (key_bias.float() * beta).repeat_interleave(H, dim=0)[:, None, :]
    blocked_key = (~key_valid).repeat_interleave(H, dim=0)  # (BH, T)
    if num_aux is not None:
        bad_aux = blocked_key[:, :num_aux]
        aux_rows = torch.nonzero(bad_aux.any(dim=-1)).flatten()
    causal_off = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    if max_scores is None:
        max_scores = DEFAULT_MAX_SCORES if q.device.type == "cpu" else DEFAULT_MAX_SCORES_GPU
    heads, rows = _chunks(BH, T, max_scores)
    out = torch.empty(BH, T, dk, dtype=q.dtype, device=q.device)
    for h0 in range(0, BH, heads):
        h1 = min(BH, h0 + heads)
        if num_aux is not None:
            mine = aux_rows[(aux_rows >= h0) & (aux_rows < h1)] - h0
        for s in range(0, T, rows):
            e = min(T, s + rows)
            sc = torch.bmm(qx[h0:h1, s:e], kx[h0:h1, :e].transpose(1, 2))
            if bias is not None:
                sc = sc.float().mul_(alpha).add_(bias[h0:h1, :, :e])
            if num_aux is None:
                blocked = causal_off[s:e, :e] | blocked_key[h0:h1, None, :e]
            else:
                blocked = (causal_off[s:e, s:e], mine, bad_aux[h0:h1][mine][:, None, :] if len(mine) else None)
            if capped and not stable:
                sc = sc.sigmoid_().mul_(gain).exp2_()
                _mask(sc, blocked, 0.0, s, num_aux)
            elif capped:  # weights relative to the row's largest allowed one (float16 tops out at 65504)
                sc = sc.sigmoid_()
                _mask(sc, blocked, 0.0, s, num_aux)  # σ >= 0, so a masked 0 never raises the row maximum
                sc = sc.sub_(sc.amax(-1, keepdim=True)).mul_(gain).exp2_()
                _mask(sc, blocked, 0.0, s, num_aux)
            else:
                _mask(sc, blocked, float("-inf"), s, num_aux)
                sc = sc.sub_(sc.amax(-1, keepdim=True).clamp_min_(-1e30)).exp_()
            denom = sc.sum(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
            o = torch.bmm(sc.to(vx.dtype), vx[h0:h1, :e]).float().div_(denom)  # all-masked rows: 0 / tiny = 0
            out[h0:h1, s:e] = o.to(out.dtype)
    return out.view(B, H, T, dk)


_compiled_flex: dict[bool, Callable] = {}
_causal_masks: dict[tuple[int, str], object] = {}


def flex_attention_fn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    num_aux: int | None = None,
    dynamic: bool = False,
) -> Tensor:
    """The same function through ``torch.nn.attention.flex_attention``, compiled (for CUDA).

    With ``num_aux`` (see :func:`chunked_attention`) the block mask is the causal mask alone, shared by
    every batch of the same length, and unknown auxiliary keys are masked in the score modification.
    ``dynamic`` compiles for varying shapes (``torch.compile(dynamic=None)``, which recompiles once
    with symbolic sizes); otherwise each new shape compiles anew.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=None if dynamic else False)
    B, _, T, _ = q.shape
    bias = key_bias.float()
    if num_aux is None:
        blocked = None

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & key_valid[b, kv_idx]

        block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
    else:
        blocked = torch.zeros_like(key_valid)
        blocked[:, :num_aux] = ~key_valid[:, :num_aux]
        key = (T, str(q.device))
        if key not in _causal_masks:

            def causal(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            _causal_masks[key] = create_block_mask(causal, None, None, T, T, device=q.device)
        block_mask = _causal_masks[key]

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score + bias[b, kv_idx]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if blocked is not None:
            s = torch.where(blocked[b, kv_idx], -float("inf"), s)
        return s

    out = _compiled_flex[dynamic](q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out.nan_to_num_(0.0) if blocked is not None else out  # a row whose only key is masked: 0


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    backend: AttentionBackend,
    num_aux: int | None = None,
) -> Tensor:
    """Dispatch to one of the attention implementations (all compute the same function).

    ``"flex"`` compiles for each new shape, ``"flex-dynamic"`` once for varying shapes.
    """
    if backend == "chunked":
        return chunked_attention(q, k, v, key_bias, key_valid, softcap, num_aux=num_aux)
    if backend in ("flex", "flex-dynamic"):
        dynamic = backend == "flex-dynamic"
        return flex_attention_fn(q, k, v, key_bias, key_valid, softcap, num_aux=num_aux, dynamic=dynamic)
    if backend == "dense":
        return dense_attention(q, k, v, key_bias, key_valid, softcap)
    raise ValueError(f"unknown attention backend {backend!r}; expected 'chunked', 'flex', 'flex-dynamic' or 'dense'.")


Attend = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]


# --------------------------------------------------------------------------------------------
# modules


class MLP(nn.Module):
    """``Linear -> ReLU -> LayerNorm -> Dropout -> Linear``, stored as ``layers.{0,2,4}``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d_in, d_hidden),
            nn.ReLU(),
            nn.LayerNorm(d_hidden),
            nn.Dropout(dropout),
            nn.Linear(d_hidden, d_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GeneEmbedding(nn.Module):
    """Token -> frozen ESM2 vector -> MLP to the model width."""

    def __init__(self, vocab_size: int, esm_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, esm_dim)
        self.embedding.weight.requires_grad_(False)
        self.mlp = MLP(esm_dim, embed_dim, embed_dim, dropout)

    def forward(self, tokens: Tensor, table: Tensor | None = None) -> Tensor:
        """Embed ``tokens``; ``table`` replaces the ESM matrix (out-of-distribution vocabularies)."""
        weight = self.embedding.weight if table is None else table
        return self.mlp(F.embedding(tokens, weight))


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``linears`` are the Q, K, V and output projections."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.linears = nn.ModuleList([nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(4)])

    def forward(self, x: Tensor, key_bias: Tensor, key_valid: Tensor, softcap: float, attend: Attend):
        q, k, v = _heads(self, x)
        return _merge(self, attend(q, k, v, key_bias, key_valid, softcap))


def _heads(attn: SelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V projections split into heads: ``(B, H, T, dk)`` each."""
    B, T, E = x.shape
    H = attn.num_heads
    return tuple(lin(x).view(B, T, H, E // H).transpose(1, 2) for lin in attn.linears[:3])


def _merge(attn: SelfAttention, out: Tensor) -> Tensor:
    """Concatenate the heads and apply the output projection."""
    B, H, T, dk = out.shape
    return attn.linears[3](out.transpose(1, 2).reshape(B, T, H * dk))


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class EncoderLayer(nn.Module):
    """One transformer layer. published: the residual stream carries the *normalised* tensor."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, Fd = config.embed_dim, config.model_dim
        self.self_attn = SelfAttention(E, config.num_heads, config.attn_bias)
        self.linear1 = nn.Linear(E, Fd, bias=config.fw_bias)
        self.linear2 = nn.Linear(Fd, E, bias=config.fw_bias)
        self.norm1 = nn.LayerNorm(E)
        self.norm2 = nn.LayerNorm(E)
        self.activation = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.softcap = float(config.softcap)

    def forward(self, x: Tensor, key_bias: Tensor, key_valid: Tensor, attend: Attend) -> Tensor:
        before, after = getattr(_FUSED, "functions", None) or (_before_attention, _after_attention)
        h, q, k, v = before(self, x)
        return after(self, h, attend(q, k, v, key_bias, key_valid, self.softcap))


def _before_attention(layer: EncoderLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h = layer.norm1(x)
    return (h, *_heads(layer.self_attn, h))


def _after_attention(layer: EncoderLayer, h: Tensor, attended: Tensor) -> Tensor:
    x = h + _merge(layer.self_attn, attended)  # published: adds LN(x), not x
    h = layer.norm2(x)
    return h + layer.linear2(layer.dropout(layer.activation(layer.linear1(h))))


#: This thread's compiled versions of the code around attention, set by :func:`fused` (unset: eager).
_FUSED = threading.local()
_FUSED_COMPILED: list[Callable] = []


@contextlib.contextmanager
def fused(enabled: bool = True):
    """Within this context (in this thread) the layers' code around attention runs through ``torch.compile``.

    Optional speed-up for CUDA: inductor fuses the layer norms, casts, activation and residual
    additions into few kernels (dynamic shapes: compiled once for all batch sizes and lengths). It
    computes the same function; nothing requires it.
    """
    if not enabled:
        yield
        return
    if not _FUSED_COMPILED:
        _FUSED_COMPILED.extend(
            [torch.compile(_before_attention, dynamic=True), torch.compile(_after_attention, dynamic=True)]
        )
    previous = getattr(_FUSED, "functions", None)
    _FUSED.functions = tuple(_FUSED_COMPILED)
    try:
        yield
    finally:
        _FUSED.functions = previous


class Encoder(nn.Module):
    """The stack of encoder layers (no final norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder_layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_layers)])

    def forward(self, x: Tensor, key_bias: Tensor, key_valid: Tensor, attend: Attend) -> Tensor:
        for layer in self.encoder_layers:
            x = layer(x, key_bias, key_valid, attend)
        return x


class CountHead(nn.Module):
    """``mu``: a per-position logit from ``[hidden ; ge(target gene)]`` plus a per-gene bias."""

    def __init__(self, vocab_size: int, embed_dim: int, dropout: float):
        super().__init__()
        self.gene_embedding = nn.Embedding(vocab_size, 1)
        self.mlp = MLP(2 * embed_dim, embed_dim // 2, 1, dropout)

    def forward(self, hidden: Tensor, target_emb: Tensor, targets: Tensor, gene_bias: Tensor | None = None) -> Tensor:
        weight = self.gene_embedding.weight if gene_bias is None else gene_bias
        logit = self.mlp(torch.cat([hidden, target_emb.to(hidden.dtype)], dim=-1)).squeeze(-1)
        return logit.float() + F.embedding(targets, weight).squeeze(-1).float()


_attention = attention  # ``TranscriptFormer.encode`` has an argument of that name

_ELEMENTWISE_LINKS = {
    "exp": torch.exp,
    "log": torch.log,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "linear": lambda x: x,
    "tanh": torch.tanh,
}


class TranscriptFormer(nn.Module):
    """TranscriptFormer at inference.

    Parameters
    ----------
    config
        Shapes and numerics.
    vocab_size
        Number of gene tokens ``V`` (special tokens included).
    esm_dim
        Width ``D`` of the ESM2 gene vectors.
    aux_vocab_sizes
        ``{obs column: vocabulary size}`` of the auxiliary tokens, in sequence order.
    aux_unknown
        Index of ``unknown`` in each auxiliary vocabulary; an auxiliary token equal to any of them is
        masked as a key.
    pad_idx, start_idx, end_idx
        Indices of ``[PAD]``, ``[START]`` and ``[END]``.
    gene_head
        Whether the gene-identity head exists.
    softplus_approx
        Form of the likelihood normaliser (``loss_config.softplus_approx``).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        vocab_size: int,
        esm_dim: int,
        aux_vocab_sizes: Mapping[str, int],
        aux_unknown: Sequence[int] = (),
        pad_idx: int = 1,
        start_idx: int = 2,
        end_idx: int = 3,
        gene_head: bool = True,
        softplus_approx: bool = True,
    ):
        super().__init__()
        self.config = config
        self.pad_idx, self.start_idx, self.end_idx = pad_idx, start_idx, end_idx
        self.aux_unknown = tuple(aux_unknown)
        self.softplus_approx = softplus_approx
        E = config.embed_dim
        self.gene_embeddings = GeneEmbedding(vocab_size, esm_dim, E, config.dropout)
        self.aux_embeddings = nn.ModuleDict({col: nn.Embedding(n, E) for col, n in aux_vocab_sizes.items()})
        self.transformer_encoder = Encoder(config)
        self.mu = CountHead(vocab_size, E, config.dropout)
        self.gene_id_head = MLP(E, config.gene_head_hidden_dim, vocab_size, config.dropout) if gene_head else None

    @property
    def num_aux(self) -> int:
        """Number of auxiliary tokens ``A`` before the genes."""
        return len(self.aux_embeddings)

    def encode(
        self,
        tokens: Tensor,
        counts: Tensor,
        aux: Tensor,
        *,
        with_targets: bool = False,
        gene_table: Tensor | None = None,
        attention: AttentionBackend = "chunked",
        embed: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Run the encoder.

        Parameters
        ----------
        tokens
            ``(B, L)`` int64 gene tokens (``[PAD]`` after each cell's genes), ``L <= S``. Trimming
            to the longest cell of the batch is exact: causality keeps later positions out of
            earlier outputs.
        counts
            ``(B, L)`` float counts (after clipping / normalisation), 0 at padding.
        aux
            ``(B, A)`` int64 auxiliary tokens.
        with_targets
            Also return the gene-MLP embedding of the (unshifted) target tokens for the count head.
        gene_table
            Replacement ESM matrix for out-of-distribution vocabularies.
        attention
            Attention implementation.
        embed
            Replaces the gene-embedding module (token ids -> ``E``-wide vectors), e.g. a cache of its
            outputs; it must compute the same function.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor | None]
            ``hidden`` ``(B, L, E)``: position ``j`` is the prediction slot of gene ``t_j`` (it has seen
            ``t_0 .. t_{j-1}``); and the target embeddings ``(B, L, E)`` or None.
        """
        B, L = tokens.shape
        A = self.num_aux
        # published: inputs are right-shifted with [START]; counts with a leading 1
        start = tokens.new_full((B, 1), self.start_idx)
        seq = torch.cat([start, tokens if with_targets else tokens[:, : L - 1]], dim=1)
        ge = embed(seq) if embed is not None else self.gene_embeddings(seq, gene_table)
        shifted = seq[:, :L]
        one = counts.new_ones(B, 1)
        counts_in = torch.cat([one.expand(B, A), one, counts[:, : L - 1]], dim=1).float()
        key_bias = torch.log1p(counts_in + self.config.log_counts_eps)
        gene_valid = shifted != self.pad_idx
        if A:
            aux_valid = torch.ones_like(aux, dtype=torch.bool)
            for unk in self.aux_unknown:
                aux_valid &= aux != unk
            aux_emb = [emb(aux[:, i]) for i, emb in enumerate(self.aux_embeddings.values())]
            x = torch.cat([torch.stack(aux_emb, dim=1).to(ge.dtype), ge[:, :L]], dim=1)
            key_valid = torch.cat([aux_valid, gene_valid], dim=1)
        else:
            x, key_valid = ge[:, :L], gene_valid
        # the key mask is the auxiliary tokens' validity plus a prefix of the genes (the cell, then padding)
        attend = partial(_attention, backend=attention, num_aux=A)
        x = self.transformer_encoder(x, key_bias, key_valid, attend)
        return x[:, A:], (ge[:, 1:] if with_targets else None)

    def cell_embedding(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Masked sum of the hidden states over the cell's positions, divided by ``S``.

        published: the pooled positions are those whose *shifted* input is not padding (START and
        the cell's genes, i.e. ``n + 1`` slots for a cell of ``n < S`` genes) and the sum is divided
        by the full ``seq_len``, whatever the cell's length.
        """
        B = tokens.shape[0]
        shifted_valid = torch.cat([tokens.new_ones(B, 1, dtype=torch.bool), tokens[:, :-1] != self.pad_idx], dim=1)
        pooled = (hidden.float() * shifted_valid[..., None]).sum(dim=1)
        return pooled / self.config.seq_len

    def count_rate(self, hidden: Tensor, target_emb: Tensor, tokens: Tensor, counts: Tensor, gene_bias=None) -> Tensor:
        """Expected count ``mu`` per position (``(B, L)``, float32)."""
        logit = self.mu(hidden, target_emb, tokens, gene_bias)
        link = self.config.mu_link_fn
        if link != "softmax":
            return _ELEMENTWISE_LINKS[link](logit)
        logit = logit.masked_fill(tokens == self.pad_idx, float("-inf"))
        return torch.softmax(logit, dim=-1) * counts.float().sum(dim=-1, keepdim=True)

    def count_nll(
        self,
        hidden: Tensor,
        target_emb: Tensor,
        tokens: Tensor,
        counts: Tensor,
        *,
        clip_counts: float | None,
        full_length: bool,
        gene_bias: Tensor | None = None,
    ) -> Tensor:
        """Mean zero-truncated-Poisson negative log-likelihood per gene, ``(B,)`` float32.

        ``full_length`` says that position ``L - 1`` is the model's last slot ``S - 1``
        (published: its count is replaced by 1). Cells without any gene give NaN.
        """
        eps = self.config.log_counts_eps
        mu = self.count_rate(hidden, target_emb, tokens, counts, gene_bias)
        c = counts.float()
        if full_length:
            c = c.clone()
            c[:, -1] = 1.0
        c = c.clamp(min=eps, max=math.inf if clip_counts is None else float(clip_counts))
        x = mu + eps
        if self.softplus_approx:
            norm = (x - F.softplus(-x)).clamp_min(0.0)
        else:
            norm = x.clamp_min(0.0)  # published: the exact branch reduces to x
        nll = -c * torch.log(x) + norm + torch.lgamma(c + 1.0)
        valid = tokens != self.pad_idx
        return torch.where(valid, nll, 0.0).sum(-1) / valid.sum(-1)

    def gene_nll(self, hidden: Tensor, tokens: Tensor, *, full_length: bool, block: int = 256) -> Tensor:
        """Per-position cross-entropy of the gene-identity head, ``(B, L)`` float32, 0 at padding.

        published: the target of the last slot ``S - 1`` is ``[END]``; logits are soft-capped.
        """
        if self.gene_id_head is None:
            raise ValueError("this checkpoint has no gene-identity head (loss_config.gene_id_loss_weight is 0).")
        targets = tokens
        if full_length:
            targets = tokens.clone()
            targets[:, -1] = self.end_idx
        cap = float(self.config.softcap)
        out = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
        for s in range(0, tokens.shape[1], block):  # (B, block, V) logits at a time
            logits = self.gene_id_head(hidden[:, s : s + block]).float()
            if cap > 0:
                logits = cap * torch.tanh(logits / cap)
            picked = logits.gather(-1, targets[:, s : s + block, None]).squeeze(-1)
            out[:, s : s + block] = torch.logsumexp(logits, dim=-1) - picked
        return out.masked_fill_(tokens == self.pad_idx, 0.0)
