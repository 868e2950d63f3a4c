"""Offline Compact Attention search: greedy window shrinking per (layer, head) on captured block mass.

Input: a :class:`~dist_compact.search.capture.MassStore` (per (layer, head) the token-summed softmax
mass at each relative tile offset ``(slab distance d, |d_row|, |d_col|)``, plus the mass in text
rows/columns). Output: a :class:`~dist_compact.patterns.compact.CompactConfig`.

The region of one frame-distance group is a *staircase* of two centred windows, stored as four
half-extents ``(a_s, a_t, b_n, b_w)`` with ``a_s <= a_t`` and ``b_n <= b_w``::

    wide-short window  |d_row| <= a_s, |d_col| <= b_w
    narrow-tall window |d_row| <= a_t, |d_col| <= b_n

A single window (local / global) has ``a_s == a_t`` and ``b_n == b_w``; an empty group is all ``-1``.
Its kept mass is read from the 2D prefix sums ``S[a, b]`` (mass with ``|d_row| <= a, |d_col| <= b``)
of the group: ``S[a_t, b_n] + S[a_s, b_w] - S[a_s, b_n]``; the cost (kept block pairs) likewise from
the pair counts. Nothing is re-expanded into masks during the search.

Greedy (the paper's rule, per (layer, head), all heads at once): start with every group at full
coverage; at each step evaluate every *move* of every group, each removing one strip of the region's
boundary:

* ``top``:    ``a_t -= 1``  (the tall window's top row; the whole top row of a single window);
* ``side``:   ``b_w -= 1``  (the wide window's outer column);
* ``arm_w``:  ``a_s -= 1``  (lower the wide arm of a cross; at ``-1`` the wide arm is gone);
* ``arm_t``:  ``b_n -= 1``  (narrow the tall arm of a cross; at ``-1`` the tall arm is gone);
* ``corner``: a single window ``(a, b)`` becomes the cross ``(a-1, a, b-1, b)`` (cuts its corners);
* ``drop``:   the group keeps nothing (never for the group holding distance 0);

and take the one with the least recall lost per unit of compute saved,
``ratio = (mass lost / total mass) / (block pairs saved / all block pairs)`` (1.0 = removing blocks
of average weight). Moves that save no compute, or would bring recall below ``tau``, are not taken;
a head stops when no move is left or the best ratio exceeds ``lam``. Every step removes block pairs,
so the cost never increases. Recall counts the always-kept text mass.

Frame-distance groups (``SearchSettings.groups``) default to one group per slab distance, so the
windows can shrink with temporal distance; consecutive distances with equal windows are merged
into one group of the output config.

Configs searched on several prompts are merged by union (:func:`search_stores`,
:func:`~dist_compact.patterns.compact.merge_union`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..patterns.compact import CompactConfig, HeadPattern, Window, merge_union
from .capture import MassStore
from .quality import NOT_CAPTURED, heads_summary

__all__ = ["SearchSettings", "SearchResult", "greedy_search", "search_store", "search_stores", "MOVES"]

#: move names, in the order of the move axis of the candidate tensors
MOVES = ("top", "side", "arm_w", "arm_t", "corner", "drop")


@dataclass(frozen=True)
class SearchSettings:
    """Greedy search settings.

    Args:
        tau: recall (share of softmax mass kept) the search never goes below (paper: 0.9).
        lam: stop a head when its best move loses more than ``lam`` recall per unit of density saved
            (dimensionless, 1.0 = average block); ``None``: only ``tau`` stops.
        groups: slab-distance groups ``((lo, hi), ...)``, ``hi=None`` for "and beyond"; must start at
            0 and be contiguous. ``None``: one group per distance.
        max_steps: cap on greedy iterations (``None``: until every head stops).
    """

    tau: float = 0.9
    lam: Optional[float] = None
    groups: Optional[Tuple[Tuple[int, Optional[int]], ...]] = None
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau <= 1.0):
            raise ValueError(f"SearchSettings.tau must be a number in [0, 1], got {self.tau!r}")
        if self.lam is not None and not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"SearchSettings.lam must be None or a number >= 0, got {self.lam!r}")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 0):
            raise ValueError(f"SearchSettings.max_steps must be None or an int >= 0, got {self.max_steps!r}")
        if self.groups is not None:
            gs = tuple((int(lo), None if hi is None else int(hi)) for lo, hi in self.groups)
            expect = 0
            for i, (lo, hi) in enumerate(gs):
                if lo != expect or (hi is not None and hi < lo) or (hi is None and i != len(gs) - 1):
                    raise ValueError(
                        f"SearchSettings.groups must be contiguous slab-distance ranges starting at 0, only the "
                        f"last open (hi=None), e.g. ((0, 0), (1, 2), (3, None)); got {self.groups!r}"
                    )
                expect = None if hi is None else hi + 1
            if not gs:
                raise ValueError("SearchSettings.groups must not be empty")
            object.__setattr__(self, "groups", gs)

    def group_ranges(self, nt: int) -> List[Tuple[int, int]]:
        """Inclusive distance ranges of the groups on ``nt`` slabs (every distance covered)."""
        if self.groups is None:
            return [(d, d) for d in range(nt)]
        out = [(lo, nt - 1 if hi is None else min(hi, nt - 1)) for lo, hi in self.groups if lo < nt]
        if out[-1][1] < nt - 1:
            raise ValueError(f"SearchSettings.groups {self.groups} end at distance {out[-1][1]} but the grid has "
                             f"{nt} slabs: end with an open group (lo, None)")
        return out


@dataclass
class SearchResult:
    """What :func:`search_store` found.

    Attributes:
        config: the searched :class:`CompactConfig`.
        recall, density: float64 ``[L, H]`` on the searched data (NaN for layers never captured,
            which stay dense).
        steps: int64 ``[L, H]`` greedy moves taken.
        seconds: wall time of the greedy search.
        iterations: greedy rounds (every active head takes one move per round).
        recall_trace, density_trace: float64 ``[iterations + 1, L, H]`` when ``trace=True``.
    """

    config: CompactConfig
    recall: torch.Tensor
    density: torch.Tensor
    steps: torch.Tensor
    seconds: float
    iterations: int = 0
    recall_trace: Optional[torch.Tensor] = None
    density_trace: Optional[torch.Tensor] = None

    def summary(self) -> str:
        heads = heads_summary(self.recall, self.density)
        return f"{heads}, {int(self.steps.sum())} moves, {self.seconds:.2f} s" if heads else NOT_CAPTURED


# -------------------------------------------------------------------------------------- vectorised core
def _prefix2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., A+1, B+1]`` -> ``[..., A+2, B+2]``: inclusive 2D prefix sums with a zero row/col in front."""
    s = x.cumsum(-2).cumsum(-1)
    return torch.nn.functional.pad(s, (1, 0, 1, 0))


