"""Procedural training videos for the embedded DiT: coloured shapes moving over simple textures.

Every sample is one shape (square, circle or triangle) of one colour that moves left / right / up /
down or bounces off the walls, over a static background texture (plain, checkerboard, stripes or a
gradient), together with a prompt that says so, e.g. ``"a red square moving left"`` or
``"a blue circle bouncing on a checkerboard"``.

Sampling is split in two so that data is deterministic by seed and cheap on a GPU:

* :func:`sample_scenes` draws the scene parameters of a batch on the CPU from a
  ``torch.Generator`` (the only source of randomness);
* :func:`render` turns them into videos with plain tensor arithmetic on any device (no Python loop
  over pixels or frames), so a training step on a GPU never waits for data.

Video layout everywhere: ``[batch, 3, frames, height, width]`` float32 in ``[-1, 1]`` (RGB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "COLORS",
    "SHAPES",
    "MOTIONS",
    "TEXTURES",
    "VOCAB",
    "Scenes",
    "sample_scenes",
    "scenes_from_prompt",
    "prompt_parts",
    "render",
    "make_batch",
    "prompt_of",
]

#: name -> RGB in [0, 1]; bright, so shapes stand out on the darker textures
COLORS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.7, 0.2, 0.9),
    "orange": (1.0, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ("square", "circle", "triangle")
#: motion name -> unit direction (dx, dy) in pixels per frame (image y grows downwards); None = bounce
MOTIONS = {
    "moving left": (-1.0, 0.0),
    "moving right": (1.0, 0.0),
    "moving up": (0.0, -1.0),
    "moving down": (0.0, 1.0),
    "bouncing": None,
}
#: texture name -> the words the prompt uses for it
TEXTURES = {
    "plain": "on a plain background",
    "checkerboard": "on a checkerboard",
    "stripes": "on stripes",
    "gradient": "on a gradient",
}

#: per motion (in ``MOTIONS`` order): whether it bounces off the walls
_BOUNCES = tuple(d is None for d in MOTIONS.values())

#: every word a prompt may contain; index 0 is padding (also the "empty prompt" of guidance)
VOCAB: Tuple[str, ...] = tuple(
    ["<pad>", "a", "an", "on", "background"]
    + list(COLORS)
    + list(SHAPES)
    + sorted({w for m in MOTIONS for w in m.split()})
    + sorted({w for t in TEXTURES.values() for w in t.split()} - {"a", "on", "background"})
)


@dataclass(frozen=True)
class Scenes:
    """Parameters of a batch of scenes (all tensors on the CPU, first dim = batch).

    Attributes:
        color: int64 [B] index into ``COLORS``; shape: int64 [B] index into ``SHAPES``;
        motion: int64 [B] index into ``MOTIONS``; texture: int64 [B] index into ``TEXTURES``;
        say_texture: bool [B] whether the prompt names the texture;
        radius: float [B] half-size of the shape in pixels;
        start: float [B, 2] (x, y) centre in the first frame, pixels;
        velocity: float [B, 2] (dx, dy) pixels per frame;
        bg: float [B, 2, 3] the two RGB colours of the texture;
        period: float [B] checker / stripe period in pixels; angle: float [B] stripe / gradient angle.
    """

    color: torch.Tensor
    shape: torch.Tensor
    motion: torch.Tensor
    texture: torch.Tensor
    say_texture: torch.Tensor
    radius: torch.Tensor
    start: torch.Tensor
    velocity: torch.Tensor
    bg: torch.Tensor
    period: torch.Tensor
    angle: torch.Tensor

    def __len__(self) -> int:
        return int(self.color.shape[0])


def _check_size(frames: int, height: int, width: int) -> None:
    for name, val in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"video {name} must be a positive int, got {val!r}")
    if min(height, width) < 16:
        raise ValueError(f"video height and width must be >= 16 pixels, got {height}x{width}")


def sample_scenes(batch: int, generator: torch.Generator, frames: int = 16, height: int = 48,
                  width: int = 48, *, color: Optional[int] = None, shape: Optional[int] = None,
                  motion: Optional[int] = None, texture: Optional[int] = None,
                  say_texture: Optional[bool] = None) -> Scenes:
    """Draw ``batch`` random scenes; any of color / shape / motion / texture may be fixed.

    Straight motions start where the shape stays fully inside the frame for all ``frames`` frames.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    _check_size(frames, height, width)
    g = generator

    def pick(n_choices: int, fixed: Optional[int], what: str) -> torch.Tensor:
        if fixed is None:
            return torch.randint(0, n_choices, (batch,), generator=g)
        if not 0 <= fixed < n_choices:
            raise ValueError(f"{what} index {fixed} out of range [0, {n_choices})")
        return torch.full((batch,), fixed, dtype=torch.int64)

    def unif(lo, hi, *shape) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    c = pick(len(COLORS), color, "color")
    s = pick(len(SHAPES), shape, "shape")
    m = pick(len(MOTIONS), motion, "motion")
    t = pick(len(TEXTURES), texture, "texture")
    say = torch.rand(batch, generator=g) < 0.5 if say_texture is None else torch.full((batch,), bool(say_texture))
    small = min(height, width)
    radius = unif(0.12 * small, 0.2 * small, batch)
    span = max(frames - 1, 1)
    speed_max = torch.minimum(torch.full((batch,), 2.0), (small - 2 * radius - 2) / span)
    speed = unif(0.5, 1.0, batch) * speed_max.clamp(min=0.0)
    dirs = torch.tensor([d if d is not None else (0.0, 0.0) for d in MOTIONS.values()])[m]
    bounce = torch.tensor(_BOUNCES)[m]
    # straight motion: choose the start so the whole path stays inside the frame
    size = torch.tensor([float(width), float(height)])
    lo = radius.unsqueeze(1) + 1 - torch.clamp(dirs, max=0) * speed.unsqueeze(1) * span
    hi = size - radius.unsqueeze(1) - 1 - torch.clamp(dirs, min=0) * speed.unsqueeze(1) * span
    start = lo + (hi - lo).clamp(min=0) * torch.rand(batch, 2, generator=g)
    velocity = dirs * speed.unsqueeze(1)
    # bouncing: random diagonal direction, faster, reflected at the walls by render()
    ang = unif(0.0, 2 * math.pi, batch)
    bspeed = unif(1.5, 3.0, batch)
    bvel = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * bspeed.unsqueeze(1)
    bstart = radius.unsqueeze(1) + 1 + (size - 2 * radius.unsqueeze(1) - 2) * torch.rand(batch, 2, generator=g)
    start = torch.where(bounce.unsqueeze(1), bstart, start)
    velocity = torch.where(bounce.unsqueeze(1), bvel, velocity)
    # dark, low-contrast textures so the bright shape is the subject
    base = unif(0.05, 0.4, batch, 1, 3)
    bg = torch.cat([base, (base + unif(-0.25, 0.25, batch, 1, 3)).clamp(0.0, 0.5)], 1)
    return Scenes(color=c, shape=s, motion=m, texture=t, say_texture=say, radius=radius, start=start,
                  velocity=velocity, bg=bg, period=unif(6.0, 14.0, batch), angle=unif(0.0, math.pi, batch))


