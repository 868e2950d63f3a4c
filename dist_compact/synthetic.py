"""Structured synthetic attention: q, k, v whose heads attend like the heads of a video DiT.

For tests and benchmarks of the pattern searches (offline Compact search, online AdaSpa search) without
model weights. Each head's logits ``q . k * scale`` are an exact polynomial of the 3D positions of the
query and key tokens (plus optional random "content" noise), built from positional features:

* ``"local"``    ``-(dt^2/st^2 + du^2/ss^2 + dv^2/ss^2) / 2``: a 3D Gaussian blob around the query;
* ``"cross"``    ``-alpha du^2 dv^2 - (du^2 + dv^2) / (2 arm^2) - dt^2 / (2 st^2)``: the query's tile row
  and tile column (a cross, ``alpha`` sets the arm width), fading along the arms, near in time;
* ``"temporal"`` ``-(du^2 + dv^2) / (2 ss^2)``: the same spatial position in every frame;
* ``"global"``   ``-dt^2 / (2 st^2)``: the whole frame, near in time.

``dt`` is measured in tile slabs and ``du, dv`` in tiles (token distance / tile size), so a head looks
the same at any grid and tile: widths are given in tiles. Text tokens (if the layout has them) get
noise features plus a bias that keeps their logits ``text_bias`` below the video peak.

Usage::

    layout = VideoLayout(12, 16, 16, tile=(1, 4, 4))
    q, k, v = synthetic_qkv(layout, ["local", "cross", "temporal", "global"], head_dim=32)
    # [batch, layout.padded_len, heads, head_dim] in block order, zero at padding positions

Logits come from polynomials of centred positions (degree up to 4 for cross heads): use float32 (the
default) for faithful patterns; half precision blurs them on large grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .layout import VideoLayout

__all__ = ["HEAD_KINDS", "SyntheticHead", "synthetic_qkv", "synthetic_logits", "MIN_HEAD_DIM"]

HEAD_KINDS = ("local", "cross", "temporal", "global")
#: feature dimensions used by the positional terms (3 quadratic axes x 3 + cross 9 + text bias 1)
_POS_DIMS = 19
_TEXT_DIM = _POS_DIMS - 1  # the text-bias feature, after the 18 positional ones
MIN_HEAD_DIM = 32

_DEFAULTS = {
    # kind: (sigma_t slabs, sigma_s tiles, alpha, arm tiles)
    "local": (0.5, 0.5, 0.0, 0.0),
    "cross": (0.5, 0.0, 16.0, 3.0),
    "temporal": (0.0, 0.12, 0.0, 0.0),
    "global": (0.4, 0.0, 0.0, 0.0),
}


@dataclass(frozen=True)
class SyntheticHead:
    """One synthetic head: ``kind`` in :data:`HEAD_KINDS` and its widths (``None``: kind default).

    Args:
        kind: ``"local"``, ``"cross"``, ``"temporal"`` or ``"global"``.
        sigma_t: temporal width in tile slabs (local, cross, global).
        sigma_s: spatial width in tiles (local, temporal).
        alpha: cross sharpness (larger = thinner arms).
        arm: length scale of the cross arms in tiles.
    """

    kind: str
    sigma_t: Optional[float] = None
    sigma_s: Optional[float] = None
    alpha: Optional[float] = None
    arm: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"SyntheticHead.kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        st, ss, al, arm = _DEFAULTS[self.kind]
        for name, default in (("sigma_t", st), ("sigma_s", ss), ("alpha", al), ("arm", arm)):
            v = getattr(self, name)
            v = default if v is None else v
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or not math.isfinite(v):
                raise ValueError(f"SyntheticHead.{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        needs = {"local": ("sigma_t", "sigma_s"), "cross": ("sigma_t", "alpha", "arm"),
                 "temporal": ("sigma_s",), "global": ("sigma_t",)}[self.kind]
        for name in needs:
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticHead({self.kind!r}).{name} must be > 0")

    def coefficients(self) -> Tuple[float, float, float, float]:
        """``(ct, cu, cv, alpha)``: logit = -(ct dt^2 + cu du^2 + cv dv^2) - alpha du^2 dv^2."""
        k = self.kind
        if k == "local":
            c = 0.5 / self.sigma_s ** 2
            return (0.5 / self.sigma_t ** 2, c, c, 0.0)
        if k == "cross":
            c = 0.5 / self.arm ** 2
            return (0.5 / self.sigma_t ** 2, c, c, self.alpha)
        if k == "temporal":
            c = 0.5 / self.sigma_s ** 2
            return (0.0, c, c, 0.0)
        return (0.5 / self.sigma_t ** 2, 0.0, 0.0, 0.0)


def _heads(heads) -> List[SyntheticHead]:
    if isinstance(heads, (str, SyntheticHead)):
        heads = [heads]
    out = [h if isinstance(h, SyntheticHead) else SyntheticHead(h) for h in heads]
    if not out:
        raise ValueError("synthetic attention needs at least one head")
    return out


def _coords(layout: VideoLayout, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-order centred (t, u, v) in (slabs, tiles, tiles) ``[padded_len, 3]`` and the video mask."""
    pos = layout.token_positions()
    video = pos[:, 0] >= 0
    tile = torch.tensor(layout.tile, dtype=torch.float64)
    grid = torch.tensor(layout.grid, dtype=torch.float64)
    # token centre in tile units, centred on the grid so polynomial features stay small
    x = (pos.to(torch.float64) + 0.5 - grid / 2) / tile
    x[~video] = 0
    return x.to(dtype), video


