"""AdaSpa online search: block attention mass -> per-(layer, head) block selection -> BlockIndex.

Everything here is vectorised on the device of the input (sort / cumsum / scatter over the last
dimension; no Python loop over heads or rows), so it runs on the GPU next to the kernels.

Layouts: ``mass`` is ``[batch, heads, q_blocks, k_blocks]`` float (what
:meth:`AttentionOps.block_mass <dist_compact.sparsity.attention_ops.AttentionOps.block_mass>` returns: this rank's
heads and query blocks, all key blocks in global numbering); masks are bool of the same shape;
per-key / per-row flags are bool ``[k_blocks]`` / ``[q_blocks]``.

Selection rules, per (batch, head, query block) row:

* ``top_k``: the ``k`` key blocks of largest mass ("row-wise": the same count in every row of a
  head; ``k`` may differ per head). Forced blocks (text sink) count towards ``k``.
* ``top_p``: the smallest set of key blocks whose mass reaches ``p`` of the row's mass (the row is
  normalised by its own sum, so rows of an LSE-cached search that do not sum to exactly 1 still
  get recall ``p``). With ``top_k`` too, ``k`` caps the set.
* text sink: text key blocks are in every row, text query blocks keep every key block;
  empty key blocks (``block_valid == 0``) are never kept; empty query blocks keep nothing.
* every row of a real query block keeps at least its top block (no empty rows).

Head-adaptive budgets (contract 5 of docs/design.md): :func:`head_statistics` makes per-head
statistics from the local mass, the caller sums them over query-row shards (``ops.reduce_rows``)
and concatenates them over head shards (``ops.gather_heads``), :func:`head_budgets` decides for all
heads (deterministically: every rank gets the same answer), and each rank keeps its
``ops.head_range`` slice. :func:`online_select` does all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from .._util import as_int
from ..block_index import BlockIndex
from .attention_ops import global_head_stats

__all__ = [
    "RankedMass",
    "rank_blocks",
    "select_blocks",
    "head_statistics",
    "paper_head_budgets",
    "recall_head_budgets",
    "head_budgets",
    "budget_for_density",
    "kept_mass_share",
    "OnlineSearchResult",
    "local_query_blocks",
    "online_select",
]


@dataclass
class RankedMass:
    """Each row's key blocks in selection order, with the quantities every rule needs.

    Attributes (all ``[B, H, NQ, NK]`` except ``total``):
        order: int64, key block at each rank (forced blocks first, then by decreasing mass,
            empty key blocks last).
        mass: float, the row-normalised mass at each rank (rows sum to 1; 0 for rows of no mass).
        forced: bool, the block at this rank is forced (text sink).
        valid: bool, the block at this rank is a real (non-empty) key block.
        total: float ``[B, H, NQ]``, each row's mass before normalisation.
    """

    order: torch.Tensor
    mass: torch.Tensor
    forced: torch.Tensor
    valid: torch.Tensor
    total: torch.Tensor


def _check_mass(mass: torch.Tensor) -> None:
    if not isinstance(mass, torch.Tensor) or mass.dim() != 4 or not mass.is_floating_point():
        got = tuple(mass.shape) if isinstance(mass, torch.Tensor) else type(mass).__name__
        raise ValueError(f"mass must be a float tensor [batch, heads, q_blocks, k_blocks], got {got}")


def _flag(x: Optional[torch.Tensor], n: int, default: bool, name: str, device) -> torch.Tensor:
    if x is None:
        return torch.full((n,), default, dtype=torch.bool, device=device)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool or x.shape != (n,):
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a bool tensor [{n}], got {got}")
    return x.to(device)


def _finite(mass: torch.Tensor) -> torch.Tensor:
    """float32, >= 0, finite: an LSE-cached search with a much too small cached LSE can overflow
    the block mass to inf; capping keeps the row's ranking and keeps row sums finite."""
    m = mass.float()
    big = torch.finfo(m.dtype).max / (2 * max(m.shape[-1], 1))
    return torch.nan_to_num(m, nan=0.0, posinf=big).clamp(min=0, max=big)


