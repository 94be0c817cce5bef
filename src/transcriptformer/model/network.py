"""The TranscriptFormer network in plain PyTorch.

A cell is a sequence of gene tokens with counts. Genes are embedded by an MLP over frozen ESM2
protein-language-model vectors, so genes of any species share one space. An optional auxiliary
token (the assay) is prepended. A causal transformer without positional encodings reads the
genes in order; every attention score is biased by ``log1p(count)`` of its key and soft-capped
(:mod:`.attention`). Three read-outs exist:

* the cell embedding: the mean of the hidden states over the cell's positions, divided by the
  full sequence length ``S`` (not the number of genes), as the published model does;
* the count head (``mu``): a zero-truncated-Poisson rate per gene, giving the likelihood;
* the gene-identity head: logits over the vocabulary for the next gene.

The module's parameter names equal the keys of the published ``model_weights.pt``, so the
published state_dict loads with ``strict=True``. Quirks of the published model that change
numbers are reproduced on purpose and marked "published:" below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ACTIVATIONS, MU_LINK_FUNCTIONS, ModelConfig
from .attention import (
    Attend,
    AttentionInputs,
    BiasMode,
    ChunkedAttention,
    DenseAttention,
    Kernel,
    outside_compile,
)

__all__ = ["Encoded", "EncoderLayer", "KVCache", "LayerCache", "TranscriptFormer"]


# --------------------------------------------------------------------------------------------
# key/value cache (generation)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for decoding one position at a time.

    Holds ``(B, H, max_len, dk)`` keys and values per layer plus each position's count bias and key
    validity. :meth:`TranscriptFormer.extend` appends positions; a query at position ``p`` then meets the
    cached keys ``0 .. p`` without recomputing them, so a cell of ``n`` genes costs ``n`` single-position
    layer passes instead of ``n`` passes over growing prefixes.
    """

    def __init__(self, model: TranscriptFormer, batch: int, max_len: int, *, device, dtype=torch.float32):
        c = model.config
        H, dk = c.num_heads, c.embed_dim // c.num_heads
        shape = (batch, H, max_len, dk)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_layers)]
        self.key_bias = torch.zeros(batch, max_len, device=device, dtype=torch.float32)
        self.key_valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self.max_len = max_len

    def layer(self, i: int) -> LayerCache:
        """The view one layer writes to and reads from."""
        return LayerCache(self, i)


