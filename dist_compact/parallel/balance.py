"""Cost-balanced sequence-parallel shards: which heads a Ulysses rank gets, where ring shards end.

The work of one rank is the number of (query block, key block) pairs its kernel computes, i.e. the
entries of its part of the :class:`~dist_compact.block_index.BlockIndex`. A contiguous split gives
every rank the same number of heads and rows, not the same work: Compact heads differ several-fold
in density, and window rows near the first and last frame see fewer keys. Two plans fix that, both
pure functions of the global index (so every rank computes the same plan with no communication):

* Ulysses: :func:`balanced_head_order` permutes the heads so that the ``U`` contiguous chunks of
  ``H / U`` heads of the permuted order carry nearly equal work. Every rank still holds exactly
  ``H / U`` heads; the permutation is applied before the all-to-all and undone after it.
* Ring: :func:`balanced_bounds` chooses the ring shard boundaries (a multiple of ``unit`` video
  blocks each: the Ulysses degree, or whole slabs) that minimise the largest shard's work, from the
  per-block costs of :func:`head_block_costs` (exact DP over the ``unit`` runs).

Per-rank work is exact (:func:`head_block_costs`, :func:`rank_loads`): the ring's cost of video
block ``b`` (see :mod:`dist_compact.parallel.ring`) is its own query row's computed blocks plus the
text rows' computed blocks against key ``b`` (each ring rank computes the text rows over its own
video keys); text rows against text keys run on ring rank 0 only.

``imbalance(loads) = max / mean``: 1.0 is perfect; a step of the slowest rank costs that much more
than the mean.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..sparsity.context import AttentionLayer

__all__ = [
    "head_costs",
    "balanced_head_order",
    "head_chunk_loads",
    "replan_head_order",
    "REPLAN_GAIN",
    "head_block_costs",
    "rank_loads",
    "equal_bounds",
    "balanced_bounds",
    "imbalance",
    "static_index_of",
]


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-rank work (1.0 = balanced; 1.0 for no work at all)."""
    a = np.asarray(loads, dtype=np.float64)
    m = a.mean() if a.size else 0.0
    return float(a.max() / m) if m > 0 else 1.0


# ---------------------------------------------------------------------------- Ulysses: heads
def head_costs(index: BlockIndex) -> torch.Tensor:
    """float64 ``[heads]``: computed blocks per head (summed over batch and query rows), on the CPU."""
    return index.counts.double().sum(dim=(0, 2)).cpu()


def _chunk_loads(costs: np.ndarray, order: np.ndarray, parts: int) -> np.ndarray:
    return costs[order].reshape(parts, -1).sum(1)


def balanced_head_order(costs, parts: int) -> torch.Tensor:
    """A permutation ``order`` of the heads (int64 ``[H]``): Ulysses rank ``u`` gets heads
    ``order[u*H/parts:(u+1)*H/parts]``, each chunk's summed cost as equal as this finds.

    Greedy largest-first into the chunk with the least cost that still has room, then, for every
    pair of chunks, the head swap that most lowers the pair's larger load, until none does (a
    local optimum; exact partitioning is NP-hard, and this is within a few percent at 24 or 40
    heads, see the tests and BENCHMARKS.md). Deterministic
    (ties go to the lower head / chunk id), so every rank derives the same order from the same
    costs; the heads inside a chunk are sorted. If the contiguous split is at least as balanced,
    the identity is returned (no permutation to apply).
    """
    c = np.asarray(torch.as_tensor(costs, dtype=torch.float64).cpu(), dtype=np.float64)
    H = c.shape[0]
    if not isinstance(parts, int) or parts < 1 or H % parts:
        raise ValueError(f"balanced_head_order: {H} heads do not split into {parts} equal chunks")
    ident = np.arange(H)
    if parts == 1:
        return torch.from_numpy(ident)
    size = H // parts
    chunks: List[List[int]] = [[] for _ in range(parts)]
    load = np.zeros(parts)
    for h in sorted(range(H), key=lambda h: (-c[h], h)):
        room = [p for p in range(parts) if len(chunks[p]) < size]
        p = min(room, key=lambda p: (load[p], p))
        chunks[p].append(h)
        load[p] += c[h]
    improved = True
    while improved:
        # every accepted swap lowers max(load_p, load_q) of its pair at a constant pair sum, so the
        # sum of squared loads falls strictly: the loop ends
        improved = False
        for p in range(parts):
            for q in range(p + 1, parts):
                best = None
                top = max(load[p], load[q])
                for i, a in enumerate(chunks[p]):
                    for j, b in enumerate(chunks[q]):
                        d = c[a] - c[b]
                        m = max(load[p] - d, load[q] + d)
                        if m < top - 1e-9 * max(top, 1.0) and (best is None or m < best[0]):
                            best = (m, i, j, d)
                if best is not None:
                    _, i, j, d = best
                    chunks[p][i], chunks[q][j] = chunks[q][j], chunks[p][i]
                    load[p] -= d
                    load[q] += d
                    improved = True
    order = np.concatenate([sorted(ch) for ch in chunks])
    if _chunk_loads(c, ident, parts).max() <= _chunk_loads(c, order, parts).max():
        order = ident
    return torch.from_numpy(order.astype(np.int64))


