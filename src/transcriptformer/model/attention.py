"""Attention kernels of TranscriptFormer: causal attention with a count bias and a soft cap.

Every kernel computes the same function of ``q, k, v`` and an :class:`AttentionInputs` record, which carries
the count bias of each key, the key mask and the count-bias *mode*: at inference (the published
``embed=True``) every key's bias applies, the query's own position included; in training (and generation)
only strictly earlier keys get it.

* :class:`ChunkedAttention` (:func:`chunked_attention`): exact, blocked, never materialises the ``T x T``
  score matrix; the default everywhere.
* :class:`FlexAttention` (:func:`flex_attention`): ``torch.nn.attention.flex_attention``, compiled, for CUDA.
* :class:`BlockedAttention` (:func:`blocked_attention`): exact, blocked, with a memory-efficient backward
  pass (recomputes the scores); training on the CPU.
* :class:`DenseAttention` (:func:`dense_attention`): the reference; materialises the scores and is
  differentiable.

A kernel is called as ``kernel(q, k, v, inputs)``; :class:`Attend` binds it to the inputs of one forward
pass, which is what each encoder layer receives.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_SCORES",
    "DEFAULT_MAX_SCORES_GPU",
    "Attend",
    "AttentionInputs",
    "BiasMode",
    "BlockedAttention",
    "ChunkedAttention",
    "DenseAttention",
    "FlexAttention",
    "HeadThreads",
    "Kernel",
    "blocked_attention",
    "chunked_attention",
    "dense_attention",
    "flex_attention",
    "outside_compile",
]

#: How the count bias meets the diagonal: ``"embed"`` (inference, the published ``embed=True``: every
#: key ``j <= i``) or ``"train"`` (training and generation: strictly earlier keys ``j < i``).
BiasMode = Literal["embed", "train"]

#: Score elements held at once by :func:`chunked_attention` on CPU (8 MiB in float32: blocks stay in
#: cache) and on GPUs (1 GiB: few, large kernels).
DEFAULT_MAX_SCORES = 1 << 21
DEFAULT_MAX_SCORES_GPU = 1 << 28


# --------------------------------------------------------------------------------------------
# attention


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention needs besides ``q, k, v``.

    Attributes
    ----------
    key_bias
        ``(B, Tk)`` float32: ``log1p(count + eps)`` of each key position.
    key_valid
        ``(B, Tk)`` bool: keys that may be attended to.
    softcap
        Scores are capped as ``softcap * tanh(s / softcap)`` after the bias; ``0`` for none.
    mode
        :data:`BiasMode`: whether a query's own position gets its count bias.
    num_aux
        ``None`` honours ``key_valid`` everywhere. An integer ``A`` promises the layout of TranscriptFormer
        sequences (the allowed keys are the first ``A`` auxiliary positions permitted by ``key_valid`` plus a
        *prefix* of the later positions), which lets kernels mask only the auxiliary keys and the causal
        triangle; rows after a sequence's valid prefix (padding, never read) are then computed unmasked.
    q_offset
        Position of the first query among the keys (KV-cached decoding: queries are the newest positions).
    """

    key_bias: Tensor
    key_valid: Tensor
    softcap: float
    mode: BiasMode = "embed"
    num_aux: int | None = None
    q_offset: int = 0


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    mode: BiasMode = "embed",
    q_offset: int = 0,
) -> Tensor:
    """Reference attention: the full score matrix, as the published (eager flex) kernel computes it.

    Parameters
    ----------
    q
        ``(B, H, Tq, dk)``: queries at positions ``q_offset .. q_offset + Tq - 1``.
    k, v
        ``(B, H, Tk, dk)``.
    key_bias
        ``(B, Tk)``: added to the score of every allowed pair whose key is at that position (in
        ``"train"`` mode not to a query's own position).
    key_valid
        ``(B, Tk)`` bool: keys that may be attended to.
    softcap
        Soft cap applied after the bias; ``0`` for none.
    mode, q_offset
        As in :class:`AttentionInputs`.

    Returns
    -------
    torch.Tensor
        ``(B, H, Tq, dk)``; query rows with no allowed key are zero.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    rows = torch.arange(Tq, device=q.device)[:, None] + q_offset
    cols = torch.arange(Tk, device=q.device)[None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    bias = key_bias[:, None, None, :].float()
    if mode == "train":
        bias = bias * (cols < rows)
    scores = scores + bias
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = (cols <= rows)[None, None] & key_valid[:, None, None, :]
    # a finite fill (exp underflows to exactly 0) keeps rows without any allowed key free of NaN, in the
    # output and in gradients; such rows are then zeroed
    scores = scores.masked_fill(~allowed, -1e30)
    p = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
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


#: Below this many scores (``B·H·T²``) a kernel runs its blocks in the calling thread alone.
_MIN_PARALLEL_SCORES = 1 << 22


class HeadThreads:
    """Runs a kernel's blocks on several threads, split by heads, each thread with one intra-op thread.

    The blocks of the CPU kernels are many small operations; with PyTorch's intra-op threads every one of
    them is an OpenMP parallel region whose threads wait for each other at its end, and on a machine where
    other processes compete for the cores that waiting dominates (measured on a loaded 2-core VM: one layer of
    a 2,048-gene cell at the TF-Sapiens shape took 6.4 s with two OpenMP threads, 1.2 s split by heads). Here
    each thread takes its own share of the heads and runs its blocks sequentially, so threads meet once per
    call; results are the same as in one thread. The threads (``torch.get_num_threads() - 1``; the caller
    takes a share too) are made on first use and kept by the kernel object.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # threads are not copied (a copy makes its own)

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def run(self, n_heads: int, scores: int, work: Callable[[int, int], None]) -> None:
        """``work(h0, h1)`` for contiguous ranges of ``[0, n_heads)`` covering it, concurrently where it pays."""
        threads = torch.get_num_threads()
        n = min(threads, n_heads)
        if n <= 1 or scores < _MIN_PARALLEL_SCORES:
            work(0, n_heads)
            return
        with self._lock:
            if self._pool is None or self._size != n - 1:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(
                    n - 1,
                    thread_name_prefix="transcriptformer-attention",
                    initializer=torch.set_num_threads,
                    initargs=(1,),
                )
                self._size = n - 1
            pool = self._pool
        bounds = [round(i * n_heads / n) for i in range(n + 1)]
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def call(h0: int, h1: int) -> None:  # worker threads do not inherit the caller's autograd modes
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                work(h0, h1)

        torch.set_num_threads(1)  # the caller's share runs without intra-op threads too
        try:
            futures = [pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, n)]
            try:
                call(bounds[0], bounds[1])
            finally:
                for f in futures:  # every share writes into the same outputs: wait for all before leaving
                    f.result()
        finally:
            torch.set_num_threads(threads)


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    mode: BiasMode = "embed",
    num_aux: int | None = None,
    max_scores: int | None = None,
    threads: HeadThreads | None = None,
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
    only the products use the reduced type. In ``"train"`` mode the bias is taken off the diagonal of
    each block again before the cap.

    Parameters
    ----------
    q, k, v, key_bias, key_valid, softcap, mode
        As in :func:`dense_attention` (queries and keys at the same positions: ``Tq = Tk``).
    num_aux
        As in :class:`AttentionInputs`.
    max_scores
        Scores held at once (default: :data:`DEFAULT_MAX_SCORES`, or :data:`DEFAULT_MAX_SCORES_GPU` on a GPU).
    threads
        Run the blocks on these threads, split by heads (CPU; see :class:`HeadThreads`); ``None``: in the
        calling thread, with PyTorch's intra-op threads.

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
    # "train": the query's own key gets no count bias, so it is subtracted again on each block's diagonal
    diagonal_bias = (key_bias.float() * beta).repeat_interleave(H, dim=0) if mode == "train" else None
    blocked_key = (~key_valid).repeat_interleave(H, dim=0)  # (BH, T)
    if num_aux is not None:
        bad_aux = blocked_key[:, :num_aux]
        aux_rows = torch.nonzero(bad_aux.any(dim=-1)).flatten()
    causal_off = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    if max_scores is None:
        max_scores = DEFAULT_MAX_SCORES if q.device.type == "cpu" else DEFAULT_MAX_SCORES_GPU
    heads, rows = _chunks(BH, T, max_scores)
    out = torch.empty(BH, T, dk, dtype=q.dtype, device=q.device)

    def blocks(lo: int, hi: int) -> None:
        for h0 in range(lo, hi, heads):
            _chunked_group(h0, min(hi, h0 + heads))

    def _chunked_group(h0: int, h1: int) -> None:
        if num_aux is not None:
            mine = aux_rows[(aux_rows >= h0) & (aux_rows < h1)] - h0
        for s in range(0, T, rows):
            e = min(T, s + rows)
            sc = torch.bmm(qx[h0:h1, s:e], kx[h0:h1, :e].transpose(1, 2))
            if bias is not None:
                sc = sc.float().mul_(alpha).add_(bias[h0:h1, :, :e])
            if diagonal_bias is not None:
                sc[:, :, s:e].diagonal(dim1=1, dim2=2).sub_(diagonal_bias[h0:h1, s:e])
            if num_aux is None:
                blocked: Tensor | tuple[Tensor, Tensor, Tensor | None] = (
                    causal_off[s:e, :e] | blocked_key[h0:h1, None, :e]
                )
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

    if threads is not None and q.device.type == "cpu":
        threads.run(BH, BH * T * T, blocks)
    else:
        blocks(0, BH)
    return out.view(B, H, T, dk)