@dataclass
class LayerCache:
    """One layer's part of a :class:`KVCache`."""

    cache: KVCache
    index: int

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' keys and values; return the keys and values of every position so far."""
        c, i = self.cache, self.index
        start, stop = c.length, c.length + k.shape[-2]
        c.k[i][:, :, start:stop] = k.to(c.k[i].dtype)
        c.v[i][:, :, start:stop] = v.to(c.v[i].dtype)
        return c.k[i][:, :, :stop].to(k.dtype), c.v[i][:, :, :stop].to(v.dtype)


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

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V projections split into heads: ``(B, H, T, dk)`` each."""
        B, T, E = x.shape
        H = self.num_heads
        q, k, v = (lin(x).view(B, T, H, E // H).transpose(1, 2) for lin in self.linears[:3])
        return q, k, v

    def merge(self, out: Tensor) -> Tensor:
        """Concatenate the heads and apply the output projection."""
        B, H, T, dk = out.shape
        return self.linears[3](out.transpose(1, 2).reshape(B, T, H * dk))


class GELU(nn.GELU):
    """``nn.GELU`` (erf form) that, on the CPU, runs oneDNN kernels of ten lengths only, whatever the shapes.

    PyTorch computes a float32 or bfloat16 GELU on the CPU with oneDNN, which compiles a kernel for every new
    input shape and keeps up to 1,024 of them. Batches of ragged cells have ever new shapes, and the kernels,
    allocated among the batches' freed buffers, kept glibc from returning those: a long run's resident memory grew
    with its cells (777 -> 1,438 MB over 32,768 cells of tf-demo; flat at 665-668 MB with this). Without gradients
    the input is cut into pieces of ``2**18`` elements and the rest is padded to a power of two (at least
    ``2**10``); the values are those of ``F.gelu`` element by element. (Training keeps ``nn.GELU``.)
    """

    piece = 1 << 18

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        flat, n = x.reshape(-1), x.numel()
        out = torch.empty_like(flat)
        whole = n - n % self.piece
        for s in range(0, whole, self.piece):
            torch.ops.aten.gelu.out(flat[s : s + self.piece], out=out[s : s + self.piece])
        if whole < n:
            rest = flat.new_empty(max(1 << 10, 1 << (n - whole - 1).bit_length()))  # the padding is never read
            rest[: n - whole] = flat[whole:]
            out[whole:] = torch.ops.aten.gelu.out(rest, out=rest)[: n - whole]
        return out.view_as(x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": GELU, "relu": nn.ReLU, "silu": nn.SiLU}
assert set(_ACTIVATIONS) == set(ACTIVATIONS), "config.ACTIVATIONS and the modules here must agree"


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

    def forward(self, x: Tensor, attend: Attend, cache: LayerCache | None = None) -> Tensor:
        h = self.norm1(x)
        q, k, v = self.self_attn.project(h)
        if cache is not None:  # keys and values of earlier positions (generation)
            k, v = cache.extend(k, v)
        x = h + self.self_attn.merge(attend(q, k, v))  # published: adds LN(x), not x
        h = self.norm2(x)
        return h + self.linear2(self.dropout(self.activation(self.linear1(h))))


class Encoder(nn.Module):
    """The stack of encoder layers (no final norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder_layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_layers)])

    def forward(
        self, x: Tensor, attend: Attend, cache: KVCache | None = None, compiled: Callable | None = None
    ) -> Tensor:
        """Run every layer; ``compiled`` is ``torch.compile(EncoderLayer.forward)`` to run them with, if given."""
        for i, layer in enumerate(self.encoder_layers):
            layer_cache = None if cache is None else cache.layer(i)
            x = layer(x, attend, layer_cache) if compiled is None else compiled(layer, x, attend, layer_cache)
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


_ELEMENTWISE_LINKS: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "linear": lambda x: x,
    "tanh": torch.tanh,
}
assert set(_ELEMENTWISE_LINKS) | {"softmax"} == set(MU_LINK_FUNCTIONS), "config.MU_LINK_FUNCTIONS must agree"


