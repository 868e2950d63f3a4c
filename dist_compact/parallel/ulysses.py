"""Ulysses: all-to-all between sequence shards and head shards, and the head-sharded AttentionOps.

Tensor layout: ``[batch, seq, heads, head_dim]`` in block order. A sequence-parallel rank holds
``[its video blocks | all text blocks]`` (text replicated, see :mod:`dist_compact.parallel.plan`).
Over a Ulysses group of ``U`` ranks (``u`` = this rank's position, ``Hu = heads / U``):

* :func:`seq_to_heads`: video ``[B, Vl, H, D]`` on each rank -> ``[B, U*Vl, Hu, D]`` (the group's
  chunks in rank order = a contiguous range of blocks) by one all-to-all for q, k and v together;
  text ``[B, T, H, D]`` (replicated) -> this rank's heads ``[B, T, Hu, D]`` by slicing, no traffic.
  This is how xDiT treats the text of joint attention: replicated, each rank uses its heads' slice.
* :func:`heads_to_seq`: the inverse for the attention output; the text rows of the output
  ``[B, T, Hu, D]`` are all-gathered over the heads so every rank again holds the full text.

Head order. Both take an optional ``order`` (a permutation of the ``H`` heads, the same on every
rank, see :func:`dist_compact.parallel.balance.balanced_head_order`): rank ``u`` then gets the
heads ``order[u*Hu:(u+1)*Hu]`` instead of the contiguous ``[u*Hu, (u+1)*Hu)``, and
:func:`heads_to_seq` puts every head back in its place, so the output is in model head order.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..sparsity.attention_ops import AttentionOps
from .config import ParallelGroups

__all__ = ["seq_to_heads", "heads_to_seq", "HeadShardedOps", "UlyssesOps", "all_gather_cat"]


def all_gather_cat(t: torch.Tensor, group: Optional[dist.ProcessGroup], dim: int,
                   sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate ``t`` from every rank of ``group`` along ``dim``, in group-rank order.

    ``sizes``: each rank's length along ``dim`` when they differ (ring shards of a balanced plan);
    the parts are padded to the longest for the all-gather (gloo and NCCL gather equal tensors).
    """
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1:
        return t
    dim = dim % t.dim()
    t = t.contiguous()
    if sizes is None or len(set(sizes)) == 1:
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=dim)
    if len(sizes) != n or t.shape[dim] != sizes[dist.get_rank(group)]:
        raise ValueError(f"all_gather_cat: sizes {list(sizes)} do not match {n} ranks / this rank's {t.shape[dim]}")
    longest = max(sizes)
    shape = list(t.shape)
    shape[dim] = longest
    padded = t.new_zeros(shape)
    padded.narrow(dim, 0, t.shape[dim]).copy_(t)
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, m) for p, m in zip(parts, sizes)], dim=dim)