def _value(table: torch.Tensor, st: torch.Tensor, width: int) -> torch.Tensor:
    """Kept amount of staircase states ``st [N, G, M, 4]`` from flat padded prefix sums ``[N or 1, G, K]``.

    Half-extent ``a`` sits at padded row ``a + 1`` (``-1``, an empty window, reads the zero row).
    """
    a_s, a_t, b_n, b_w = (st[..., i].clamp(min=-1) + 1 for i in range(4))
    N, G, M = st.shape[:3]
    idx = torch.stack([a_t * width + b_n, a_s * width + b_w, a_s * width + b_n], dim=-1).view(N, G, M * 3)
    v = torch.gather(table.expand(N, -1, -1), 2, idx).view(N, G, M, 3)
    return v[..., 0] + v[..., 1] - v[..., 2]


def _candidates(st: torch.Tensor, has0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All moves of canonical states ``[N, G, 4]`` -> candidates ``[N, G, 6, 4]`` and validity.

    ``has0`` (bool, broadcastable to ``[N, G]``) marks the groups holding distance 0 (never dropped).
    """
    a_s, a_t, b_n, b_w = st.unbind(-1)
    empty = a_t < 0
    rect = (a_s == a_t) & (b_n == b_w) & ~empty
    cross = ~rect & ~empty
    neg = torch.full_like(a_s, -1)

    def canon(s_, t_, n_, w_):
        # a cross that lost an arm (-1) or whose arms met (a_s == a_t or b_n == b_w) is one window
        lost_w, lost_t, met = s_ < 0, n_ < 0, (s_ == t_) | (n_ == w_)
        rows = torch.where(lost_w, t_, torch.where(lost_t, s_, t_))
        cols = torch.where(lost_w, n_, w_)
        single = lost_w | lost_t | met
        return torch.stack([torch.where(single, rows, s_), torch.where(single, rows, t_),
                            torch.where(single, cols, n_), torch.where(single, cols, w_)], dim=-1)

    top = canon(torch.where(rect, a_t - 1, a_s), a_t - 1, b_n, b_w)
    side = canon(a_s, a_t, torch.where(rect, b_w - 1, b_n), b_w - 1)
    arm_w = canon(a_s - 1, a_t, b_n, b_w)
    arm_t = canon(a_s, a_t, b_n - 1, b_w)
    corner = torch.stack([a_t - 1, a_t, b_w - 1, b_w], dim=-1)
    drop = torch.stack([neg, neg, neg, neg], dim=-1)
    cand = torch.stack([top, side, arm_w, arm_t, corner, drop], dim=2)
    valid = torch.stack([
        ~empty & (a_t >= 1),
        ~empty & (b_w >= 1),
        cross,
        cross,
        rect & (a_t >= 1) & (b_w >= 1),
        ~empty & ~has0,
    ], dim=2)
    return cand, valid


@dataclass
class _Greedy:
    state: torch.Tensor        # int64 [N, G, 4]
    recall: torch.Tensor       # float64 [N]
    density: torch.Tensor      # float64 [N]
    steps: torch.Tensor        # int64 [N]
    iterations: int            # greedy rounds (all heads move in parallel)
    recall_trace: Optional[torch.Tensor]
    density_trace: Optional[torch.Tensor]


def greedy_search(rel: torch.Tensor, text: torch.Tensor, total: torch.Tensor, pairs: torch.Tensor,
                  text_pairs: float, total_pairs: float, settings: SearchSettings = SearchSettings(),
                  *, device=None, trace: bool = False) -> _Greedy:
    """The vectorised greedy over ``N`` independent heads.

    Args:
        rel: float ``[N, nt, nh, nw]`` mass per relative offset; text, total: ``[N]``.
        pairs: ``[nt, nh, nw]`` block pairs per relative offset; text_pairs / total_pairs: block pairs
            with text, and all block pairs (density = kept pairs / total_pairs).
        device: where to run (default: ``rel``'s device).

    Returns the final states ``[N, G, 4]`` (groups of ``settings.group_ranges(nt)``), recall,
    density, steps and optional traces (``[iterations + 1, N]``).
    """
    dev = torch.device(device) if device is not None else rel.device
    N, nt, nh, nw = rel.shape
    ranges = settings.group_ranges(nt)
    G = len(ranges)
    gm = torch.zeros(G, nt, dtype=torch.float64, device=dev)
    for g, (lo, hi) in enumerate(ranges):
        gm[g, lo: hi + 1] = 1
    has0 = torch.zeros(G, dtype=torch.bool, device=dev)
    has0[0] = True
    rel = rel.to(dev, torch.float64).clamp(min=0)  # mass is >= 0; clamp rounding noise
    relg = torch.einsum("gt,ntab->ngab", gm, rel)
    cntg = torch.einsum("gt,tab->gab", gm, pairs.to(dev, torch.float64))
    width = nw + 1
    S = _prefix2d(relg).reshape(N, G, -1)
    C = _prefix2d(cntg).reshape(1, G, -1)
    text = text.to(dev, torch.float64).clamp(min=0)
    total = total.to(dev, torch.float64)
    A, B = nh - 1, nw - 1
    st = torch.tensor([A, A, B, B], dtype=torch.int64, device=dev).expand(N, G, 4).clone()
    Vg = _value(S, st.unsqueeze(2), width).squeeze(2)
    Cg = _value(C, st.unsqueeze(2), width).squeeze(2)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    # a move must keep recall >= tau; the margin keeps a recomputed recall >= tau despite rounding
    floor = settings.tau * total * (1 + 1e-12)
    active = total > 0
    steps = torch.zeros(N, dtype=torch.int64, device=dev)
    lam = math.inf if settings.lam is None else float(settings.lam)
    rows = torch.arange(N, device=dev)
    rtr, dtr = [], []

    def moves(st_, S_, C_, Vg_, Cg_, has0_, tot_):
        """Candidates of states [K, G', 4]: (cand, mass lost, pairs saved, ratio, valid), [K, G', M]."""
        cand, ok = _candidates(st_, has0_)
        Vn, Cn = _value(S_, cand, width), _value(C_, cand, width)
        dV, dC = Vg_.unsqueeze(-1) - Vn, Cg_.unsqueeze(-1) - Cn
        ratio = (dV / tot_.view(-1, 1, 1)) / (dC.clamp(min=1) / total_pairs)
        return cand, Vn, Cn, dV, ratio, ok & (dC > 0.5)

    # every group's moves are evaluated once here, then only the group that moved is re-evaluated
    cand, Vn, Cn, dV, ratio0, ok = moves(st, S, C, Vg, Cg, has0.view(1, G), safe_total)
    M = cand.shape[2]
    kept = text + Vg.sum(1)

    def snapshot():
        rtr.append((kept / safe_total).cpu())
        dtr.append(((text_pairs + Cg.sum(1)) / total_pairs).cpu())

    if trace:
        snapshot()
    it = 0
    while settings.max_steps is None or it < settings.max_steps:
        feasible = ok & ((kept.view(N, 1, 1) - dV) >= floor.view(N, 1, 1))
        ratio = torch.where(feasible, ratio0, torch.full_like(ratio0, math.inf)).view(N, G * M)
        # argmin + gather: Tensor.min(dim) is much slower on CPU float64; ties go to the first move
        arg = ratio.argmin(dim=1)
        best = ratio.gather(1, arg.view(N, 1)).view(N)
        go = active & torch.isfinite(best) & (best <= lam)
        if not bool(go.any()):
            break
        n = rows[go]
        g, m = arg[go] // M, arg[go] % M
        st[n, g] = cand[n, g, m]
        Vg[n, g] = Vn[n, g, m]
        Cg[n, g] = Cn[n, g, m]
        kept[n] = text[n] + Vg[n].sum(1)
        sub = moves(st[n, g].unsqueeze(1), S[n, g].unsqueeze(1), C[0, g].unsqueeze(1), Vg[n, g].unsqueeze(1),
                    Cg[n, g].unsqueeze(1), has0[g].view(-1, 1), safe_total[n])
        for full, part in zip((cand, Vn, Cn, dV, ratio0, ok), sub):
            full[n, g] = part.squeeze(1)
        steps[n] += 1
        active = go
        it += 1
        if trace:
            snapshot()
    recall = (text + Vg.sum(1)) / safe_total
    recall = torch.where(total > 0, recall, torch.full_like(recall, math.nan))
    density = (text_pairs + Cg.sum(1)) / total_pairs
    return _Greedy(st.cpu(), recall.cpu(), density.cpu(), steps.cpu(), it,
                   torch.stack(rtr) if trace else None, torch.stack(dtr) if trace else None)


# -------------------------------------------------------------------------------------- configs
def _windows(s: Sequence[int], A: int, B: int) -> Tuple[Window, ...]:
    a_s, a_t, b_n, b_w = (int(x) for x in s)
    if a_t < 0:
        return ()

    def ax(v: int, lim: int) -> Optional[int]:
        return None if v >= lim else v

    if a_s == a_t and b_n == b_w:
        return (Window(ax(a_t, A), ax(b_w, B)),)
    return (Window(ax(a_s, A), ax(b_w, B)), Window(ax(a_t, A), ax(b_n, B)))


def states_to_patterns(states: torch.Tensor, ranges: Sequence[Tuple[int, int]],
                       tile_grid: Tuple[int, int, int]) -> List[HeadPattern]:
    """Greedy states ``[N, G, 4]`` -> one :class:`HeadPattern` per head."""
    nt, nh, nw = tile_grid
    out = []
    for s in states.tolist():
        per: List[Tuple[Window, ...]] = [()] * nt
        for (lo, hi), gs in zip(ranges, s):
            ws = _windows(gs, nh - 1, nw - 1)
            for d in range(lo, hi + 1):
                per[d] = ws
        # distances beyond the searched grid do not exist there: continue the farthest group if it keeps
        # something, so a head that keeps every distance reads "k+: ..."
        out.append(HeadPattern.from_distances(per, per[-1]))
    return out


def search_store(store: MassStore, settings: SearchSettings = SearchSettings(), *, device=None,
                 model: Optional[str] = None, trace: bool = False) -> SearchResult:
    """Search a config for every (layer, head) of ``store`` (layers never captured stay dense)."""
    if not isinstance(store, MassStore):
        raise TypeError(f"search_store needs a MassStore, got {type(store).__name__}")
    if not isinstance(settings, SearchSettings):
        raise TypeError(f"settings must be SearchSettings, got {type(settings).__name__}")
    L, H = store.num_layers, store.num_heads
    text_pairs, total_pairs = store.block_counts()
    t0 = time.perf_counter()
    res = greedy_search(store.rel.reshape(L * H, *store.tile_grid), store.text.reshape(-1),
                        store.total.reshape(-1), store.pairs(), text_pairs, total_pairs, settings,
                        device=device, trace=trace)
    seconds = time.perf_counter() - t0
    pats = states_to_patterns(res.state, settings.group_ranges(store.tile_grid[0]), store.tile_grid)
    captured = store.captured
    dense = HeadPattern.dense()
    layers = tuple(tuple(pats[li * H + h] if captured[li] else dense for h in range(H)) for li in range(L))
    config = CompactConfig(layers, model=store.model if model is None else model, grid=store.grid,
                           tile=store.tile, tau=float(settings.tau), lam=settings.lam)
    lh = lambda t: None if t is None else t.view(-1, L, H)  # noqa: E731
    density = res.density.view(L, H).clone()
    density[~captured] = 1.0
    return SearchResult(config, res.recall.view(L, H), density, res.steps.view(L, H), seconds, res.iterations,
                        lh(res.recall_trace), lh(res.density_trace))


def search_stores(stores: Sequence[MassStore], settings: SearchSettings = SearchSettings(), *, device=None,
                  model: Optional[str] = None, merge: str = "union") -> Tuple[CompactConfig, List[SearchResult]]:
    """Search several captures (e.g. one per prompt) and merge.

    ``merge="union"`` (the paper): search each store, then keep every tile any config keeps.
    ``merge="average"``: sum the stores and search once.
    """
    stores = list(stores)
    if not stores:
        raise ValueError("search_stores needs at least one MassStore")
    if merge not in ("union", "average"):
        raise ValueError(f"merge must be 'union' or 'average', got {merge!r}")
    if merge == "average":
        res = search_store(functools.reduce(MassStore.merged, stores), settings, device=device, model=model)
        return res.config, [res]
    results = [search_store(s, settings, device=device, model=model) for s in stores]
    return merge_union([r.config for r in results]), results
