"""The embedded tiny text-to-video DiT that the project trains and ships (no downloads needed).

Architecture (a small single-stream HunyuanVideo / Wan-style flow-matching DiT, pixel space):

* video ``[B, 3, F, H, W]`` in ``[-1, 1]`` -> patches ``(pt, ph, pw)`` -> linear -> video tokens
  (raster order ``(frame, row, col)``);
* prompt -> :class:`WordTokenizer` ids ``[B, L]`` -> embedding + learned position -> text tokens,
  joined *after* the video tokens (HunyuanVideo's joint attention: every block attends over text and
  video together);
* conditioning vector = timestep embedding + pooled text embedding; each block is modulated by it
  (adaLN with gates, Wan's shared projection plus a per-block offset);
* q/k RMS norm, 3D RoPE on video tokens (text tokens are not rotated);
* output: velocity ``noise - x0`` of rectified flow (``x_t = (1 - t) x0 + t noise``, ``t = 1`` is
  noise), as Wan and HunyuanVideo.

Attention: like the diffusers models, the model runs on one device in its own token order; each
block's attention is its ``processor`` (default: PyTorch SDPA), and the token stream passes three
hook points: ``stream_in`` (the tokens after embedding), ``rope`` (their rotary tables) and
``stream_out`` (the output tokens). dist_compact's installers
(:func:`dist_compact.integrations.diffusers.sparsify`, through
:class:`~dist_compact.models.adapters.embedded.EmbeddedAdapter`) put the stream in kernel block order
and this rank's shard once per forward at those points and replace the processors. All other ops
are per token, so the order does not change the result. :meth:`EmbeddedDiT.forward_plain` is the
same network with SDPA whatever is installed: used for training (it has gradients) and as the
oracle in tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._util import is_int
from ..cmdline import A_DIRECTORY, NOT_FOUND, file_problem, show_path
from ..layout import VideoLayout
from .data import VOCAB

__all__ = [
    "EmbeddedConfig",
    "EmbeddedDiT",
    "WordTokenizer",
    "RotaryTables",
    "sdpa_attention",
    "WeightsError",
    "DEFAULT_WEIGHTS",
    "WEIGHTS_DIR",
    "shipped_weights",
    "load_embedded",
    "save_embedded",
    "pending_checksum_path",
    "sha256_of",
    "rope_tables",
]

#: the folder of the shipped weights (trained by ``python -m dist_compact.models.train``), each with its checksum
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: the tiny model's weights, the CPU default
DEFAULT_WEIGHTS = WEIGHTS_DIR / "embedded.safetensors"


def shipped_weights(name: str = "embedded") -> Path:
    """The shipped weights of the embedded model called ``name`` (``model.name`` of a config):
    ``"embedded"`` (the tiny CPU default) or ``"embedded-gpu"`` (16 x 128 x 128, 16,384 video tokens)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"embedded model name must be a plain name such as 'embedded', got {name!r}")
    return WEIGHTS_DIR / f"{name}.safetensors"
_FORMAT = "dist_compact.embedded/1"
#: the "format" value in the metadata of an embedded-model weights file
WEIGHTS_FORMAT = _FORMAT


