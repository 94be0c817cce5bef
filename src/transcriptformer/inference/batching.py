"""How cells are grouped into batches: a token budget, a cost model, and the tensors of a batch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..data.tokenizer import TokenWindow, sequence_width
from ..weights.loaded import LoadedModel

__all__ = ["FLOP_RATE", "BatchPlanner", "batch_tensors", "estimate_flops"]

#: Heuristic cost of one batch beyond its arithmetic (kernel launches, Python, copies), as seconds, and the
#: arithmetic rate it is traded against: a batch is split where its padding would cost more than a new batch.
_BATCH_OVERHEAD_S = {"cpu": 2e-3, "cuda": 5e-3, "mps": 5e-3}
FLOP_RATE = {"cpu": 2e11, "cuda": 3e14, "mps": 5e12}


@dataclass(frozen=True)
class BatchPlanner:
    """How cells are grouped into batches: a token budget and a cost model.

    Attributes
    ----------
    seq_len, num_aux
        The model's ``S`` and ``A``.
    max_tokens, batch_size
        Budget of a batch (cells x width) and the most cells in one (``None``: no cap).
    overhead, per_token, per_pair
        Estimated cost (in FLOPs) of a batch beyond its arithmetic, of a token (projections, feed-forward,
        gene MLP) and of a (query, key) pair of attention.
    pad_multiple
        Widths are rounded up to a multiple of this (with the auxiliary tokens): compiled flex kernels like
        lengths on a coarse grid (fewer recompilations).
    fixed
        Fixed shapes: every batch of a width holds the same number of cells (``flex`` compiled per shape).
    """

    seq_len: int
    num_aux: int
    max_tokens: int
    batch_size: int | None
    overhead: float
    per_token: float
    per_pair: float
    pad_multiple: int = 1
    fixed: bool = False

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, device_type: str, *, max_tokens: int, batch_size: int | None, kernel: str = "chunked"
    ) -> BatchPlanner:
        c = loaded.config.model
        E, Fd, L = c.embed_dim, c.model_dim, c.num_layers
        return cls(
            seq_len=c.seq_len,
            num_aux=loaded.model.num_aux,
            max_tokens=max_tokens,
            batch_size=batch_size,
            overhead=_BATCH_OVERHEAD_S.get(device_type, 5e-3) * FLOP_RATE.get(device_type, 1e12),
            per_token=2.0 * (E * E + L * (4 * E * E + 2 * E * Fd)),
            per_pair=2.0 * L * 2 * E / 2,  # causal: about half the pairs
            pad_multiple={"flex": 256, "flex-dynamic": 128}.get(kernel, 1),
            fixed=kernel == "flex",
        )

    def width(self, longest: int) -> int:
        """Sequence length a batch whose longest cell has ``longest`` genes runs at."""
        width = sequence_width(longest, self.seq_len)
        m = self.pad_multiple
        if m > 1:
            width = min(self.seq_len, -(-(width + self.num_aux) // m) * m - self.num_aux)
        return width

    def cells_per_batch(self, width: int) -> int:
        """Cells in a full batch running at ``width``: the token budget, capped by ``batch_size``."""
        n = max(1, self.max_tokens // width)
        return min(n, self.batch_size) if self.batch_size else n

    def plan(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Group cells (positions into ``lengths``) into batches under the token budget, longest first.

        Cells are sorted by length and cut into consecutive groups. Where to cut is chosen to minimise the
        estimated cost: padding a short cell to a long batch costs its arithmetic, a new batch costs a fixed
        overhead. So a few cells of very different lengths run as separate batches, and many similar cells
        fill the budget. With fixed shapes, each batch is filled to the usual size of its width.
        """
        lengths = np.asarray(lengths)
        order = np.argsort(-lengths, kind="stable")
        n = len(order)
        if n == 0:
            return []
        widths = np.array([self.width(int(x)) for x in lengths[order]])
        cap = np.array([self.cells_per_batch(int(w)) for w in widths])
        if self.fixed:
            cuts, i = [0], 0
            while i < n:
                i = min(n, i + int(cap[i]))
                cuts.append(i)
        else:
            cuts = _optimal_cuts(widths, cap, self.overhead, self.per_token, self.per_pair)
        return [order[a:b] for a, b in itertools.pairwise(cuts)]


def batch_tensors(
    window: TokenWindow, idx: np.ndarray, width: int, pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, counts and auxiliary tokens of the cells ``idx`` of ``window``, trimmed or padded to ``width``."""
    tokens = np.full((len(idx), width), pad, dtype=np.int64)
    counts = np.zeros((len(idx), width), dtype=np.float32)
    w = min(width, window.tokens.shape[1])
    tokens[:, :w] = window.tokens[idx, :w]
    counts[:, :w] = window.counts[idx, :w]
    tok = torch.from_numpy(tokens).to(device, non_blocking=True)
    cnt = torch.from_numpy(counts).to(device, non_blocking=True)
    aux = torch.from_numpy(window.aux[idx]).to(device, non_blocking=True)
    return tok, cnt, aux


def _optimal_cuts(widths: np.ndarray, cap: np.ndarray, overhead: float, per_token: float, per_pair: float):
    """Cut points ``0 = c0 < c1 < ... = n`` of cells sorted by decreasing width minimising the estimated cost.

    A batch ``[i, j)`` runs at ``widths[i]`` with ``j - i <= cap[i]`` cells and costs
    ``overhead + (j - i) * (per_token * w + per_pair * w * w)``. Dynamic programming over the end of the last
    batch; each step is vectorised over the possible starts.
    """
    n = len(widths)
    w = widths.astype(np.float64)
    per_cell = per_token * w + per_pair * w * w
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    max_cap = int(cap.max())
    for j in range(1, n + 1):
        i = np.arange(max(0, j - max_cap), j)
        ok = (j - i) <= cap[i]
        i = i[ok]
        cost = best[i] + overhead + (j - i) * per_cell[i]
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], i[k]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(start[cuts[-1]]))
    return cuts[::-1]


def estimate_flops(
    n_tokens_per_cell: np.ndarray, loaded: LoadedModel, *, llh: bool = False, objective: bool = False
) -> float:
    """Multiply-add FLOPs (x2) the model needs for cells of the given token counts (no padding).

    Counts the gene MLP, the projections and feed-forward of every layer, causal attention
    (``QK^T`` and ``PV`` over keys up to each query) and, with ``llh``, the count head. ``objective`` counts
    the training objective's forward: also the count head, the gene MLP of the targets and the gene-identity
    head (``V`` logits per token), together more than half of it for the released shapes.
    """
    c = loaded.config.model
    E, Fd, L = c.embed_dim, c.model_dim, c.num_layers
    D = loaded.model.gene_embeddings.embedding.weight.shape[1]
    A = loaded.model.num_aux
    T = n_tokens_per_cell.astype(np.float64) + A
    per_token = 2 * (D * E + E * E) + L * 2 * (4 * E * E + 2 * E * Fd)
    attn = L * 2 * 2 * E * (T * (T + 1) / 2)  # causal: query i meets i+1 keys
    total = float((per_token * T).sum() + attn.sum())
    if llh or objective:
        total += float((2 * (E * E + E / 2) * T).sum())
    if objective:
        head = loaded.model.gene_id_head
        gene_head = E * c.gene_head_hidden_dim + c.gene_head_hidden_dim * len(loaded.vocab) if head else 0
        total += float((2 * (D * E + E * E + gene_head) * n_tokens_per_cell).sum())
    return total
