"""The ring's plan and byte model: which key blocks each ring rank computes against and fetches.

Pure functions of a global :class:`~dist_compact.block_index.BlockIndex`, a layout and the ring
shard offsets; nothing here communicates (the ops that move the tensors are
:class:`~dist_compact.parallel.ring.RingOps`, which runs exactly these plans; its module doc has
the geometry). Cost models and benchmarks use the same plans without process groups:

* :func:`ring_rank_plan` / :func:`rank_plan` - a rank's :class:`RingPlan`: its own shard and text,
  and per remote shard the rows that touch it and the key range ``[lo, hi)`` fetched (never a
  shard's trailing padding blocks);
* :func:`ring_blocks`, :func:`ring_needs` - the ``[ring, ring]`` traffic of a whole ring group;
* :func:`block_kv_bytes`, :func:`shard_kv_bytes`, :func:`ring_shard_bytes`, :func:`ring_bytes` -
  the bytes of that traffic, and of a dense ring for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..block_index import BlockIndex
from ..layout import VideoLayout

__all__ = ["RingPlan", "ShardGeometry", "check_bounds", "shard_bounds", "shard_geometry", "real_ends", "rank_plan",
           "ring_rank_plan", "ring_needs", "ring_blocks", "ring_bytes", "ring_shard_bytes", "shard_kv_bytes",
           "block_kv_bytes"]


# ---------------------------------------------------------------------------- traffic
def check_bounds(bounds: Sequence[int], nv: int, ring: int, what: str) -> Tuple[int, ...]:
    """``bounds`` as a tuple of ints, checked: ``ring + 1`` strictly increasing offsets from 0 to ``nv``."""
    b = tuple(int(x) for x in bounds)
    if len(b) != ring + 1 or b[0] != 0 or b[-1] != nv or any(y <= x for x, y in zip(b[:-1], b[1:])):
        raise ValueError(
            f"{what}: ring shard bounds {b} must be {ring + 1} strictly increasing offsets from 0 to the "
            f"{nv} video blocks"
        )
    return b


def shard_bounds(layout: VideoLayout, ring: int, bounds: Optional[Sequence[int]], what: str) -> Tuple[int, ...]:
    """The ring shard offsets: ``bounds`` checked, or equal shards when it is None."""
    nv = layout.num_video_blocks
    if bounds is not None:
        return check_bounds(bounds, nv, ring, what)
    if nv % ring:
        raise ValueError(f"{nv} video blocks do not split into {ring} ring shards; use SequenceParallel.layout_for")
    return tuple(i * (nv // ring) for i in range(ring + 1))


def ring_blocks(index: BlockIndex, layout: VideoLayout, ring: int,
                bounds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """int64 ``[ring, ring]``: ``blocks[i, j]`` = key blocks of video shard j that ring rank i
    fetches (its key range ``hi - lo``, module docstring; 0 on the diagonal and for shards it skips).

    ``index`` is a global index (all query and key blocks) restricted to the heads one ring group
    sees; ``bounds`` the ring shard offsets (None = equal shards). This is the traffic
    :class:`RingOps` moves (the same plans); text rows never cause transfers. Bytes:
    ``ring_bytes(blocks, block_kv_bytes(...))``.
    """
    b = shard_bounds(layout, ring, bounds, "ring_blocks")
    out = torch.zeros(ring, ring, dtype=torch.int64)
    for i in range(ring):
        out[i] = torch.tensor(ring_rank_plan(index, layout, b, i).blocks, dtype=torch.int64)
    return out


def ring_needs(index: BlockIndex, layout: VideoLayout, ring: int,
               bounds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """bool ``[ring, ring]``: ``need[i, j]`` = ring rank i fetches part of video shard j (i != j)."""
    return ring_blocks(index, layout, ring, bounds) > 0


def ring_shard_bytes(layout: VideoLayout, ring: int, *, batch: int, heads: int, head_dim: int,
                     element_size: int) -> int:
    """Bytes of one equal ring shard's K and V (``heads``: the heads one ring group sees, i.e.
    ``H / ulysses``). A dense ring sends every shard to the other ``ring - 1`` ranks of the group:
    ``(ring - 1) * ring * ring_shard_bytes`` per group, whatever the shard sizes."""
    return 2 * batch * (layout.num_video_blocks // ring) * layout.block_size * heads * head_dim * element_size


def shard_kv_bytes(bounds: Sequence[int], block_size: int, *, batch: int, heads: int, head_dim: int,
                   element_size: int) -> List[int]:
    """Bytes of each ring shard's K and V for shard offsets ``bounds`` (``ring + 1`` ints)."""
    per_block = 2 * batch * block_size * heads * head_dim * element_size
    return [(b - a) * per_block for a, b in zip(bounds[:-1], bounds[1:])]