class _CappedCrossEntropy(torch.autograd.Function):
    """``logsumexp(y) - y[target]`` with ``y = c·tanh(z/c)`` over the last axis, for training.

    The same function as :meth:`TranscriptFormer.gene_logits` followed by the cross-entropy, differentiated by
    hand: the forward keeps ``tanh(z/c)`` and the (shifted) weights ``exp(y - m)``, the backward is
    ``(softmax(y) - onehot(target)) · (1 - tanh²)``. Since ``y <= c``, the shift ``m`` is ``c`` itself for caps
    up to 40 (no row maximum needed; the weights stay in float32's normal range), the row maximum above.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, cap: float) -> Tensor:  # type: ignore[override]
        t = (logits if logits.dtype == torch.float64 else logits.float()).mul(1.0 / cap).tanh_()
        shift = t.amax(-1, keepdim=True).mul_(cap) if cap > 40 else torch.full_like(t[..., :1], cap)
        w = torch.mul(t, cap).sub_(shift).exp_()
        total = w.sum(-1, keepdim=True)
        picked = t.gather(-1, targets[..., None]).mul_(cap)
        ctx.save_for_backward(t, w, total, targets)
        ctx.dtype = logits.dtype
        return (total.log().add_(shift).sub_(picked)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        t, w, total, targets = ctx.saved_tensors
        g = grad.to(t.dtype)[..., None]
        dy = w * (g / total)  # softmax(y) · g
        dy.scatter_add_(-1, targets[..., None], -g)
        dz = dy.addcmul_(dy * t, t, value=-1.0)  # · (1 - tanh²)
        return dz.to(ctx.dtype), None, None


class _CappedCrossEntropySum(torch.autograd.Function):
    """Sum over the non-``[PAD]`` targets of :class:`_CappedCrossEntropy`, fused with the head's last ``Linear``.

    For CPU training: the loss is a plain sum (the published gene term), so the gradient with respect to each
    logit is known in the forward; each chunk of rows is computed, reduced and differentiated while it is in
    cache (the ``V``-wide logits never exist for the whole batch, nor are they read again), ``[PAD]`` targets are
    skipped, and the backward only scales the kept gradients of ``h``, ``weight`` and ``bias``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, pad: int, cap: float) -> Tensor:  # type: ignore[override]
        rows, tg = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        keep = (tg != pad).nonzero().squeeze(1)
        total = h.new_zeros((), dtype=torch.float32)
        needs = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(x) if need else None for x, need in zip((rows, weight, bias), needs, strict=True)]
        dh, dw, db = grads
        for s in range(0, keep.numel(), 256):
            idx = keep[s : s + 256]
            hc, tc = rows.index_select(0, idx), tg.index_select(0, idx)[:, None]
            t = torch.addmm(bias, hc, weight.t()).mul_(1.0 / cap).tanh_()
            p = t.sub(1.0).mul_(cap).exp_()  # exp(y - c): y <= c keeps it in float32's range
            z = p.sum(-1, keepdim=True)
            total += z.log().add_(cap).sum() - t.gather(-1, tc).sum() * cap
            dz = p.div_(z).scatter_add_(-1, tc, torch.full_like(z, -1.0)).mul_(t.mul_(t).neg_().add_(1.0))
            if dh is not None:
                dh.index_copy_(0, idx, dz @ weight)
            if dw is not None:
                dw.addmm_(dz.t(), hc)
            if db is not None:
                db.add_(dz.sum(0))
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.has, ctx.shape = [g is not None for g in grads], h.shape
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        kept = iter(ctx.saved_tensors)
        dh, dw, db = (next(kept) * grad if has else None for has in ctx.has)
        return (dh.view(ctx.shape) if dh is not None else None), dw, db, None, None, None


@dataclass(frozen=True)
class Encoded:
    """What :meth:`TranscriptFormer.encode` returns.

    Attributes
    ----------
    hidden
        ``(B, L, E)``: position ``j`` is the prediction slot of gene ``t_j`` (it has seen ``t_0 .. t_{j-1}``).
    targets
        ``(B, L, E)`` gene-MLP embeddings of the (unshifted) target tokens for the count head, or ``None``.
    """

    hidden: Tensor
    targets: Tensor | None = None