#: an online head re-plan moves a layer's cached index and LSE only when it lowers the largest
#: Ulysses rank's computed blocks by more than this fraction
REPLAN_GAIN = 0.02


def head_chunk_loads(costs, order: Optional[Sequence[int]], parts: int) -> List[float]:
    """Summed cost of each of the ``parts`` Ulysses ranks' heads under head ``order`` (None = contiguous)."""
    c = np.asarray(torch.as_tensor(costs, dtype=torch.float64).cpu(), dtype=np.float64)
    o = np.arange(c.shape[0]) if order is None else np.asarray(torch.as_tensor(order).cpu(), dtype=np.int64)
    return [float(x) for x in _chunk_loads(c, o, parts)]


def replan_head_order(costs, current: Optional[Sequence[int]], parts: int,
                      gain: float = REPLAN_GAIN) -> Optional[torch.Tensor]:
    """The online re-plan rule: :func:`balanced_head_order` of ``costs`` if it lowers the largest
    chunk of the ``current`` order (None = contiguous) by more than ``gain``, else None (keep it)."""
    new = balanced_head_order(costs, parts)
    if max(head_chunk_loads(costs, new, parts)) >= (1.0 - gain) * max(head_chunk_loads(costs, current, parts)):
        return None
    return new


# ---------------------------------------------------------------------------- per rank work
def head_block_costs(index: Union[BlockIndex, torch.Tensor], layout: VideoLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """The work of a global index per (head, video block), and the text x text work per head.

    ``costs[h, b]`` (float64 ``[heads, num_video_blocks]``, CPU) = head ``h``'s computed blocks in
    query row ``b`` plus its text rows' computed blocks against key ``b`` (a ring rank computes the
    text rows over its own video keys); ``text_text[h]`` = its text rows' blocks against text keys
    (ring rank 0 computes those). Summed over both, a head's cost is its ``counts`` total.
    ``index`` may also be the dense bool block mask ``[batch, heads, NB, NB]`` of one.
    """
    nv, nb = layout.num_video_blocks, layout.num_blocks
    dense = isinstance(index, torch.Tensor)
    if not dense and not isinstance(index, BlockIndex):
        raise TypeError(f"head_block_costs: expected a BlockIndex or a bool block mask, got {type(index).__name__}")
    shape = tuple(index.shape[-2:]) if dense else (index.num_q_blocks, index.num_k_blocks)
    if (dense and (index.dtype != torch.bool or index.dim() != 4)) or shape != (nb, nb):
        what = f"a mask of shape {tuple(index.shape)}, {index.dtype}" if dense else repr(index)
        raise ValueError(f"head_block_costs: {what} is not a global index for {layout} ({nb} x {nb} blocks)")
    counts = index.sum(-1) if dense else index.counts
    rows = counts.double().sum(0)[:, :nv].cpu()
    H = rows.shape[0]
    if nb == nv:
        return rows, torch.zeros(H, dtype=torch.float64)
    text_rows = index[..., nv:, :] if dense else index.select_rows(nv, nb).to_dense()
    text = text_rows.double().sum(dim=(0, 2)).cpu()  # [H, nb] per key block
    return rows + text[:, :nv], text[:, nv:].sum(1)


def rank_loads(costs: torch.Tensor, text_text: torch.Tensor, ulysses: int, ring: int,
               order: Optional[Sequence[int]] = None, bounds: Optional[Sequence[int]] = None) -> List[float]:
    """Work of every sequence-parallel rank (``sp_rank = ring_rank * ulysses + ulysses_rank`` order)
    for a head ``order`` (None = contiguous) and ring shard ``bounds`` (None = equal shards), from
    :func:`head_block_costs` (summed over layers if the plan serves several)."""
    c = np.asarray(costs, dtype=np.float64)
    tt = np.asarray(text_text, dtype=np.float64)
    H, nv = c.shape
    o = np.arange(H) if order is None else np.asarray(order, dtype=np.int64)
    b = equal_bounds(nv, ring) if bounds is None else tuple(bounds)
    hu = H // ulysses
    out = []
    for r in range(ring):
        for u in range(ulysses):
            heads = o[u * hu:(u + 1) * hu]
            load = c[heads, b[r]:b[r + 1]].sum()
            if r == 0:
                load += tt[heads].sum()
            out.append(float(load))
    return out


def equal_bounds(num_video_blocks: int, parts: int) -> Tuple[int, ...]:
    """The contiguous split: ``parts + 1`` offsets of equal shards (``num_video_blocks % parts == 0``)."""
    if num_video_blocks % parts:
        raise ValueError(f"{num_video_blocks} video blocks do not split into {parts} equal shards")
    n = num_video_blocks // parts
    return tuple(i * n for i in range(parts + 1))


def balanced_bounds(costs, parts: int, unit: int = 1) -> Tuple[int, ...]:
    """Shard offsets (``parts + 1`` ints, first 0, last ``len(costs)``) minimising the largest
    shard's summed cost, every shard a non-empty multiple of ``unit`` blocks.

    Exact: a DP over the ``n = len(costs) / unit`` runs, ``best[k][i]`` = the least possible
    largest cost of ``k`` shards covering the first ``i`` runs (``O(parts n^2)``, vectorised).
    Among optimal splits the one with the earliest boundaries is taken (deterministic).
    """
    c = np.asarray(torch.as_tensor(costs, dtype=torch.float64).cpu(), dtype=np.float64)
    N = c.shape[0]
    if not isinstance(unit, int) or unit < 1 or N % unit:
        raise ValueError(f"balanced_bounds: {N} blocks are not a whole number of runs of {unit}")
    n = N // unit
    if not isinstance(parts, int) or not 1 <= parts <= n:
        raise ValueError(f"balanced_bounds: cannot cut {n} runs of {unit} blocks into {parts} non-empty shards")
    pre = np.concatenate([[0.0], np.cumsum(c.reshape(n, unit).sum(1))])
    inf = np.inf
    best = np.full((parts + 1, n + 1), inf)
    arg = np.zeros((parts + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    seg = pre[None, :] - pre[:, None]  # seg[j, i] = cost of runs [j, i)
    j_idx = np.arange(n + 1)
    for k in range(1, parts + 1):
        # candidate j < i: max(best[k-1][j], seg[j, i]); j >= k-1 and i >= k
        cand = np.maximum(best[k - 1][:, None], seg)
        cand[j_idx[:, None] >= j_idx[None, :]] = inf
        arg[k] = np.argmin(cand, axis=0)
        best[k] = cand[arg[k], j_idx]
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(int(arg[k, bounds[-1]]))
    return tuple(b * unit for b in reversed(bounds))


# ---------------------------------------------------------------------------- where costs come from
def static_index_of(attn, layout: VideoLayout, num_heads: Optional[int] = None) -> Optional[BlockIndex]:
    """The static global index of an attention layer, or None: what an
    :class:`~dist_compact.sparsity.context.AttentionLayer` declares (``static_index``); a plain
    callable declares none. ``num_heads`` None = the pattern's own head count. Online (AdaSpa) indices
    do not exist before the first search; their row-wise top-k gives every row the same count, so the
    contiguous row split is already balanced for them.
    """
    return attn.static_index(layout, num_heads) if isinstance(attn, AttentionLayer) else None
