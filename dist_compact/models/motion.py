"""Does a clip move as its prompt says?  Track the prompted object and score its trajectory.

The embedded model's prompts name a colour, a shape and a motion (``moving left / right / up /
down`` or ``bouncing``; :mod:`dist_compact.models.data`). The object is tracked by colour: per frame,
every pixel gets the weight ``clamp(1 - |rgb - colour| / colour_tol, 0, 1)`` (RGB in [0, 1]; the
palette's colours are >= 0.36 apart and the backgrounds are dark, so only the object scores), and
the object's position is the weighted centroid, its area the summed weight.

A clip *follows its prompt* when all of these hold (pixels and frames of the clip):

* **visible**: the object's area is >= ``min_area`` px in every frame (a vanished or wrongly
  coloured object fails);
* **smooth**: no teleport: every per-frame step is <= ``max_step`` px and <= ``jump_ratio`` times the
  median step + ``jump_slack`` px (the data moves at <= 3 px/frame and never jumps);
* **direction**, straight motions with unit direction ``u``: the net displacement along ``u`` is
  >= ``min_travel`` px, the displacement across ``u`` is <= ``max_across`` times that, and
  >= ``min_monotone`` of the per-frame steps go along ``u`` (so "moving left" that drifts right
  and back fails);
* **direction**, bouncing: the object keeps moving: median speed >= ``min_speed`` px/frame and
  >= ``min_monotone`` of the steps are >= half the median speed (a reflection shortens one step).

:func:`score_clips` returns one :class:`MotionScore` per clip with these verdicts and the numbers behind
them (travel, worst step, jerk = mean |second difference| / mean speed); :func:`summarize` gives the
shares of a list of scores. The training data scores 100% (tests/models/test_motion.py).

:func:`direction_probe` is a cheap proxy for the direction verdict that needs no sampling: one guided
forward at a high noise level, scored on the clean video the model predicts there (where a flow model
decides the layout of the clip). Training logs it at every validation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .data import COLORS, MOTIONS, prompt_parts

__all__ = ["MotionCriteria", "MotionScore", "track", "score_track", "score_clips", "summarize", "DIRECTIONS",
           "direction_probe"]


@dataclass(frozen=True)
class MotionCriteria:
    """Thresholds of "follows the prompt" (see the module doc); pixels, per frame."""

    colour_tol: float = 0.3
    min_area: float = 12.0
    max_step: float = 6.0
    jump_ratio: float = 3.0
    jump_slack: float = 1.5
    min_travel: float = 4.0
    max_across: float = 0.5
    min_monotone: float = 0.75
    min_speed: float = 0.75


@dataclass(frozen=True)
class MotionScore:
    """Verdicts and measurements of one clip (see the module doc)."""

    motion: str
    follows: bool
    visible: bool
    smooth: bool
    direction: bool
    travel: float  # px along the prompted direction (bouncing: path length)
    across: float  # px across it (bouncing: 0)
    max_step: float  # px, the largest per-frame step
    median_speed: float  # px / frame
    jerk: float  # mean |second difference| / mean speed (0 for constant velocity)
    min_area: float  # px, the smallest per-frame object area

    def as_dict(self) -> dict:
        return asdict(self)


def track(video: torch.Tensor, rgb: Sequence[float], colour_tol: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centroid ``[B, T, 2]`` (x, y, pixel centres at +0.5) and area ``[B, T]`` of one colour.

    video: ``[B, 3, T, H, W]`` in ``[-1, 1]`` (the data's and the sampler's range); rgb: the colour in
    [0, 1]. Frames where the colour is absent get the frame centre and area 0.
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be [batch, 3, frames, height, width], got {got}")
    v = (video.detach().float().cpu() + 1) / 2
    col = torch.tensor([float(c) for c in rgb]).view(1, 3, 1, 1, 1)
    w = (1 - (v - col).norm(dim=1) / colour_tol).clamp(min=0.0)  # [B, T, H, W]
    H, W = w.shape[-2:]
    ys = torch.arange(H, dtype=torch.float32).view(H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float32).view(1, W) + 0.5
    area = w.sum((-2, -1))
    n = area.clamp(min=1e-6)
    cx = torch.where(area > 0, (w * xs).sum((-2, -1)) / n, torch.full_like(area, W / 2))
    cy = torch.where(area > 0, (w * ys).sum((-2, -1)) / n, torch.full_like(area, H / 2))
    return torch.stack([cx, cy], -1), area


def _along_across(centroid: torch.Tensor, u: torch.Tensor) -> Tuple[float, float]:
    """Net displacement of a track ``[T, 2]`` from its first to its last frame along the unit direction
    ``u`` (signed) and across it (unsigned), px."""
    net = centroid[-1] - centroid[0]
    return float(net @ u), float(abs(net[0] * u[1] - net[1] * u[0]))


def score_track(centroid: torch.Tensor, area: torch.Tensor, motion: str,
                criteria: MotionCriteria = MotionCriteria()) -> MotionScore:
    """Score one trajectory: ``centroid [T, 2]``, ``area [T]``, the prompted ``motion`` (a MOTIONS key)."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r} is not one of {list(MOTIONS)}")
    if centroid.dim() != 2 or centroid.shape[1] != 2 or centroid.shape[0] < 3 or area.shape != centroid.shape[:1]:
        raise ValueError(f"centroid must be [frames >= 3, 2] and area [frames], got {tuple(centroid.shape)}, "
                         f"{tuple(area.shape)}")
    c = criteria
    steps = centroid[1:] - centroid[:-1]  # [T-1, 2]
    speed = steps.norm(dim=1)
    med = float(speed.median())
    worst = float(speed.max())
    visible = bool((area >= c.min_area).all())
    smooth = visible and worst <= c.max_step and worst <= c.jump_ratio * med + c.jump_slack
    jerk = float((steps[1:] - steps[:-1]).norm(dim=1).mean() / speed.mean().clamp(min=1e-6))
    d = MOTIONS[motion]
    if d is None:
        travel, across = float(speed.sum()), 0.0
        direction = med >= c.min_speed and float((speed >= 0.5 * med).float().mean()) >= c.min_monotone
    else:
        u = torch.tensor(d, dtype=torch.float32)
        travel, across = _along_across(centroid, u)
        along_steps = steps @ u
        direction = (travel >= c.min_travel and across <= c.max_across * travel
                     and float((along_steps > 0).float().mean()) >= c.min_monotone)
    direction = visible and direction
    return MotionScore(motion=motion, follows=bool(visible and smooth and direction), visible=visible,
                       smooth=bool(smooth), direction=bool(direction), travel=travel, across=across,
                       max_step=worst, median_speed=med, jerk=jerk, min_area=float(area.min()))


