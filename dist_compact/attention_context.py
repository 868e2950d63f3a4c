"""AttentionContext: what every attention layer of a DiT forward needs besides q, k, v.

Every attention entry point in dist_compact has the same signature::

    out = attn(q, k, v, ctx)

with q, k, v this rank's ``[batch, seq_local, heads_local, head_dim]`` tensors in block order and
``ctx`` an :class:`AttentionContext` that the pipeline fills once per transformer forward (the
layout of the latents, the denoising step, the ops of this rank, where statistics go). Model code
only ever calls ``attn(q, k, v, ctx)``; whether that is dense, sparse, Ulysses or ring is decided by
how ``attn`` was built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .attention_ops import AttentionOps
from .layout import VideoLayout

__all__ = ["AttentionContext", "DenseAttention"]


@dataclass
class AttentionContext:
    """Per-forward state shared by all attention layers.

    Attributes:
        layout: the global :class:`VideoLayout` of this forward (latent grid, text tokens, tile).
        step: denoising step index (0-based) of this forward.
        num_steps: total denoising steps of the run (schedules are written for it).
        ops: this rank's :class:`AttentionOps` (single device, or a parallel version).
        stats: optional recorder of densities / timings (see :mod:`dist_compact.stats`), or None.
        scale: softmax scale, default ``head_dim ** -0.5``.
    """

    layout: VideoLayout
    step: int = 0
    num_steps: int = 1
    ops: AttentionOps = field(default_factory=AttentionOps)
    stats: Optional[Any] = None
    scale: Optional[float] = None


class DenseAttention:
    """The dense attention entry point (same signature as the sparse one)."""

    def __init__(self, layer: int = 0):
        self.layer = layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return ctx.ops.dense(q, k, v, ctx.layout, scale=ctx.scale)

    def __repr__(self) -> str:
        return f"DenseAttention(layer={self.layer})"