# --------------------------------------------------------------------------------------------
# blocked attention with a backward pass (training)


class _Blocks:
    """What the forward and the backward of :class:`_BlockedAttentionFunction` share.

    The key bias per head, the masks (the causal triangle ``T x T``, upper, and either the full key mask
    ``(BH, T)`` with ``num_aux=None`` or the auxiliary keys' mask ``(BH, A)``), the block sizes, and the capped
    scores of one block.
    """

    def __init__(self, q: Tensor, key_bias: Tensor, key_valid: Tensor, softcap: float, mode: str, num_aux, max_scores):
        B, H, T, dk = q.shape
        self.BH, self.T, self.device = B * H, T, q.device
        self.bias = key_bias.float().repeat_interleave(H, dim=0)[:, None, :]  # (BH, 1, T)
        self.diag = self.bias[:, 0] if mode == "train" else None  # "train": a query's own key gets no count bias
        self.causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        blocked_key = (~key_valid).repeat_interleave(H, dim=0)  # (BH, T)
        self.blocked_key = blocked_key if num_aux is None else None
        self.aux = None if num_aux is None else blocked_key[:, :num_aux]
        self.heads, self.rows = _chunks(self.BH, T, max_scores or DEFAULT_MAX_SCORES)
        self.scale, self.softcap, self.num_aux = 1.0 / math.sqrt(dk), softcap, num_aux

    def run(self, threads: HeadThreads | None, block: Callable[[int, int, int, int], None]) -> None:
        """``block(h0, h1, s, e)`` over the head groups of ``[0, BH)`` and their query rows, on ``threads`` (CPU)."""

        def groups(lo: int, hi: int) -> None:
            for h0 in range(lo, hi, self.heads):
                for s in range(0, self.T, self.rows):
                    block(h0, min(hi, h0 + self.heads), s, min(self.T, s + self.rows))

        if threads is not None and self.device.type == "cpu":
            threads.run(self.BH, self.BH * self.T * self.T, groups)
        else:
            groups(0, self.BH)

    def scores(self, qf: Tensor, kt: Tensor, h0: int, h1: int, s: int, e: int) -> tuple[Tensor, Tensor | None]:
        """Scores of query rows ``[s, e)`` of heads ``[h0, h1)`` against keys ``[0, e)``.

        Returns the capped scores (masked keys at ``-inf``) and ``tanh`` of the scaled ones (for the gradient;
        ``None`` without a cap).
        """
        x = torch.baddbmm(self.bias[h0:h1, :, :e], qf[h0:h1, s:e], kt[h0:h1, :, :e], alpha=self.scale)
        if self.diag is not None:
            x[:, :, s:e].diagonal(dim1=1, dim2=2).sub_(self.diag[h0:h1, s:e])
        t = None
        if self.softcap > 0:
            t = x.mul_(1.0 / self.softcap).tanh_()
            y = t * self.softcap
        else:
            y = x
        mask = self.causal[s:e, :e].expand(y.shape[0], -1, -1)
        if self.blocked_key is not None:
            mask = mask | self.blocked_key[h0:h1, None, :e]
        elif self.aux is not None and self.num_aux:
            mask = mask.clone()
            mask[:, :, : self.num_aux] |= self.aux[h0:h1, None, :]
        return y.masked_fill_(mask, float("-inf")), t


