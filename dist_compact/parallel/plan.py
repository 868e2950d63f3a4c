"""SequenceParallel: how a DiT forward is cut over ranks, and the wrapper of its attention layers.

Model code (see docs/design.md, contract 7)::

    layout = sp.layout_for(layout)              # pads whole empty slabs so shards divide evenly
    x = layout.to_blocks(x)                     # [B, padded_len, C] in block order
    x = sp.shard(x, layout)                     # this rank's video blocks + all text blocks
    ... blocks ...: out = attn(q, k, v, ctx)    # attn = sp.wrap(SparseAttention(...)); ctx.layout global
    x = sp.gather(x, layout)                    # every rank gets the whole sequence back
    x = layout.from_blocks(x)

Sharding rule. The video blocks (tile slabs in t-major order) are cut into ``ring`` contiguous ring
shards at offsets ``ring_bounds(layout)`` (each a multiple of ``ulysses`` blocks), and each ring
shard into ``ulysses`` equal chunks. Sequence-parallel rank ``p = ring_rank * ulysses +
ulysses_rank`` (yunchang's rank layout) holds chunk ``ulysses_rank`` of ring shard ``ring_rank``,
then every text block (replicated: text tokens are few and every rank needs them, as in xDiT's
joint attention). Without balancing the ring shards are equal: rank ``p`` holds video blocks
``[p*Vp, (p+1)*Vp)``, ``Vp = num_video_blocks / P``.

Balancing (``balance=True``, the default; :mod:`dist_compact.parallel.balance`). Decided from the
static (Compact) indices of the wrapped layers, so every rank derives the same plan with no
communication:

* ring shard offsets, once per layout at its first use (``shard``, ``local_len``, the ring ops):
  the offsets that minimise the largest rank's computed blocks summed over ALL wrapped layers
  (the shards shape the whole forward, so one split serves every layer). Frozen for the layout
  afterwards: AdaSpa indices found later do not move it (their row-wise top-k keeps the same count
  per row, so equal rows are already balanced for them);
* the Ulysses head order, per wrapped layer and layout at its first call (heads are independent,
  so each layer may permute its own): :func:`~dist_compact.parallel.balance.balanced_head_order`.

Without a static index (dense, AdaSpa alone) every real row counts the same and padding slabs
nothing (the padding ``layout_for`` appends would otherwise all land on the last ring rank), and
the head order starts contiguous.

Online re-plan of the heads (Ulysses, ``balance=True``): AdaSpa's per-head budgets exist only
after its search, so after each online search of a wrapped layer the exact computed blocks per
head of the index found are gathered (one small all-gather; the same numbers on every rank) and
:func:`~dist_compact.parallel.balance.balanced_head_order` re-run on them. When the new order
lowers the largest Ulysses rank's blocks by more than ``REPLAN_GAIN``, the layer's cached state
moves with its heads: the searched index is gathered to all heads (model order) and localized
again, the cached LSE is all-gathered over the Ulysses group and cut for the new heads, the
per-head statistics are permuted, the static index (if any) is localized again; later calls use
the new order. Every rank takes the same decision from the same numbers, so no rank waits on a
collective the others skip. ``balance_report`` gives the imbalance (max / mean computed blocks
per rank) per layer and summed, balanced and contiguous, of the static indices, and under
``online`` that of the last search per layer (per Ulysses rank, this plan's order vs contiguous).

Padding. ``layout_for`` adds empty slabs (``slab_multiple``; padding, never truncation) until the
video blocks split evenly. Default ``shard_unit="block"`` pads to the fewest slabs that make
``num_video_blocks % P == 0`` (``slab_multiple = P / gcd(blocks_per_slab, P)``): e.g. Wan 480p's 21
slabs of 28 tiles need none at P=4, where whole-slab shards would add 3 slabs (14% more tokens,
all of them on the last ring rank, which is then idle that much). Windows stay correct either way
(shard skipping is computed from the index), a shard boundary may just cut a slab. With
``shard_unit="slab"`` ring shards are whole slabs (``num_slabs % ring == 0``), for frame-aligned
halos.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..sparsity.context import AttentionContext, AttentionLayer, OnlineState
from ..sparsity.attention_ops import AttentionOps, global_head_stats
from ..layout import VideoLayout
from .balance import (REPLAN_GAIN, balanced_bounds, balanced_head_order, equal_bounds, head_block_costs,
                      head_chunk_loads, head_costs, imbalance, rank_loads, replan_head_order, static_index_of)
from .config import ParallelConfig, ParallelConfigError, ParallelGroups
from .coordinator import gather_index
from .ring import RingOps
from .ulysses import HeadShardedOps, UlyssesOps, all_gather_cat, heads_to_seq, seq_to_heads

__all__ = ["SequenceParallel", "ParallelAttention", "padded_layout", "REPLAN_GAIN"]

_UNITS = ("block", "slab")


def _compatible(layout: VideoLayout, config: ParallelConfig, shard_unit: str) -> bool:
    if layout.num_video_blocks % config.degree:
        return False
    return shard_unit != "slab" or layout.num_slabs % config.ring == 0


def padded_layout(layout: VideoLayout, config: ParallelConfig, shard_unit: str = "block") -> VideoLayout:
    """``layout`` with the fewest empty slabs appended so that ``config``'s shards divide it (the
    module docstring's padding rule; :meth:`SequenceParallel.layout_for` without a plan object)."""
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout_for: expected a VideoLayout, got {type(layout).__name__}")
    if shard_unit not in _UNITS:
        raise ParallelConfigError(f"shard_unit must be one of {_UNITS}, got {shard_unit!r}")
    if _compatible(layout, config, shard_unit):
        return layout
    P, R = config.degree, config.ring
    m = P // math.gcd(layout.blocks_per_slab, P)
    if shard_unit == "slab":
        m = m * R // math.gcd(m, R)
    sm = layout.slab_multiple * m // math.gcd(layout.slab_multiple, m)
    return layout.with_(slab_multiple=sm)


