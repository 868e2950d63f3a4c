"""AttentionOps: how one rank computes its part of one attention call.

The schedule / search logic (:mod:`dist_compact.sparsity.attention`) never talks to torch.distributed. It asks
an ``AttentionOps`` for the four things it needs, and the parallel layer provides versions of this
class that communicate (Ulysses: this rank holds some heads of the full sequence; ring: this rank
holds some query blocks, keys travel). The single-device version is :class:`AttentionOps` itself.

Contract, for every implementation:

* Tensors handed in are this rank's *local* q, k, v ``[batch, seq_local, heads_local, head_dim]`` in
  block order (see :class:`~dist_compact.layout.VideoLayout`); ``layout`` is always the *global*
  layout of the whole sequence.
* :meth:`head_range` / :meth:`q_blocks` say which global heads / query blocks are local
  (:meth:`q_block_range` is the contiguous video part; a ring rank also holds every text block);
  :meth:`row_weight` weights per-row statistics so rows held by several ranks count once.
* :meth:`localize` cuts a global :class:`BlockIndex` (all heads, all query blocks, global key
  numbering) down to the local heads and query rows; key numbering stays global.
* :meth:`attention` takes such a localized index; :meth:`block_mass` returns
  ``[batch, heads_local, q_blocks_local, num_blocks]`` (all key blocks, global numbering).
* :meth:`reduce_rows` sums a tensor over the ranks that hold the same heads but other query rows;
  :meth:`gather_heads` concatenates per-head tensors over the ranks that hold other heads (global
  head order). Both are identities on one device. Head-adaptive decisions use them so that every
  rank decides the same thing from global statistics.
* :attr:`~AttentionOps.head_order`: where this rank's heads come from when a balanced
  sequence-parallel plan permuted them (None: model order); per-head figures of all heads are held
  in that order, and :meth:`AttentionOps.model_order` says where each model head's figure is.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..ops import block_attention_mass, block_sparse_attention, dense_attention

__all__ = ["AttentionOps", "global_head_stats"]


class AttentionOps:
    """Single-device attention ops (also the base class of the parallel versions).

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, passed to the kernels' dispatch.

    Attributes:
        head_order: int64 ``[H]`` on the host, or None (model order): plan position ``i`` holds model
            head ``head_order[i]``. A head-balanced Ulysses plan sets it before each call; the
            local heads are positions :meth:`head_range` of it.
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.head_order: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ what is local
    def head_range(self, num_heads: int) -> Tuple[int, int]:
        """Global heads ``[start, stop)`` held by this rank."""
        return (0, num_heads)

    def q_block_range(self, layout: VideoLayout) -> Tuple[int, int]:
        """Global query blocks ``[start, stop)`` held by this rank."""
        return (0, layout.num_blocks)

    def q_blocks(self, layout: VideoLayout) -> torch.Tensor:
        """int64 global ids of the local query blocks, in local order (ring ranks: their video
        shard, then every text block)."""
        r0, r1 = self.q_block_range(layout)
        return torch.arange(r0, r1)

    def row_weight(self, layout: VideoLayout) -> torch.Tensor:
        """float32 per local query block: weights with which per-row statistics enter
        :meth:`reduce_rows`, so rows held by several ranks (the text rows of a ring) count once."""
        r0, r1 = self.q_block_range(layout)
        return torch.ones(r1 - r0)

    def localize(self, index: BlockIndex, layout: VideoLayout) -> BlockIndex:
        """Global index -> this rank's heads and query rows (key numbering unchanged)."""
        h0, h1 = self.head_range(index.num_heads)
        r0, r1 = self.q_block_range(layout)
        if (h0, h1) != (0, index.num_heads):
            index = index.select_heads(slice(h0, h1))
        if (r0, r1) != (0, index.num_q_blocks):
            index = index.select_rows(r0, r1)
        return index

    # ------------------------------------------------------------------ compute
    @staticmethod
    def _valid(layout: VideoLayout, device) -> Optional[torch.Tensor]:
        """Per-block valid counts, or None when every block is full (the kernels then skip masking)."""
        return layout.block_valid(device) if layout.has_padding else None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex,
                  layout: VideoLayout, *, return_lse: bool = False, scale: Optional[float] = None):
        """Block-sparse attention of the local queries with a localized index.

        The index runs as given: the schedule has already sent dense layers to :meth:`dense`
        (``SparsityConfig.dense_threshold``), so the op's own dense dispatch, which reads the density of
        every new index back to the host (mid-forward, after each search), is off."""
        bv = self._valid(layout, q.device)
        return block_sparse_attention(q, k, v, index, scale=scale, return_lse=return_lse, block_valid=bv,
                                      backend=self.backend, dense_threshold=None)

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout, *,
              return_lse: bool = False, scale: Optional[float] = None):
        """Dense attention over all valid keys (the fastest dense path when no LSE is needed)."""
        bv = self._valid(layout, q.device)
        return dense_attention(q, k, v, block_size=layout.block_size, scale=scale, return_lse=return_lse,
                               block_valid=bv, backend=self.backend)

    def block_mass(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, layout: VideoLayout, *,
                   scale: Optional[float] = None, query_rows: Optional[int] = None) -> torch.Tensor:
        """Block attention mass of the local query blocks against all key blocks.

        ``query_rows``: sample that many query rows per block (see ``ops.block_attention_mass``).
        """
        bv = self._valid(layout, q.device)
        return block_attention_mass(q, k, lse, layout.block_size, scale=scale, block_valid=bv,
                                    query_rows=query_rows, backend=self.backend)

    def model_order(self) -> Optional[List[int]]:
        """Where model head ``i``'s figure sits among per-head figures held in :attr:`head_order`
        (``figures[order[i]]``), or None when they are in model order. Host ints: applied to the values
        when they are read, so nothing is copied to the device."""
        return None if self.head_order is None else torch.argsort(self.head_order.cpu()).tolist()

    # ------------------------------------------------------------------ global statistics
    def reduce_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks holding the same heads but other query rows (identity on one device)."""
        return t

    def gather_heads(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate per-head tensors over ranks holding other heads (identity on one device)."""
        return t

    @property
    def world_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


def global_head_stats(stat: torch.Tensor, ops: AttentionOps, dim: int = 0) -> torch.Tensor:
    """Per-head statistic summed over all query rows, for all heads (contract 5).

    ``stat`` holds this rank's heads along ``dim``, already summed over its rows (weight the rows
    with ``ops.row_weight(layout)`` where the ops have it: ring ranks all hold the text rows).
    """
    return ops.gather_heads(ops.reduce_rows(stat), dim=dim)