class _BlockedAttentionFunction(torch.autograd.Function):
    """Blocked causal attention with count bias and soft cap, and its gradient (flash-attention style).

    The forward keeps only the output and each row's log-sum-exp; the backward recomputes the scores block by
    block. Everything is computed in float32 (the inputs may be reduced-precision under autocast).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_bias, key_valid, softcap, mode, num_aux, max_scores, threads):  # type: ignore[override]
        B, H, T, dk = q.shape
        blocks = _Blocks(q, key_bias, key_valid, softcap, mode, num_aux, max_scores)
        BH = blocks.BH
        qf, vf = q.float().reshape(BH, T, dk), v.float().reshape(BH, T, dk)
        kt = k.float().reshape(BH, T, dk).transpose(1, 2).contiguous()  # (BH, dk, T): plain products
        out = torch.empty(BH, T, dk, dtype=torch.float32, device=q.device)
        lse = torch.empty(BH, T, 1, dtype=torch.float32, device=q.device)

        def block(h0: int, h1: int, s: int, e: int) -> None:
            y, _ = blocks.scores(qf, kt, h0, h1, s, e)
            m = y.amax(-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)  # rows without a key: 0
            p = y.sub_(m).exp_()
            denom = p.sum(-1, keepdim=True)
            out[h0:h1, s:e] = torch.bmm(p, vf[h0:h1, :e]).div_(denom.clamp_min(torch.finfo(torch.float32).tiny))
            # log-sum-exp; +inf for rows without any key (their weights are then exp(-inf) = 0)
            lse[h0:h1, s:e] = torch.where(denom > 0, m + denom.log(), float("inf"))

        blocks.run(threads, block)
        ctx.save_for_backward(q, k, v, key_bias, key_valid, out, lse)
        ctx.args = (softcap, mode, num_aux, max_scores, threads)
        return out.view(B, H, T, dk).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, key_bias, key_valid, out, lse = ctx.saved_tensors
        softcap, mode, num_aux, max_scores, threads = ctx.args
        B, H, T, dk = q.shape
        blocks = _Blocks(q, key_bias, key_valid, softcap, mode, num_aux, max_scores)
        BH, scale = blocks.BH, blocks.scale
        qf, kf, vf = (x.float().reshape(BH, T, dk) for x in (q, k, v))
        kt = kf.transpose(1, 2).contiguous()
        vt = vf.transpose(1, 2).contiguous()
        do = grad_out.float().reshape(BH, T, dk)
        delta = (do * out).sum(-1, keepdim=True)  # (BH, T, 1): rowwise dO . O
        dq = torch.zeros(BH, T, dk, dtype=torch.float32, device=q.device)
        dk_ = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        dbias = torch.zeros(BH, T, dtype=torch.float32, device=q.device) if ctx.needs_input_grad[3] else None

        def block(h0: int, h1: int, s: int, e: int) -> None:
            y, t = blocks.scores(qf, kt, h0, h1, s, e)
            p = y.sub_(lse[h0:h1, s:e]).exp_()  # (h, r, e): the attention weights
            dob = do[h0:h1, s:e]
            dv[h0:h1, :e].baddbmm_(p.transpose(1, 2), dob)
            dp = torch.bmm(dob, vt[h0:h1, :, :e])
            dz = dp.sub_(delta[h0:h1, s:e]).mul_(p)  # d(capped score)
            if t is not None:
                dz.mul_(t.square_().neg_().add_(1.0))  # d tanh
            if dbias is not None:
                dbias[h0:h1, :e] += dz.sum(1)
                if blocks.diag is not None:
                    dbias[h0:h1, s:e] -= dz[:, :, s:e].diagonal(dim1=1, dim2=2)
            dq[h0:h1, s:e] = torch.bmm(dz, kf[h0:h1, :e]).mul_(scale)
            dk_[h0:h1, :e].baddbmm_(dz.transpose(1, 2), qf[h0:h1, s:e], alpha=scale)

        blocks.run(threads, block)
        shape = (B, H, T, dk)
        grad_bias = None if dbias is None else dbias.view(B, H, T).sum(1).to(key_bias.dtype)
        grads = dq.view(shape).to(q.dtype), dk_.view(shape).to(k.dtype), dv.view(shape).to(v.dtype), grad_bias
        return (*grads, None, None, None, None, None, None)


def blocked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    mode: BiasMode = "embed",
    num_aux: int | None = None,
    max_scores: int | None = None,
    threads: HeadThreads | None = None,
) -> Tensor:
    """:func:`dense_attention` computed in blocks of query rows, with a memory-efficient backward pass.

    The forward keeps the output and each query row's log-sum-exp (``O(B·H·T)``), never the ``T x T``
    weights; the backward recomputes each block's scores and accumulates the gradients of ``q``, ``k``,
    ``v`` (and of ``key_bias`` where it requires one). Exact: the soft cap's ``tanh`` and the count bias are
    differentiated as written (``d/dx c·tanh(x/c) = 1 - tanh²(x/c)``), not approximated.

    Parameters
    ----------
    q, k, v, key_bias, key_valid, softcap, mode, num_aux, max_scores, threads
        As in :func:`chunked_attention`.

    Returns
    -------
    torch.Tensor
        ``(B, H, T, dk)`` in the dtype of ``q``; query rows with no allowed key are zero.
    """
    return _BlockedAttentionFunction.apply(
        q, k, v, key_bias, key_valid, float(softcap), mode, num_aux, max_scores, threads
    )


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor,
    key_valid: Tensor,
    softcap: float,
    *,
    mode: BiasMode = "embed",
    num_aux: int | None = None,
    compiled: Callable | None = None,
    causal_mask: object | None = None,
) -> Tensor:
    """The same function through ``torch.nn.attention.flex_attention`` (:class:`FlexAttention` compiles it).

    With ``num_aux`` the block mask is the causal mask alone (``causal_mask``, shared by every batch of the
    same length) and unknown auxiliary keys are masked in the score modification.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

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
        block_mask = causal_mask if causal_mask is not None else _causal_block_mask(T, q.device)  # type: ignore[assignment]
    train = mode == "train"

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score + (torch.where(q_idx > kv_idx, bias[b, kv_idx], 0.0) if train else bias[b, kv_idx])
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if blocked is not None:
            s = torch.where(blocked[b, kv_idx], -float("inf"), s)
        return s

    out = (compiled or flex)(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out.nan_to_num_(0.0) if blocked is not None else out  # a row whose only key is masked: 0


def _causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, T, T, device=device)