class SequenceParallel:
    """The sequence-parallel plan of one rank.

    Args:
        config: degrees (default: one process, everything an identity).
        groups: this rank's :class:`ParallelGroups` (from ``build_groups`` / ``init_distributed``,
            or ``ParallelGroups.from_groups`` around yunchang's groups); required when
            ``config.degree > 1``.
        shard_unit: ``"block"`` (least padding) or ``"slab"`` (ring shards are whole slabs).
        balance: cost-balanced ring shards and Ulysses head orders (module docstring); False =
            the contiguous split.
    """

    def __init__(self, config: Optional[ParallelConfig] = None, groups: Optional[ParallelGroups] = None, *,
                 shard_unit: str = "block", balance: bool = True):
        if isinstance(groups, SequenceParallel):
            raise ParallelConfigError(
                "SequenceParallel(config, groups): groups must be ParallelGroups; init_distributed(config) "
                "already returns the SequenceParallel plan, use it directly"
            )
        if groups is not None and not isinstance(groups, ParallelGroups):
            raise ParallelConfigError(f"groups must be ParallelGroups or None, got {type(groups).__name__}")
        if config is None:
            config = groups.config if groups is not None else ParallelConfig()
        if not isinstance(config, ParallelConfig):
            raise ParallelConfigError(f"config must be a ParallelConfig, got {type(config).__name__}")
        if groups is not None and groups.config != config:
            raise ParallelConfigError(f"groups are for {groups.config} but config is {config}")
        if groups is None and config.degree > 1:
            raise ParallelConfigError(
                f"{config} runs on {config.degree} ranks and needs process groups: use "
                "dist_compact.parallel.init_distributed(config) or build_groups(config)"
            )
        if shard_unit not in _UNITS:
            raise ParallelConfigError(f"shard_unit must be one of {_UNITS}, got {shard_unit!r}")
        if not isinstance(balance, bool):
            raise ParallelConfigError(f"balance must be a bool, got {balance!r}")
        self.config = config
        self.groups = groups
        self.shard_unit = shard_unit
        self.balance = balance
        self._layers: List[weakref.ref] = []  # the wrapped layers, in wrap order
        # frozen at the first use of a video geometry: the layouts with and without the text tokens
        # (a diffusers stream shards the video alone; the attention sees text too) share one entry,
        # so the shards cut and the shards the attention expects are always the same
        self._bounds: Dict[tuple, Tuple[int, ...]] = {}

    # ------------------------------------------------------------------ who am I
    @property
    def degree(self) -> int:
        return self.config.degree

    @property
    def enabled(self) -> bool:
        return self.config.degree > 1

    @property
    def sp_rank(self) -> int:
        return self.groups.sp_rank if self.groups is not None else 0

    @property
    def is_first(self) -> bool:
        """True on sequence-parallel rank 0 (e.g. for progress bars and writing files)."""
        return self.sp_rank == 0

    # ------------------------------------------------------------------ layout and shards
    def layout_for(self, layout: VideoLayout) -> VideoLayout:
        """The layout to use under this plan: ``layout`` with empty slabs appended if needed."""
        return padded_layout(layout, self.config, self.shard_unit)

    def _compatible(self, layout: VideoLayout) -> bool:
        return _compatible(layout, self.config, self.shard_unit)

    def check_layout(self, layout: VideoLayout) -> VideoLayout:
        if not self._compatible(layout):
            raise ValueError(
                f"{layout} ({layout.num_video_blocks} video blocks, {layout.num_slabs} slabs) does not split into "
                f"{self.config.degree} equal shards; use sp.layout_for(layout) before building the block order "
                "and the indices"
            )
        return layout

    # ------------------------------------------------------------------ ring shard offsets
    def _unit(self, layout: VideoLayout) -> int:
        U = self.config.ulysses
        return U if self.shard_unit == "block" else math.lcm(layout.blocks_per_slab, U)

    def _live_layers(self) -> List["ParallelAttention"]:
        self._layers = [r for r in self._layers if r() is not None]
        return [r() for r in self._layers]

    def _static_costs(self, layout: VideoLayout) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """``(layer number, head x block costs, text x text per head)`` of every wrapped layer with a
        static index (:func:`~dist_compact.parallel.balance.head_block_costs`)."""
        out = []
        for i, w in enumerate(self._live_layers()):
            idx = static_index_of(w.inner, layout)
            if idx is not None:
                out.append((w.layer if w.layer is not None else i, *head_block_costs(idx, layout)))
        return out

    def ring_bounds(self, layout: VideoLayout) -> Tuple[int, ...]:
        """Ring shard offsets in video blocks (``ring + 1`` ints, 0 .. num_video_blocks) for ``layout``.

        Decided at the layout's first use and then fixed (see the module docstring): balanced over
        the wrapped layers' static indices when ``balance`` and they exist, else over the real
        (non-padding) blocks; equal shards without ``balance`` or when balancing gains nothing.
        """
        key = (layout.frames, layout.height, layout.width, tuple(layout.tile))  # the video geometry
        hit = self._bounds.get(key)
        if hit is not None:
            return hit
        self.check_layout(layout)
        R = self.config.ring
        nv = layout.num_video_blocks
        bounds = equal_bounds(nv, R)
        unit = self._unit(layout)
        if R > 1 and self.balance and nv // unit >= R:
            costs = self._static_costs(layout)
            if costs:
                total = sum(c for _, c, _ in costs).sum(0)  # per video block, all layers and heads
                tt = float(sum(t.sum() for _, _, t in costs))
            else:
                # no static index (dense, AdaSpa): every real row costs the same (AdaSpa keeps the
                # same count per row), padding slabs nothing
                total = (layout.block_valid()[:nv] > 0).double()
                tt = 0.0
            cand = balanced_bounds(total, R, unit)

            def worst(b):
                return max(rank_loads(total.view(1, -1), torch.tensor([tt]), 1, R, bounds=b))

            if worst(cand) < worst(bounds):
                bounds = cand
        self._bounds[key] = bounds
        return bounds

    def _video_range(self, layout: VideoLayout) -> Tuple[int, int]:
        """This rank's video blocks ``[start, stop)``: its Ulysses chunk of its ring shard."""
        b = self.ring_bounds(layout)
        U = self.config.ulysses
        r, u = divmod(self.sp_rank, U)
        n = (b[r + 1] - b[r]) // U
        return b[r] + u * n, b[r] + (u + 1) * n

    def video_blocks_per_rank(self, layout: VideoLayout) -> int:
        """This rank's video blocks (all ranks hold the same number unless the ring shards are balanced)."""
        a, b = self._video_range(self.check_layout(layout))
        return b - a

    def local_len(self, layout: VideoLayout) -> int:
        """Tokens this rank holds: its video blocks + all text blocks, in tokens."""
        return (self.video_blocks_per_rank(layout) + layout.num_text_blocks) * layout.block_size

    def local_blocks(self, layout: VideoLayout) -> torch.Tensor:
        """int64 global block ids of this rank's shard, in local order."""
        a, b = self._video_range(self.check_layout(layout))
        return torch.cat([torch.arange(a, b), torch.arange(layout.num_video_blocks, layout.num_blocks)])

    def shard(self, x: torch.Tensor, layout: VideoLayout, dim: int = 1) -> torch.Tensor:
        """Block-order tensor (``padded_len`` along ``dim``) -> this rank's part (``local_len``)."""
        if not self.enabled:
            return x
        dim = dim % x.dim()
        if x.shape[dim] != layout.padded_len:
            raise ValueError(f"shard: expected {layout.padded_len} block-order tokens along dim {dim}, got {tuple(x.shape)}")
        bs = layout.block_size
        a, b = self._video_range(self.check_layout(layout))
        vt = layout.video_padded_len
        return torch.cat([x.narrow(dim, a * bs, (b - a) * bs), x.narrow(dim, vt, layout.padded_len - vt)], dim=dim)

    def gather(self, x_local: torch.Tensor, layout: VideoLayout, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard` on every rank (collective): the whole block-order sequence."""
        if not self.enabled:
            return x_local
        dim = dim % x_local.dim()
        n_loc = self.local_len(layout)
        if x_local.shape[dim] != n_loc:
            raise ValueError(f"gather: expected {n_loc} local tokens along dim {dim}, got {tuple(x_local.shape)}")
        vl = self.video_blocks_per_rank(layout) * layout.block_size
        video = x_local.narrow(dim, 0, vl)
        # ulysses chunks of one ring shard (equal), then ring shards (sizes may differ): sp_rank order
        video = all_gather_cat(video, self.groups.ulysses_group, dim)
        b = self.ring_bounds(layout)
        sizes = [(y - x) * layout.block_size for x, y in zip(b[:-1], b[1:])]
        video = all_gather_cat(video, self.groups.ring_group, dim, sizes=sizes)
        return torch.cat([video, x_local.narrow(dim, vl, n_loc - vl)], dim=dim)

    # ------------------------------------------------------------------ attention
    def make_ops(self, backend: str = "auto") -> AttentionOps:
        """The AttentionOps the inner attention of a wrapped layer sees on this rank."""
        if not self.enabled:
            return AttentionOps(backend)
        if self.config.ring > 1:
            return RingOps(self.groups, backend, bounds=self.ring_bounds)
        return UlyssesOps(self.groups, backend)

    def wrap(self, attn: Callable) -> Callable:
        """``attn(q, k, v, ctx)`` on this rank's shard; the identity on one process."""
        if not self.enabled:
            return attn
        return ParallelAttention(attn, self)

    def _register(self, layer: "ParallelAttention") -> None:
        self._layers.append(weakref.ref(layer))

    # ------------------------------------------------------------------ report
    def balance_report(self, layout: VideoLayout) -> Dict:
        """Imbalance (max / mean computed blocks per rank over all ``P`` ranks) of this plan and of
        the contiguous split, per wrapped layer with a static index and summed over them (the
        summed one is what a forward waits for); ``None`` figures when no layer has one."""
        cfg = self.config
        U, R = cfg.ulysses, cfg.ring
        bounds = self.ring_bounds(layout) if self.enabled else (0, layout.num_video_blocks)
        equal = equal_bounds(layout.num_video_blocks, R)
        per_layer, tot_b, tot_c = [], None, None
        for w in self._live_layers():
            idx = static_index_of(w.inner, layout)
            if idx is None:
                continue
            c, tt = head_block_costs(idx, layout)
            order = w.head_order(layout, idx.num_heads, idx) if U > 1 else None
            lb = rank_loads(c, tt, U, R, order=order, bounds=bounds)
            lc = rank_loads(c, tt, U, R, bounds=equal)
            per_layer.append({"layer": w.layer if w.layer is not None else len(per_layer), "balanced": imbalance(lb),
                              "contiguous": imbalance(lc)})
            tot_b = lb if tot_b is None else [x + y for x, y in zip(tot_b, lb)]
            tot_c = lc if tot_c is None else [x + y for x, y in zip(tot_c, lc)]
        online, on_b, on_c = [], None, None
        for w in self._live_layers():
            c = w.online_costs.get(layout)
            if c is None or U == 1:
                continue
            order = w._orders.get((layout, c.numel()))
            lb = head_chunk_loads(c, order, U)
            lc = head_chunk_loads(c, None, U)
            online.append({"layer": w.layer if w.layer is not None else len(online), "balanced": imbalance(lb),
                           "contiguous": imbalance(lc), "replans": w.replans.get(layout, 0)})
            on_b = lb if on_b is None else [x + y for x, y in zip(on_b, lb)]
            on_c = lc if on_c is None else [x + y for x, y in zip(on_c, lc)]
        return {
            "balance": self.balance, "ulysses": U, "ring": R, "ring_bounds": list(bounds), "equal_bounds": list(equal),
            "online": None if not online else {
                "what": "computed blocks per Ulysses rank of each layer's last online search (all rows)",
                "imbalance": imbalance(on_b), "imbalance_contiguous": imbalance(on_c),
                "worst_layer": max(r["balanced"] for r in online),
                "worst_layer_contiguous": max(r["contiguous"] for r in online), "per_layer": online},
            "static_layers": len(per_layer),
            "imbalance": None if tot_b is None else imbalance(tot_b),
            "imbalance_contiguous": None if tot_c is None else imbalance(tot_c),
            "computed_blocks_per_rank": tot_b, "per_layer": per_layer,
        }

    def __repr__(self) -> str:
        return (f"SequenceParallel({self.config}, sp_rank={self.sp_rank}, shard_unit={self.shard_unit!r}, "
                f"balance={self.balance})")


class ParallelAttention(AttentionLayer):
    """``attn(q, k, v, ctx)`` over a sequence-parallel group (built by :meth:`SequenceParallel.wrap`).

    q, k, v: this rank's ``[B, local_len, H, D]`` (its video blocks + the text blocks, all heads);
    ``ctx.layout`` is the global layout. With Ulysses the video tokens are exchanged for heads
    (:func:`seq_to_heads`) and the inner attention runs on the ring shard (the whole sequence when
    ring = 1) for this rank's heads; with ring > 1 its ``ctx.ops`` is a :class:`RingOps`, else a
    :class:`UlyssesOps`. The output comes back to ``[B, local_len, H, D]``.

    ``self.ops`` is kept per wrapped layer (plan caches and traffic counters live there). The wrapped
    layer's :class:`~dist_compact.sparsity.context.AttentionLayer` declarations (layer number, static
    pattern, online state) are all the plan reads of it; a plain callable has none.
    """

    def __init__(self, inner: Callable, sp: SequenceParallel):
        if isinstance(inner, ParallelAttention):
            raise TypeError("ParallelAttention: this attention is already wrapped")
        self.inner = inner
        self.sp = sp
        self.ops: Optional[AttentionOps] = None
        self._orders: Dict[Tuple[VideoLayout, int], Optional[torch.Tensor]] = {}
        self._device_orders: Dict[Tuple[VideoLayout, int, torch.device], torch.Tensor] = {}
        #: per layout: model-order computed blocks per head of the last online search, re-plans made
        self.online_costs: Dict[VideoLayout, torch.Tensor] = {}
        self.replans: Dict[VideoLayout, int] = {}
        # the last search result looked at (held, so that a new one is never taken for it: ids are reused)
        self._seen_search: Dict[VideoLayout, object] = {}
        sp._register(self)

    # ------------------------------------------------------------------ the wrapped layer's declarations
    @property
    def layer(self) -> Optional[int]:
        return self.inner.layer if isinstance(self.inner, AttentionLayer) else None

    @property
    def compact(self):
        return self.inner.compact if isinstance(self.inner, AttentionLayer) else None

    def static_index(self, layout: VideoLayout, num_heads: Optional[int] = None):
        return self.inner.static_index(layout, num_heads) if isinstance(self.inner, AttentionLayer) else None

    def cache_nbytes(self) -> int:
        return self.inner.cache_nbytes() if isinstance(self.inner, AttentionLayer) else 0

    def head_order(self, layout: VideoLayout, num_heads: int, index=None) -> Optional[torch.Tensor]:
        """This layer's Ulysses head permutation for ``layout`` (None = contiguous), decided once
        from its static index (``index``, or the inner attention's own)."""
        key = (layout, num_heads)
        if key in self._orders:
            return self._orders[key]
        order = None
        U = self.sp.config.ulysses
        if self.sp.balance and U > 1:
            idx = index if index is not None else static_index_of(self.inner, layout, num_heads)
            if idx is not None:
                o = balanced_head_order(head_costs(idx), U)
                order = None if torch.equal(o, torch.arange(num_heads)) else o
        self._orders[key] = order
        return order

    def _ops_for(self, ctx: AttentionContext) -> AttentionOps:
        if isinstance(ctx.ops, HeadShardedOps):
            raise TypeError("ParallelAttention: ctx.ops is already a parallel AttentionOps (wrapped twice?)")
        backend = ctx.ops.backend
        if self.ops is None or self.ops.backend != backend:
            self.ops = self.sp.make_ops(backend)
        return self.ops

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        sp, cfg = self.sp, self.sp.config
        layout = ctx.layout
        n_loc = sp.local_len(layout)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[1] != n_loc:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; this rank holds [batch, {n_loc}, heads, head_dim] "
                    f"for {layout} under {cfg} (use sp.shard)"
                )
        cfg.check(num_heads=q.shape[2])
        ops = self._ops_for(ctx)
        g = sp.groups
        vl = sp.video_blocks_per_rank(layout) * layout.block_size
        order = self.head_order(layout, q.shape[2])
        ops.head_order = order  # host copy: it selects heads of the (host-built) index
        if order is not None:
            # one device copy per layout and device, so no attention call copies it host -> device again
            key = (layout, q.shape[2], q.device)
            if key not in self._device_orders:
                self._device_orders[key] = order.to(q.device)
            order = self._device_orders[key]
        if cfg.ulysses > 1:
            q, k, v = seq_to_heads([q, k, v], vl, g.ulysses_group, g.ulysses_rank, cfg.ulysses, order=order)
        out = self.inner(q, k, v, dataclasses.replace(ctx, ops=ops))
        if cfg.ulysses > 1:
            out = heads_to_seq(out, vl, g.ulysses_group, g.ulysses_rank, cfg.ulysses, order=order)
            if sp.balance:
                self._replan_heads(layout, out.shape[2], ops)
        return out

    # ------------------------------------------------------------------ online head re-plan
    def _replan_heads(self, layout: VideoLayout, H: int, ops: HeadShardedOps) -> None:
        """After an online search of the inner attention: balance the heads on the index it found
        (module docstring). Collective over the ops' groups when a new search result exists."""
        state = self.inner.export_online() if isinstance(self.inner, AttentionLayer) else None
        if state is None or self._seen_search.get(layout) is state.search:
            return
        U = self.sp.config.ulysses
        res = state.search
        idx = res.index
        w = ops.row_weight(layout).to(idx.device, torch.float64)
        local = (idx.counts.double() * w.view(1, 1, -1)).sum(dim=(0, 2))  # [Hl] computed blocks
        plan_costs = global_head_stats(local, ops).cpu()  # [H], plan order, equal on every rank
        cur = self._orders.get((layout, H))
        inv = torch.argsort(torch.arange(H) if cur is None else cur)
        costs = plan_costs[inv]  # model order
        self.online_costs[layout] = costs
        self._seen_search[layout] = res
        if res.dense_layer:
            return  # runs dense: every head costs the same
        new = replan_head_order(costs, cur, U)
        if new is None:
            return
        self._move_heads(layout, H, ops, cur, new, state)
        self._seen_search[layout] = self.inner.export_online().search
        self.replans[layout] = self.replans.get(layout, 0) + 1

    def _move_heads(self, layout: VideoLayout, H: int, ops: HeadShardedOps, cur: Optional[torch.Tensor],
                    new: torch.Tensor, state: OnlineState) -> None:
        """Move the inner attention's online ``state`` from head order ``cur`` to ``new`` (collective
        over the ops' groups): gathered to all heads in model order, cut for the new heads."""
        res = state.search
        inv = torch.argsort(torch.arange(H) if cur is None else cur)
        full = gather_index(res.index, ops, layout)  # model head order (ops.head_order is cur), all rows
        lse = state.lse
        if lse is not None:
            lse = ops.gather_heads(lse, dim=1).index_select(1, inv.to(lse.device))  # model order
        order = None if torch.equal(new, torch.arange(H)) else new
        ops.head_order = order
        h0, h1 = ops.head_range(H)
        if lse is not None:
            lse = lse.index_select(1, new[h0:h1].to(lse.device)).contiguous()
        static = None
        if state.static is not None:
            static = ops.localize(self.inner.static_index(layout, H).to(res.index.device), layout)
        moved = dataclasses.replace(res, index=ops.localize(full, layout))
        self.inner.import_online(OnlineState(search=moved, lse=lse, static=static), inv[new])
        self._orders[(layout, H)] = order
        for key in [k for k in self._device_orders if k[0] == layout and k[1] == H]:
            del self._device_orders[key]

    def __repr__(self) -> str:
        return f"ParallelAttention({self.inner!r}, {self.sp.config})"
