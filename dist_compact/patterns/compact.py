"""Compact Attention patterns: per (layer, head) spatio-temporal windows -> one BlockIndex.

Units. Everything here is at *tile* granularity of a :class:`~dist_compact.layout.VideoLayout`:

* the temporal distance between a query tile and a key tile is their **slab distance**
  ``d = |slab_q - slab_k|`` (one slab = ``tile[0]`` latent frames; with tiles ``(1, h, w)`` it is the
  frame distance). Frame-distance groups are ranges of slab distances;
* windows are centred on the query tile and given by **half-extents in tiles**: a key tile at
  ``(d_row, d_col)`` tiles from the query tile is inside ``Window(rows, cols)`` iff
  ``|d_row| <= rows`` and ``|d_col| <= cols``; ``None`` means the whole axis. Windows are clipped at
  the borders of the grid (not shifted).

A head's pattern is a list of :class:`FrameGroup` (slab-distance range ``[lo, hi]``, ``hi=None`` for
"and beyond"), each keeping the union of up to two windows: one window = *local* (or *global* when it
covers most of the frame), two windows = *cross-shaped* (a wide-short and a narrow-tall one). A group
with no window, or a distance covered by no group, keeps nothing: a head whose last group ends at
``hi = w`` never looks further than ``w`` slabs, which the ring path uses to skip key shards.
Distance 0 must keep at least one window, so every video query tile keeps its own tile.

Text tokens: text rows attend to every non-empty block and every non-empty row attends to all text
blocks (the "text sink"). Empty blocks (padding slabs of ``slab_multiple``) are never kept, and their
query rows are empty (their outputs are padding that is dropped).

Resolution rule (:meth:`CompactConfig.rescaled`): a config searched on a tile grid ``(nt, nh, nw)``
(real slabs, no padding) applies to a grid ``(nt', nh', nw')`` by keeping the *share of each axis*
that a window covers: a spatial half-extent ``a`` covers ``2a+1`` of ``n`` tiles and becomes the
smallest ``a'`` with ``(2a'+1) / n' >= (2a+1) / n``, i.e. ``a' = ceil(((2a+1) n' - n) / (2 n))``
(``None``, or a window reaching the whole axis, stays whole). A target slab distance ``d'`` spans
``[d' nt/nt', (d'+1) nt/nt')`` source distances; it keeps the union of the windows of every source
distance that interval overlaps (reduced to two windows by :func:`cover_windows`, a superset). On the
grid it was searched for a config is used unchanged.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .._util import cdiv, is_int
from ..cmdline import short_repr
from ..block_index import BlockIndex
from ..layout import VideoLayout

__all__ = [
    "Window",
    "FrameGroup",
    "HeadPattern",
    "CompactConfig",
    "MAX_WINDOWS",
    "cover_windows",
    "merge_union",
    "real_tile_grid",
    "relative_bins",
]

#: Windows per frame-distance group (Compact Attention's dual windows).
MAX_WINDOWS = 2
# stands for "whole axis" in integer arithmetic; larger than any tile grid
_INF = 1 << 30


def _big(v: Optional[int]) -> int:
    return _INF if v is None else v


def real_tile_grid(layout: VideoLayout) -> Tuple[int, int, int]:
    """Tile grid ``(slabs, tile rows, tile cols)`` of a layout without its empty padding slabs."""
    return (cdiv(layout.frames, layout.tile[0]), layout.tile_grid[1], layout.tile_grid[2])


# ---------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Window:
    """A window centred on the query tile: ``|d_row| <= rows`` and ``|d_col| <= cols`` (tiles).

    ``None`` is the whole axis. Written ``"RxC"`` in config files, ``*`` for ``None``.
    """

    rows: Optional[int] = None
    cols: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 0):
                raise ValueError(f"Window.{name} must be an int >= 0 (tiles) or None (whole axis), got {v!r}")

    def covers(self, other: "Window") -> bool:
        """True if every tile offset inside ``other`` is inside this window."""
        return _big(self.rows) >= _big(other.rows) and _big(self.cols) >= _big(other.cols)

    def clipped(self, nh: int, nw: int) -> "Window":
        """Same window on a grid of ``nh x nw`` tiles, with extents reaching the whole axis as ``None``."""
        r = None if self.rows is None or self.rows >= nh - 1 else self.rows
        c = None if self.cols is None or self.cols >= nw - 1 else self.cols
        return Window(r, c)

    def __str__(self) -> str:
        return f"{'*' if self.rows is None else self.rows}x{'*' if self.cols is None else self.cols}"

    @classmethod
    def parse(cls, text: str) -> "Window":
        m = re.fullmatch(r"\s*(\*|\d+)\s*x\s*(\*|\d+)\s*", text)
        if not m:
            raise ValueError(f"bad window {short_repr(text, 40)}: expected 'RxC' with ints or '*', e.g. '2x3' or '0x*'")
        return cls(*(None if g == "*" else int(g) for g in m.groups()))


def cover_windows(windows: Iterable[Window], max_windows: int = MAX_WINDOWS) -> Tuple[Window, ...]:
    """At most ``max_windows`` centred windows whose union contains the union of ``windows``.

    Dominated windows are dropped (exact). If more than ``max_windows`` remain (a staircase of
    rectangles, e.g. after a union merge), the smallest two-window cover by unclipped area is taken:
    sorted by rows, windows ``1..i`` are covered by the wide one ``(rows_i, cols_1)`` and ``i+1..k`` by
    the tall one ``(rows_k, cols_{i+1})``. Output is sorted by rows (wide-short first).
    """
    if max_windows not in (1, 2):
        raise ValueError(f"max_windows must be 1 or 2, got {max_windows!r}")
    ws = set(windows)
    keep = [w for w in ws if not any(o != w and o.covers(w) for o in ws)]  # drop contained windows
    keep.sort(key=lambda w: (_big(w.rows), -_big(w.cols)))
    if len(keep) <= max_windows:
        return tuple(keep)
    wide_cols, tall_rows = keep[0].cols, keep[-1].rows

    def area(w: Window) -> int:
        return (2 * min(_big(w.rows), _INF // 4) + 1) * (2 * min(_big(w.cols), _INF // 4) + 1)

    best = None
    if max_windows == 2:
        for i in range(len(keep) - 1):
            wide, tall = Window(keep[i].rows, wide_cols), Window(tall_rows, keep[i + 1].cols)
            inter = Window(keep[i].rows, keep[i + 1].cols)
            cand = (area(wide) + area(tall) - area(inter), (wide, tall))
            if best is None or cand[0] < best[0]:
                best = cand
    single = Window(tall_rows, wide_cols)
    if best is None or area(single) <= best[0]:
        return (single,)
    return best[1]


@dataclass(frozen=True)
class FrameGroup:
    """Slab distances ``lo <= |slab_q - slab_k| <= hi`` (``hi=None``: no upper end) keep ``windows``.

    ``windows`` holds 0 (nothing kept), 1 or 2 :class:`Window`.
    """

    lo: int
    hi: Optional[int]
    windows: Tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        if not (is_int(self.lo) and self.lo >= 0):
            raise ValueError(f"FrameGroup.lo must be an int >= 0 (slab distance), got {self.lo!r}")
        if self.hi is not None and not (is_int(self.hi) and self.hi >= self.lo):
            raise ValueError(f"FrameGroup.hi must be None or an int >= lo={self.lo}, got {self.hi!r}")
        ws = tuple(self.windows) if not isinstance(self.windows, Window) else (self.windows,)
        if len(ws) > MAX_WINDOWS or not all(isinstance(w, Window) for w in ws):
            raise ValueError(f"FrameGroup.windows must be at most {MAX_WINDOWS} Window objects, got {self.windows!r}")
        object.__setattr__(self, "windows", ws)

    def contains(self, d: int) -> bool:
        return self.lo <= d and (self.hi is None or d <= self.hi)

    def __str__(self) -> str:
        rng = f"{self.lo}+" if self.hi is None else (f"{self.lo}" if self.hi == self.lo else f"{self.lo}-{self.hi}")
        return f"{rng}: " + (" + ".join(str(w) for w in self.windows) if self.windows else "-")


@dataclass(frozen=True)
class HeadPattern:
    """The kept key region of one head: frame-distance groups, each a union of up to two windows.

    Groups are sorted by ``lo`` and do not overlap; only the last may be unbounded (``hi=None``);
    slab distances outside every group keep nothing. Written as one line in config files, e.g.
    ``"0: 2x2; 1-3: 0x* + 1x0; 4+: -"`` (distance 0: a 5x5-tile window; 1..3: a cross made of one
    full-width row and a 1-tile-wide column of 3 tiles; from 4 on: nothing).
    """

    groups: Tuple[FrameGroup, ...]

    def __post_init__(self) -> None:
        gs = tuple(self.groups)
        if not gs or not all(isinstance(g, FrameGroup) for g in gs):
            raise ValueError(f"HeadPattern.groups must be a non-empty sequence of FrameGroup, got {self.groups!r}")
        for a, b in zip(gs, gs[1:]):
            if a.hi is None or b.lo <= a.hi:
                raise ValueError(
                    f"HeadPattern groups must be sorted and disjoint (only the last unbounded): "
                    f"'{a}' then '{b}'"
                )
        object.__setattr__(self, "groups", gs)
        if not self.windows_at(0):
            raise ValueError(
                "HeadPattern must keep at least one window at slab distance 0 (the query's own tile), "
                f"got {str(self)!r}"
            )

    # ---------------------------------------------------------------- queries
    def windows_at(self, d: int) -> Tuple[Window, ...]:
        """Windows kept at slab distance ``d`` (empty tuple: nothing)."""
        for g in self.groups:
            if g.contains(d):
                return g.windows
        return ()

    @property
    def span(self) -> int:
        """The smallest ``n`` such that every distance ``>= n`` keeps the same windows."""
        last = self.groups[-1]
        return last.lo if last.hi is None else last.hi + 1

    def max_distance(self) -> Optional[int]:
        """Largest slab distance that keeps something; ``None`` if unbounded."""
        last = self.groups[-1]
        if last.hi is None and last.windows:
            return None
        return max(g.hi for g in self.groups if g.windows)

    def to_distances(self, n: Optional[int] = None) -> Tuple[List[Tuple[Window, ...]], Tuple[Window, ...]]:
        """``(per_distance, tail)``: windows for ``d < n`` and for every ``d >= n`` (``n >= span``)."""
        n = self.span if n is None else n
        if n < self.span:
            raise ValueError(f"to_distances: n={n} is below the pattern's span {self.span}")
        return [self.windows_at(d) for d in range(n)], self.windows_at(n)

    @classmethod
    def from_distances(cls, per_distance: Sequence[Sequence[Window]], tail: Sequence[Window] = ()) -> "HeadPattern":
        """Groups of equal consecutive distances (empty runs become gaps); ``tail`` applies beyond."""
        groups: List[FrameGroup] = []
        items = [tuple(w) for w in per_distance]
        tail = tuple(tail)
        d = 0
        while d < len(items):
            e = d
            while e + 1 < len(items) and items[e + 1] == items[d]:
                e += 1
            if items[d]:
                unbounded = e == len(items) - 1 and tail == items[d]
                groups.append(FrameGroup(d, None if unbounded else e, items[d]))
            d = e + 1
        if tail and (not groups or groups[-1].hi is not None):
            groups.append(FrameGroup(len(items), None, tail))
        return cls(tuple(groups))

    # ---------------------------------------------------------------- constructors / text
    @classmethod
    def dense(cls) -> "HeadPattern":
        """Every key tile at every distance."""
        return cls((FrameGroup(0, None, (Window(None, None),)),))

    @classmethod
    def window(cls, rows: Optional[int], cols: Optional[int], max_distance: Optional[int] = None) -> "HeadPattern":
        """One window at every distance up to ``max_distance`` slabs (``None``: all)."""
        return cls((FrameGroup(0, max_distance, (Window(rows, cols),)),))

    def __str__(self) -> str:
        return "; ".join(str(g) for g in self.groups)

    @classmethod
    def parse(cls, text: str) -> "HeadPattern":
        """Inverse of ``str()``: ``"lo[-hi|+]: RxC [+ RxC] | -; ..."``."""
        if not isinstance(text, str):
            raise ValueError(f"a head pattern must be a string like '0: 2x2; 1+: 0x0', got {short_repr(text, 40)}")
        groups = []
        for part in text.split(";"):
            m = re.fullmatch(r"\s*(\d+)\s*(?:(\+)|-\s*(\d+))?\s*:\s*(.*?)\s*", part)
            if not m:
                raise ValueError(f"bad frame group {short_repr(part.strip(), 40)} in {short_repr(text, 60)}: expected "
                                 "'lo[-hi|+]: windows'")
            lo = int(m.group(1))
            hi = None if m.group(2) else (int(m.group(3)) if m.group(3) else lo)
            body = m.group(4)
            wins = () if body == "-" else tuple(Window.parse(w) for w in body.split("+"))
            groups.append(FrameGroup(lo, hi, wins))
        return cls(tuple(groups))

    # ---------------------------------------------------------------- geometry
    def relative_mask(self, tile_grid: Tuple[int, int, int]) -> torch.Tensor:
        """bool ``[nt, nh, nw]``: kept iff a key at (slab distance, |d_row|, |d_col|) is in the region."""
        nt, nh, nw = tile_grid
        dr = torch.arange(nh).view(nh, 1)
        dc = torch.arange(nw).view(1, nw)
        out = torch.zeros(nt, nh, nw, dtype=torch.bool)
        for g in self.groups:
            hi = nt - 1 if g.hi is None else min(g.hi, nt - 1)
            if g.lo > hi or not g.windows:
                continue
            region = torch.zeros(nh, nw, dtype=torch.bool)
            for w in g.windows:
                region |= (dr <= _big(w.rows)) & (dc <= _big(w.cols))
            out[g.lo: hi + 1] = region
        return out

    def union(self, other: "HeadPattern", max_windows: int = MAX_WINDOWS) -> "HeadPattern":
        """A pattern keeping every tile either pattern keeps (exact, or a two-window cover)."""
        n = max(self.span, other.span)
        a, ta = self.to_distances(n)
        b, tb = other.to_distances(n)
        per = [cover_windows(x + y, max_windows) for x, y in zip(a, b)]
        return HeadPattern.from_distances(per, cover_windows(ta + tb, max_windows))

    def rescaled(self, src: Tuple[int, int, int], dst: Tuple[int, int, int]) -> "HeadPattern":
        """The same pattern on another tile grid (the resolution rule in the module docstring)."""
        if tuple(src) == tuple(dst):
            return self
        nt, nh, nw = src
        mt, mh, mw = dst

        def axis(a: Optional[int], n: int, m: int) -> Optional[int]:
            if a is None or a >= n - 1:
                return None
            a2 = max(0, cdiv((2 * a + 1) * m - n, 2 * n))
            return None if a2 >= m - 1 else a2

        def scale(ws: Sequence[Window]) -> Tuple[Window, ...]:
            return cover_windows(Window(axis(w.rows, nh, mh), axis(w.cols, nw, mw)) for w in ws)

        per = []
        for d2 in range(mt):
            lo, hi = (d2 * nt) // mt, cdiv((d2 + 1) * nt, mt) - 1
            ws: Tuple[Window, ...] = ()
            for d in range(lo, max(lo, hi) + 1):
                ws = ws + self.windows_at(d)
            per.append(scale(ws))
        # beyond the target grid: what the source keeps beyond its own grid
        return HeadPattern.from_distances(per, scale(self.windows_at(max(nt, self.span))))


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=16)
def _relative_bins(layout: VideoLayout, device: str) -> torch.Tensor:
    if device != "cpu":
        return _relative_bins(layout, "cpu").to(device)
    nt, nh, nw = real_tile_grid(layout)
    tiles = layout.tile_coords()[: nt * nh * nw]  # (slab, row, col) of the real video blocks
    d = (tiles.unsqueeze(1) - tiles.unsqueeze(0)).abs()
    return (d[..., 0] * nh + d[..., 1]) * nw + d[..., 2]


def relative_bins(layout: VideoLayout, device="cpu") -> torch.Tensor:
    """int64 ``[nbv, nbv]`` over the real video blocks (``nbv = slabs*nh*nw`` without padding slabs).

    Entry ``[i, j]`` is ``(d * nh + |d_row|) * nw + |d_col|``, the relative offset of key block ``j``
    from query block ``i`` as a flat index into a ``[nt, nh, nw]`` table. The real video blocks are
    the first ``nbv`` blocks of the block order (tiles are t-major). Cached per layout and device (no
    copy per call); do not modify.
    """
    return _relative_bins(layout, str(torch.device(device)))


# ---------------------------------------------------------------------------------------------- config
def _tuple3(name: str, v) -> Optional[Tuple[int, int, int]]:
    if v is None:
        return None
    t = tuple(v)
    if len(t) != 3 or not all(is_int(x) and x >= 1 for x in t):
        raise ValueError(f"CompactConfig.{name} must be three positive ints, got {v!r}")
    return t


@dataclass(frozen=True)
class CompactConfig:
    """Compact Attention patterns of a whole model: ``patterns[layer][head]`` is a :class:`HeadPattern`.

    Args:
        patterns: ``num_layers`` tuples of ``num_heads`` :class:`HeadPattern` each.
        model: the model the config was searched for (checked when loading, see ``config_file``).
        grid, tile: latent grid ``(T, H, W)`` and tile ``(t, h, w)`` the windows were searched on;
            with them the windows are rescaled to other grids (module docstring); ``None``: windows
            are used as written on every grid.
        tau, lam: search settings, kept for the record.
        cache_size: how many BlockIndex objects :meth:`index_for` keeps (LRU).

    The main use is :meth:`index_for` (design contract 6): the global ``[1, H, NB, NB]`` index of one
    layer for a layout.
    """

    patterns: Tuple[Tuple[HeadPattern, ...], ...]
    model: str = ""
    grid: Optional[Tuple[int, int, int]] = None
    tile: Optional[Tuple[int, int, int]] = None
    tau: Optional[float] = None
    lam: Optional[float] = None
    cache_size: int = 128
    _cache: Dict = field(default_factory=OrderedDict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        pats = tuple(tuple(layer) for layer in self.patterns)
        if not pats or not pats[0]:
            raise ValueError("CompactConfig.patterns must hold at least one layer with at least one head")
        for i, layer in enumerate(pats):
            if len(layer) != len(pats[0]):
                raise ValueError(
                    f"CompactConfig: layer {i} has {len(layer)} heads but layer 0 has {len(pats[0])}"
                )
            for h, p in enumerate(layer):
                if not isinstance(p, HeadPattern):
                    raise ValueError(f"CompactConfig: patterns[{i}][{h}] must be a HeadPattern, got {type(p).__name__}")
        object.__setattr__(self, "patterns", pats)
        if not isinstance(self.model, str):
            raise ValueError(f"CompactConfig.model must be a string, got {self.model!r}")
        object.__setattr__(self, "grid", _tuple3("grid", self.grid))
        object.__setattr__(self, "tile", _tuple3("tile", self.tile))
        if (self.grid is None) != (self.tile is None):
            raise ValueError("CompactConfig: give both grid and tile (what it was searched on) or neither")
        for name in ("tau", "lam"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"CompactConfig.{name} must be None or a number >= 0, got {v!r}")
        if not (is_int(self.cache_size) and self.cache_size >= 0):
            raise ValueError(f"CompactConfig.cache_size must be an int >= 0, got {self.cache_size!r}")

    # ---------------------------------------------------------------- sizes / identity
    @property
    def num_layers(self) -> int:
        return len(self.patterns)

    @property
    def num_heads(self) -> int:
        return len(self.patterns[0])

    @property
    def tile_grid(self) -> Optional[Tuple[int, int, int]]:
        """Real tile grid ``(slabs, rows, cols)`` the windows are written for, or ``None``."""
        if self.grid is None:
            return None
        return tuple(cdiv(g, t) for g, t in zip(self.grid, self.tile))

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, pattern: HeadPattern, **kw) -> "CompactConfig":
        """Every (layer, head) with the same pattern."""
        if not (is_int(num_layers) and num_layers >= 1 and is_int(num_heads) and num_heads >= 1):
            raise ValueError(f"CompactConfig.uniform: num_layers and num_heads must be ints >= 1, got "
                             f"{num_layers!r}, {num_heads!r}")
        return cls(tuple((pattern,) * num_heads for _ in range(num_layers)), **kw)

    def check_compatible(self, model: Optional[str] = None, num_layers: Optional[int] = None,
                         num_heads: Optional[int] = None) -> None:
        """Raise ``ValueError`` if this config was made for another model / layer or head count."""
        problems = []
        if model is not None and self.model and model != self.model:
            problems.append(f"model {self.model!r} (wanted {model!r})")
        if num_layers is not None and num_layers != self.num_layers:
            problems.append(f"{self.num_layers} layers (model has {num_layers})")
        if num_heads is not None and num_heads != self.num_heads:
            problems.append(f"{self.num_heads} heads per layer (model has {num_heads})")
        if problems:
            raise ValueError("Compact config does not fit this model: it is for " + ", ".join(problems)
                             + "; search a config for this model (dist-compact-search)")

    # ---------------------------------------------------------------- geometry
    def _cached(self, key, make):
        cache = self._cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        val = make()
        if self.cache_size:
            cache[key] = val
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        return val

    def rescaled(self, tile_grid: Tuple[int, int, int]) -> "CompactConfig":
        """This config with windows for another real tile grid (no-op without a searched grid)."""
        tile_grid = tuple(tile_grid)
        src = self.tile_grid
        if src is None or src == tile_grid:
            return self

        def make():
            pats = tuple(tuple(p.rescaled(src, tile_grid) for p in layer) for layer in self.patterns)
            return CompactConfig(pats, model=self.model, tau=self.tau, lam=self.lam, cache_size=self.cache_size)

        return self._cached(("rescaled", tile_grid), make)

    def _check_layer(self, layer: int) -> None:
        if not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def relative_mask(self, layer: int, tile_grid: Tuple[int, int, int]) -> torch.Tensor:
        """bool ``[H, nt, nh, nw]`` of one layer on a real tile grid (rescaled if searched elsewhere)."""
        self._check_layer(layer)
        cfg = self.rescaled(tile_grid)
        return torch.stack([p.relative_mask(tile_grid) for p in cfg.patterns[layer]])

    def block_mask(self, layer: int, layout: VideoLayout) -> torch.Tensor:
        """bool ``[1, H, NB, NB]`` block mask of one layer for ``layout`` (global key numbering)."""
        self._check_layer(layer)
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
        tg = real_tile_grid(layout)
        rel = self.relative_mask(layer, tg).reshape(self.num_heads, -1)
        bins = relative_bins(layout)
        nbv = bins.shape[0]
        NB, H = layout.num_blocks, self.num_heads
        mask = torch.zeros(1, H, NB, NB, dtype=torch.bool)
        for h in range(H):  # one head at a time keeps the gather's temporary small
            mask[0, h, :nbv, :nbv] = rel[h][bins]
        nonempty = layout.block_valid() > 0
        text = layout.is_text_block()
        mask[0, :, text] |= nonempty
        mask[0, :, :, text] |= nonempty.view(-1, 1)
        return mask

    def index_for(self, layer: int, layout: VideoLayout, num_heads: int, device=None) -> BlockIndex:
        """Global :class:`BlockIndex` ``[1, H, NB, NB]`` of ``layer`` for ``layout`` (cached per layout)."""
        self._check_layer(layer)
        if num_heads != self.num_heads:
            raise ValueError(f"Compact config has {self.num_heads} heads per layer but the model asks for "
                             f"{num_heads}; search a config for this model")
        device = torch.device("cpu" if device is None else device)
        if device.type != "cpu":  # a copy of the (cached) CPU index
            return self._cached((layer, layout, str(device)),
                                lambda: self.index_for(layer, layout, num_heads).to(device))
        return self._cached((layer, layout, "cpu"),
                            lambda: BlockIndex.from_dense(self.block_mask(layer, layout), layout.block_size))

    def max_distance(self, layer: int, layout: Optional[VideoLayout] = None) -> Optional[int]:
        """Largest slab distance any head of ``layer`` keeps (``None``: unbounded), on ``layout``'s grid."""
        self._check_layer(layer)
        cfg = self if layout is None else self.rescaled(real_tile_grid(layout))
        ds = [p.max_distance() for p in cfg.patterns[layer]]
        return None if any(d is None for d in ds) else max(ds)

    # ---------------------------------------------------------------- merging
    def union(self, other: "CompactConfig") -> "CompactConfig":
        """Per (layer, head) union of the kept regions (configs must be for the same model/grid)."""
        return merge_union([self, other])


