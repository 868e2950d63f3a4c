"""Static baselines every searched pattern must beat, as pattern objects of the Compact modes.

Both have ``index_for(layer, layout, num_heads) -> BlockIndex`` (global ``[1, H, NB, NB]``), so they
run through ``SparseAttention`` in ``mode: compact`` exactly as a searched Compact config does:

* :func:`window_for_density`: one fixed 3D window around each query tile, the same for every layer
  and head (sliding-tile attention's pattern, as in STA): the window of the tile grid whose density
  is nearest a target;
* :class:`RandomBlocks`: every query row keeps the same number of key blocks drawn at random (a floor:
  a method that does not beat it has found no structure).

Both keep the text sink (text rows see every block, every row sees the text blocks), as the searched
patterns do, so densities compare like for like.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .._util import is_int
from ..block_index import BlockIndex
from ..layout import VideoLayout
from .compact import CompactConfig, HeadPattern, real_tile_grid

__all__ = ["window_for_density", "window_density", "video_density", "RandomBlocks"]


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def video_density(mask: torch.Tensor, layout: VideoLayout) -> float:
    """Kept share of (real video query block, real video key block) pairs of a ``[.., NB, NB]`` mask."""
    valid = (layout.block_valid() > 0) & ~layout.is_text_block()
    sub = mask[..., valid, :][..., :, valid]
    return float(sub.float().mean())


def window_density(pattern: HeadPattern, layout: VideoLayout) -> float:
    """Density of one head's pattern over the video blocks of ``layout`` (text excluded)."""
    cfg = CompactConfig.uniform(1, 1, pattern)
    return video_density(cfg.block_mask(0, layout)[0, 0], layout)


def window_for_density(layout: VideoLayout, num_layers: int, num_heads: int, density: float,
                       model: str = "") -> Tuple[CompactConfig, float]:
    """The fixed window (same for every layer and head) whose video density is nearest ``density``.

    Searched over every half-extent ``(slabs, rows, cols)`` of the layout's tile grid; among those
    within 15% of the target the one closest to a cube in tiles wins (sliding-tile attention's shape),
    else the nearest. Returns the config and its density.
    """
    density = _check_density(density)
    nt, nh, nw = real_tile_grid(layout)
    found = []
    for dt in range(nt):
        for r in range(nh):
            for c in range(nw):
                pat = HeadPattern.window(r, c, max_distance=dt)
                found.append((window_density(pat, layout), max(dt, r, c) - min(dt, r, c), pat))
    # the grid is coarse: among windows within 15% of the target take the most cube-like, then the nearest
    near = [f for f in found if abs(f[0] - density) <= 0.15 * density]
    d, _, pat = min(near, key=lambda f: (f[1], abs(f[0] - density))) if near else \
        min(found, key=lambda f: abs(f[0] - density))
    return CompactConfig.uniform(num_layers, num_heads, pat, model=model), d


class RandomBlocks:
    """Random key blocks: every real video query row keeps ``round(density * n)`` of its ``n`` real
    video key blocks, drawn independently per (layer, head, row) from ``seed``; text sink kept.

    Args:
        density: share of video key blocks per row, in (0, 1].
        num_layers, num_heads: the model's (checked at :meth:`index_for`).
        seed: the draws are a function of (seed, layer, layout), so every rank and run agrees.
    """

    def __init__(self, density: float, num_layers: int, num_heads: int, seed: int = 0):
        self.density = _check_density(density)
        for name, v in (("num_layers", num_layers), ("num_heads", num_heads)):
            if not is_int(v) or v < 1:
                raise ValueError(f"RandomBlocks.{name} must be an int >= 1, got {v!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"RandomBlocks.seed must be an int >= 0, got {seed!r}")
        self.num_layers, self.num_heads, self.seed = num_layers, num_heads, seed
        self._cache: Dict = {}

    def block_mask(self, layer: int, layout: VideoLayout) -> torch.Tensor:
        """bool ``[1, H, NB, NB]`` of ``layer`` (global key numbering)."""
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        NB, H = layout.num_blocks, self.num_heads
        nonempty = layout.block_valid() > 0
        text = layout.is_text_block()
        video = nonempty & ~text
        vid = torch.nonzero(video).flatten()
        n = vid.numel()
        k = max(1, round(self.density * n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        # k smallest of uniform scores per row = k blocks drawn without replacement
        scores = torch.rand(H, n, n, generator=g)
        pick = scores.argsort(-1)[..., :k]
        sub = torch.zeros(H, n, n, dtype=torch.bool).scatter_(-1, pick, True)
        mask = torch.zeros(1, H, NB, NB, dtype=torch.bool)
        mask[0][:, vid.view(-1, 1), vid.view(1, -1)] = sub
        mask[0, :, text] |= nonempty
        mask[0, :, :, text] |= nonempty.view(-1, 1)
        return mask

    def index_for(self, layer: int, layout: VideoLayout, num_heads: int, device=None) -> BlockIndex:
        if num_heads != self.num_heads:
            raise ValueError(f"RandomBlocks was made for {self.num_heads} heads, the model asks for {num_heads}")
        key = (layer, layout)
        if key not in self._cache:
            self._cache[key] = BlockIndex.from_dense(self.block_mask(layer, layout), layout.block_size)
        idx = self._cache[key]
        return idx if device is None else idx.to(device)

    def __repr__(self) -> str:
        return f"RandomBlocks(density={self.density}, layers={self.num_layers}, heads={self.num_heads}, seed={self.seed})"