class TranscriptFormer(nn.Module):
    """The TranscriptFormer network.

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

    def key_bias(self, counts: Tensor) -> Tensor:
        """Attention count bias ``log1p(count + eps)`` of key positions with these (input) counts."""
        return torch.log1p(counts.float() + self.config.log_counts_eps)

    def aux_inputs(self, aux: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings ``(B, A, E)`` and key validity ``(B, A)`` of the auxiliary tokens."""
        valid = torch.ones_like(aux, dtype=torch.bool)
        for unk in self.aux_unknown:
            valid &= aux != unk
        emb = [layer(aux[:, i]) for i, layer in enumerate(self.aux_embeddings.values())]
        return torch.stack(emb, dim=1), valid

    def encode(
        self,
        tokens: Tensor,
        counts: Tensor,
        aux: Tensor,
        *,
        mode: BiasMode = "embed",
        with_targets: bool = False,
        gene_table: Tensor | None = None,
        kernel: Kernel | None = None,
        compiled: Callable | None = None,
        embed: Callable[[Tensor], Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> Encoded:
        """Run the encoder over whole cells.

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
        mode
            ``"embed"`` (inference, the published ``embed=True``) or ``"train"`` (the training objective and
            generation): whether a position's own count bias applies (see :class:`AttentionInputs`).
        with_targets
            Also return the gene-MLP embedding of the (unshifted) target tokens for the count head.
        gene_table
            Replacement ESM matrix for out-of-distribution vocabularies.
        kernel
            Attention kernel (default :class:`ChunkedAttention`).
        compiled
            ``torch.compile(EncoderLayer.forward)`` to run each layer with (the attention kernel stays out of the
            compiled graph); ``None`` runs the layers as they are.
        embed
            Replaces the gene-embedding module (token ids -> ``E``-wide vectors), e.g. a cache of its
            outputs; it must compute the same function.
        cache
            An empty :class:`KVCache` to fill with these positions' keys and values (a prompt to continue).

        Returns
        -------
        Encoded
            Hidden states at the prediction slots and, with ``with_targets``, the target embeddings.
        """
        B, L = tokens.shape
        A = self.num_aux
        # published: inputs are right-shifted with [START]; counts with a leading 1
        start = tokens.new_full((B, 1), self.start_idx)
        # in training the target embeddings get dropout masks of their own (the published model embeds the
        # inputs and the targets in two calls); otherwise one call serves both
        joint = with_targets and not self.training
        seq = torch.cat([start, tokens if joint else tokens[:, : L - 1]], dim=1)
        ge = embed(seq) if embed is not None else self.gene_embeddings(seq, gene_table)
        targets = None
        if with_targets:
            targets = ge[:, 1:] if joint else self.gene_embeddings(tokens, gene_table)
        shifted = seq[:, :L]
        one = counts.new_ones(B, 1)
        key_bias = self.key_bias(torch.cat([one.expand(B, A), one, counts[:, : L - 1]], dim=1))
        gene_valid = shifted != self.pad_idx
        if A:
            aux_emb, aux_valid = self.aux_inputs(aux)
            x = torch.cat([aux_emb.to(ge.dtype), ge[:, :L]], dim=1)
            key_valid = torch.cat([aux_valid, gene_valid], dim=1)
        else:
            x, key_valid = ge[:, :L], gene_valid
        # the key mask is the auxiliary tokens' validity plus a prefix of the genes (the cell, then padding)
        inputs = AttentionInputs(key_bias, key_valid, float(self.config.softcap), mode=mode, num_aux=A)
        if cache is not None:
            x = self.extend(x, key_bias, key_valid, cache, kernel=kernel, mode=mode, inputs=inputs)
        else:
            call = outside_compile() if compiled is not None else None
            x = self.transformer_encoder(x, Attend(kernel or ChunkedAttention(), inputs, call), compiled=compiled)
        return Encoded(x[:, A:], targets)

    def extend(
        self,
        x: Tensor,
        key_bias: Tensor,
        key_valid: Tensor,
        cache: KVCache,
        *,
        kernel: Kernel | None = None,
        mode: BiasMode = "train",
        inputs: AttentionInputs | None = None,
    ) -> Tensor:
        """Run the encoder over new positions appended to those in ``cache`` (which then holds them too).

        Parameters
        ----------
        x
            ``(B, t, E)`` input embeddings of the new positions.
        key_bias, key_valid
            ``(B, t)`` count bias and key validity of the new positions.
        cache
            Keys and values of the earlier positions.
        kernel, mode
            As in :meth:`encode`.
        inputs
            Precomputed attention inputs of the new positions (when the cache is empty).

        Returns
        -------
        torch.Tensor
            ``(B, t, E)`` hidden states of the new positions.
        """
        start, stop = cache.length, cache.length + x.shape[1]
        if stop > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; {stop} were asked for.")
        cache.key_bias[:, start:stop] = key_bias
        cache.key_valid[:, start:stop] = key_valid
        if inputs is None or start > 0:
            inputs = AttentionInputs(
                cache.key_bias[:, :stop],
                cache.key_valid[:, :stop],
                float(self.config.softcap),
                mode=mode,
                num_aux=None,
                q_offset=start,
            )
        else:
            inputs = replace(inputs, num_aux=None)  # padding keys of a prompt batch must stay masked
        out = self.transformer_encoder(x, Attend(kernel or ChunkedAttention(), inputs), cache)
        cache.length = stop
        return out

    def forward(
        self,
        tokens: Tensor,
        counts: Tensor,
        aux: Tensor,
        *,
        full_length: bool,
        clip_counts: float | None = 30.0,
        kernel: Kernel | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The training objective over a batch, as sums: ``(count NLL, gene cross-entropy, genes)``.

        The published training forward (``embed=False``): the count bias on strictly earlier keys only,
        dropout where the module is in training mode. The count term is the zero-truncated-Poisson NLL of
        every gene (:meth:`count_nll_per_gene`), the gene term the gene-identity cross-entropy with the
        published targets (:meth:`gene_targets`; 0 without the gene-identity head). The published batch loss
        is ``count / genes + gene_id_loss_weight * gene / (cells * seq_len)``
        (:func:`transcriptformer.training.fit.batch_loss`).

        Parameters
        ----------
        tokens, counts, aux
            As in :meth:`encode` (counts after clipping / normalisation).
        full_length
            Position ``L - 1`` is the model's last slot ``S - 1``.
        clip_counts
            The data's clipping value, which also bounds the counts in the likelihood.
        kernel
            Attention kernel; it must be differentiable for training (:class:`DenseAttention`, or
            :class:`FlexAttention` on CUDA).
        """
        enc = self.encode(tokens, counts, aux, mode="train", with_targets=True, kernel=kernel or DenseAttention())
        count = self.count_nll_per_gene(
            enc.hidden,
            enc.targets,  # type: ignore[arg-type]  # with_targets=True
            tokens,
            counts,
            clip_counts=clip_counts,
            full_length=full_length,
        ).sum()
        if self.gene_id_head is not None:
            gene = self.gene_nll_sum(enc.hidden, self.gene_targets(tokens, full_length=full_length))
        else:
            gene = count.new_zeros(())
        return count, gene, (tokens != self.pad_idx).sum()

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

    def count_logits(self, hidden: Tensor, target_emb: Tensor, tokens: Tensor, gene_bias: Tensor | None = None):
        """Count-head logits ``(B, L)`` float32, before the link function."""
        return self.mu(hidden, target_emb, tokens, gene_bias)

    def link(self, logit: Tensor) -> Tensor:
        """An elementwise link function applied to count logits (every link but ``softmax``)."""
        return _ELEMENTWISE_LINKS[self.config.mu_link_fn](logit)

    def count_rate(self, hidden: Tensor, target_emb: Tensor, tokens: Tensor, counts: Tensor, gene_bias=None) -> Tensor:
        """Expected count ``mu`` per position (``(B, L)``, float32)."""
        logit = self.count_logits(hidden, target_emb, tokens, gene_bias)
        if self.config.mu_link_fn != "softmax":
            return self.link(logit)
        logit = logit.masked_fill(tokens == self.pad_idx, float("-inf"))
        return torch.softmax(logit, dim=-1) * counts.float().sum(dim=-1, keepdim=True)

    def count_nll_per_gene(
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
        """Zero-truncated-Poisson negative log-likelihood of each position's count, ``(B, L)``, 0 at padding.

        ``full_length`` says that position ``L - 1`` is the model's last slot ``S - 1`` (published: its
        count is replaced by 1).
        """
        eps = self.config.log_counts_eps
        mu = self.count_rate(hidden, target_emb, tokens, counts, gene_bias)
        c = counts.float()
        if full_length:
            c = torch.cat([c[:, :-1], c.new_ones(c.shape[0], 1)], dim=1)
        c = c.clamp(min=eps, max=math.inf if clip_counts is None else float(clip_counts))
        x = mu + eps
        if self.softplus_approx:
            norm = (x - F.softplus(-x)).clamp_min(0.0)
        else:
            norm = x.clamp_min(0.0)  # published: the exact branch reduces to x
        nll = -c * torch.log(x) + norm + torch.lgamma(c + 1.0)
        return torch.where(tokens != self.pad_idx, nll, 0.0)

    def count_nll(self, hidden: Tensor, target_emb: Tensor, tokens: Tensor, counts: Tensor, **kwargs) -> Tensor:
        """Mean of :meth:`count_nll_per_gene` over each cell's genes, ``(B,)`` (NaN for cells without genes)."""
        nll = self.count_nll_per_gene(hidden, target_emb, tokens, counts, **kwargs)
        return nll.sum(-1) / (tokens != self.pad_idx).sum(-1)

    def gene_logits(self, hidden: Tensor) -> Tensor:
        """Soft-capped gene-identity logits ``(..., V)`` float32 (published: capped like attention scores)."""
        if self.gene_id_head is None:
            raise ValueError("this checkpoint has no gene-identity head (loss_config.gene_id_loss_weight is 0).")
        logits = self.gene_id_head(hidden).float()
        cap = float(self.config.softcap)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def gene_nll(self, hidden: Tensor, targets: Tensor, *, block: int = 256) -> Tensor:
        """Cross-entropy of the gene-identity head for ``targets`` at each position, ``(B, L)`` float32.

        0 where the target is ``[PAD]``. Logits are computed ``block`` positions at a time (they are
        ``V`` wide).
        """
        cap = float(self.config.softcap)
        if torch.is_grad_enabled() and hidden.requires_grad and cap > 0 and self.gene_id_head is not None:
            # training: one autograd node per block that keeps tanh and the weights only (the V-wide logits
            # dominate the memory and element-wise work of a training step)
            parts = [
                _CappedCrossEntropy.apply(self.gene_id_head(hidden[:, s : s + block]), targets[:, s : s + block], cap)
                for s in range(0, targets.shape[1], block)
            ]
            return torch.cat(parts, dim=1).masked_fill(targets == self.pad_idx, 0.0)
        out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
        for s in range(0, targets.shape[1], block):
            logits = self.gene_logits(hidden[:, s : s + block])
            picked = logits.gather(-1, targets[:, s : s + block, None]).squeeze(-1)
            out[:, s : s + block] = torch.logsumexp(logits, dim=-1) - picked
        return out.masked_fill_(targets == self.pad_idx, 0.0)

    def gene_nll_sum(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """``gene_nll(hidden, targets).sum()``; on the CPU in float32 with gradients, fused with the last layer."""
        head, cap = self.gene_id_head, float(self.config.softcap)
        last = head.layers[-1] if head is not None else None
        if (
            torch.is_grad_enabled()
            and 0 < cap <= 40  # exp(y - c) needs no row maximum
            and type(last) is nn.Linear  # not LoRA-wrapped
            and last.bias is not None
            and hidden.device.type == "cpu"
            and hidden.dtype == last.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            h = head.layers[:-1](hidden)  # type: ignore[index,union-attr]  # the head exists: last is a Linear
            return _CappedCrossEntropySum.apply(h, last.weight, last.bias, targets, self.pad_idx, cap)
        return self.gene_nll(hidden, targets).sum()

    def gene_targets(self, tokens: Tensor, *, full_length: bool) -> Tensor:
        """The gene-identity targets of the published objective: the tokens, with ``[END]`` at slot ``S - 1``.

        ``full_length`` says that position ``L - 1`` is slot ``S - 1``; a cell that does not reach it keeps
        ``[PAD]`` there (no target).
        """
        if not full_length:
            return tokens
        last = tokens[:, -1:]
        return torch.cat([tokens[:, :-1], torch.where(last != self.pad_idx, self.end_idx, last)], dim=1)