def prompt_of(scenes: Scenes) -> List[str]:
    """The prompt of every scene, e.g. ``"a red square moving left on stripes"``."""
    colors, motions, textures = list(COLORS), list(MOTIONS), list(TEXTURES.values())
    out = []
    for c, s, m, t, say in zip(scenes.color.tolist(), scenes.shape.tolist(), scenes.motion.tolist(),
                               scenes.texture.tolist(), scenes.say_texture.tolist()):
        color = colors[c]
        words = ["an" if color[0] in "aeiou" else "a", color, SHAPES[s], motions[m]]
        if say:
            words.append(textures[t])
        out.append(" ".join(words))
    return out


def prompt_parts(prompt: str) -> dict:
    """Indices of what a prompt of the data's grammar names: ``{"color", "shape", "motion", "texture"}``
    into ``COLORS`` / ``SHAPES`` / ``MOTIONS`` / ``TEXTURES`` (None where it names none)."""
    text = " ".join(prompt.lower().split())

    def find(names: Sequence[str], what: str) -> Optional[int]:
        hits = [i for i, n in enumerate(names) if f" {n} " in f" {text} "]
        if len(hits) > 1:
            raise ValueError(f"prompt {prompt!r} names more than one {what}")
        return hits[0] if hits else None

    return {"color": find(list(COLORS), "colour"), "shape": find(SHAPES, "shape"),
            "motion": find(list(MOTIONS), "motion"), "texture": find(list(TEXTURES.values()), "texture")}


def scenes_from_prompt(prompt: str, batch: int, generator: torch.Generator, frames: int = 16,
                       height: int = 48, width: int = 48) -> Scenes:
    """Random scenes that match a prompt of the data's grammar (what the prompt leaves open is random)."""
    parts = prompt_parts(prompt)
    return sample_scenes(batch, generator, frames, height, width, color=parts["color"], shape=parts["shape"],
                         motion=parts["motion"], texture=parts["texture"], say_texture=parts["texture"] is not None)


