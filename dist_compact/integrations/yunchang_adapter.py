"""dist_compact's block-sparse op as yunchang's ``attn_processor`` (``LongContextAttention``, USP).

Use (yunchang 0.6.x)::

    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    set_seq_parallel_pg(ulysses, ring, rank, world_size)
    proc = YunchangBlockSparse(layout, PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    attn = LongContextAttention(ring_impl_type="basic", attn_type=None, attn_processor=proc)
    proc.set_index(index)                      # global BlockIndex [1 or B, H, nb, nb] of this layer
    out = attn(q_local, k_local, v_local)      # [B, S/P, H, D] chunks of the block-order sequence

Sequence: yunchang splits the flat sequence into ``P = ulysses x ring`` equal chunks, chunk ``i`` on
sequence-parallel rank ``i``; here the flat sequence is the block order of ``layout``
(``[video tiles | text]``, :class:`~dist_compact.layout.VideoLayout`) extended by empty blocks to
``seq_len(layout, P)`` tokens so that chunks are whole blocks (:meth:`YunchangBlockSparse.pad`).

How it runs inside yunchang: after its Ulysses all-to-all, yunchang's ring loop calls the processor
once per ring step with this rank's queries and the key/value chunk that arrived; in its basic,
non-causal ring, step ``s`` holds the chunk of ring rank ``(ring_rank - s) mod ring``, so the
processor counts its calls to know which key blocks it sees and runs the block-sparse op with
that sub-index. Limits of yunchang's loop (documented in our issue): every step moves its K/V chunk
even when no query needs it (use :class:`dist_compact.parallel.SequenceParallel` for shard
skipping), and its sigmoid LSE merge turns an empty step (lse = -inf) into NaN. The processor
therefore returns the LSE in float64 with -inf replaced by ``EMPTY_LSE = -1e6``: an empty step then
gets weight exp(-1e6) = 0 and the float64 cancellation error of the running LSE stays ~1e-10, so
the output equals the one-process result (the LSE is discarded by ``LongContextAttention``).
yunchang is imported only by :meth:`from_yunchang_globals`.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .._util import cdiv
from ..block_index import BlockIndex
from ..layout import VideoLayout
from ..ops import block_sparse_attention

__all__ = ["YunchangBlockSparse", "EMPTY_LSE"]

#: finite stand-in for -inf in the LSE handed to yunchang's merge (see the module docstring)
EMPTY_LSE = -1.0e6


def _ranks(group: Optional[dist.ProcessGroup]) -> List[int]:
    return dist.get_process_group_ranks(group) if group is not None else [dist.get_rank() if dist.is_initialized() else 0]


class YunchangBlockSparse:
    """A yunchang ``attn_processor`` running :func:`dist_compact.block_sparse_attention`.

    Args:
        layout: global layout of the sequence (block order).
        ulysses_group, ring_group: yunchang's groups (``PROCESS_GROUP.ULYSSES_PG`` / ``RING_PG``);
            both of its rank layouts work (the chunk positions are derived from the groups).
        index: the layer's global :class:`BlockIndex` (or call :meth:`set_index` before each forward).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(self, layout: VideoLayout, ulysses_group: Optional[dist.ProcessGroup],
                 ring_group: Optional[dist.ProcessGroup], index: Optional[BlockIndex] = None,
                 backend: str = "auto"):
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
        self.layout = layout
        self.backend = backend
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        uly, ring = _ranks(ulysses_group), _ranks(ring_group)
        me = dist.get_rank() if dist.is_initialized() else 0
        self.U, self.R = len(uly), len(ring)
        self.P = self.U * self.R
        self.u = uly.index(me)
        self.r = ring.index(me)
        # the group of ring rank j is this rank's Ulysses group shifted by (ring[j] - me) (true for
        # both of yunchang's layouts); sequence chunk position = global rank - first rank of the SP group
        base = min(ring) + min(uly) - me
        self._chunks = [[x + ring[j] - me - base for x in uly] for j in range(self.R)]
        for j, c in enumerate(self._chunks):
            if sorted(c) != c:
                raise ValueError(f"ring rank {j} holds sequence chunks {c} out of order; unsupported group layout")
        self.nb = self.num_blocks(layout, self.P)
        self.chunk_blocks = self.nb // self.P
        # valid tokens per block of the flat sequence (the appended blocks are empty)
        self._valid = torch.cat([layout.block_valid(), torch.zeros(self.nb - layout.num_blocks, dtype=torch.int32)])
        self._index: Optional[BlockIndex] = None
        self._subs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._calls = 0
        if index is not None:
            self.set_index(index)

    # ------------------------------------------------------------------ sequence geometry
    @staticmethod
    def num_blocks(layout: VideoLayout, world: int) -> int:
        """Blocks of the flat sequence: ``layout.num_blocks`` rounded up to a multiple of ``world``."""
        return cdiv(layout.num_blocks, world) * world

    @classmethod
    def seq_len(cls, layout: VideoLayout, world: int) -> int:
        """Tokens of the flat sequence yunchang splits (block order + empty blocks)."""
        return cls.num_blocks(layout, world) * layout.block_size

    def pad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Block-order tensor (``padded_len`` along ``dim``) -> the flat sequence (zeros appended)."""
        extra = self.nb * self.layout.block_size - x.shape[dim]
        if extra < 0:
            raise ValueError(f"pad: {x.shape[dim]} tokens along dim {dim} exceed {self.nb} blocks")
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def unpad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.narrow(dim, 0, self.layout.padded_len)

    def chunk(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of the flat (padded) sequence, as yunchang expects its input."""
        n = self.chunk_blocks * self.layout.block_size
        pos = self._chunks[self.r][self.u]
        return self.pad(x, dim).narrow(dim, pos * n, n)

    def _blocks(self, j: int) -> torch.Tensor:
        cb = self.chunk_blocks
        return torch.cat([torch.arange(p * cb, (p + 1) * cb) for p in self._chunks[j]])

    # ------------------------------------------------------------------ index
    def set_index(self, index: BlockIndex) -> None:
        """The global index ``[1 or B, H, num_blocks, num_blocks]`` of the next forward; resets the step count."""
        nb0 = self.layout.num_blocks
        if not isinstance(index, BlockIndex) or index.num_q_blocks != nb0 or index.num_k_blocks != nb0:
            raise ValueError(f"set_index: expected a global BlockIndex of {nb0} x {nb0} blocks, got {index!r}")
        if index.num_heads % self.U:
            raise ValueError(f"{index.num_heads} heads are not divisible by the Ulysses degree {self.U}")
        self._index = index
        self._calls = 0

    def _sub(self, j: int, device) -> Tuple[BlockIndex, torch.Tensor, torch.Tensor]:
        """(sub-index, q valid, kv valid) of the ring step that holds chunk ``j``, on ``device``.

        Built once per index and device: every step then hands the kernels the same tensors (no
        copies, and the kernels' one-time check of the valid counts stays one-time).
        """
        idx = self._index
        per = self._subs.setdefault(idx, {})
        key = (j, str(device))
        if key not in per:
            hu = idx.num_heads // self.U
            loc = idx.select_heads(slice(self.u * hu, (self.u + 1) * hu))
            if self.nb != idx.num_q_blocks:  # the empty blocks yunchang's even split appends
                extra = self.nb - idx.num_q_blocks
                c = torch.cat([loc.counts, loc.counts.new_zeros((*loc.counts.shape[:2], extra))], 2)
                i = torch.cat([loc.indices, loc.indices.new_full((*loc.indices.shape[:2], extra, loc.max_count), -1)], 2)
                loc = BlockIndex(c, i, idx.block_size, self.nb)
            rows, keys = self._blocks(self.r), self._blocks(j)
            kmap = torch.full((self.nb,), -1, dtype=torch.long)
            kmap[keys] = torch.arange(len(keys))
            sub = loc.select_rows_at(rows).remap_keys(kmap, len(keys))
            per[key] = (sub.to(device), self._valid[rows].to(device), self._valid[keys].to(device))
        return per[key]

    # ------------------------------------------------------------------ the processor
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 softmax_scale: Optional[float] = None, causal: bool = False, **unused):
        """yunchang's ``fn(q, k, v, ...)`` of one ring step: ``(out [B,S,H,D], lse [B,H,S] float64)``."""
        if self._index is None:
            raise RuntimeError("YunchangBlockSparse: call set_index(index) before the forward")
        if causal:
            raise ValueError("YunchangBlockSparse: causal attention is not supported (video DiTs are bidirectional)")
        if dropout_p:
            raise ValueError("YunchangBlockSparse: dropout is not supported (inference only)")
        want = self.U * self.chunk_blocks * self.layout.block_size
        if q.shape[1] != want or k.shape[1] != want:
            raise ValueError(f"YunchangBlockSparse: expected {want} tokens per ring shard, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}; feed yunchang the chunks of proc.chunk(x)")
        step = self._calls % self.R
        self._calls += 1
        sub, q_valid, kv_valid = self._sub((self.r - step) % self.R, q.device)
        out, lse = block_sparse_attention(q, k, v, sub, scale=softmax_scale, return_lse=True, q_valid=q_valid,
                                          kv_valid=kv_valid, backend=self.backend)
        lse = lse.double()
        return out, torch.where(torch.isfinite(lse), lse, torch.full_like(lse, EMPTY_LSE))

    @classmethod
    def from_yunchang_globals(cls, layout: VideoLayout, index: Optional[BlockIndex] = None,
                              backend: str = "auto") -> "YunchangBlockSparse":
        """Build from the groups yunchang's ``set_seq_parallel_pg`` stored (imports yunchang)."""
        from ..extras import require

        PROCESS_GROUP = require("yunchang.globals", "usp", "YunchangBlockSparse.from_yunchang_globals").PROCESS_GROUP
        return cls(layout, PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG, index, backend)

    def __repr__(self) -> str:
        return f"YunchangBlockSparse({self.layout}, ulysses={self.U}, ring={self.R}, backend={self.backend!r})"