def block_kv_bytes(block_size: int, *, batch: int, heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of one video block's K and V (``heads``: the heads one ring group sees)."""
    return 2 * batch * block_size * heads * head_dim * element_size


def ring_bytes(need: torch.Tensor, shard_bytes: Union[int, Sequence[int]]) -> torch.Tensor:
    """int64 ``[ring]`` bytes each rank sends. With ``need`` = :func:`ring_blocks` (int) and
    ``shard_bytes`` = :func:`block_kv_bytes`: what :class:`RingOps` sends. With a bool ``need``
    and whole-shard bytes (one int, or one per shard, :func:`shard_kv_bytes`): a ring that sends
    whole shards (e.g. the dense ring's ``(ring - 1) x`` every shard)."""
    sb = torch.as_tensor(shard_bytes, dtype=torch.int64)
    return need.to(torch.int64).sum(0) * sb


# ---------------------------------------------------------------------------- the plan
@dataclass
class RingPlan:
    """How one rank computes one local index.

    own: every local row against ``[own video shard | text]`` keys (text keys dropped from the text
        rows unless ring rank 0).
    remote: shard j -> (row0, row1, sub-index of video rows [row0, row1) against the fetched keys
        of shard j, i.e. its blocks ``ranges[j]``).
    ranges: shard j -> ``(lo, hi)``, the key blocks fetched, relative to shard j's start.
    ring: the ring degree.
    """

    own: BlockIndex
    remote: Dict[int, Tuple[int, int, BlockIndex]]
    ranges: Dict[int, Tuple[int, int]]
    ring: int

    @property
    def needs(self) -> List[bool]:
        """R bools, the remote shards this rank fetches from."""
        return [j in self.ranges for j in range(self.ring)]

    @property
    def blocks(self) -> List[int]:
        """Key blocks fetched from each shard (0 where none)."""
        return [self.ranges[j][1] - self.ranges[j][0] if j in self.ranges else 0 for j in range(self.ring)]


@dataclass(frozen=True)
class ShardGeometry:
    """Where ring rank ``rank``'s rows and every shard lie, in blocks (global numbering)."""

    bs: int
    starts: Tuple[int, ...]  # ring shard offsets in video blocks (ring + 1)
    nt: int  # text blocks
    nb: int  # all blocks
    rank: int
    real: Tuple[int, ...]  # per shard: its blocks before its trailing padding blocks

    @property
    def nv(self) -> int:
        return self.starts[-1]

    def size(self, j: int) -> int:
        return self.starts[j + 1] - self.starts[j]

    @property
    def vr(self) -> int:  # this rank's video blocks
        return self.size(self.rank)

    @property
    def r0(self) -> int:
        return self.starts[self.rank]

    @property
    def r1(self) -> int:
        return self.starts[self.rank + 1]

    @property
    def rows(self) -> int:
        return self.vr + self.nt


def real_ends(layout: VideoLayout, starts: Sequence[int]) -> Tuple[int, ...]:
    """Per ring shard: 1 + its last block holding a valid token, relative to the shard (0 = all padding)."""
    real = (layout.block_valid()[: layout.num_video_blocks] > 0).nonzero().flatten()
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        inside = real[(real >= a) & (real < b)]
        out.append(int(inside[-1]) - a + 1 if inside.numel() else 0)
    return tuple(out)


def shard_geometry(layout: VideoLayout, starts: Tuple[int, ...], rank: int) -> ShardGeometry:
    """The :class:`ShardGeometry` of ring rank ``rank`` for shard offsets ``starts``."""
    return ShardGeometry(layout.block_size, starts, layout.num_text_blocks, layout.num_blocks, rank, real_ends(layout, starts))


def rank_plan(index: BlockIndex, g: ShardGeometry) -> RingPlan:
    """The :class:`RingPlan` of ring rank ``g.rank`` for its localized ``index`` (rows: its video
    shard, then the text blocks; global keys)."""
    r0, r1 = g.r0, g.r1
    kmap = torch.full((g.nb,), -1, dtype=torch.long)
    kmap[r0:r1] = torch.arange(g.vr)
    kmap[g.nv:] = g.vr + torch.arange(g.nt)
    vid = index.select_rows(0, g.vr)
    own = vid.remap_keys(kmap, g.rows)
    if g.nt:
        kmap_t = kmap.clone()
        if g.rank != 0:
            kmap_t[g.nv:] = -1  # text x text is computed once, on ring rank 0
        own = own.cat_rows(index.select_rows(g.vr, g.rows).remap_keys(kmap_t, g.rows))
    remote: Dict[int, Tuple[int, int, BlockIndex]] = {}
    ranges: Dict[int, Tuple[int, int]] = {}
    for j in range(len(g.starts) - 1):
        if j == g.rank or g.real[j] == 0:
            continue
        s0 = g.starts[j]
        sub = vid.select_keys(s0, s0 + g.real[j])  # the trailing padding keys hold no token: dropped
        used = sub.key_blocks_used().nonzero().flatten()
        if not used.numel():
            continue
        lo, hi = int(used[0]), int(used[-1]) + 1
        sub = sub.select_keys(lo, hi)
        rows = (sub.counts > 0).any(0).any(0).nonzero().flatten()
        a, b = int(rows[0]), int(rows[-1]) + 1
        remote[j] = (a, b, sub.select_rows(a, b))
        ranges[j] = (lo, hi)
    return RingPlan(own, remote, ranges, len(g.starts) - 1)


def ring_rank_plan(index: BlockIndex, layout: VideoLayout, bounds: Sequence[int], rank: int) -> RingPlan:
    """What ring rank ``rank`` computes for a global ``index`` (already cut to the heads its ring
    group holds) with shard offsets ``bounds``: the same :class:`RingPlan` :class:`RingOps` runs,
    without process groups (for cost models and benchmarks)."""
    b = check_bounds(bounds, layout.num_video_blocks, len(bounds) - 1, "ring_rank_plan")
    g = shard_geometry(layout, b, rank)
    rows = torch.cat([torch.arange(g.r0, g.r1), torch.arange(g.nv, g.nb)])
    return rank_plan(index.select_rows_at(rows), g)
