"""The attention entry point: :class:`AttentionContext` (what a layer gets besides q, k, v) and
:class:`AttentionLayer` (what a layer declares to the sequence-parallel plan that wraps it).

Every attention entry point in dist_compact has the same signature::

    out = attn(q, k, v, ctx)

with q, k, v this rank's ``[batch, seq_local, heads_local, head_dim]`` tensors in block order and
``ctx`` an :class:`AttentionContext` that the pipeline fills once per transformer forward (the
layout of the latents, the denoising step, the ops of this rank, where statistics go). Model code
only ever calls ``attn(q, k, v, ctx)``; whether that is dense, sparse, Ulysses or ring is decided by
how ``attn`` was built.

The protocol between an attention layer and the parallel layer (:mod:`dist_compact.parallel.plan`)
is :class:`AttentionLayer`, nothing else: its layer number and static pattern (the plan balances
shards and heads from :meth:`AttentionLayer.static_index`), and the export / import of its cached
online state (:meth:`~AttentionLayer.export_online`, :meth:`~AttentionLayer.import_online`: a
head-balanced plan moves the searched index and LSE to the heads' new ranks). The ops side of the
protocol is :class:`~dist_compact.sparsity.attention_ops.AttentionOps` (``head_order`` included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..block_index import BlockIndex
from ..layout import VideoLayout
from .attention_ops import AttentionOps
from .online import OnlineSearchResult

__all__ = ["AttentionContext", "AttentionLayer", "OnlineState", "DenseAttention"]


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


@dataclass(frozen=True)
class OnlineState:
    """A layer's cached online-search state, held for this rank's heads (what a head re-plan moves).

    Attributes:
        search: the last search result: ``index`` localized to this rank's heads and rows; the
            per-head ``density`` / ``recall`` / ``budget`` of ALL heads, in the plan's head order.
        lse: the LSE ``[B, local heads, local tokens]`` kept for a later cached search, or None.
        static: the localized static (Compact) index the layer unites with the searched one, or None.
    """

    search: OnlineSearchResult
    lse: Optional[torch.Tensor] = None
    static: Optional[BlockIndex] = None


class AttentionLayer:
    """The attention callable of one layer, ``out = attn(q, k, v, ctx)``, and what it declares to the
    sequence-parallel plan that wraps it (the module doc). Subclasses implement :meth:`__call__`;
    the defaults are those of a layer without a static pattern or an online state.

    Attributes:
        layer: the layer number (None: not known).
        compact: the static pattern of the layer, an object with ``index_for(layer, layout,
            num_heads) -> BlockIndex`` (``[1, H, NB, NB]``, global) and optionally ``num_heads``;
            None: no static pattern.
    """

    layer: Optional[int] = None
    compact: Any = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def static_index(self, layout: VideoLayout, num_heads: Optional[int] = None) -> Optional[BlockIndex]:
        """The static global index of this layer for ``layout``, or None.

        ``num_heads`` None = the pattern's own ``num_heads`` (before the first call the head count
        of q, k, v is not known); None when the pattern does not say. Online (AdaSpa) indices do not
        exist before their search and are not static.
        """
        if self.compact is None or self.layer is None:
            return None
        if num_heads is None:
            # optional in the pattern protocol: a pattern built for any head count has none
            num_heads = getattr(self.compact, "num_heads", None)
            if not isinstance(num_heads, int):
                return None
        idx = self.compact.index_for(self.layer, layout, num_heads)
        return idx if isinstance(idx, BlockIndex) else None

    def export_online(self) -> Optional[OnlineState]:
        """The cached online state (None: no search result held)."""
        return None

    def import_online(self, state: OnlineState, perm: torch.Tensor) -> None:
        """Adopt a new head assignment of the plan: ``state`` holds the searched index, LSE and static
        index already cut for this rank's new heads; ``perm`` (int64 ``[H]``): new plan position
        ``i`` holds the head at old plan position ``perm[i]`` (the per-head statistics of all heads
        are permuted with it)."""
        raise RuntimeError(f"{type(self).__name__} holds no online state to import")

    def cache_nbytes(self) -> int:
        """Bytes held by the layer's caches (indices, LSE)."""
        return 0


class DenseAttention(AttentionLayer):
    """The dense attention entry point (same signature as the sparse one)."""

    def __init__(self, layer: int = 0):
        self.layer = layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return ctx.ops.dense(q, k, v, ctx.layout, scale=ctx.scale)

    def __repr__(self) -> str:
        return f"DenseAttention(layer={self.layer})"