def score_clips(videos: torch.Tensor, prompts: Sequence[str],
                criteria: MotionCriteria = MotionCriteria()) -> List[MotionScore]:
    """One :class:`MotionScore` per clip of ``videos [B, 3, T, H, W]`` (in [-1, 1]) for its prompt.

    Every prompt must name a colour and a motion of the data's grammar.
    """
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")
    out = []
    for b, prompt in enumerate(prompts):
        parts = prompt_parts(prompt)
        if parts["color"] is None or parts["motion"] is None:
            raise ValueError(f"prompt {prompt!r} must name a colour and a motion to be scored")
        colour, motion = list(COLORS)[parts["color"]], list(MOTIONS)[parts["motion"]]
        cen, area = track(videos[b:b + 1], COLORS[colour], criteria.colour_tol)
        out.append(score_track(cen[0], area[0], motion, criteria))
    return out


def summarize(scores: Sequence[MotionScore]) -> Dict[str, float]:
    """Shares (in %) of clips that follow / are visible / smooth / go the right way, and medians."""
    if not scores:
        raise ValueError("summarize: no scores")
    n = len(scores)

    def pct(key):
        return 100.0 * sum(bool(getattr(s, key)) for s in scores) / n

    def median(key):
        return float(torch.tensor([getattr(s, key) for s in scores]).median())

    return {"clips": n, "follows_pct": pct("follows"), "direction_pct": pct("direction"),
            "smooth_pct": pct("smooth"), "visible_pct": pct("visible"), "median_max_step": median("max_step"),
            "median_jerk": median("jerk"), "median_travel": median("travel")}


