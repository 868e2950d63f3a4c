"""dist_compact's block-sparse op as the local attention of deepspeed's ``DistributedAttention``.

Use (deepspeed >= 0.14)::

    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention
    deepspeed.init_distributed()
    local = DeepSpeedBlockSparse(layout, sp_group, index)            # index: global [1|B, H, nb, nb]
    attn = DistributedAttention(local, sp_group, scatter_idx=2, gather_idx=1)
    out = attn(q_local, k_local, v_local, 0)        # batch_dim_idx=0: [B, S/P, H, D] -> [B, S/P, H, D]

deepspeed's all-to-all gives the local attention the whole sequence (block order of ``layout``,
``padded_len`` tokens, split into P equal chunks by the caller) for a contiguous range of heads:
``H/P`` each, or with a head count not divisible by P the uneven split of
``deepspeed.module_inject.tp_shard.get_shard_size_list`` -- which deepspeed only does when its
``groups.mpu`` is set (:func:`sequence_parallel_mpu` builds one for a plain group). The adapter
picks the same heads of the index and runs :func:`dist_compact.block_sparse_attention`.
deepspeed is imported only when the head split is uneven.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..ops import block_sparse_attention, dense_attention

__all__ = ["DeepSpeedBlockSparse", "sequence_parallel_mpu", "head_split"]


def head_split(num_heads: int, world: int, rank: int) -> Tuple[int, int]:
    """Heads ``[start, stop)`` deepspeed's Ulysses all-to-all gives ``rank`` of ``world``."""
    if num_heads % world == 0:
        h = num_heads // world
        return rank * h, (rank + 1) * h
    from ..extras import require

    tp_shard = require("deepspeed.module_inject.tp_shard", "deepspeed", "an uneven deepspeed head split")
    AutoTPMeta, get_shard_size_list = tp_shard.AutoTPMeta, tp_shard.get_shard_size_list

    sizes = get_shard_size_list(num_heads, world, AutoTPMeta(num_kv_heads=num_heads))
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


class DeepSpeedBlockSparse(torch.nn.Module):
    """Local attention for ``DistributedAttention``: ``forward(q, k, v, *args, **kwargs) -> out``.

    Args:
        layout: global layout; q, k, v handed in are ``[B, layout.padded_len, heads_local, D]``.
        group: the sequence-parallel group given to ``DistributedAttention``.
        index: the layer's global :class:`BlockIndex` (or :meth:`set_index` before each forward);
            ``None`` = dense.
        scale: softmax scale (default ``head_dim ** -0.5``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(self, layout: VideoLayout, group: Optional[dist.ProcessGroup], index: Optional[BlockIndex] = None,
                 scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
        self.layout, self.group, self.scale, self.backend = layout, group, scale, backend
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.index: Optional[BlockIndex] = None
        self._local: Optional[Tuple[BlockIndex, BlockIndex]] = None
        if index is not None:
            self.set_index(index)

    def set_index(self, index: Optional[BlockIndex]) -> None:
        nb = self.layout.num_blocks
        if index is not None and (not isinstance(index, BlockIndex) or index.num_q_blocks != nb
                                  or index.num_k_blocks != nb):
            raise ValueError(f"set_index: expected a global BlockIndex of {nb} x {nb} blocks, got {index!r}")
        self.index = index

    def _index_for(self, heads_local: int, device) -> BlockIndex:
        idx = self.index
        if self._local is not None and self._local[0] is idx:
            return self._local[1]
        h0, h1 = head_split(idx.num_heads, self.world, self.rank)
        if h1 - h0 != heads_local:
            raise ValueError(f"deepspeed gave {heads_local} heads but the index's {idx.num_heads} heads split over "
                             f"{self.world} ranks give rank {self.rank} heads [{h0}, {h1})")
        local = idx.select_heads(slice(h0, h1)).to(device)
        self._local = (idx, local)
        return local

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if q.dim() != 4 or q.shape[1] != self.layout.padded_len:
            raise ValueError(f"DeepSpeedBlockSparse expects [B, {self.layout.padded_len}, heads, D] (batch first, "
                             f"batch_dim_idx=0), got {tuple(q.shape)}")
        bv = self.layout.block_valid(q.device)
        if self.index is None:
            return dense_attention(q, k, v, block_size=self.layout.block_size, scale=self.scale, block_valid=bv,
                                   backend=self.backend)
        return block_sparse_attention(q, k, v, self._index_for(q.shape[2], q.device), scale=self.scale,
                                      block_valid=bv, backend=self.backend)


class _MPU:
    """The sequence-parallel part of deepspeed's ``mpu`` interface, around one explicit group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def get_sequence_parallel_group(self):
        return self.group

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_sequence_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)


def sequence_parallel_mpu(group: dist.ProcessGroup) -> _MPU:
    """An ``mpu`` for ``deepspeed.initialize(mpu=...)`` (deepspeed's uneven-head all-to-all needs it)."""
    return _MPU(group)