class DenseAttention:
    """Attention kernel: :func:`dense_attention` (the reference; materialises the score matrix)."""

    name = "dense"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
        return dense_attention(
            q, k, v, inputs.key_bias, inputs.key_valid, inputs.softcap, mode=inputs.mode, q_offset=inputs.q_offset
        )


class ChunkedAttention:
    """Attention kernel: :func:`chunked_attention` (exact, blocked; the default everywhere).

    Queries after the first position of a KV cache (``q_offset > 0``) are few and go through
    :func:`dense_attention`, whose score matrix is then only ``Tq x Tk``.
    """

    name = "chunked"
    kernel = staticmethod(chunked_attention)

    def __init__(self, max_scores: int | None = None):
        self.max_scores = max_scores
        self.threads = HeadThreads()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
        if inputs.q_offset or q.shape[-2] != k.shape[-2]:
            return DenseAttention()(q, k, v, inputs)
        return self.kernel(
            q,
            k,
            v,
            inputs.key_bias,
            inputs.key_valid,
            inputs.softcap,
            mode=inputs.mode,
            num_aux=inputs.num_aux,
            max_scores=self.max_scores,
            threads=self.threads,
        )


class BlockedAttention(ChunkedAttention):
    """Attention kernel: :func:`blocked_attention` (exact, blocked, differentiable; training on the CPU).

    Memory grows with ``T`` rather than ``T²`` in the forward and the backward. Queries after the first position
    of a KV cache go through :func:`dense_attention`, as in :class:`ChunkedAttention`.
    """

    name = "blocked"
    kernel = staticmethod(blocked_attention)