#: the straight motions, whose sign the direction probe checks
DIRECTIONS = tuple(m for m, d in MOTIONS.items() if d is not None)


def direction_probe(velocity, tokenizer, frames: int, height: int, width: int, *, t: float = 0.9,
                    guidance: float = 4.0, seeds: Sequence[int] = (0, 1), colours: Sequence[str] = ("red", "cyan"),
                    min_travel: float = 2.0, device="cpu", dtype=torch.float32) -> Dict[str, object]:
    """Does the model's clean-video prediction at noise level ``t`` move the object the prompted way?

    For every colour x straight motion x seed, ``"a <colour> square <motion>"`` is run once through
    ``velocity(x_t, t, text)`` with classifier-free guidance from the same noise ``x_t`` (``torch.randn``
    of ``[1, 3, frames, height, width]`` seeded by the seed; the same noise for every prompt), the clean
    video is predicted as ``x_t - t v`` (rectified flow: ``v = noise - x0``), the colour is tracked
    (:func:`track`) and the clip counts as going the right way when its net displacement along the
    prompted direction is >= ``min_travel`` px and larger than across it.

    Returns ``{"right_way_pct": share of all clips, "per_motion": {motion: pct}, "axis_pct": share that
    moves more along the prompted axis than across it (either sign), "clips": count}``. A model that reads
    the axis of a motion from the prompt but not its sign scores about 50% right way at a high axis share.
    """
    if not 0.0 < t <= 1.0:
        raise ValueError(f"direction_probe: t must be in (0, 1], got {t}")
    if not seeds or not colours:
        raise ValueError("direction_probe: needs at least one seed and one colour")
    for c in colours:
        if c not in COLORS:
            raise ValueError(f"direction_probe: colour {c!r} is not one of {list(COLORS)}")
    prompts = [(c, m) for c in colours for m in DIRECTIONS]
    text = tokenizer.batch([f"a {c} square {m}" for c, m in prompts]).to(device)
    null = tokenizer.batch([""] * len(prompts)).to(device)
    right = {m: [] for m in DIRECTIONS}
    axis = []
    with torch.no_grad():
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(1, 3, frames, height, width, generator=g)
            x = noise.expand(len(prompts), -1, -1, -1, -1).to(device=device, dtype=dtype)
            tt = torch.full((2 * len(prompts),), float(t), device=device, dtype=dtype)
            v = velocity(torch.cat([x, x]), tt, torch.cat([text, null])).float()
            v_c, v_u = v.chunk(2)
            x0 = (x.float() - t * (v_u + guidance * (v_c - v_u))).clamp(-1, 1).cpu()
            for b, (c, m) in enumerate(prompts):
                cen, _ = track(x0[b:b + 1], COLORS[c])
                along, across = _along_across(cen[0], torch.tensor(MOTIONS[m], dtype=torch.float32))
                right[m].append(along >= min_travel and along > across)
                axis.append(abs(along) >= min_travel and abs(along) > across)
    n = len(axis)
    return {"right_way_pct": 100.0 * sum(sum(v) for v in right.values()) / n,
            "per_motion": {m: 100.0 * sum(v) / len(v) for m, v in right.items()},
            "axis_pct": 100.0 * sum(axis) / n, "clips": n}