class WeightsError(RuntimeError):
    """The weights file is missing, corrupt (checksum mismatch) or not an embedded-model file."""


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EmbeddedConfig:
    """Hyper-parameters of :class:`EmbeddedDiT` (stored in the weights file's metadata).

    Attributes:
        patch: ``(pt, ph, pw)`` pixels per token along (frame, row, col).
        dim, depth, heads: width, number of blocks, attention heads (``dim // heads`` in 16..128).
        mlp_ratio: hidden width of the MLP in units of ``dim``.
        text_len: prompt tokens (padded / refused beyond); vocab_size: tokenizer vocabulary.
        rope_split: head-dim channels rotated by frame, row, col (even, sum == head_dim).
        rope_theta: RoPE base.
        frames, height, width: the video size it was trained on (pixels).
    """

    patch: Tuple[int, int, int] = (1, 4, 4)
    dim: int = 192
    depth: int = 8
    heads: int = 6
    mlp_ratio: int = 4
    text_len: int = 12
    vocab_size: int = len(VOCAB)
    rope_split: Tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 1000.0
    in_channels: int = 3
    frames: int = 16
    height: int = 48
    width: int = 48

    def __post_init__(self) -> None:
        for name in ("patch", "rope_split"):
            val = getattr(self, name)
            if not isinstance(val, (list, tuple)):
                raise ValueError(f"EmbeddedConfig.{name} must be three ints, got {val!r}")
            object.__setattr__(self, name, tuple(val))
        for name in ("dim", "depth", "heads", "mlp_ratio", "text_len", "vocab_size", "in_channels",
                     "frames", "height", "width"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"EmbeddedConfig.{name} must be a positive int, got {val!r}")
        if len(self.patch) != 3 or not all(is_int(p) and p >= 1 for p in self.patch):
            raise ValueError(f"EmbeddedConfig.patch must be three positive ints, got {self.patch!r}")
        if self.dim % self.heads:
            raise ValueError(f"EmbeddedConfig.dim {self.dim} must be divisible by heads {self.heads}")
        hd = self.dim // self.heads
        if hd not in (16, 32, 64, 128):
            raise ValueError(f"EmbeddedConfig: head_dim {hd} must be one of 16, 32, 64, 128 (kernel sizes)")
        if (len(self.rope_split) != 3 or not all(is_int(s) for s in self.rope_split)
                or any(s % 2 or s < 0 for s in self.rope_split) or sum(self.rope_split) != hd):
            raise ValueError(
                f"EmbeddedConfig.rope_split {self.rope_split} must be three even ints summing to head_dim {hd}"
            )
        theta = self.rope_theta
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 1):
            raise ValueError(f"EmbeddedConfig.rope_theta must be a finite number > 1, got {theta!r}")
        for name, size, p in (("frames", self.frames, self.patch[0]), ("height", self.height, self.patch[1]),
                              ("width", self.width, self.patch[2])):
            if size % p:
                raise ValueError(f"EmbeddedConfig.{name} {size} must be a multiple of the patch size {p}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def forward_flops(self, frames: Optional[int] = None, height: Optional[int] = None,
                      width: Optional[int] = None) -> dict:
        """Matmul FLOPs of one dense forward of one clip (default: the trained size), by part.

        ``attention``: ``4 S^2 dim`` per block (QK^T and PV over all ``S`` video + text tokens);
        ``linear``: ``2 S`` times the block's weights (qkv, proj, MLP) per block, plus the patch embedding
        and the output projection over the video tokens. Norms, RoPE and the modulation are elementwise
        and left out. ``attention_share`` = attention / (attention + linear).
        """
        f, h, w = frames or self.frames, height or self.height, width or self.width
        pt, ph, pw = self.patch
        video = (f // pt) * (h // ph) * (w // pw)
        S = video + self.text_len
        d = self.dim
        attention = self.depth * 4 * S * S * d
        block_weights = 4 * d * d + 2 * self.mlp_ratio * d * d
        linear = self.depth * 2 * S * block_weights + 2 * 2 * video * self.patch_dim * d
        return {"tokens": S, "video_tokens": video, "attention": attention, "linear": linear,
                "attention_share": attention / (attention + linear)}

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch[0] * self.patch[1] * self.patch[2]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EmbeddedConfig":
        """From :meth:`to_json`'s text; anything else is one ``ValueError`` saying what is wrong."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ValueError(f"EmbeddedConfig: the config is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"EmbeddedConfig: the config must be a JSON object of fields, got a {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EmbeddedConfig: unknown fields {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------- text
class WordTokenizer:
    """Word-level tokenizer over the prompt vocabulary of :mod:`dist_compact.models.data`.

    ``encode(prompt)`` -> int64 ``[text_len]``, padded with id 0 (``<pad>``). The empty prompt is all
    padding (the unconditional input of classifier-free guidance). A word outside the vocabulary or
    a prompt longer than ``text_len`` words is an error: the model can only draw what it was taught.
    """

    def __init__(self, text_len: int, vocab: Sequence[str] = VOCAB):
        self.text_len = text_len
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        words = prompt.lower().replace(",", " ").replace(".", " ").split()
        unknown = [w for w in words if w not in self.ids or w == "<pad>"]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r}: the embedded model does not know the word(s) {unknown}; "
                f"its vocabulary is: {' '.join(self.vocab[1:])}"
            )
        if len(words) > self.text_len:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; the embedded model takes at most {self.text_len}")
        ids = [self.ids[w] for w in words] + [0] * (self.text_len - len(words))
        return torch.tensor(ids, dtype=torch.int64)

    def batch(self, prompts: Sequence[str]) -> torch.Tensor:
        """int64 ``[len(prompts), text_len]``."""
        return torch.stack([self.encode(p) for p in prompts])


# ---------------------------------------------------------------------------------------------- rope
def rope_tables(pos: torch.Tensor, split: Sequence[int], theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[N, head_dim // 2]`` float32 for positions ``pos`` int ``[N, 3]`` (frame, row, col).

    Channel pairs ``(2i, 2i+1)`` of the head dim are rotated; the first ``split[0] // 2`` pairs by the
    frame index, the next by the row, the last by the column. Rows with a negative position (text,
    padding) get the identity rotation (cos 1, sin 0).
    """
    angles = []
    for axis, n in enumerate(split):
        half = n // 2
        if half == 0:
            continue
        freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=pos.device) / half)
        angles.append(pos[:, axis:axis + 1].to(torch.float64) * freqs.view(1, -1))
    ang = torch.cat(angles, 1)
    ang = torch.where((pos < 0).any(1, keepdim=True), torch.zeros_like(ang), ang)
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x [B, S, H, D]`` by ``cos, sin [B|1, S, D/2]`` (computed in fp32)."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``t`` in [0, 1] (scaled by 1000 as in DiT / Wan)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().view(-1, 1) * 1000.0 * freqs.view(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention of ``[B, S, heads, head_dim]`` tensors (PyTorch SDPA): the stock processor."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