def merge_union(configs: Sequence[CompactConfig]) -> CompactConfig:
    """Merge configs searched on several prompts: every tile any of them keeps is kept.

    All configs must share the layer/head counts and the searched grid and tile (search them on the
    same shape); per distance the windows are joined and, when more than two remain, covered by the
    smallest two-window superset (:func:`cover_windows`). tau / lam are kept if all agree.
    """
    configs = list(configs)
    if not configs or not all(isinstance(c, CompactConfig) for c in configs):
        raise ValueError("merge_union needs a non-empty list of CompactConfig")
    first = configs[0]
    for c in configs[1:]:
        if (c.num_layers, c.num_heads) != (first.num_layers, first.num_heads):
            raise ValueError(f"merge_union: configs differ in shape: {first.num_layers}x{first.num_heads} vs "
                             f"{c.num_layers}x{c.num_heads} (layers x heads)")
        if (c.grid, c.tile) != (first.grid, first.tile):
            raise ValueError(f"merge_union: configs were searched on different grids/tiles: "
                             f"{first.grid}/{first.tile} vs {c.grid}/{c.tile}")
        if c.model and first.model and c.model != first.model:
            raise ValueError(f"merge_union: configs are for different models: {first.model!r} vs {c.model!r}")
    pats = []
    for li in range(first.num_layers):
        row = []
        for h in range(first.num_heads):
            p = first.patterns[li][h]
            for c in configs[1:]:
                p = p.union(c.patterns[li][h])
            row.append(p)
        pats.append(tuple(row))
    same = lambda name: getattr(first, name) if all(getattr(c, name) == getattr(first, name) for c in configs) else None  # noqa: E731
    model = next((c.model for c in configs if c.model), "")
    return CompactConfig(tuple(pats), model=model, grid=first.grid, tile=first.tile, tau=same("tau"),
                         lam=same("lam"), cache_size=first.cache_size)