def seq_to_heads(tensors: Sequence[torch.Tensor], video_len: int, group: Optional[dist.ProcessGroup],
                 rank: int, size: int, order: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Sequence shards -> head shards for each tensor (one all-to-all for all of them).

    Args:
        tensors: ``[B, video_len + T, H, D]`` each (same shape): this rank's video tokens, then the
            replicated text tokens.
        video_len: local video tokens ``Vl``.
        group, rank, size: the Ulysses group and this rank's position in it.
        order: head permutation (None = contiguous heads, see the module docstring).

    Returns:
        ``[B, size*video_len + T, H/size, D]`` each: the group's video tokens for this rank's heads,
        then the text tokens for this rank's heads.
    """
    x0 = tensors[0]
    B, S, H, D = x0.shape
    if size == 1:
        return list(tensors)
    Hu = H // size
    T = S - video_len
    n = len(tensors)
    if order is not None:
        order = order.to(x0.device)
    send = x0.new_empty((size, n, B, video_len, Hu, D))
    for i, x in enumerate(tensors):
        xv = x[:, :video_len] if order is None else x[:, :video_len].index_select(2, order)
        # [B, Vl, H, D] -> [size (head chunk = destination), B, Vl, Hu, D]
        send[:, i].copy_(xv.reshape(B, video_len, size, Hu, D).permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    outs = []
    for i, x in enumerate(tensors):
        out = x0.new_empty((B, size * video_len + T, Hu, D))
        # recv[s, i] is rank s's video chunk for my heads; chunks in rank order = sequence order
        out[:, : size * video_len].view(B, size, video_len, Hu, D).copy_(recv[:, i].transpose(0, 1))
        if T:
            mine = (x[:, video_len:, rank * Hu:(rank + 1) * Hu] if order is None
                    else x[:, video_len:].index_select(2, order[rank * Hu:(rank + 1) * Hu]))
            out[:, size * video_len:].copy_(mine)
        outs.append(out)
    return outs


def heads_to_seq(x: torch.Tensor, video_len: int, group: Optional[dist.ProcessGroup], rank: int,
                 size: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head shards -> sequence shards: ``[B, size*Vl + T, Hu, D]`` -> ``[B, Vl + T, size*Hu, D]``
    (model head order again when :func:`seq_to_heads` used ``order``)."""
    if size == 1:
        return x
    B, S, Hu, D = x.shape
    H = Hu * size
    T = S - size * video_len
    send = x[:, : size * video_len].reshape(B, size, video_len, Hu, D).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out = x.new_empty((B, video_len + T, H, D))
    # recv[s] = head chunk s of my video tokens
    out[:, :video_len].view(B, video_len, size, Hu, D).copy_(recv.permute(1, 2, 0, 3, 4))
    if T:
        out[:, video_len:] = all_gather_cat(x[:, size * video_len:], group, dim=2)
    if order is None:
        return out
    order = order.to(out.device)  # a no-op for the wrapper's cached device copy
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out.index_select(2, inverse)


class HeadShardedOps(AttentionOps):
    """What the Ulysses and ring ops share: this rank's heads of its Ulysses group.

    ``head_range`` = the heads of ``groups.ulysses_rank`` (``H / ulysses`` each); ``gather_heads``
    all-gathers over the Ulysses group. Both are in the *plan's* head order: with a head permutation
    ``head_order`` (set by the wrapper that applied it in :func:`seq_to_heads`), position ``i`` is
    model head ``head_order[i]``; :meth:`localize` selects those heads of a global index, and
    per-head statistics gathered over the heads come out in that order (decisions made from all of
    them, such as head-adaptive budgets, are the same on every rank either way).
    """

    def __init__(self, groups: ParallelGroups, backend: str = "auto"):
        super().__init__(backend)
        self.groups = groups

    def local_heads(self, index):
        """The heads of a global ``index`` that this rank holds (in its local order)."""
        h0, h1 = self.head_range(index.num_heads)
        if self.head_order is not None:
            if self.head_order.numel() != index.num_heads:
                raise ValueError(f"head order of {self.head_order.numel()} heads for an index of {index.num_heads}")
            return index.select_heads(self.head_order[h0:h1])
        return index.select_heads(slice(h0, h1)) if (h0, h1) != (0, index.num_heads) else index

    def localize(self, index, layout):
        r0, r1 = self.q_block_range(layout)
        out = self.local_heads(index)
        return out.select_rows(r0, r1) if (r0, r1) != (0, out.num_q_blocks) else out

    def head_range(self, num_heads: int) -> Tuple[int, int]:
        u = self.groups.config.ulysses
        if num_heads % u:
            raise ValueError(f"{num_heads} heads are not divisible by ulysses={u}")
        hu = num_heads // u
        return (self.groups.ulysses_rank * hu, (self.groups.ulysses_rank + 1) * hu)

    def gather_heads(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return all_gather_cat(t, self.groups.ulysses_group, dim)

    @property
    def world_size(self) -> int:
        return self.groups.config.degree


class UlyssesOps(HeadShardedOps):
    """AttentionOps of one Ulysses rank: its heads of the whole sequence (after :func:`seq_to_heads`).

    ``head_range`` = this rank's contiguous heads; query rows are all blocks (the base class's
    ``q_blocks`` / ``row_weight``: no row is held twice); ``gather_heads`` all-gathers over the
    Ulysses group (global head order); ``reduce_rows`` is the identity.
    """

    @property
    def ulysses(self) -> int:
        return self.groups.config.ulysses

    def __repr__(self) -> str:
        return f"UlyssesOps({self.groups!r}, backend={self.backend!r})"
