"""SequenceParallel: how a DiT forward is cut over ranks, and the wrapper of its attention layers.

Model code (see docs/design.md, contract 7)::

    layout = sp.layout_for(layout)              # pads whole empty slabs so shards divide evenly
    x = layout.to_blocks(x)                     # [B, padded_len, C] in block order
    x = sp.shard(x, layout)                     # this rank's video blocks + all text blocks
    ... blocks ...: out = attn(q, k, v, ctx)    # attn = sp.wrap(SparseAttention(...)); ctx.layout global
    x = sp.gather(x, layout)                    # every rank gets the whole sequence back
    x = layout.from_blocks(x)

Sharding rule. Sequence-parallel rank ``p = ring_rank * ulysses + ulysses_rank`` (yunchang's rank
layout) holds video blocks ``[p*Vp, (p+1)*Vp)``, ``Vp = num_video_blocks / P``, then every text
block (replicated: text tokens are few and every rank needs them, as in xDiT's joint attention).
The video blocks are tile slabs in t-major order, so each shard is a run of whole tiles and a ring
shard (``ulysses`` consecutive chunks) a run of ``Vr = Vp * ulysses`` blocks.

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
from typing import Callable, Optional

import torch

from ..context import AttentionContext
from ..executor import AttentionOps
from ..layout import VideoLayout
from .config import ParallelConfig, ParallelConfigError, ParallelGroups
from .ring import RingOps
from .ulysses import HeadShardedOps, UlyssesOps, all_gather_cat, heads_to_seq, seq_to_heads

__all__ = ["SequenceParallel", "ParallelAttention"]

_UNITS = ("block", "slab")


class SequenceParallel:
    """The sequence-parallel plan of one rank.

    Args:
        config: degrees (default: one process, everything an identity).
        groups: this rank's :class:`ParallelGroups` (from ``build_groups`` / ``init_distributed``,
            or ``ParallelGroups.from_groups`` around yunchang's groups); required when
            ``config.degree > 1``.
        shard_unit: ``"block"`` (least padding) or ``"slab"`` (ring shards are whole slabs).
    """

    def __init__(self, config: Optional[ParallelConfig] = None, groups: Optional[ParallelGroups] = None, *,
                 shard_unit: str = "block"):
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
        self.config = config
        self.groups = groups
        self.shard_unit = shard_unit

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
    def _slab_multiple(self, layout: VideoLayout) -> int:
        P, R = self.config.degree, self.config.ring
        m = P // math.gcd(layout.blocks_per_slab, P)
        if self.shard_unit == "slab":
            m = m * R // math.gcd(m, R)
        return m

    def layout_for(self, layout: VideoLayout) -> VideoLayout:
        """The layout to use under this plan: ``layout`` with empty slabs appended if needed."""
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout_for: expected a VideoLayout, got {type(layout).__name__}")
        if self._compatible(layout):
            return layout
        m = self._slab_multiple(layout)
        sm = layout.slab_multiple * m // math.gcd(layout.slab_multiple, m)
        return layout.with_(slab_multiple=sm)

    def _compatible(self, layout: VideoLayout) -> bool:
        if layout.num_video_blocks % self.config.degree:
            return False
        return self.shard_unit != "slab" or layout.num_slabs % self.config.ring == 0

    def check_layout(self, layout: VideoLayout) -> VideoLayout:
        if not self._compatible(layout):
            raise ValueError(
                f"{layout} does not split into {self.config.degree} equal shards "
                f"({layout.num_video_blocks} video blocks, {layout.num_slabs} slabs); use sp.layout_for(layout) "
                "before building the block order and the indices"
            )
        return layout

    def video_blocks_per_rank(self, layout: VideoLayout) -> int:
        return self.check_layout(layout).num_video_blocks // self.config.degree

    def local_len(self, layout: VideoLayout) -> int:
        """Tokens this rank holds: its video blocks + all text blocks, in tokens."""
        return (self.video_blocks_per_rank(layout) + layout.num_text_blocks) * layout.block_size

    def local_blocks(self, layout: VideoLayout) -> torch.Tensor:
        """int64 global block ids of this rank's shard, in local order."""
        vp = self.video_blocks_per_rank(layout)
        p = self.sp_rank
        return torch.cat([torch.arange(p * vp, (p + 1) * vp), torch.arange(layout.num_video_blocks, layout.num_blocks)])

    def shard(self, x: torch.Tensor, layout: VideoLayout, dim: int = 1) -> torch.Tensor:
        """Block-order tensor (``padded_len`` along ``dim``) -> this rank's part (``local_len``)."""
        if not self.enabled:
            return x
        dim = dim % x.dim()
        if x.shape[dim] != layout.padded_len:
            raise ValueError(f"shard: expected {layout.padded_len} block-order tokens along dim {dim}, got {tuple(x.shape)}")
        bs, vp = layout.block_size, self.video_blocks_per_rank(layout)
        p, vt = self.sp_rank, layout.video_padded_len
        return torch.cat([x.narrow(dim, p * vp * bs, vp * bs), x.narrow(dim, vt, layout.padded_len - vt)], dim=dim)

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
        # ulysses chunks of one ring shard, then ring shards: the sequence order of sp_rank
        video = all_gather_cat(video, self.groups.ulysses_group, dim)
        video = all_gather_cat(video, self.groups.ring_group, dim)
        return torch.cat([video, x_local.narrow(dim, vl, n_loc - vl)], dim=dim)

    # ------------------------------------------------------------------ attention
    def make_ops(self, backend: str = "auto") -> AttentionOps:
        """The AttentionOps the inner attention of a wrapped layer sees on this rank."""
        if not self.enabled:
            return AttentionOps(backend)
        if self.config.ring > 1:
            return RingOps(self.groups, backend)
        return UlyssesOps(self.groups, backend)

    def wrap(self, attn: Callable) -> Callable:
        """``attn(q, k, v, ctx)`` on this rank's shard; the identity on one process."""
        if not self.enabled:
            return attn
        return ParallelAttention(attn, self)

    def __repr__(self) -> str:
        return f"SequenceParallel({self.config}, sp_rank={self.sp_rank}, shard_unit={self.shard_unit!r})"


