"""Ring attention with shard skipping: RingOps, the AttentionOps of one ring rank (the communicating
half; the plans it runs and their byte model are :mod:`dist_compact.parallel.ring_plan`).

Geometry (global layout ``layout``, ring degree ``R``, this rank ``r``): the video blocks are cut
into ``R`` contiguous shards at offsets ``bounds = (b_0 = 0, b_1, ..., b_R = num_video_blocks)``
(t-major tile order, so a shard is a run of temporal slabs; equal shards by default, or the
cost-balanced offsets of :mod:`dist_compact.parallel.balance`, which may differ in size). Rank
``r`` holds ``Vr = b_{r+1} - b_r`` video blocks:

    local rows / keys = [video blocks b_r .. b_{r+1}) | all text blocks]     (text replicated)

* Video query rows: their keys are the rank's own video shard and the text blocks (local), plus any
  remote video shard ``j`` their index rows touch. Each remote shard is fetched once and the local
  op runs on (the rows that touch it, that shard) with ``index.select_keys(shard j)``; partial
  ``(out, lse)`` are combined with :func:`~dist_compact.parallel.merge.merge_partials`.
* Text query rows are replicated, and usually attend to every video block. Fetching every shard
  for them would defeat shard skipping, so each rank computes the text rows over its OWN video
  shard only (and ring rank 0 also over the text keys, so each key is counted once), and the
  partials are merged across the ring with one :func:`~dist_compact.parallel.merge.all_reduce_merge`
  (text rows are few: two small all-reduces).
* Shard skipping: which remote shards a rank needs follows from its (cached) plan; the ranks
  all-gather these R-bit vectors on every call (a few bytes, on the CPU ``meta_group`` when there is
  one, so no GPU synchronisation) -- agreeing per call instead of "once per index change" means
  ranks never disagree on whether an exchange happens (an online search may change some ranks'
  rows and not others'), so it can never deadlock. Then exactly the needed K/V shards move, all in
  one ``batch_isend_irecv`` posted before the local shard is computed, so the transfer overlaps
  with it. With a temporal window of +-w slabs and shards of >= w slabs this is a halo exchange.
* Key ranges: a rank fetches from shard ``j`` only the run of its key blocks that its rows use,
  ``[lo, hi)`` (first to last used block; the all-gather carries these pairs), and never the
  trailing padding blocks of a shard (empty slabs ``layout_for`` appended: no valid token, so
  dropping them from the sub-index changes nothing). A halo exchange thus moves the halo slabs,
  not the neighbour's whole shard, and a cost-balanced shard that grew by padding costs no bytes.
* ``bytes_sent`` / ``bytes_received`` count the point-to-point payload actually moved
  (``ring_plan.ring_blocks`` x ``ring_plan.block_kv_bytes`` predicts it exactly).
* Staging: gloo cannot send CUDA tensors point to point ("Bad address"; ranks sharing one GPU run
  gloo, since NCCL refuses two ranks on one device). When the ring group is gloo and the tensors
  are on a GPU, or when ``ParallelGroups.stage_p2p`` forces it (to test the path on CPUs), sends are
  copied into (pinned, on CUDA machines) host buffers first and receives land in host buffers that
  are copied to the device when waited for.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..ops import block_attention_mass, block_sparse_attention
from .config import ParallelGroups
from .merge import all_reduce_merge, merge_partials
from .ring_plan import RingPlan, ShardGeometry, rank_plan, shard_bounds, shard_geometry
from .ulysses import HeadShardedOps

__all__ = ["RingOps"]


class _Valid:
    """Valid-token counts a ring rank hands the kernels, built once per (layout, device).

    The kernels' entry points check a counts tensor (a device sync) once per tensor object, so each
    call must pass the same objects: the global counts sliced per ring shard and the text blocks,
    this rank's local rows (own shard, then text), and slices of them cached by row range.
    """

    def __init__(self, layout: VideoLayout, g: ShardGeometry, device):
        bv = layout.block_valid(device)
        self.shard = [bv[a:b] for a, b in zip(g.starts[:-1], g.starts[1:])]
        self.text = bv[g.nv:]
        self.local = torch.cat([self.shard[g.rank], self.text])
        self._rows: Dict[Tuple[int, int], torch.Tensor] = {}
        self._keys: Dict[Tuple[int, int, int], torch.Tensor] = {}

    def rows(self, a: int, b: int) -> torch.Tensor:
        """``local[a:b]``, the same tensor object for the same range."""
        hit = self._rows.get((a, b))
        if hit is None:
            hit = self._rows[(a, b)] = self.local[a:b]
        return hit

    def keys(self, j: int, lo: int, hi: int) -> torch.Tensor:
        """``shard[j][lo:hi]``, the same tensor object for the same range."""
        hit = self._keys.get((j, lo, hi))
        if hit is None:
            hit = self._keys[(j, lo, hi)] = self.shard[j][lo:hi]
        return hit


class _Transfer:
    """Posted point-to-point exchange of shard tensors; wait per source rank, then for all.

    ``batch_isend_irecv`` returns one work per op on gloo; NCCL may return one for the whole batch,
    in which case waiting for any source waits for all. With staging, ``bufs`` are host buffers
    and :meth:`wait` copies a source's tensors to ``device`` (once).
    """

    def __init__(self, works, n_ops: int, recv_slots: Dict[int, List[int]], bufs: Dict[int, List[torch.Tensor]],
                 keep: Sequence[torch.Tensor], device: Optional[torch.device] = None):
        self.works = list(works)
        self.per_op = len(self.works) == n_ops
        self.recv_slots, self.bufs, self._keep = recv_slots, bufs, keep  # sends stay alive until waited
        self.device = device  # staged: where received tensors go
        self._landed: Dict[int, List[torch.Tensor]] = {}

    def _wait(self, pos: int) -> None:
        # a gloo work must be waited exactly once: a second wait on a finished recv blocks forever
        if self.works[pos] is not None:
            self.works[pos].wait()
            self.works[pos] = None

    def wait(self, j: int) -> List[torch.Tensor]:
        if not self.per_op:
            self.wait_all()
        else:
            for pos in self.recv_slots[j]:
                self._wait(pos)
        if self.device is None:
            return self.bufs[j]
        if j not in self._landed:
            self._landed[j] = [b.to(self.device, non_blocking=True) for b in self.bufs[j]]
        return self._landed[j]

    def wait_all(self) -> None:
        for pos in range(len(self.works)):
            self._wait(pos)


class RingOps(HeadShardedOps):
    """AttentionOps of one ring rank (see the module docstring); also the hybrid's inner ops.

    Args:
        groups: this rank's :class:`~dist_compact.parallel.config.ParallelGroups`; with
            ``ulysses > 1`` (hybrid) the local heads are this rank's Ulysses heads and
            ``gather_heads`` all-gathers over the Ulysses group.
        backend: local kernel backend (``"auto"``, ``"triton"``, ``"torch"``).
        overlap: compute the local shard while the remote shards travel (True), or wait for them
            first (False; for measuring what the overlap hides).
        bounds: ``bounds(layout)`` -> the ring shard offsets (``ring + 1`` video block offsets, e.g.
            ``SequenceParallel.ring_bounds``); None = equal shards.

    Local tensors are ``[B, (Vr + text_blocks) * block_size, heads_local, D]``; a localized index
    has ``Vr + text_blocks`` query rows (:meth:`q_blocks` gives their global ids) and global keys.
    """

    _DIGEST_CACHE = 8

    def __init__(self, groups: ParallelGroups, backend: str = "auto", overlap: bool = True,
                 bounds: Optional[Callable[[VideoLayout], Sequence[int]]] = None):
        super().__init__(groups, backend)
        self.overlap = overlap
        self._bounds = bounds
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self._local = weakref.WeakKeyDictionary()  # global index -> (layout, local index)
        self._plans = weakref.WeakKeyDictionary()  # local index -> (layout, plan)
        self._plans_by_digest: "OrderedDict" = OrderedDict()  # (digest, layout) -> plan
        self._full: Dict = {}  # (layout, heads, device) -> full local index
        self._valids: Dict = {}  # (layout, device) -> _Valid
        self._geos: Dict = {}  # (layout, bounds) -> ShardGeometry
        self._peers: Optional[List[int]] = None
        self._ready = False

    # ------------------------------------------------------------------ geometry
    @property
    def ring(self) -> int:
        return self.groups.config.ring

    @property
    def rank(self) -> int:
        return self.groups.ring_rank

    def _geo(self, layout: VideoLayout) -> ShardGeometry:
        b = shard_bounds(layout, self.ring, None if self._bounds is None else self._bounds(layout), "RingOps")
        key = (layout, b)
        hit = self._geos.get(key)
        if hit is None:
            hit = self._geos[key] = shard_geometry(layout, b, self.rank)
        return hit

    def bounds(self, layout: VideoLayout) -> Tuple[int, ...]:
        """The ring shard offsets this rank uses for ``layout``."""
        return self._geo(layout).starts

    def q_block_range(self, layout: VideoLayout) -> Tuple[int, int]:
        """This rank's video query blocks ``[start, stop)``; the text blocks are local too (:meth:`q_blocks`)."""
        g = self._geo(layout)
        return (g.r0, g.r1)

    def q_blocks(self, layout: VideoLayout) -> torch.Tensor:
        """int64 global ids of the local query blocks: this shard's video blocks, then all text blocks."""
        g = self._geo(layout)
        return torch.cat([torch.arange(g.r0, g.r1), torch.arange(g.nv, g.nb)])

    def row_weight(self, layout: VideoLayout) -> torch.Tensor:
        """float32 per local query block: 1 for video rows; text rows (held by every ring rank) 1
        on ring rank 0 and 0 elsewhere, so ``reduce_rows(sum(w * stat))`` counts each row once."""
        g = self._geo(layout)
        w = torch.ones(g.rows)
        if self.rank != 0:
            w[g.vr:] = 0
        return w

    def _valid_for(self, layout: VideoLayout, g: ShardGeometry, device) -> _Valid:
        key = (layout, str(device))
        hit = self._valids.get(key)
        if hit is None:
            hit = self._valids[key] = _Valid(layout, g, device)
        return hit

    # ------------------------------------------------------------------ index -> plan
    def localize(self, index: BlockIndex, layout: VideoLayout) -> BlockIndex:
        """Global index -> this rank's heads and rows (video shard, then text); global key numbering."""
        if not isinstance(index, BlockIndex):
            raise TypeError(f"localize: index must be a BlockIndex, got {type(index).__name__}")
        g = self._geo(layout)
        if index.num_q_blocks != g.nb or index.num_k_blocks != g.nb:
            raise ValueError(f"localize: {index!r} is not a global index for {layout} ({g.nb} x {g.nb} blocks)")
        key = (layout, None if self.head_order is None else tuple(self.head_order.tolist()))
        hit = self._local.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = self.local_heads(index).select_rows_at(self.q_blocks(layout))
        self._local[index] = (key, out)
        return out

    def _build_plan(self, index: BlockIndex, g: ShardGeometry) -> RingPlan:
        return rank_plan(index, g)

    def plan(self, index: BlockIndex, layout: VideoLayout) -> RingPlan:
        """The cached plan of a localized index (by object, then by digest)."""
        hit = self._plans.get(index)
        if hit is not None and hit[0] == layout:
            return hit[1]
        g = self._geo(layout)
        key = (index.digest(), layout, g.starts)
        plan = self._plans_by_digest.get(key)
        if plan is None:
            plan = self._build_plan(index, g)
            self._plans_by_digest[key] = plan
            while len(self._plans_by_digest) > self._DIGEST_CACHE:
                self._plans_by_digest.popitem(last=False)
        else:
            self._plans_by_digest.move_to_end(key)
        self._plans[index] = (layout, plan)
        return plan

    # ------------------------------------------------------------------ communication
    def _comm_device(self, group, like: torch.Tensor) -> torch.device:
        if group is not None and dist.get_backend(group) == "nccl":
            return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _ensure_ready(self, like: torch.Tensor) -> None:
        # NCCL: the first operation on a group must include all of its ranks, but a ring exchange
        # may leave some ranks out; one tiny all_reduce on first use satisfies that.
        if self._ready or self.ring == 1:
            self._ready = True
            return
        g = self.groups.ring_group
        t = torch.zeros(1, device=self._comm_device(g, like))
        dist.all_reduce(t, group=g)
        self._peers = [dist.get_global_rank(g, i) for i in range(self.ring)]
        self._ready = True

    def exchange_needs(self, ranges: Dict[int, Tuple[int, int]], like: torch.Tensor) -> List[List[Tuple[int, int]]]:
        """All-gather every rank's fetched key ranges: ``need[i][j]`` = ``(lo, hi)`` blocks of shard j
        that rank i fetches (``(0, 0)``: none)."""
        if self.ring == 1:
            return [[(0, 0)]]
        g = self.groups.meta_group or self.groups.ring_group
        mine = [list(ranges.get(j, (0, 0))) for j in range(self.ring)]
        t = torch.tensor(mine, dtype=torch.int32, device=self._comm_device(g, like))
        parts = [torch.empty_like(t) for _ in range(self.ring)]
        dist.all_gather(parts, t, group=g)
        return [[(int(lo), int(hi)) for lo, hi in p] for p in torch.stack(parts).cpu().tolist()]  # one copy

    def _staged(self, like: torch.Tensor) -> bool:
        """Point-to-point through host buffers: forced, or CUDA tensors over a gloo ring group."""
        if self.groups.stage_p2p:
            return True
        return like.is_cuda and dist.get_backend(self.groups.ring_group) == "gloo"

    def _post(self, tensors: Sequence[torch.Tensor], send: Dict[int, Tuple[int, int]],
              recv: Dict[int, int]) -> _Transfer:
        """Post sends of token ranges of ``tensors`` ``[B, tokens, H, D]`` (``send``: rank i -> its
        ``(t0, t1)``) and receives of ``recv[j]`` tokens (same other dims) from each rank ``j``."""
        g = self.groups.ring_group
        staged = self._staged(tensors[0])
        device = tensors[0].device
        pin = staged and torch.cuda.is_available()  # page-locked host memory needs a CUDA runtime
        per_dest: Dict[int, List[torch.Tensor]] = {}
        cut: Dict[Tuple[int, int], List[torch.Tensor]] = {}  # one copy per distinct range
        for i, (t0, t1) in send.items():
            if (t0, t1) not in cut:
                if staged:
                    cut[(t0, t1)] = [torch.empty((t.shape[0], t1 - t0, *t.shape[2:]), dtype=t.dtype, pin_memory=pin)
                                     .copy_(t[:, t0:t1], non_blocking=True) for t in tensors]
                else:
                    cut[(t0, t1)] = [t[:, t0:t1].contiguous() for t in tensors]
            per_dest[i] = cut[(t0, t1)]
        if staged and send and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # gloo reads the host copies now
        buf_dev = torch.device("cpu") if staged else device
        ops: List = []
        for i in sorted(per_dest):
            for tag, t in enumerate(per_dest[i]):
                ops.append(dist.P2POp(dist.isend, t, self._peers[i], group=g, tag=tag))
                self.bytes_sent += t.numel() * t.element_size()
        bufs: Dict[int, List[torch.Tensor]] = {}
        slots: Dict[int, List[int]] = {}
        for j in sorted(recv):
            n = recv[j]
            bufs[j] = [torch.empty((t.shape[0], n, *t.shape[2:]), dtype=t.dtype, device=buf_dev,
                                   pin_memory=pin and buf_dev.type == "cpu")
                       for t in tensors]
            slots[j] = []
            for tag, b in enumerate(bufs[j]):
                slots[j].append(len(ops))
                ops.append(dist.P2POp(dist.irecv, b, self._peers[j], group=g, tag=tag))
                self.bytes_received += b.numel() * b.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        keep = [t for ts in cut.values() for t in ts]
        return _Transfer(works, len(ops), slots, bufs, keep, device if staged else None)

    # ------------------------------------------------------------------ compute
    def _check(self, q, k, v, index: Optional[BlockIndex], g: ShardGeometry, what: str) -> None:
        want = g.rows * g.bs
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"RingOps.{what}: {name} must be a 4-D [batch, seq, heads, head_dim] tensor")
            if t.shape[1] != want:
                raise ValueError(
                    f"RingOps.{what}: {name} has {t.shape[1]} tokens but this ring rank holds "
                    f"({g.vr} video + {g.nt} text blocks) x {g.bs} = {want}; shard with SequenceParallel.shard"
                )
        if index is not None:
            if not isinstance(index, BlockIndex):
                raise TypeError(f"RingOps.{what}: index must be a BlockIndex, got {type(index).__name__}")
            if index.num_q_blocks != g.rows or index.num_k_blocks != g.nb or index.num_heads != q.shape[2]:
                raise ValueError(
                    f"RingOps.{what}: index {index!r} is not localized for this rank (want {q.shape[2]} heads, "
                    f"{g.rows} query blocks, {g.nb} global key blocks); use ops.localize(index, layout)"
                )

    def attention(self, q, k, v, index: BlockIndex, layout: VideoLayout, *, return_lse: bool = False,
                  scale: Optional[float] = None):
        """Block-sparse attention of the local rows; only the key shards the index uses travel."""
        g = self._geo(layout)
        self._check(q, k, v, index, g, "attention")
        return self._run(q, k, v, self.plan(index, layout), layout, g, return_lse, scale)

    def dense(self, q, k, v, layout: VideoLayout, *, return_lse: bool = False, scale: Optional[float] = None):
        """Dense attention: a ring over every shard, LSE-merged."""
        g = self._geo(layout)
        self._check(q, k, v, None, g, "dense")
        key = (layout, q.shape[2], str(q.device))
        full = self._full.get(key)
        if full is None:
            full = BlockIndex.full(1, q.shape[2], g.rows, g.nb, g.bs, device=q.device)
            self._full[key] = full
        return self._run(q, k, v, self.plan(full, layout), layout, g, return_lse, scale)

    def _run(self, q, k, v, plan: RingPlan, layout: VideoLayout, g: ShardGeometry, return_lse: bool, scale):
        self._ensure_ready(q)
        self.calls += 1
        me, bs, vt = self.rank, g.bs, g.vr * g.bs
        need = self.exchange_needs(plan.ranges, q)
        if need[me] != [plan.ranges.get(j, (0, 0)) for j in range(self.ring)]:
            raise RuntimeError("RingOps: the exchanged key ranges differ from this rank's plan")
        send = {i: (need[i][me][0] * bs, need[i][me][1] * bs) for i in range(self.ring)
                if i != me and need[i][me][1] > need[i][me][0]}
        recv_from = sorted(plan.ranges)
        tr = self._post([k, v], send, {j: (plan.ranges[j][1] - plan.ranges[j][0]) * bs for j in recv_from})
        if not self.overlap:
            tr.wait_all()
        val = self._valid_for(layout, g, q.device)
        # own shard + text first: it overlaps with the transfer just posted
        out, lse = block_sparse_attention(q, k, v, plan.own, scale=scale, return_lse=True, q_valid=val.local,
                                          kv_valid=val.local, backend=self.backend)
        out = out.float()  # partials are merged in float32
        # nearest shards first: in a halo exchange they are the ones every rank waits for
        for j in sorted(recv_from, key=lambda j: (abs(j - me), j)):
            kj, vj = tr.wait(j)
            a, b, sub = plan.remote[j]
            lo, hi = plan.ranges[j]
            oj, lj = block_sparse_attention(q[:, a * bs:b * bs], kj, vj, sub, scale=scale, return_lse=True,
                                            q_valid=val.rows(a, b), kv_valid=val.keys(j, lo, hi), backend=self.backend)
            mo, ml = merge_partials(out[:, a * bs:b * bs], lse[:, :, a * bs:b * bs], oj, lj)
            out[:, a * bs:b * bs] = mo
            lse[:, :, a * bs:b * bs] = ml.to(lse.dtype)
        tr.wait_all()
        if g.nt and self.ring > 1:
            to, tl = all_reduce_merge(out[:, vt:], lse[:, :, vt:], self.groups.ring_group)
            out[:, vt:] = to
            lse[:, :, vt:] = tl.to(lse.dtype)
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out

    def block_mass(self, q, k, lse, layout: VideoLayout, *, scale: Optional[float] = None,
                   query_rows: Optional[int] = None) -> torch.Tensor:
        """Block mass ``[B, H_local, local rows, num_blocks]``: a ring over every K shard (no V; not
        the trailing padding blocks of a shard, whose mass is 0)."""
        g = self._geo(layout)
        self._check(q, k, None, None, g, "block_mass")
        self._ensure_ready(q)
        me, bs = self.rank, g.bs
        vt = g.vr * bs
        others = [j for j in range(self.ring) if j != me and g.real[j] > 0]
        send = {i: (0, g.real[me] * bs) for i in range(self.ring) if i != me} if g.real[me] > 0 else {}
        tr = self._post([k], send, {j: g.real[j] * bs for j in others})
        val = self._valid_for(layout, g, q.device)
        B, _, H, _ = q.shape
        mass = torch.empty((B, H, g.rows, g.nb), dtype=torch.float32, device=q.device)

        def part(kk, kv_valid, c0, c1):
            mass[..., c0:c1] = block_attention_mass(q, kk, lse, g.bs, scale=scale, q_valid=val.local,
                                                    kv_valid=kv_valid, query_rows=query_rows, backend=self.backend)

        part(k[:, :vt], val.shard[me], g.r0, g.r1)
        if g.nt:
            part(k[:, vt:], val.text, g.nv, g.nb)
        for j in range(self.ring):
            if j != me and g.real[j] < g.size(j):
                mass[..., g.starts[j] + g.real[j]:g.starts[j + 1]] = 0.0  # padding keys: no token, no mass
        for j in sorted(others, key=lambda j: (abs(j - me), j)):
            (kj,) = tr.wait(j)
            part(kj, val.keys(j, 0, g.real[j]), g.starts[j], g.starts[j] + g.real[j])
        tr.wait_all()
        return mass

    # ------------------------------------------------------------------ global statistics
    def reduce_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ring group (ranks with the same heads, other rows). Weight text rows with
        :meth:`row_weight` first, or they are counted once per ring rank."""
        if self.ring == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.groups.ring_group)
        return t

    def reset_counters(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0

    def __repr__(self) -> str:
        return (f"RingOps({self.groups!r}, backend={self.backend!r}, sent={self.bytes_sent}B, "
                f"received={self.bytes_received}B)")
