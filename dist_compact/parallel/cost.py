"""The sequence-parallel cost model: per-rank work, imbalance, bytes and predicted step time per layout.

``benchmarks/scaling_model.py`` drives it (one GPU times every rank's real local attention work;
communication is added from measured bandwidths) and ``benchmarks/ring_traffic.py`` prints the ring
traffic of the real shapes; nothing here reads files or times anything itself (the timer is an
argument).

Shapes: HunyuanVideo 720p 129 frames (latent grid 33 x 45 x 80, tile (1, 8, 16), 256 text tokens in
the joint attention, 24 heads, 60 layers) and Wan2.1-14B 480p 81 frames (21 x 30 x 52, tile
(1, 16, 8), no text in the self-attention, 40 heads, 40 layers); head_dim 128, bf16, batch 1.

Indices (per layer, all layers of the model):
* ``compact-0.5`` / ``-0.6`` / ``-0.8``: a searched Compact config (the drivers pass the shipped ones,
  searched for the embedded model, 8 layers x 6 heads, dist_compact/models/weights/embedded-compact-*.yaml)
  rescaled to the shape;
  each target layer's heads are a seeded random draw (without replacement within the layer) of
  those 48 searched (layer, head) patterns: :func:`pooled_compact`;
* ``adaspa``: AdaSpa's selection (``sparsity.online.select_blocks``, the paper's head-adaptive rule
  at sparsity 0.8, text sink) on a synthetic block mass whose heads are of the four kinds of
  :mod:`dist_compact.synthetic` (local / cross / temporal / global, random widths):
  :func:`synthetic_mass`, :class:`Source`.

Layouts for P = 2, 4, 8: Ulysses P, ring P, hybrid 2 x P/2 (P >= 4); the layout padding of
``SequenceParallel.layout_for``. "balanced" is what ``SequenceParallel(balance=True)`` does (ring
bounds from the summed static cost of all layers, per-layer Ulysses head order; for AdaSpa, whose
index exists only after its search, ring bounds over the real blocks and the Ulysses heads
re-planned on the index after the search); "balanced_oracle" plans the ring from the index itself
too (for AdaSpa: ring bounds the runtime does not re-plan); "contiguous" the equal split;
"balanced_slab_aligned" whole-slab ring shards.
Imbalance = max / mean computed blocks per rank, summed over all layers (and the worst layer).

Scaling model (assumptions):
1. Per layer and rank, the time of its local attention = the measured time of exactly the kernel
   calls that rank makes (Ulysses: its heads over the whole sequence; ring: its own-shard call and
   one call per remote shard it needs, as ``RingOps`` plans them), on one GPU alone. Timed on
   ``--measure-layers`` layers and scaled to the model's layer count.
2. Communication per call from byte counts that are exact and bandwidths from flags: Ulysses 4
   all-to-alls (q, k, v in, out back) of ``(U-1)/U`` of the rank's video q/k/v leaving it at
   ``--a2a-gbps`` (default 285 GB/s per rank, NCCL on 4 H200); ring K+V blocks sent to each rank
   that needs them (the key range of each shard its rows use, never trailing padding: what
   ``RingOps`` moves), ``max(sent, received) / --p2p-gbps`` (default 365 GB/s: one 730 MB K+V shard
   step in 2.0 ms on 2 H200). Text all-gathers / all-reduces (a few blocks) are left out.
3. Ranks meet at every attention call (the collectives), so a layer costs its slowest rank:
   ``step = sum over layers of max over ranks``. Without overlap a rank's time is
   ``compute + a2a + p2p``; with the ring's overlap ``a2a + max(own-shard compute, p2p) + remote
   compute``. Efficiency = one-GPU attention time / (P x predicted).
4. Only attention is modelled (the other ops of a DiT divide by P with no communication).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..sparsity.context import AttentionContext, AttentionLayer
from ..sparsity.attention_ops import AttentionOps
from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..ops import block_sparse_attention
from ..patterns.compact import CompactConfig
from ..sparsity.online import RankedMass, budget_for_density, paper_head_budgets, rank_blocks, select_blocks
from .balance import (REPLAN_GAIN, balanced_bounds, balanced_head_order, equal_bounds, head_block_costs, imbalance,
                      rank_loads, replan_head_order)
from .config import ParallelConfig, build_groups
from .plan import SequenceParallel, padded_layout
from .ring_plan import block_kv_bytes, ring_bytes, ring_rank_plan, shard_kv_bytes

__all__ = ["SHAPES", "SMALL_SHAPES", "SOURCES", "HEAD_DIM", "A2A_GBPS", "P2P_GBPS", "REPLAN_GAIN", "shape_layout",
           "layouts_for", "padded_layout", "pooled_compact", "synthetic_mass", "Source", "plan_for", "imbalance_rows",
           "a2a_bytes", "p2p_bytes", "rank_ms", "ring_traffic", "Work", "predict", "StaticLayer", "measure"]

SHAPES = {
    "hunyuan720": dict(grid=(33, 45, 80), tile=(1, 8, 16), text=256, heads=24, layers=60, model="hunyuanvideo"),
    "wan480": dict(grid=(21, 30, 52), tile=(1, 16, 8), text=0, heads=40, layers=40, model="wan2.1-t2v-14b"),
}
SMALL_SHAPES = {
    "small-text": dict(grid=(7, 9, 10), tile=(1, 4, 4), text=20, heads=8, layers=4, model="small"),
    "small": dict(grid=(6, 8, 9), tile=(1, 4, 4), text=0, heads=8, layers=4, model="small"),
}
SOURCES = ("compact-0.5", "compact-0.6", "compact-0.8", "adaspa")
HEAD_DIM = 128
#: measured all-to-all and point-to-point GB/s per rank (docs/performance.md, "NCCL on 4 H200")
A2A_GBPS, P2P_GBPS = 285.0, 365.0


def layouts_for(P: int, heads: int) -> List[Tuple[str, int, int]]:
    """(name, ulysses, ring) of the layouts benchmarked at P ranks."""
    out = []
    if heads % P == 0:
        out.append((f"ulysses{P}", P, 1))
    out.append((f"ring{P}", 1, P))
    if P >= 4 and heads % 2 == 0:
        out.append((f"hybrid2x{P // 2}", 2, P // 2))
    return out


# ---------------------------------------------------------------------------- indices
def _draws(layers: int, heads: int, pool: int, seed: int) -> List[torch.Tensor]:
    """Per target layer, which pool entries its heads take (seeded, without replacement in a layer)."""
    if heads > pool:
        raise ValueError(f"{heads} heads per layer but only {pool} patterns to draw from")
    out = []
    for l in range(layers):
        g = torch.Generator().manual_seed(seed * 100003 + l)
        out.append(torch.randperm(pool, generator=g)[:heads])
    return out


def pooled_compact(src: CompactConfig, model: str, layers: int, heads: int, seed: int = 0) -> CompactConfig:
    """A CompactConfig for ``layers x heads`` whose heads are drawn from the searched patterns of
    ``src`` (e.g. a shipped embedded config; module doc)."""
    pool = [p for layer in src.patterns for p in layer]
    pats = tuple(tuple(pool[int(i)] for i in d) for d in _draws(layers, heads, len(pool), seed))
    return CompactConfig(pats, model=model, grid=src.grid, tile=src.tile, tau=src.tau, lam=src.lam)


def _block_coords(layout: VideoLayout) -> torch.Tensor:
    """float ``[num_video_blocks, 3]``: (slab, tile row, tile col) of each video block (t-major)."""
    nt, nh, nw = layout.tile_grid
    b = torch.arange(layout.num_video_blocks)
    return torch.stack([b // (nh * nw), (b // nw) % nh, b % nw], 1).double()


def synthetic_mass(layout: VideoLayout, heads: int, seed: int) -> torch.Tensor:
    """float ``[1, heads, NB, NB]`` row-normalised block mass of synthetic DiT-like heads (module doc)."""
    nv, nb = layout.num_video_blocks, layout.num_blocks
    valid = layout.block_valid() > 0
    c = _block_coords(layout)
    d = c.view(-1, 1, 3) - c.view(1, -1, 3)
    dt2, du, dv = d[..., 0] ** 2, d[..., 1], d[..., 2]
    sp2 = du ** 2 + dv ** 2
    g = torch.Generator().manual_seed(seed)
    mass = torch.zeros(1, heads, nb, nb, dtype=torch.float32)
    for h in range(heads):
        kind = int(torch.randint(4, (1,), generator=g))
        st, ss = 0.5 + 3 * float(torch.rand(1, generator=g)), 0.5 + 3 * float(torch.rand(1, generator=g))
        if kind == 0:  # local
            lg = -(dt2 / st ** 2 + sp2 / ss ** 2) / 2
        elif kind == 1:  # cross: the query's tile row and column, fading along the arms, near in time
            lg = -4 * torch.minimum(du.abs(), dv.abs()) ** 2 - sp2 / (8 * ss ** 2) - dt2 / (2 * st ** 2)
        elif kind == 2:  # temporal: the same place in every frame
            lg = -sp2 / (2 * ss ** 2)
        else:  # global: the whole frame, near in time
            lg = -dt2 / (2 * st ** 2)
        lg = 3 * lg + 0.5 * torch.randn(nv, nv, generator=g, dtype=torch.float64)
        mass[0, h, :nv, :nv] = torch.softmax(lg, dim=-1).float()
    mass[..., nv:] = 1.0 / nb  # text keys (forced by the text sink) and text rows (kept whole)
    mass[..., nv:, :] = 1.0 / nb
    mass[..., ~valid] = 0
    mass[..., ~valid, :] = 0
    return mass


class Source:
    """Per-layer global block masks of one index source at one layout.

    Both kinds draw each layer's heads from a pool of 48 heads (module doc), so the pool's masks are
    built once: Compact -- the shipped config's 8 x 6 patterns rescaled to the layout (stacking them
    is exactly the pooled config's ``block_mask``); AdaSpa -- 48 synthetic heads ranked once, each
    layer's budgets from the paper's rule over its heads' recalls at the uniform budget.
    """

    POOL = 48

    def __init__(self, name: str, layout: VideoLayout, heads: int, layers: int, seed: int = 0, *,
                 compact: Optional[CompactConfig] = None):
        self.name, self.layout, self.heads, self.layers = name, layout, heads, layers
        self._costs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._kept: Dict[Tuple[int, int], torch.Tensor] = {}
        if name.startswith("compact"):
            if compact is None:
                raise ValueError(f"index source {name!r} needs compact=<the CompactConfig whose patterns it pools>")
            src = compact
            nb = layout.num_blocks
            self.pool = torch.cat([src.block_mask(l, layout).reshape(-1, nb, nb) for l in range(src.num_layers)])
        elif name == "adaspa":
            self._adaspa_pool(seed)
        else:
            raise ValueError(f"unknown index source {name!r}; known: {', '.join(SOURCES)}")
        self.draws = _draws(layers, heads, self.pool.shape[0] if name != "adaspa" else self.POOL, seed)

    def _adaspa_pool(self, seed: int) -> None:
        lay = self.layout
        nv, nb = lay.num_video_blocks, lay.num_blocks
        self.key_valid = lay.block_valid() > 0
        self.text = torch.zeros(nb, dtype=torch.bool)
        self.text[nv:] = True
        self.k0 = budget_for_density(0.2, int(self.key_valid.sum()))  # AdaSpa's default sparsity 0.8
        mass = synthetic_mass(lay, self.POOL, seed + 7)
        self.ranked = rank_blocks(mass, self.key_valid, self.text)
        rows = self.key_valid[:nv]
        self.recall = self.ranked.mass[0, :, :nv][:, rows, :self.k0].sum(-1).mean(-1)  # [POOL]
        self.pool = mass  # only its shape is used from here on

    def _adaspa_head(self, p: int, k: int) -> torch.Tensor:
        key = (p, k)
        if key not in self._kept:
            r = self.ranked
            one = RankedMass(order=r.order[:, p:p + 1], mass=r.mass[:, p:p + 1], forced=r.forced[:, p:p + 1],
                             valid=r.valid[:, p:p + 1], total=r.total[:, p:p + 1])
            self._kept[key] = select_blocks(r.mass[:, p:p + 1], top_k=k, key_valid=self.key_valid,
                                            forced_keys=self.text, full_rows=self.text, row_valid=self.key_valid,
                                            ranked=one)[0, 0]
        return self._kept[key]

    def mask(self, layer: int) -> torch.Tensor:
        """bool ``[1, heads, NB, NB]`` of ``layer``."""
        d = self.draws[layer]
        if self.name != "adaspa":
            return self.pool[d].unsqueeze(0)
        budgets = paper_head_budgets(self.recall[d], self.k0, int(self.key_valid.sum()))
        return torch.stack([self._adaspa_head(int(p), int(k)) for p, k in zip(d, budgets)]).unsqueeze(0)

    def index(self, layer: int) -> BlockIndex:
        return BlockIndex.from_dense(self.mask(layer), self.layout.block_size)

    def costs(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._costs:
            self._costs[layer] = head_block_costs(self.mask(layer), self.layout)
        return self._costs[layer]

    def density(self) -> float:
        nb = self.layout.num_blocks
        return sum(float(self.costs(l)[0].sum() + self.costs(l)[1].sum()) for l in range(self.layers)) / (
            self.layers * self.heads * nb * nb)


# ---------------------------------------------------------------------------- plans
def plan_for(source: Source, U: int, R: int, balance: bool, oracle: bool = False
             ) -> Tuple[Tuple[int, ...], List[Optional[torch.Tensor]]]:
    """(ring bounds, head order per layer) as ``SequenceParallel(balance=...)`` chooses them.

    A Compact source is a static index: the runtime plans from it. AdaSpa's index is found during
    the run, so the runtime balances the ring over the real blocks, and re-plans the Ulysses heads
    on the index after the search (``ParallelAttention``'s online re-plan, taken when it lowers the
    largest rank's blocks by more than ``REPLAN_GAIN``); ``oracle=True`` plans the ring from the
    index itself too.
    """
    nv = source.layout.num_video_blocks
    bounds = equal_bounds(nv, R)
    orders: List[Optional[torch.Tensor]] = [None] * source.layers
    if not balance:
        return bounds, orders
    static = oracle or source.name != "adaspa"
    if R > 1 and nv // U >= R:
        if static:
            total = sum(source.costs(l)[0] for l in range(source.layers)).sum(0)
            tt = torch.tensor([float(sum(source.costs(l)[1].sum() for l in range(source.layers)))])
        else:
            total, tt = (source.layout.block_valid()[:nv] > 0).double(), torch.zeros(1)
        cand = balanced_bounds(total, R, U)
        worst = [max(rank_loads(total.view(1, -1), tt, 1, R, bounds=b)) for b in (cand, bounds)]
        if worst[0] < worst[1]:
            bounds = cand
    if U > 1:
        for l in range(source.layers):
            c, tt = source.costs(l)
            per_head = c.sum(1) + tt
            # AdaSpa: the runtime's online re-plan rule (move heads only for a real gain)
            o = balanced_head_order(per_head, U) if static else replan_head_order(per_head, None, U)
            orders[l] = None if o is None or torch.equal(o, torch.arange(source.heads)) else o
    return bounds, orders


def _summed(source: Source, U: int, R: int, bounds, orders) -> Tuple[float, float]:
    """(imbalance of the loads summed over layers, worst layer's imbalance)."""
    tot, worst = None, 0.0
    for l in range(source.layers):
        c, tt = source.costs(l)
        loads = rank_loads(c, tt, U, R, order=orders[l], bounds=bounds)
        worst = max(worst, imbalance(loads))
        tot = loads if tot is None else [a + b for a, b in zip(tot, loads)]
    return imbalance(tot), worst


def imbalance_rows(source: Source, shape: str, entries: Sequence[Tuple[int, str, int, int]]) -> List[dict]:
    """Balanced vs contiguous imbalance (summed over layers, and the worst layer) per layout
    ``(P, name, ulysses, ring)`` of ``entries``."""
    rows = []
    for P, name, U, R in entries:
        row = dict(shape=shape, source=source.name, density=round(source.density(), 4), P=P, layout=name,
                   ulysses=U, ring=R)
        for label, bal in (("contiguous", False), ("balanced", True)):
            row[label], row[f"{label}_worst_layer"] = (round(x, 4) for x in _summed(source, U, R, *plan_for(source, U, R, bal)))
        row["balanced_oracle"] = round(_summed(source, U, R, *plan_for(source, U, R, True, oracle=True))[0], 4)
        row["balanced_slab_aligned"] = ""
        unit = math.lcm(source.layout.blocks_per_slab, U)
        if R > 1 and source.layout.num_video_blocks // unit >= R:  # whole-slab ring shards, for comparison
            _, orders = plan_for(source, U, R, True, oracle=True)
            total = sum(source.costs(l)[0] for l in range(source.layers)).sum(0)
            b = balanced_bounds(total, R, unit)
            row["balanced_slab_aligned"] = round(_summed(source, U, R, b, orders)[0], 4)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- the arithmetic
def a2a_bytes(video_blocks: int, block_size: int, heads: int, head_dim: int, element_size: int, ulysses: int) -> float:
    """Bytes one Ulysses rank sends per attention call: q, k, v and the output, each its video
    tokens x all heads, of which ``(U-1)/U`` leave the rank."""
    if ulysses == 1:
        return 0.0
    return 4 * video_blocks * block_size * heads * head_dim * element_size * (ulysses - 1) / ulysses


def p2p_bytes(blocks: Sequence[Sequence[int]], block_bytes: int, rank: int) -> Tuple[int, int]:
    """(sent, received) ring bytes of ``rank``: ``blocks[i][j]`` = key blocks of shard j that rank i
    fetches (``RingPlan.blocks``, its key ranges), ``block_bytes`` = one block's K+V."""
    R = len(blocks)
    sent = block_bytes * sum(int(blocks[i][rank]) for i in range(R) if i != rank)
    recv = block_bytes * sum(int(blocks[rank][j]) for j in range(R) if j != rank)
    return sent, recv


def rank_ms(compute_ms: float, own_ms: Optional[float], a2a_b: float, p2p_b: float, a2a_gbps: float,
            p2p_gbps: float) -> Tuple[float, float]:
    """(without overlap, with the ring's overlap) time of one rank's attention call (assumption 3)."""
    t_a2a, t_p2p = a2a_b / (a2a_gbps * 1e6), p2p_b / (p2p_gbps * 1e6)  # GB/s -> bytes per ms
    plain = compute_ms + t_a2a + t_p2p
    if own_ms is None:
        return plain, plain
    return plain, t_a2a + max(own_ms, t_p2p) + (compute_ms - own_ms)


class Work:
    """Random q, k, v of the whole sequence once; each rank's kernel calls work on slices of them."""

    def __init__(self, layout: VideoLayout, heads: int, head_dim: int, dtype, device, backend: str):
        self.layout, self.backend, self.device = layout, backend, device
        g = torch.Generator(device=device).manual_seed(0)
        S = layout.padded_len
        self.q, self.k, self.v = (torch.randn(1, S, heads, head_dim, generator=g, device=device, dtype=dtype)
                                  for _ in range(3))
        self.bv = layout.block_valid(device)
        self.bs = layout.block_size

    def _tok(self, a: int, b: int) -> torch.Tensor:
        return torch.arange(a * self.bs, b * self.bs, device=self.device)

    def _heads(self, heads: torch.Tensor):
        h = heads.to(self.device)
        return [t.index_select(2, h) for t in (self.q, self.k, self.v)]

    def ulysses_fn(self, index: BlockIndex, heads: torch.Tensor):
        """The call of a Ulysses rank: its heads, the whole sequence."""
        q, k, v = self._heads(heads)
        idx = index.select_heads(heads.to(index.device))
        return lambda: block_sparse_attention(q, k, v, idx, block_valid=self.bv, backend=self.backend)

    def ring_fns(self, plan, heads: torch.Tensor, bounds: Sequence[int], rank: int):
        """(every call of ring rank ``rank`` as RingOps makes them, the own-shard call alone)."""
        lay = self.layout
        q, k, v = self._heads(heads)
        nv, nb = lay.num_video_blocks, lay.num_blocks
        loc = torch.cat([self._tok(bounds[rank], bounds[rank + 1]), self._tok(nv, nb)])
        ql, kl, vl = (t.index_select(1, loc) for t in (q, k, v))
        val = torch.cat([self.bv[bounds[rank]:bounds[rank + 1]], self.bv[nv:]])
        calls = []
        for j, (a, b, sub) in sorted(plan.remote.items()):
            lo, hi = plan.ranges[j]  # the key blocks of shard j that travel
            k0, k1 = bounds[j] + lo, bounds[j] + hi
            keys = self._tok(k0, k1)
            calls.append((ql[:, a * self.bs:b * self.bs], k.index_select(1, keys), v.index_select(1, keys), sub,
                          val[a:b], self.bv[k0:k1]))
        own = plan.own

        def own_fn():
            return block_sparse_attention(ql, kl, vl, own, q_valid=val, kv_valid=val, return_lse=True,
                                          backend=self.backend)

        def all_fn():
            own_fn()
            for qq, kk, vv, sub, qv, kvv in calls:
                block_sparse_attention(qq, kk, vv, sub, q_valid=qv, kv_valid=kvv, return_lse=True, backend=self.backend)

        return all_fn, own_fn


def predict(source: Source, work: Work, measure_layers: Sequence[int], entries: Sequence[Tuple[int, str, int, int]],
            *, a2a_gbps: float, p2p_gbps: float, reps: int, timer) -> List[dict]:
    """Predicted attention time per step for every layout and plan (module doc, assumptions 1-4)."""
    lay, H, dev = source.layout, source.heads, work.device
    bs, D, es = lay.block_size, work.q.shape[-1], work.q.element_size()
    scale = source.layers / len(measure_layers)
    idx = {l: source.index(l).to(dev) for l in measure_layers}
    t1 = scale * sum(timer(work.ulysses_fn(idx[l], torch.arange(H)), reps) for l in measure_layers)
    rows = []
    for P, name, U, R in entries:
        for label, bal in (("contiguous", False), ("balanced", True)):
            bounds, orders = plan_for(source, U, R, bal)
            hu = H // U
            step = step_ov = a2a_tot = p2p_tot = 0.0
            for l in measure_layers:
                order = orders[l] if orders[l] is not None else torch.arange(H)
                times = []
                for u in range(U):
                    heads = order[u * hu:(u + 1) * hu]
                    if R > 1:
                        sub = idx[l].select_heads(heads.to(dev))
                        plans = [ring_rank_plan(sub, lay, bounds, r) for r in range(R)]
                        blocks = [p.blocks for p in plans]
                        kv = 2 * bs * hu * D * es  # one block's K+V
                    for r in range(R):
                        a2a = a2a_bytes((bounds[r + 1] - bounds[r]) // U, bs, H, D, es, U)
                        if R == 1:
                            comp, own, p2p = timer(work.ulysses_fn(idx[l], heads), reps), None, 0.0
                        else:
                            all_fn, own_fn = work.ring_fns(plans[r], heads, bounds, r)
                            comp, own = timer(all_fn, reps), timer(own_fn, reps)
                            p2p = max(p2p_bytes(blocks, kv, r))
                        times.append(rank_ms(comp, own, a2a, p2p, a2a_gbps, p2p_gbps))
                        a2a_tot, p2p_tot = a2a_tot + a2a, p2p_tot + p2p
                step += max(t[0] for t in times)
                step_ov += max(t[1] for t in times)
            step, step_ov = step * scale, step_ov * scale
            n = len(measure_layers)
            rows.append(dict(source=source.name, P=P, layout=name, plan=label, t1_ms=round(t1, 2),
                             step_ms=round(step, 2), step_overlap_ms=round(step_ov, 2),
                             efficiency=round(t1 / (P * step), 3), efficiency_overlap=round(t1 / (P * step_ov), 3),
                             a2a_mb_per_layer=round(a2a_tot / n / 1e6, 1), p2p_mb_per_layer=round(p2p_tot / n / 1e6, 1)))
    return rows


# ---------------------------------------------------------------------------- the real layer (multi-GPU)
class StaticLayer(AttentionLayer):
    """A wrapped attention layer with a static index (the ``compact.index_for`` protocol that
    ``SequenceParallel`` balances from): localize, then the ops' block-sparse attention."""

    def __init__(self, index: BlockIndex, layer: int):
        self.compact, self.layer, self._index = self, layer, index
        self.num_heads = index.num_heads

    def index_for(self, layer, layout, num_heads):
        return self._index

    def __call__(self, q, k, v, ctx):
        return ctx.ops.attention(q, k, v, ctx.ops.localize(self._index, ctx.layout), ctx.layout)


def measure(source: Source, work: Work, measure_layers: Sequence[int], entries, reps: int, *,
            timer) -> Dict[Tuple[str, str], float]:
    """Measured attention ms per step of each ``(layout, plan)`` whose degree is the world size:
    the wrapped layer on the real process groups, slowest rank per call (collective); ``timer(fn,
    reps)`` -> ms as for :func:`predict`."""
    world = dist.get_world_size()
    lay = source.layout
    scale = source.layers / len(measure_layers)
    out = {}
    for P, name, U, R in entries:
        if P != world:
            continue
        cfg = ParallelConfig(U, R)
        groups = build_groups(cfg)
        for label, bal in (("contiguous", False), ("balanced", True)):
            sp = SequenceParallel(cfg, groups, balance=bal)
            layers = [sp.wrap(StaticLayer(source.index(l).to(work.device), l)) for l in measure_layers]
            ctx = AttentionContext(layout=lay, ops=AttentionOps(work.backend))
            local = [sp.shard(t, lay) for t in (work.q, work.k, work.v)]
            total = 0.0
            for attn in layers:
                def call():
                    dist.barrier()
                    attn(*local, ctx)
                ms = torch.tensor([timer(call, reps)], device=work.device)
                dist.all_reduce(ms, op=dist.ReduceOp.MAX)
                total += float(ms)
            out[(name, label)] = round(total * scale, 2)
            del layers
    return out


def shape_layout(spec: dict) -> VideoLayout:
    """The global layout of one of :data:`SHAPES` / :data:`SMALL_SHAPES`."""
    return VideoLayout(*spec["grid"], tile=spec["tile"], text_tokens=spec["text"])


def ring_traffic(src, lay, R: int, bounds, layers, heads: int, head_dim: int = 128, esize: int = 2):
    """Ring K+V traffic of ``src``'s ``layers`` at shard offsets ``bounds``: (bytes per layer as
    :class:`~dist_compact.parallel.ring.RingOps` moves them, bytes per layer of a ring sending whole
    shards, the most blocks one rank receives)."""
    pb = block_kv_bytes(lay.block_size, batch=1, heads=heads, head_dim=head_dim, element_size=esize)
    kv = shard_kv_bytes(bounds, lay.block_size, batch=1, heads=heads, head_dim=head_dim, element_size=esize)
    new = old = 0.0
    worst = 0
    for l in layers:
        idx = src.index(l)
        blocks = torch.tensor([ring_rank_plan(idx, lay, bounds, r).blocks for r in range(R)])
        new += float(ring_bytes(blocks, pb).sum())
        old += float(ring_bytes(blocks > 0, kv).sum())
        worst = max(worst, int(blocks.sum(1).max()))
    return new / len(layers), old / len(layers), worst