class ParallelAttention:
    """``attn(q, k, v, ctx)`` over a sequence-parallel group (built by :meth:`SequenceParallel.wrap`).

    q, k, v: this rank's ``[B, local_len, H, D]`` (its video blocks + the text blocks, all heads);
    ``ctx.layout`` is the global layout. With Ulysses the video tokens are exchanged for heads
    (:func:`seq_to_heads`) and the inner attention runs on the ring shard (the whole sequence when
    ring = 1) for this rank's heads; with ring > 1 its ``ctx.ops`` is a :class:`RingOps`, else a
    :class:`UlyssesOps`. The output comes back to ``[B, local_len, H, D]``.

    ``self.ops`` is kept per wrapped layer (plan caches and traffic counters live there).
    """

    def __init__(self, inner: Callable, sp: SequenceParallel):
        if isinstance(inner, ParallelAttention):
            raise TypeError("ParallelAttention: this attention is already wrapped")
        self.inner = inner
        self.sp = sp
        self.ops: Optional[AttentionOps] = None

    def _ops_for(self, ctx: AttentionContext) -> AttentionOps:
        if isinstance(ctx.ops, HeadShardedOps):
            raise TypeError("ParallelAttention: ctx.ops is already a parallel AttentionOps (wrapped twice?)")
        backend = getattr(ctx.ops, "backend", "auto")
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
        if cfg.ulysses > 1:
            q, k, v = seq_to_heads([q, k, v], vl, g.ulysses_group, g.ulysses_rank, cfg.ulysses)
        out = self.inner(q, k, v, dataclasses.replace(ctx, ops=ops))
        if cfg.ulysses > 1:
            out = heads_to_seq(out, vl, g.ulysses_group, g.ulysses_rank, cfg.ulysses)
        return out

    def __repr__(self) -> str:
        return f"ParallelAttention({self.inner!r}, {self.sp.config})"