def _features(head: SyntheticHead, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query / key features ``[N, 18]`` with ``fq . fk = logit`` for video tokens (float64)."""
    ct, cu, cv, alpha = head.coefficients()
    c = (1.0, -2.0, 1.0)  # (a - b)^2 = sum_i c_i a^i b^(2-i)
    fq, fk = [], []
    for axis, coef in enumerate((ct, cu, cv)):
        a = x[:, axis]
        s = math.sqrt(coef)  # logit term -coef * (a_q - a_k)^2, split sqrt(coef) on each side
        for i in range(3):
            fq.append(-s * c[i] * a ** i)
            fk.append(s * a ** (2 - i))
    u, v = x[:, 1], x[:, 2]
    s = math.sqrt(alpha)
    for i in range(3):
        for j in range(3):
            fq.append(-s * c[i] * c[j] * u ** i * v ** j)
            fk.append(s * u ** (2 - i) * v ** (2 - j))
    return torch.stack(fq, 1), torch.stack(fk, 1)


def synthetic_logits(layout: VideoLayout, head: Union[str, SyntheticHead]) -> torch.Tensor:
    """float64 ``[padded_len, padded_len]``: the noise-free video-video logits of one head, from positions.

    The analytic formula (not the features), for tests; entries involving text or padding are 0.
    """
    h = _heads([head])[0]
    x, video = _coords(layout, torch.float64)
    ct, cu, cv, alpha = h.coefficients()
    d = x.unsqueeze(1) - x.unsqueeze(0)
    lg = -(ct * d[..., 0] ** 2 + cu * d[..., 1] ** 2 + cv * d[..., 2] ** 2) - alpha * d[..., 1] ** 2 * d[..., 2] ** 2
    return lg * (video.view(-1, 1) & video.view(1, -1))


def synthetic_qkv(
    layout: VideoLayout,
    heads: Sequence[Union[str, SyntheticHead]] = HEAD_KINDS,
    *,
    head_dim: int = 64,
    batch: int = 1,
    noise: float = 0.1,
    text_bias: float = 4.0,
    seed: int = 0,
    scale: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[batch, layout.padded_len, heads, head_dim]`` in block order (padding positions zero).

    Args:
        layout: the video layout (any grid, tile, text tokens, padding slabs).
        heads: one entry per head: a kind in :data:`HEAD_KINDS` or a :class:`SyntheticHead`.
        head_dim: at least :data:`MIN_HEAD_DIM`; dimensions beyond the positional features carry noise.
        noise: standard deviation of the random content part of each logit (0 = exact patterns).
        text_bias: how far text keys sit below the video peak logit.
        seed: random seed (noise, text features and v).
        scale: the softmax scale the attention will use (default ``head_dim ** -0.5``); q and k are
            scaled so that ``q . k * scale`` is the intended logit.
    """
    hs = _heads(heads)
    if not isinstance(head_dim, int) or head_dim < MIN_HEAD_DIM:
        raise ValueError(f"synthetic_qkv: head_dim must be an int >= {MIN_HEAD_DIM}, got {head_dim!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"synthetic_qkv: batch must be an int >= 1, got {batch!r}")
    if noise < 0 or text_bias < 0:
        raise ValueError(f"synthetic_qkv: noise and text_bias must be >= 0, got {noise!r}, {text_bias!r}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if scale <= 0:
        raise ValueError(f"synthetic_qkv: scale must be > 0, got {scale!r}")
    g = torch.Generator().manual_seed(seed)
    x, video = _coords(layout, torch.float64)
    valid = layout.token_valid()
    text = valid & ~video
    N, H, D = layout.padded_len, len(hs), head_dim
    nd = D - _POS_DIMS
    q = torch.zeros(batch, N, H, D, dtype=torch.float64)
    k = torch.zeros(batch, N, H, D, dtype=torch.float64)
    for h, head in enumerate(hs):
        fq, fk = _features(head, x)
        q[:, :, h, :_TEXT_DIM] = fq
        k[:, :, h, :_TEXT_DIM] = fk
        # text keys: logit -text_bias for every video query (the text feature is 1 on video queries)
        q[:, video, h, _TEXT_DIM] = 1.0
        k[:, text, h, _TEXT_DIM] = -text_bias
        q[:, text, h, :_TEXT_DIM] = 0
        k[:, text, h, :_TEXT_DIM] = 0
    if nd > 0 and noise > 0:
        # content part: random directions with logit std `noise`
        std = math.sqrt(noise) / nd ** 0.25
        q[..., _POS_DIMS:] = torch.randn(batch, N, H, nd, generator=g, dtype=torch.float64) * std
        k[..., _POS_DIMS:] = torch.randn(batch, N, H, nd, generator=g, dtype=torch.float64) * std
    v = torch.randn(batch, N, H, D, generator=g, dtype=torch.float64)
    valid = valid.view(1, N, 1, 1)
    root = scale ** -0.5  # q . k * scale = fq . fk
    q, k, v = q * valid * root, k * valid * root, v * valid
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)