class RotaryTables(nn.Module):
    """``(cos, sin)`` ``[1, S, head_dim / 2]`` of token positions ``[S, 3]`` (a module: a hook point)."""

    def __init__(self, split: Sequence[int], theta: float):
        super().__init__()
        self.split, self.theta = tuple(split), theta

    def forward(self, pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(pos, self.split, self.theta)
        return cos.unsqueeze(0), sin.unsqueeze(0)


class Block(nn.Module):
    """Joint text+video transformer block: adaLN-modulated attention and MLP with gates.

    ``x [B, S, dim]`` in any token order; ``mod [B, 6, dim]`` the shared modulation of this forward;
    ``cos, sin [B|1, S, head_dim/2]`` in the same token order as ``x``. The attention of
    ``[B, S, heads, head_dim]`` tensors is ``attend`` when given, else :attr:`processor`
    (``processor(q, k, v)``; default :func:`sdpa_attention`; replace with :meth:`set_processor`).
    """

    def __init__(self, cfg: EmbeddedConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        # per-block offset of the shared modulation (Wan2.1 style); small so blocks start near identity
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

        # compiled (pre_attention, post_attention) once compile_pointwise() ran, else None (eager)
        self._compiled = None
        self.processor = sdpa_attention

    def set_processor(self, processor) -> None:
        """Install the attention of this block: ``processor(q, k, v) -> out`` (``[B, S, heads, head_dim]``)."""
        if not callable(processor):
            raise TypeError(f"set_processor: the processor must be callable as processor(q, k, v), got "
                            f"{type(processor).__name__}")
        self.processor = processor

    def pre_attention(self, x, mod, cos, sin):
        """q, k, v ``[B, S, heads, head_dim]`` of ``x`` (modulated norm, projection, q/k norm, RoPE)."""
        B, S, D = x.shape
        shift1, scale1 = (mod[:, 0] + self.modulation[:, 0]), (mod[:, 1] + self.modulation[:, 1])
        h = self.norm1(x) * (1 + scale1.unsqueeze(1)) + shift1.unsqueeze(1)
        q, k, v = self.qkv(h).view(B, S, 3, self.heads, D // self.heads).unbind(2)
        # one dtype for q, k, v: under autocast the norms' fp32 weights would promote q and k to fp32
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        return q, k, v.contiguous()

    def post_attention(self, x, a, mod):
        """The residual update of ``x`` with the attention output ``a [B, S, heads, head_dim]``, then the MLP."""
        B, S, D = x.shape
        m = mod + self.modulation
        gate1, shift2, scale2, gate2 = m[:, 2], m[:, 3], m[:, 4], m[:, 5]
        x = x + gate1.unsqueeze(1) * self.proj(a.reshape(B, S, D))
        h = self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1)
        return x + gate2.unsqueeze(1) * self.mlp(h)

    def forward(self, x, mod, cos, sin, attend=None):
        pre, post = self._compiled or (self.pre_attention, self.post_attention)
        q, k, v = pre(x, mod, cos, sin)
        return post(x, (attend or self.processor)(q, k, v), mod)


# ---------------------------------------------------------------------------------------------- model
class EmbeddedDiT(nn.Module):
    """Tiny text-to-video flow-matching DiT (see the module docstring).

    Attributes:
        config: :class:`EmbeddedConfig`.
        blocks: the transformer blocks; each block's attention is its ``processor``.
        stream_in, rope, stream_out: the hook points of the token stream (module doc).
        tokenizer: :class:`WordTokenizer` for prompts.
    """

    def __init__(self, config: Optional[EmbeddedConfig] = None):
        super().__init__()
        cfg = config or EmbeddedConfig()
        if not isinstance(cfg, EmbeddedConfig):
            raise TypeError(f"config must be an EmbeddedConfig, got {type(cfg).__name__}")
        self.config = cfg
        d = cfg.dim
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.text_embed = nn.Embedding(cfg.vocab_size, d)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.text_len, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pool_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.mod_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, cfg.patch_dim)
        # adaLN-Zero: the residual branches and the output start at zero, so training starts stable
        for m in (self.mod_proj[1], self.final_mod[1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # hook points of the token stream (identities here; installers hook them)
        self.stream_in = nn.Identity()
        self.rope = RotaryTables(cfg.rope_split, cfg.rope_theta)
        self.stream_out = nn.Identity()
        self.tokenizer = WordTokenizer(cfg.text_len)

    def compile_pointwise(self, enabled: bool = True) -> None:
        """Run each block's per-token work (everything but attention) through ``torch.compile``.

        Why: at 16K tokens and width 512 the eager norms, modulation, RoPE (fp32) and gates are ~30
        memory-bound kernels per block, as slow as dense attention itself on a GPU; fused they are a
        few. Attention stays the installed callables (never traced). Compiled on the first call of
        each shape; ``enabled=False`` restores the eager functions.
        """
        for b in self.blocks:
            b._compiled = ((torch.compile(b.pre_attention, dynamic=False),
                            torch.compile(b.post_attention, dynamic=False)) if enabled else None)

    # ------------------------------------------------------------------ shapes
    def grid(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """Token grid (T, H, W) of a video of ``frames x height x width`` pixels."""
        pt, ph, pw = self.config.patch
        for name, size, p in (("frames", frames, pt), ("height", height, ph), ("width", width, pw)):
            if size % p:
                raise ValueError(f"video {name} {size} is not a multiple of the model's patch size {p}")
        return frames // pt, height // ph, width // pw

    def video_layout(self, frames: int, height: int, width: int, tile=(2, 4, 4)) -> VideoLayout:
        """The :class:`VideoLayout` of a video of that pixel size (text tokens after the video)."""
        T, H, W = self.grid(frames, height, width)
        return VideoLayout(T, H, W, tile=tuple(tile), text_tokens=self.config.text_len, text_position="after")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, T*Hp*Wp, C*pt*ph*pw]`` (raster order of the token grid)."""
        B, C, Fr, H, W = x.shape
        pt, ph, pw = self.config.patch
        T, Hp, Wp = self.grid(Fr, H, W)
        x = x.reshape(B, C, T, pt, Hp, ph, Wp, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, T * Hp * Wp, C * pt * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        B = tokens.shape[0]
        pt, ph, pw = self.config.patch
        T, Hp, Wp = self.grid(frames, height, width)
        C = self.config.in_channels
        x = tokens.reshape(B, T, Hp, Wp, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, C, frames, height, width)

    def _check_inputs(self, x, t, text) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [batch, {cfg.in_channels}, frames, height, width], got {got}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"t must be a tensor [batch] = [{B}] of times in [0, 1]")
        if not isinstance(text, torch.Tensor) or text.shape != (B, cfg.text_len) or text.dtype != torch.int64:
            raise ValueError(f"text must be int64 token ids [batch, text_len] = [{B}, {cfg.text_len}]")

    def _embed(self, x, t, text):
        """Model-order tokens ``[B, N + L, dim]`` (video raster, then text) and modulation inputs."""
        dtype = self.patch_embed.weight.dtype
        vid = self.patch_embed(self.patchify(x.to(dtype)))
        txt = self.text_embed(text) + self.text_pos
        keep = (text != 0).to(dtype).unsqueeze(-1)
        pooled = (txt * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        cond = self.time_mlp(timestep_embedding(t, self.config.dim).to(dtype)) + self.pool_mlp(pooled)
        mod = self.mod_proj(cond).view(-1, 6, self.config.dim)
        return torch.cat([vid, txt], dim=1), cond, mod

    def _head(self, h, cond):
        shift, scale = self.final_mod(cond).chunk(2, dim=1)
        return self.final(self.final_norm(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))

    def token_positions(self, frames: int, height: int, width: int, device="cpu") -> torch.Tensor:
        """int64 ``[N + text_len, 3]``: (frame, row, col) of each token in model order (video raster,
        then the text tokens at -1: not rotated)."""
        T, Hp, Wp = self.grid(frames, height, width)
        f = torch.arange(T, device=device).view(T, 1, 1).expand(T, Hp, Wp)
        r = torch.arange(Hp, device=device).view(1, Hp, 1).expand(T, Hp, Wp)
        c = torch.arange(Wp, device=device).view(1, 1, Wp).expand(T, Hp, Wp)
        pos = torch.stack([f, r, c], -1).reshape(-1, 3)
        return torch.cat([pos, torch.full((self.config.text_len, 3), -1, device=device, dtype=pos.dtype)])

    # ------------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, C, F, H, W]`` of video ``x [B, C, F, H, W]`` at times ``t [B]``.

        Args:
            text: int64 ``[B, text_len]`` token ids (:attr:`tokenizer`).
        """
        self._check_inputs(x, t, text)
        B, _, Fr, H, W = x.shape
        seq, cond, mod = self._embed(x, t, text)
        seq = self.stream_in(seq)
        cos, sin = self.rope(self.token_positions(Fr, H, W, x.device))
        for block in self.blocks:
            seq = block(seq, mod, cos, sin)
        out = self.stream_out(self._head(seq, cond))  # model order again: the video tokens, then the text
        return self.unpatchify(out[:, : out.shape[1] - self.config.text_len], Fr, H, W)

    def forward_plain(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The same network with PyTorch SDPA whatever processors and hooks are installed (never
        permutes; differentiable). Used for training and as the oracle of :meth:`forward` in tests."""
        self._check_inputs(x, t, text)
        B, _, Fr, H, W = x.shape
        seq, cond, mod = self._embed(x, t, text)
        cos, sin = rope_tables(self.token_positions(Fr, H, W, x.device), self.config.rope_split,
                               self.config.rope_theta)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        for block in self.blocks:
            seq = block(seq, mod, cos, sin, sdpa_attention)
        out = self._head(seq, cond)
        return self.unpatchify(out[:, : out.shape[1] - self.config.text_len], Fr, H, W)


# ---------------------------------------------------------------------------------------------- weights
def safetensors_io():
    """``safetensors.torch``, or one ImportError naming the install (the weights file format)."""
    try:
        import safetensors.torch as st
    except ImportError as e:  # not a core dependency
        raise ImportError(
            "reading/writing the embedded model's weights needs the 'safetensors' package: "
            "pip install -e \".[video]\"  (or: pip install safetensors)"
        ) from e
    return st


def sha256_of(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def pending_checksum_path(path: Union[str, os.PathLike]) -> Path:
    """Where a training save (:mod:`dist_compact.models.train`) writes the new checksum of ``path`` before
    renaming it beside the weights: what a save killed between those two renames leaves behind."""
    path = Path(path)
    return path.with_name(f".{path.name}.sha256.tmp")


def _digest_in(path: Path) -> Optional[str]:
    """The sha256 a checksum file names (lower case), or None when it is absent or not one."""
    try:
        words = path.read_bytes()[:4096].decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return words[0].lower() if words and re.fullmatch(r"[0-9a-fA-F]{64}", words[0]) else None


def save_embedded(model: EmbeddedDiT, path: Union[str, os.PathLike], dtype=torch.float32,
                  extra: Optional[dict] = None) -> str:
    """Write ``path`` (safetensors, config in the metadata) and ``path.sha256``; returns the sha256.

    Written to temporary names and renamed, so a reader never sees a half-written pair.
    """
    st = safetensors_io()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": _FORMAT, "config": model.config.to_json()}
    if extra:
        meta["training"] = json.dumps(extra, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    st.save_file(tensors, str(tmp), metadata=meta)
    digest = sha256_of(tmp)
    tmp_sum = tmp.with_name(tmp.name + ".sha256")
    tmp_sum.write_text(f"{digest}  {path.name}\n")
    for f in (tmp, tmp_sum):  # safetensors creates 0600 files; weights are for everyone to read
        os.chmod(f, 0o644)
    os.replace(tmp, path)
    os.replace(tmp_sum, _checksum_path(path))
    return digest


def load_embedded(path: Union[str, os.PathLike, None] = None, device="cpu",
                  dtype: torch.dtype = torch.float32) -> EmbeddedDiT:
    """Load the embedded model; the file's sha256 must equal the one in ``<path>.sha256``.

    Raises:
        WeightsError: file or checksum missing, checksum mismatch, or not an embedded-model file.
        ImportError: the ``safetensors`` package is missing (``pip install -e ".[video]"``).
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    st = safetensors_io()
    sum_path = _checksum_path(path)
    problem = file_problem(path)
    if problem == A_DIRECTORY:
        raise WeightsError(f"{path} is a directory; the embedded model's weights are one .safetensors file (e.g. "
                           f"{path / DEFAULT_WEIGHTS.name}, with its .sha256 beside it)")
    if problem == NOT_FOUND:
        raise WeightsError(f"embedded model weights not found: {path} (train them with "
                           f"`python -m dist_compact.models.train`, or reinstall the package)")
    if problem is not None:
        fix = "" if ";" in problem else "; give the .safetensors file of the weights"
        raise WeightsError(f"model weights {show_path(path)}: {problem}{fix}")
    sum_problem = file_problem(sum_path)
    if sum_problem == NOT_FOUND:
        raise WeightsError(f"checksum file missing for {path}: expected {sum_path}")
    if sum_problem is not None:
        raise WeightsError(f"checksum file {sum_path}: {sum_problem}; it must be a text file "
                           f"'<sha256 hex>  {path.name}'")
    try:
        expected = sum_path.read_bytes()[:4096].decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        expected = []
    if not expected or not re.fullmatch(r"[0-9a-fA-F]{64}", expected[0]):
        raise WeightsError(f"checksum file {sum_path} is malformed (want '<sha256 hex>  {path.name}')")
    try:
        actual = sha256_of(path)
    except OSError as e:
        raise WeightsError(f"cannot read model weights {path}: {e.strerror or e}") from None
    if actual != expected[0].lower():
        pending = pending_checksum_path(path)
        if _digest_in(pending) == actual:  # the weights were renamed into place, their checksum not yet
            raise WeightsError(
                f"checksum mismatch for {path}: a training save stopped between renaming the weights and their "
                f"checksum, which is still {pending.name}; finish it: mv {show_path(pending)} {show_path(sum_path)} "
                "(or continue the training with --resume)"
            )
        raise WeightsError(
            f"checksum mismatch for {path}: sha256 {actual} but {sum_path.name} says {expected[0]}; "
            "the file is corrupt or was replaced without its checksum (re-download / re-train it)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a file with a valid checksum should parse; say which file if not
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise WeightsError(f"{path} is not an embedded-model weights file (metadata format {meta.get('format')!r})")
    redo = "re-train it or re-download the file"
    try:
        cfg = EmbeddedConfig.from_json(meta["config"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: its metadata does not describe a model ({e}); {redo}") from None
    _check_shapes(path, cfg, shapes, redo)
    try:
        tensors = st.load_file(str(path))
    except Exception as e:  # noqa: BLE001 - the same file parsed above; say which file if not
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    model = EmbeddedDiT(cfg)
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _check_shapes(path: Path, cfg: EmbeddedConfig, shapes: dict, redo: str) -> None:
    """The file's tensors (``name -> shape``, read from its header) are the model its metadata
    describes, checked before any tensor is read or any parameter allocated: the block count first
    (a metadata ``depth`` of a billion must not build a billion blocks), then every shape against a
    model built on the meta device (no memory)."""
    blocks = {int(k.split(".")[1]) for k in shapes if re.fullmatch(r"blocks\.[0-9]{1,9}(\..*)?", k)}
    if len(blocks) != cfg.depth:
        raise WeightsError(f"{path}: its metadata describes {cfg.depth} blocks but the file holds tensors of "
                           f"{len(blocks)}; {redo}")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in EmbeddedDiT(cfg).state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    if missing or unexpected:
        raise WeightsError(f"{path}: tensors do not match the model of its metadata (missing {missing[:4]}"
                           f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                           f"{'...' if len(unexpected) > 4 else ''}); {redo}")
    for k, shape in want.items():
        if shapes[k] != shape:
            raise WeightsError(f"{path}: tensor {k} has shape {list(shapes[k])} but the model of its metadata "
                               f"needs {list(shape)}; {redo}")