def _triangle_wave(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect x into [lo, hi] as a ball bouncing between two walls would move."""
    span = (hi - lo).clamp(min=1e-6)
    y = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(y > span, 2 * span - y, y)


def render(scenes: Scenes, frames: int = 16, height: int = 48, width: int = 48, device="cpu") -> torch.Tensor:
    """Videos ``[B, 3, frames, height, width]`` float32 in ``[-1, 1]`` for the given scenes.

    Shapes have a one-pixel soft edge (coverage from a signed distance), so the videos are smooth
    enough for a small model to learn.
    """
    _check_size(frames, height, width)
    dev = torch.device(device)
    B = len(scenes)
    sc = {k: getattr(scenes, k).to(dev) for k in Scenes.__dataclass_fields__}
    y = torch.arange(height, device=dev, dtype=torch.float32).view(1, 1, -1, 1) + 0.5
    x = torch.arange(width, device=dev, dtype=torch.float32).view(1, 1, 1, -1) + 0.5
    tt = torch.arange(frames, device=dev, dtype=torch.float32).view(1, -1)

    # background [B, 1, H, W] blend weight between the two texture colours
    ang = sc["angle"].view(B, 1, 1, 1)
    period = sc["period"].view(B, 1, 1, 1)
    u = x * torch.cos(ang) + y * torch.sin(ang)
    checker = ((torch.floor(x / period) + torch.floor(y / period)) % 2).expand(B, 1, height, width)
    stripes = (torch.floor(u / period) % 2).expand(B, 1, height, width)
    # gradient: u normalised to [0, 1] between the image corners with the lowest and highest u
    cs, sn = torch.cos(ang), torch.sin(ang)
    u_lo = torch.clamp(cs, max=0) * width + torch.clamp(sn, max=0) * height
    u_hi = torch.clamp(cs, min=0) * width + torch.clamp(sn, min=0) * height
    gradient = ((u - u_lo) / (u_hi - u_lo).clamp(min=1e-6)).clamp(0, 1).expand(B, 1, height, width)
    plain = torch.zeros(B, 1, height, width, device=dev)
    kinds = torch.stack([plain, checker, stripes, gradient], 0)  # order of TEXTURES
    w = kinds[sc["texture"], torch.arange(B, device=dev)]  # [B, 1, H, W]
    bg0 = sc["bg"][:, 0].view(B, 3, 1, 1)
    bg1 = sc["bg"][:, 1].view(B, 3, 1, 1)
    background = (bg0 * (1 - w) + bg1 * w).unsqueeze(2)  # [B, 3, 1, H, W]

    # shape centres per frame [B, T]
    r = sc["radius"].view(B, 1)
    cx = sc["start"][:, 0:1] + sc["velocity"][:, 0:1] * tt
    cy = sc["start"][:, 1:2] + sc["velocity"][:, 1:2] * tt
    bounce = torch.tensor(_BOUNCES, device=dev)[sc["motion"]].view(B, 1)
    cx = torch.where(bounce, _triangle_wave(cx, r, width - r), cx)
    cy = torch.where(bounce, _triangle_wave(cy, r, height - r), cy)
    dx = x - cx.view(B, frames, 1, 1)  # [B, T, H, W]
    dy = y - cy.view(B, frames, 1, 1)
    rr = r.view(B, 1, 1, 1)
    # signed distances (negative inside), one per shape kind
    sq = torch.maximum(dx.abs(), dy.abs()) - rr * 0.9
    ci = torch.sqrt(dx * dx + dy * dy) - rr
    # upward triangle, apex at cy - r, base at cy + r, base half-width r: distance to its three edges
    edge = (dx.abs() * 2 - (dy + rr)) / math.sqrt(5.0)
    tr = torch.maximum(torch.maximum(edge, dy - rr), -dy - rr)
    sdf = torch.stack([sq, ci, tr], 0)[sc["shape"], torch.arange(B, device=dev)]
    cover = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)  # [B, 1, T, H, W]
    color = torch.tensor(list(COLORS.values()), device=dev)[sc["color"]].view(B, 3, 1, 1, 1)
    video = background * (1 - cover) + color * cover
    return video * 2 - 1


def make_batch(batch: int, generator: torch.Generator, frames: int = 16, height: int = 48, width: int = 48,
               device="cpu") -> Tuple[torch.Tensor, List[str]]:
    """Random videos ``[B, 3, frames, height, width]`` in ``[-1, 1]`` and their prompts."""
    scenes = sample_scenes(batch, generator, frames, height, width)
    return render(scenes, frames, height, width, device), prompt_of(scenes)