def rank_blocks(mass: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                forced_keys: Optional[torch.Tensor] = None) -> RankedMass:
    """Sort each row's key blocks: forced first, then by decreasing mass, empty key blocks last.

    Args:
        mass: ``[B, H, NQ, NK]`` block mass (non-negative).
        key_valid: bool ``[NK]``, False for empty key blocks (never kept); default all True.
        forced_keys: bool ``[NK]``, key blocks kept in every row (text sink); default none.
    """
    _check_mass(mass)
    nk = mass.shape[-1]
    key_valid = _flag(key_valid, nk, True, "key_valid", mass.device)
    forced = _flag(forced_keys, nk, False, "forced_keys", mass.device) & key_valid
    m = torch.where(key_valid, _finite(mass), torch.zeros((), device=mass.device))
    # ranking key: forced blocks +inf, empty blocks -1 (below any real mass, which is >= 0)
    key = torch.where(forced, torch.full_like(m, float("inf")), m)
    key = torch.where(key_valid, key, torch.full_like(m, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sm = torch.gather(m, -1, order)
    total = sm.sum(-1)
    norm = sm / total.clamp(min=torch.finfo(sm.dtype).tiny).unsqueeze(-1)
    expand = order.shape
    return RankedMass(
        order=order,
        mass=norm,
        forced=forced.expand(expand).gather(-1, order),
        valid=key_valid.expand(expand).gather(-1, order),
        total=total,
    )


def _per_head(x: Union[int, torch.Tensor], H: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):  # a fill on the device: a host number copied there would wait for its queue
        k = as_int(x)
        if k is None:
            raise ValueError(f"top_k must be an int or a tensor [heads={H}], got {x!r}")
        return torch.full((H,), k, dtype=torch.long, device=device)
    t = x.to(device).long()
    if t.dim() == 0:
        return t.expand(H)
    if t.shape != (H,):
        raise ValueError(f"top_k must be an int or a tensor [heads={H}], got shape {tuple(t.shape)}")
    return t


def select_blocks(
    mass: torch.Tensor,
    *,
    top_k: Union[None, int, torch.Tensor] = None,
    top_p: Optional[float] = None,
    key_valid: Optional[torch.Tensor] = None,
    forced_keys: Optional[torch.Tensor] = None,
    full_rows: Optional[torch.Tensor] = None,
    row_valid: Optional[torch.Tensor] = None,
    static_mask: Optional[torch.Tensor] = None,
    ranked: Optional[RankedMass] = None,
) -> torch.Tensor:
    """Kept-block mask ``[B, H, NQ, NK]`` bool from a block mass (rules in the module doc).

    Args:
        mass: ``[B, H, NQ, NK]`` block mass.
        top_k: blocks per row, an int or an int tensor ``[H]`` (one budget per head).
        top_p: recall target in (0, 1].
        key_valid / forced_keys: bool ``[NK]`` (see :func:`rank_blocks`).
        full_rows: bool ``[NQ]``, query blocks that keep every real key block (text rows).
        row_valid: bool ``[NQ]``, False for empty query blocks (they keep nothing).
        static_mask: bool broadcastable to ``[B, H, NQ, NK]``, OR-ed in (a static Compact index).
        ranked: a :func:`rank_blocks` result for the same inputs, to skip the sort.
    """
    _check_mass(mass)
    if top_k is None and top_p is None:
        raise ValueError("select_blocks needs top_k, top_p or both")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    B, H, NQ, NK = mass.shape
    dev = mass.device
    r = rank_blocks(mass, key_valid, forced_keys) if ranked is None else ranked
    rank = torch.arange(NK, device=dev).view(1, 1, 1, NK)
    keep = torch.ones_like(r.valid)
    if top_k is not None:
        k = _per_head(top_k, H, dev)
        keep &= rank < k.view(1, H, 1, 1)
    if top_p is not None:
        # exclusive cumsum < p keeps the block that crosses p: the smallest prefix reaching p
        before = torch.cumsum(r.mass, dim=-1) - r.mass
        keep &= (before < float(top_p)) & (r.total > 0).unsqueeze(-1)
    keep |= r.forced
    keep[..., 0] = True  # no empty rows (a real row's top block; empty ones are dropped below)
    keep &= r.valid
    out = torch.zeros_like(keep).scatter_(-1, r.order, keep)
    key_valid = _flag(key_valid, NK, True, "key_valid", dev)
    if full_rows is not None:
        full = _flag(full_rows, NQ, False, "full_rows", dev)
        out |= full.view(1, 1, NQ, 1) & key_valid.view(1, 1, 1, NK)
    if static_mask is not None:
        out = out | (static_mask.to(dev).bool() & key_valid.view(1, 1, 1, NK))
    if row_valid is not None:
        out &= _flag(row_valid, NQ, True, "row_valid", dev).view(1, 1, NQ, 1)
    return out


def kept_mass_share(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recall of a mask: each row's kept share of its mass, ``[B, H, NQ]`` (0 for rows of no mass)."""
    m = _finite(mass)
    total = m.sum(-1)
    kept = (m * mask).sum(-1)
    return torch.where(total > 0, kept / total.clamp(min=torch.finfo(m.dtype).tiny), torch.zeros_like(total))


def head_statistics(ranked: RankedMass, rows: torch.Tensor) -> torch.Tensor:
    """Per-head recall curves to gather across ranks: float64 ``[H, NK + 1]``.

    Column ``j < NK`` is the sum over the counted rows (and the batch) of the normalised mass at
    rank ``j``; the last column is the number of counted rows. Both are sums, so shards of query
    rows add up with ``reduce_rows``. Recall at ``k`` blocks is ``cumsum(stat[:, :NK])[k-1] / rows``.

    Args:
        ranked: :func:`rank_blocks` of the local mass.
        rows: bool or float ``[NQ]``, the rows to count (real, non-text query blocks) or their
            weights (a row replicated on several ranks counts once in total).
    """
    w = rows.to(ranked.mass.device, torch.float64).view(1, 1, -1, 1)
    per_rank = (ranked.mass.double() * w).sum(dim=(0, 2))  # [H, NK]
    n = (w.sum() * ranked.mass.shape[0]).expand(per_rank.shape[0], 1)
    return torch.cat([per_rank, n], dim=1)


def budget_for_density(density: float, num_keys: int) -> int:
    """Blocks per row for a target density: ``round(density * num_keys)`` clamped to ``[1, num_keys]``."""
    return int(min(max(int(density * num_keys + 0.5), 1), max(num_keys, 1)))


def paper_head_budgets(recall: torch.Tensor, k0: int, num_keys: int, threshold: float = 0.8) -> torch.Tensor:
    """AdaSpa's head-adaptive rule: int64 ``[H]`` blocks per row for each head.

    Heads whose ``recall`` at the uniform budget ``k0`` is above ``threshold`` become sparser (target
    sparsity ``(1+s)/2``, i.e. ``k0/2`` blocks); as many of the lowest-recall heads become denser
    (``(3s-1)/2``, i.e. ``3*k0/2``); the rest keep ``k0``. Both moves are the same whole number of
    blocks ``delta``, so the mean over heads stays exactly ``k0``. When more than half the heads are
    above the threshold, only as many of them (the highest first) move as there are heads below it,
    so no head above the threshold is made denser. ``delta`` is limited so that no head goes below
    1 block or above ``num_keys`` (for ``s < 1/3`` the paper's ``(3s-1)/2`` would be negative).
    """
    H = recall.shape[0]
    dev = recall.device
    delta = min(int(k0 / 2 + 0.5), k0 - 1, num_keys - k0)
    k = torch.full((H,), k0, dtype=torch.long, device=dev)
    if delta <= 0 or H < 2:
        return k
    order = torch.sort(recall.double(), descending=True, stable=True).indices  # ties: lower head first
    # on the device, without reading the count back: the n highest-ranked heads go down, the n lowest up
    high = (recall > threshold).sum()
    n = torch.minimum(high, H - high)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(H, device=dev)
    return k - delta * (rank < n).long() + delta * (rank >= H - n).long()


def recall_head_budgets(stats: torch.Tensor, k0: int, num_keys: int) -> torch.Tensor:
    """Recall-driven budgets: int64 ``[H]``, summing to ``H * k0``, each in ``[1, num_keys]``.

    Each head's mean recall curve ``R_h(k)`` (from :func:`head_statistics`) is concave in ``k``: rows
    are sorted by decreasing mass, so the marginal recall of block ``j`` is the mean of the rows'
    ``j``-th largest masses, non-increasing in ``j``. Greedy on marginal recall (take the ``H*k0``
    largest marginal gains over all heads and ranks) is then optimal for the total recall, and the
    count taken per head is that head's budget. One stable sort: deterministic on every rank.
    """
    H = stats.shape[0]
    nk = stats.shape[1] - 1
    gains = stats[:, :num_keys].double() / stats[:, nk:].double().clamp(min=1)
    gains = gains.clone()
    gains[:, 0] = float("inf")  # every head keeps at least one block per row
    budget = min(H * k0, H * num_keys)
    top = torch.sort(gains.reshape(-1), descending=True, stable=True).indices[:budget]
    # per-head counts by scatter (bincount reads its input's maximum back to the host on a GPU)
    head = top // num_keys
    return torch.zeros(H, dtype=torch.long, device=head.device).scatter_add_(0, head, torch.ones_like(head))


def head_budgets(stats: torch.Tensor, k0: int, num_keys: int, rule: str = "paper",
                 threshold: float = 0.8) -> torch.Tensor:
    """Blocks per row for every head, int64 ``[H]``, from gathered :func:`head_statistics`."""
    if rule == "paper":
        nk = stats.shape[1] - 1
        curve = torch.cumsum(stats[:, :nk].double(), dim=1) / stats[:, nk:].double().clamp(min=1)
        return paper_head_budgets(curve[:, k0 - 1], k0, num_keys, threshold)
    if rule == "recall":
        return recall_head_budgets(stats, k0, num_keys)
    raise ValueError(f"head rule must be 'paper' or 'recall', got {rule!r}")


@dataclass
class OnlineSearchResult:
    """What :func:`online_select` found for one layer on this rank.

    Attributes:
        index: the localized :class:`BlockIndex` (this rank's heads and query rows, batch 1 when the
            index is shared over the batch).
        density: float ``[H]`` per-head density of ALL heads (kept pairs over the pairs of real
            query and key blocks), the same on every rank.
        recall: float ``[H]`` per-head kept mass share, averaged over real non-text query rows.
        budget: int64 ``[H]`` top-k blocks per row of each head (None for top-p alone).
        dense_layer: the layer's mean density is above the dense threshold: run it dense.
        head_range: this rank's global heads ``[start, stop)``.
    """

    index: BlockIndex
    density: torch.Tensor
    recall: torch.Tensor
    budget: Optional[torch.Tensor]
    dense_layer: bool
    head_range: Tuple[int, int]

    def density_list(self) -> List[float]:
        return [float(x) for x in self.density.tolist()]

    def recall_list(self) -> List[float]:
        return [float(x) for x in self.recall.tolist()]


def local_query_blocks(ops, layout, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's query blocks: int64 global ids ``[NQ_local]`` and float64 row weights.

    From ``ops.q_blocks(layout)`` / ``ops.row_weight(layout)`` (a sequence-parallel rank may hold its
    video blocks plus replicated text blocks, whose rows must be counted once over the ranks).
    """
    ids = torch.as_tensor(ops.q_blocks(layout)).long()
    w = torch.as_tensor(ops.row_weight(layout)).double()
    if w.shape != ids.shape:
        raise ValueError(f"ops.row_weight gave {tuple(w.shape)} weights for {ids.shape[0]} local query blocks")
    return ids.to(device), w.to(device)


@dataclass(frozen=True)
class _SelectConstants:
    """What :func:`online_select` needs of the layout and the rank, on the mass's device (built once)."""

    rows: torch.Tensor
    row_w: torch.Tensor
    key_valid: torch.Tensor
    forced_keys: Optional[torch.Tensor]
    row_valid: torch.Tensor
    full_rows: Optional[torch.Tensor]
    counted_rows: torch.Tensor
    nkv: int
    # the row width of every selection: nkv where a full (text) row keeps every real key block, else None
    width: Optional[int]


def _select_constants(ops, layout, device, text_sink: bool) -> _SelectConstants:
    """The layout's and this rank's constants of a selection, kept with the layout's own device tensors
    (keyed by the rank's rows, which a re-planned ring shard changes): a search then copies nothing from
    the host (each blocking copy to a GPU waits for its queue)."""
    ids, w = local_query_blocks(ops, layout)

    def build() -> _SelectConstants:
        key_valid = layout.block_valid() > 0
        text = layout.is_text_block()
        row_valid = key_valid[ids]
        full_rows = (text[ids] & row_valid) if text_sink else None
        counted_rows = row_valid & ~text[ids] if text_sink else row_valid
        forced_keys = text & key_valid if text_sink else None

        def on(t):
            return None if t is None else t.to(device)

        nkv = int(key_valid.sum())
        # a selection keeps only real key blocks, so no row holds more than nkv; a full row holds exactly nkv
        width = nkv if full_rows is not None and bool(full_rows.any()) else None
        return _SelectConstants(rows=on(ids), row_w=on(w), key_valid=on(key_valid), forced_keys=on(forced_keys),
                                row_valid=on(row_valid), full_rows=on(full_rows), counted_rows=on(counted_rows),
                                nkv=nkv, width=width)

    key = ("online_select", tuple(ids.tolist()), tuple(w.tolist()), str(torch.device(device)), bool(text_sink))
    return layout.cached(key, build)


def online_select(mass: torch.Tensor, layout, ops, config, *,
                  static_mask: Optional[torch.Tensor] = None) -> OnlineSearchResult:
    """AdaSpa selection for one layer from this rank's block mass.

    Args:
        mass: ``[B, H_local, NQ_local, NK]`` from ``ops.block_mass`` (exact or LSE-cached).
        layout: the global :class:`~dist_compact.layout.VideoLayout`.
        ops: this rank's :class:`~dist_compact.sparsity.attention_ops.AttentionOps`; only ``head_range``, the
            local query blocks (:func:`local_query_blocks`), ``reduce_rows`` and ``gather_heads`` are
            used. Every rank must call this function together (two gathers of per-head sums).
        config: a :class:`~dist_compact.sparsity.config.SparsityConfig` (target, head rule, text sink,
            batch mode, dense threshold).
        static_mask: bool ``[1 or B, H_local, NQ_local, NK]`` of a localized static index, OR-ed in.

    Returns a :class:`OnlineSearchResult`. With ``batch_index == "shared"`` the mass is averaged over the
    batch and the index has batch 1.
    """
    _check_mass(mass)
    B, Hl, NQl, NK = mass.shape
    dev = mass.device
    c = _select_constants(ops, layout, dev, config.text_sink)
    if NK != layout.num_blocks or NQl != c.rows.shape[0]:
        raise ValueError(
            f"mass {tuple(mass.shape)} does not match {layout}: expected {c.rows.shape[0]} local query "
            f"blocks and {layout.num_blocks} key blocks"
        )
    key_valid, forced_keys, row_valid, full_rows, counted_rows, row_w, nkv = (
        c.key_valid, c.forced_keys, c.row_valid, c.full_rows, c.counted_rows, c.row_w, c.nkv)
    if config.batch_index == "shared" and B > 1:
        mass = mass.mean(0, keepdim=True)

    ranked = rank_blocks(mass, key_valid, forced_keys)
    budget_all = None
    top_k = None
    if config.sparsity is not None:
        k0 = budget_for_density(1.0 - config.sparsity, nkv)
        if config.head_adaptive:
            stats = global_head_stats(head_statistics(ranked, counted_rows.double() * row_w), ops)
            budget_all = head_budgets(stats, k0, nkv, config.head_rule, config.head_threshold)
        top_k = k0 if budget_all is None else None
    # the global head count is known only after a gather; without head-adaptive budgets the
    # post-selection statistics below give it, and the budget is uniform anyway
    if budget_all is not None:
        h0, h1 = ops.head_range(budget_all.shape[0])
        top_k = budget_all[h0:h1]
    mask = select_blocks(mass, top_k=top_k, top_p=config.top_p, key_valid=key_valid, forced_keys=forced_keys,
                         full_rows=full_rows, row_valid=row_valid, static_mask=static_mask, ranked=ranked)

    # per-head density and recall of all heads: one gather of [H_local, 4] sums
    rows_w = (counted_rows.double() * row_w).view(1, 1, -1)
    share = kept_mass_share(mass, mask).double() * rows_w
    kept = mask.sum(-1).double() * row_w.view(1, 1, -1)  # [B', Hl, NQl]
    pairs = ((row_valid.double() * row_w).sum() * nkv).expand(Hl)
    local = torch.stack([
        share.sum(dim=(0, 2)),
        (rows_w.sum() * mask.shape[0]).expand(Hl),
        kept.sum(dim=(0, 2)),
        pairs * mask.shape[0],
    ], dim=1)
    g = global_head_stats(local, ops)
    H = g.shape[0]
    h0, h1 = ops.head_range(H)
    if h1 - h0 != Hl:
        raise ValueError(f"ops.head_range({H}) = ({h0}, {h1}) does not match {Hl} local heads")
    recall = torch.where(g[:, 1] > 0, g[:, 0] / g[:, 1].clamp(min=1), torch.ones_like(g[:, 0]))
    density = g[:, 2] / g[:, 3].clamp(min=1)

    # near-dense heads: full rows (a little more work, no error); near-dense layers: dense kernel.
    # A density is at most 1, so a threshold of 1 (the Hopper kernel's) decides nothing: the search then
    # reads nothing back from the device here
    if config.dense_threshold < 1.0:
        full_heads = density > config.dense_threshold
        density = torch.where(full_heads, torch.ones_like(density), density)
        recall = torch.where(full_heads, torch.ones_like(recall), recall)
        fh = full_heads[h0:h1].view(1, Hl, 1, 1)
        mask = mask | (fh & key_valid.view(1, 1, 1, NK) & row_valid.view(1, 1, NQl, 1))
        dense_layer = bool(density.mean() > config.dense_threshold)
    else:
        dense_layer = False
    index = BlockIndex.from_dense(mask, layout.block_size, max_count=c.width)
    budget = budget_all
    if budget is None and isinstance(top_k, int):
        budget = torch.full((H,), top_k, dtype=torch.long, device=dev)
    return OnlineSearchResult(index=index, density=density.float(), recall=recall.float(), budget=budget,
                        dense_layer=dense_layer, head_range=(h0, h1))