class FlexAttention:
    """Attention kernel: :func:`flex_attention`, compiled once per kernel object.

    Parameters
    ----------
    dynamic
        Compile for varying shapes (``torch.compile(dynamic=None)``, which recompiles once with
        symbolic sizes); otherwise each new shape compiles anew.

    The compiled function and the causal block masks (one per length and device) are kept by the object.
    """

    def __init__(self, dynamic: bool = True):
        self.dynamic = dynamic
        self.name = "flex-dynamic" if dynamic else "flex"
        self._compiled: Callable | None = None
        self._causal_masks: dict[tuple[int, str], object] = {}

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
        if inputs.q_offset or q.shape[-2] != k.shape[-2]:
            return DenseAttention()(q, k, v, inputs)
        if self._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention as flex

            self._compiled = torch.compile(flex, dynamic=None if self.dynamic else False)
        T = q.shape[-2]
        key = (T, str(q.device))
        if inputs.num_aux is not None and key not in self._causal_masks:
            self._causal_masks[key] = _causal_block_mask(T, q.device)
        return flex_attention(
            q,
            k,
            v,
            inputs.key_bias,
            inputs.key_valid,
            inputs.softcap,
            mode=inputs.mode,
            num_aux=inputs.num_aux,
            compiled=self._compiled,
            causal_mask=self._causal_masks.get(key),
        )


#: An attention kernel: ``kernel(q, k, v, inputs) -> out`` with ``q, k, v`` of shape ``(B, H, T, dk)``.
Kernel = Callable[[Tensor, Tensor, Tensor, AttentionInputs], Tensor]


@dataclass(frozen=True)
class Attend:
    """A kernel bound to the attention inputs of one forward pass: ``attend(q, k, v) -> out``.

    ``call`` runs the kernel: :func:`_call_kernel`, or :func:`outside_compile`'s version of it for encoder
    layers compiled as a whole, which keeps the kernel out of the compiled graph.
    """

    kernel: Kernel
    inputs: AttentionInputs
    call: Callable[..., Tensor] | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return (self.call or _call_kernel)(self.kernel, q, k, v, self.inputs)


def _call_kernel(kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
    return kernel(q, k, v, inputs)


@functools.cache
def outside_compile() -> Callable[..., Tensor]:
    """:func:`_call_kernel` behind ``torch.compiler.disable`` (a graph break), as gpt-fast keeps its kernels.

    Made on first use: ``torch.compiler.disable`` imports ``torch._dynamo`` (over a second), which eager runs
    never need.
    """
    return torch.compiler.disable(_call_kernel)
