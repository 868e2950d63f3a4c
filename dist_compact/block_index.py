"""BlockIndex: the one block-sparse format every pattern producer emits and every kernel consumes."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch

from ._util import as_int

__all__ = ["BlockIndex"]

HeadSelector = Union[int, slice, Sequence[int], torch.Tensor]


#: most (batch x heads x query blocks x key blocks) entries :meth:`BlockIndex.full` builds (int32 offsets)
_MAX_ENTRIES = 1 << 31
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def _check_has_values(where: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{where}: tensors on the meta device hold no values to check; build the index "
                         f"from CPU or CUDA tensors (or pass check=False)")


#: entries of a mask that :func:`_compact_rows` turns into slots at a time (int64: 128 MiB)
_ROWS_CHUNK = 1 << 24


def _compact_rows(keep: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the ``values`` where ``keep`` is True, in order, then ``-1``: ``[..., width]`` int32.

    A kept entry's slot is the number of kept entries before it (a cumsum); the others go to a
    spare column that is dropped. One scatter, no sort. Done a few (batch, head) slices at a time
    (up to ``_ROWS_CHUNK`` entries) so the int64 slot tensor stays small at long sequences, and a
    short one (an online search's, launched between attention kernels) takes one pass.
    """
    lead = keep.shape[:-1]
    out = torch.full((*lead, width + 1), -1, dtype=torch.int32, device=keep.device)
    # explicit leading size: reshape(-1, ...) is ambiguous when a dimension is 0 (no key blocks)
    k2 = keep.reshape(math.prod(keep.shape[:-2]) if keep.dim() > 2 else 1, *keep.shape[-2:])
    v2 = values.expand_as(keep).reshape(k2.shape)
    o2 = out.view(k2.shape[0], k2.shape[1], width + 1)
    step = max(1, _ROWS_CHUNK // max(k2.shape[1] * k2.shape[2], 1))
    for i in range(0, k2.shape[0], step):
        k = k2[i:i + step]
        slot = torch.where(k, k.cumsum(-1) - 1, width)
        o2[i:i + step].scatter_(-1, slot, v2[i:i + step].to(torch.int32))
    return out[..., :width]


def _check_sizes(where: str, block_size, num_k_blocks):
    """(block_size, num_k_blocks) as ints, or one error naming the bad one (bool is no int)."""
    bs, nk = as_int(block_size), as_int(num_k_blocks)
    if bs is None or bs < 1:
        raise ValueError(f"{where}: block_size must be a positive int, got {block_size!r}")
    if nk is None or not 0 <= nk <= _INT32_MAX:
        raise ValueError(f"{where}: num_k_blocks must be an int in [0, 2**31 - 1], got {num_k_blocks!r}")
    return bs, nk


class BlockIndex:
    """Block-sparse attention pattern in a FlexAttention-like BCSR layout (immutable once built).

    The query sequence is cut into ``num_q_blocks`` blocks and the key sequence into ``num_k_blocks``
    blocks of ``block_size`` tokens (block ``b`` covers tokens ``[b*block_size, (b+1)*block_size)``;
    the last one may be short). For every (batch, head, query block) the index stores

    * ``counts``  int32 ``[batch, heads, num_q_blocks]``: how many key blocks the row attends to;
    * ``indices`` int32 ``[batch, heads, num_q_blocks, max_count]``: those key blocks, strictly
      increasing in the first ``counts`` entries; the rest of the row is ``-1`` padding.

    ``batch`` is either the real batch size or 1 (the same pattern for every sample). This is the
    layout of FlexAttention's ``BlockMask`` (``kv_num_blocks`` / ``kv_indices``) and of
    FlashAttention-4's block sparsity, so conversions are cheap. Whether a kept block needs
    masking (padding inside it) is not stored here: it follows from the per-block valid-token counts
    of the layout, which the kernel reads.

    Construct with :meth:`from_dense` (a bool block mask), :meth:`full`, or directly from tensors
    (checked: counts within the row width, used entries in ``[0, num_k_blocks)`` and strictly
    increasing; ``check=False`` is for the derivations below, correct by construction).
    Derived data that is expensive to build (e.g. a token mask) is kept on the index with
    :meth:`cached`, since the index never changes.
    """

    def __init__(self, counts: torch.Tensor, indices: torch.Tensor, block_size: int, num_k_blocks: int, *,
                 check: bool = True):
        if not isinstance(counts, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError("BlockIndex: counts and indices must be tensors")
        if counts.dim() != 3:
            raise ValueError(f"BlockIndex: counts must be [batch, heads, q_blocks], got shape {tuple(counts.shape)}")
        if indices.dim() != 4 or indices.shape[:3] != counts.shape:
            raise ValueError(
                f"BlockIndex: indices must be [batch, heads, q_blocks, max_count] matching counts "
                f"{tuple(counts.shape)}, got {tuple(indices.shape)}"
            )
        if counts.device != indices.device:
            raise ValueError(f"BlockIndex: counts on {counts.device} but indices on {indices.device}")
        for name, t in (("counts", counts), ("indices", indices)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                # a float block number would be truncated silently (2.7 -> block 2)
                raise TypeError(f"BlockIndex: {name} must be an integer tensor (int32 or int64), got {t.dtype}; "
                                f"convert whole numbers with {name}.round().int() (fractions are no block)")
        block_size, num_k_blocks = _check_sizes("BlockIndex", block_size, num_k_blocks)
        if check:
            _check_has_values("BlockIndex", counts)
            # values beyond int32 would wrap silently in the cast below (2**32 -> block 0); one host read
            wide = [(name, t) for name, t in (("counts", counts), ("indices", indices))
                    if t.dtype != torch.int32 and t.numel()]
            if wide:
                ends = torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for _, t in wide]).tolist()
                for (name, _), (lo, hi) in zip(wide, ends):
                    if lo < _INT32_MIN or hi > _INT32_MAX:
                        raise ValueError(f"BlockIndex: {name} holds {lo if lo < _INT32_MIN else hi}, outside "
                                         f"int32; counts and key blocks must lie in [0, {_INT32_MAX}]")
        if indices.shape[-1] < 1:  # keep one column so kernels always have a valid pointer
            indices = torch.full((*counts.shape, 1), -1, dtype=torch.int32, device=counts.device)
        self.counts = counts.to(torch.int32).contiguous()
        self.indices = indices.to(torch.int32).contiguous()
        self.block_size = block_size
        self.num_k_blocks = num_k_blocks
        self._density = None  # cached: an index is immutable once built
        self._derived: dict = {}  # kind -> (key, value), see cached()
        if check:
            self._check_entries()

    def _check_entries(self) -> None:
        """One error naming the first bad row: count outside ``[0, max_count]``, a used entry outside
        ``[0, num_k_blocks)``, or used entries not strictly increasing (kernels rely on all three)."""
        c, i, nk = self.counts, self.indices, self.num_k_blocks
        bad_count = (c < 0) | (c > self.max_count)
        used = torch.arange(self.max_count, device=c.device).view(1, 1, 1, -1) < c.unsqueeze(-1)
        bad_range = (used & ((i < 0) | (i >= nk))).any(-1)
        bad_order = (used[..., 1:] & (i[..., 1:] <= i[..., :-1])).any(-1)
        checks = ((bad_count, f"count outside [0, {self.max_count}] (the row width)"),
                  (bad_range, f"key block outside [0, {nk})"),
                  (bad_order, "key blocks not strictly increasing"))
        # one host read for all three verdicts (each read of a CUDA tensor waits for the device)
        found = torch.stack([bad.any() for bad, _ in checks]).tolist()
        for (bad, what), hit in zip(checks, found):
            if hit:
                b, h, r = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"BlockIndex: row (batch {b}, head {h}, query block {r}) has a {what}: count "
                    f"{int(c[b, h, r])}, indices {i[b, h, r, :8].tolist()}{'...' if self.max_count > 8 else ''}"
                )

    def cached(self, kind: str, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``(kind, key)``, kept on this index (it is immutable, so derived data
        stays valid). One key per kind: a new key replaces the old value (a run uses one layout at
        a time, and a token mask can be large)."""
        hit = self._derived.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._derived.pop(kind, None)  # free the old value before building the new one
        value = build()
        self._derived[kind] = (key, value)
        return value

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size: int, *, max_count: Optional[int] = None) -> "BlockIndex":
        """From a bool block mask ``[batch or 1, heads, q_blocks, k_blocks]`` (True = computed).

        ``max_count``: the row width, where the caller knows the most key blocks any row keeps (it must be
        at least every row's count; more pads every row with -1). By default it is read from the mask,
        which on a GPU waits for the device's queue."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"BlockIndex.from_dense: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"BlockIndex.from_dense: mask must be bool, got {mask.dtype}")
        if mask.dim() != 4:
            raise ValueError(
                f"BlockIndex.from_dense: mask must be [batch, heads, q_blocks, k_blocks], got shape {tuple(mask.shape)}"
            )
        if max_count is None:  # it reads the width from the mask
            _check_has_values("BlockIndex.from_dense", mask)
        block_size = _check_sizes("BlockIndex.from_dense", block_size, 0)[0]
        nk = mask.shape[-1]
        width = None if max_count is None else as_int(max_count)
        if max_count is not None and (width is None or not 0 <= width <= nk):
            raise ValueError(f"BlockIndex.from_dense: max_count must be an int in [0, {nk}] (the key blocks) or None, "
                             f"got {max_count!r}")
        counts = mask.sum(-1, dtype=torch.int32)
        if width is None:
            width = int(counts.max()) if counts.numel() else 0
        cols = torch.arange(nk, dtype=torch.int32, device=mask.device)
        return cls(counts, _compact_rows(mask, cols, max(width, 1)), block_size, nk, check=False)

    @classmethod
    def full(cls, batch: int, heads: int, num_q_blocks: int, num_k_blocks: int, block_size: int,
             device=None) -> "BlockIndex":
        """Every query block attends to every key block (dense attention)."""
        dims = []
        for name, val, least in (("batch", batch, 1), ("heads", heads, 1), ("num_q_blocks", num_q_blocks, 0),
                                 ("num_k_blocks", num_k_blocks, 0)):
            v = as_int(val)
            if v is None or v < least:
                raise ValueError(f"BlockIndex.full: {name} must be an int >= {least}, got {val!r}")
            dims.append(v)
        batch, heads, num_q_blocks, num_k_blocks = dims
        block_size = _check_sizes("BlockIndex.full", block_size, num_k_blocks)[0]
        entries = batch * heads * num_q_blocks * max(num_k_blocks, 1)
        if entries > _MAX_ENTRIES:
            raise ValueError(f"BlockIndex.full: {batch} x {heads} x {num_q_blocks} x {num_k_blocks} = {entries} "
                             f"entries is more than 2**31; use fewer or larger blocks (a larger block_size)")
        counts = torch.full((batch, heads, num_q_blocks), num_k_blocks, dtype=torch.int32, device=device)
        idx = torch.arange(max(num_k_blocks, 1), dtype=torch.int32, device=device)
        if num_k_blocks == 0:
            idx = idx - 1
        indices = idx.view(1, 1, 1, -1).expand(batch, heads, num_q_blocks, -1).contiguous()
        return cls(counts, indices, block_size, num_k_blocks, check=False)

    # ------------------------------------------------------------------ properties
    @property
    def batch(self) -> int:
        return self.counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[2]

    @property
    def max_count(self) -> int:
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def shape(self):
        """(batch, heads, q_blocks, k_blocks) of the dense block mask."""
        return (self.batch, self.num_heads, self.num_q_blocks, self.num_k_blocks)

    def nnz(self) -> int:
        """Number of computed (query block, key block) pairs over batch and heads."""
        return int(self.counts.sum())

    def density(self, per_head: bool = False):
        """Share of computed blocks. ``per_head=True`` gives a float tensor ``[heads]``."""
        total = max(self.num_q_blocks * self.num_k_blocks, 1)
        if per_head:
            return self.counts.double().sum(dim=(0, 2)) / (total * self.batch)
        if self._density is None:  # one device sync per index, not per call
            n = total * self.batch * self.num_heads
            self._density = float(self.counts.double().sum()) / n if n else 0.0
        return self._density

    # ------------------------------------------------------------------ conversions
    def to(self, device) -> "BlockIndex":
        return BlockIndex(self.counts.to(device), self.indices.to(device), self.block_size, self.num_k_blocks,
                          check=False)

    def entry_mask(self) -> torch.Tensor:
        """bool ``[batch, heads, q_blocks, max_count]``: which entries of ``indices`` are used."""
        ar = torch.arange(self.max_count, device=self.device).view(1, 1, 1, -1)
        return ar < self.counts.unsqueeze(-1)

    def to_dense(self) -> torch.Tensor:
        """bool block mask ``[batch, heads, q_blocks, k_blocks]``."""
        nk = self.num_k_blocks
        out = torch.zeros((*self.counts.shape, nk + 1), dtype=torch.bool, device=self.device)
        idx = torch.where(self.entry_mask(), self.indices.long(), torch.full_like(self.indices, nk, dtype=torch.long))
        out.scatter_(-1, idx, True)
        return out[..., :nk]

    def to_block_mask(self, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                      q_valid: Optional[torch.Tensor] = None, kv_valid: Optional[torch.Tensor] = None):
        """FlexAttention ``BlockMask`` with the same kept blocks, for side-by-side checks.

        Blocks whose keys are all valid become "full" blocks (no mask_mod work); blocks with padding
        (a short last block, or ``kv_valid < block_size``) become partial blocks with a mask_mod
        that hides the padded keys. ``q_valid`` has no effect on which keys are used (padded query
        rows are just unused), it is accepted for symmetry.
        """
        from torch.nn.attention.flex_attention import BlockMask

        bs = self.block_size
        nk = self.num_k_blocks
        q_len = self.num_q_blocks * bs if q_len is None else q_len
        kv_len = nk * bs if kv_len is None else kv_len
        dev = self.device
        kv_tokens = torch.full((nk,), bs, dtype=torch.int32, device=dev)
        if kv_valid is not None:
            kv_tokens = torch.minimum(kv_tokens, kv_valid.to(dev, torch.int32))
        tail = kv_len - (nk - 1) * bs
        if nk and tail < bs:
            kv_tokens[-1] = min(int(kv_tokens[-1]), tail)
        block_full = kv_tokens == bs  # [nk]
        used = self.entry_mask()
        safe = self.indices.clamp(min=0).long()
        is_full = used & block_full[safe]
        is_part = used & ~block_full[safe]

        def compact(sel):
            # FlexAttention reads kv_indices [.., NK]; entries past the count are never read
            return sel.sum(-1, dtype=torch.int32), _compact_rows(sel, safe, max(nk, 1)).clamp(min=0)

        full_cnt, full_idx = compact(is_full)
        part_cnt, part_idx = compact(is_part)
        # FlexAttention evaluates mask_mod on partial blocks only when compiled, but its eager path
        # applies mask_mod alone to every position: so the mask_mod encodes the kept blocks too.
        dense = self.to_dense()
        batch_is_one = self.batch == 1
        kv_tok = kv_tokens

        def mask_mod(b, h, q_idx, kv_idx):
            blk = kv_idx // bs
            bb = b * 0 if batch_is_one else b
            return dense[bb, h, q_idx // bs, blk] & ((kv_idx % bs) < kv_tok[blk])

        return BlockMask.from_kv_blocks(
            part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
            seq_lengths=(q_len, kv_len),
        )

    # ------------------------------------------------------------------ algebra
    def _check_compatible(self, other: "BlockIndex") -> None:
        if not isinstance(other, BlockIndex):
            raise TypeError(f"expected a BlockIndex, got {type(other).__name__}")
        if (other.block_size, other.num_heads, other.num_q_blocks, other.num_k_blocks) != (
            self.block_size, self.num_heads, self.num_q_blocks, self.num_k_blocks
        ):
            raise ValueError(f"BlockIndex shapes differ: {self!r} vs {other!r}")
        if self.batch != other.batch and 1 not in (self.batch, other.batch):
            raise ValueError(f"BlockIndex batch sizes {self.batch} and {other.batch} do not broadcast")

    def union(self, other: "BlockIndex") -> "BlockIndex":
        """Blocks kept by either index (batch 1 broadcasts)."""
        self._check_compatible(other)
        return BlockIndex.from_dense(self.to_dense() | other.to(self.device).to_dense(), self.block_size)

    __or__ = union

    def intersection(self, other: "BlockIndex") -> "BlockIndex":
        self._check_compatible(other)
        return BlockIndex.from_dense(self.to_dense() & other.to(self.device).to_dense(), self.block_size)

    def select_heads(self, heads: HeadSelector) -> "BlockIndex":
        """Keep some heads (an int, slice, list or index tensor), e.g. one Ulysses rank's heads.

        Ids count from the end when negative, as in Python; an id outside ``[-heads, heads)`` or a
        selection of no head is an error (checked for ints, slices, lists and CPU tensors; a GPU
        tensor's values are not read back)."""
        H = self.num_heads
        fix = (f"pass a head id in [-{H}, {H}), a slice, or a list / 1-D integer tensor of such ids"
               if H else "this index has no heads")
        one = as_int(heads)
        if one is not None:
            if not -H <= one < H:
                raise ValueError(f"select_heads: head {one} is out of range for {H} heads; {fix}")
            one %= H
            heads = slice(one, one + 1)
        if isinstance(heads, slice):
            c, i = self.counts[:, heads], self.indices[:, heads]
            if c.shape[1] == 0:
                raise ValueError(f"select_heads: {heads} selects none of the {H} heads; {fix}")
        else:
            if isinstance(heads, torch.Tensor):
                if heads.dtype.is_floating_point or heads.dtype.is_complex or heads.dtype == torch.bool:
                    raise TypeError(f"select_heads: heads must be integer head ids, got a {heads.dtype} tensor; {fix}")
                sel = heads.to(self.device, torch.long)
            elif isinstance(heads, (list, tuple, range)) or type(heads).__module__ == "numpy":
                ids = list(heads.tolist() if hasattr(heads, "tolist") else heads)
                if not all(as_int(h) is not None for h in ids):
                    raise TypeError(f"select_heads: heads must be integer head ids, got {ids[:8]!r}; {fix}")
                bad = [int(h) for h in ids if not -H <= int(h) < H]
                if bad:  # checked here, so a list needs no read-back on GPUs
                    raise ValueError(f"select_heads: head {bad[0]} is out of range for {H} heads; {fix}")
                sel = torch.tensor([int(h) % H for h in ids], dtype=torch.long, device=self.device)
            else:
                raise TypeError(f"select_heads: heads must be an int, slice, list or tensor, got "
                                f"{type(heads).__name__}; {fix}")
            if sel.dim() != 1:
                raise ValueError(f"select_heads: head ids must be 1-D, got shape {tuple(sel.shape)}; {fix}")
            if sel.device.type == "cpu" and sel.numel():  # on GPUs the value check would sync every call
                lo, hi = int(sel.min()), int(sel.max())
                if lo < -H or hi >= H:
                    raise ValueError(f"select_heads: head {lo if lo < -H else hi} is out of range for {H} "
                                     f"heads; {fix}")
                sel = sel % H
            c, i = self.counts.index_select(1, sel), self.indices.index_select(1, sel)
        return BlockIndex(c, i, self.block_size, self.num_k_blocks, check=False)

    def select_rows(self, start: int, stop: int) -> "BlockIndex":
        """Keep query blocks ``[start, stop)`` (a ring rank's query shard); key numbering unchanged."""
        if not 0 <= start <= stop <= self.num_q_blocks:
            raise ValueError(f"select_rows({start}, {stop}) out of range for {self.num_q_blocks} query blocks")
        return BlockIndex(self.counts[:, :, start:stop], self.indices[:, :, start:stop], self.block_size,
                          self.num_k_blocks, check=False)

    def select_keys(self, start: int, stop: int) -> "BlockIndex":
        """Keep key blocks ``[start, stop)`` renumbered from 0 (the key shard a ring step brings)."""
        if not 0 <= start <= stop <= self.num_k_blocks:
            raise ValueError(f"select_keys({start}, {stop}) out of range for {self.num_k_blocks} key blocks")
        sel = self.entry_mask() & (self.indices >= start) & (self.indices < stop)
        cnt = sel.sum(-1, dtype=torch.int32)
        width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        return BlockIndex(cnt, _compact_rows(sel, self.indices - start, width), self.block_size, stop - start,
                          check=False)

    def select_rows_at(self, rows: torch.Tensor) -> "BlockIndex":
        """Keep the query blocks listed in ``rows`` (int ids, any order); key numbering unchanged."""
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_q_blocks)):
            raise ValueError(f"select_rows_at: rows must be 1-D ids in [0, {self.num_q_blocks}), got {rows.tolist()[:8]}")
        c = self.counts.index_select(2, rows)
        i = self.indices.index_select(2, rows)
        width = max(int(c.max()) if c.numel() else 0, 1)
        return BlockIndex(c, i[..., :width], self.block_size, self.num_k_blocks, check=False)

    def remap_keys(self, key_map: torch.Tensor, num_k_blocks: int) -> "BlockIndex":
        """Renumber key blocks: key ``j`` becomes ``key_map[j]`` (``-1`` drops it); ``num_k_blocks`` keys after.

        ``key_map`` (int ``[self.num_k_blocks]``) must be strictly increasing on the kept keys (so
        rows stay strictly increasing) and map into ``[0, num_k_blocks)``; the result is checked.
        """
        num_k_blocks = _check_sizes("remap_keys", self.block_size, num_k_blocks)[1]
        km = torch.as_tensor(key_map)
        if km.dtype.is_floating_point or km.dtype.is_complex or km.dtype == torch.bool:
            # a float key block would be truncated silently (1.9 -> block 1), as the constructor says
            raise TypeError(f"remap_keys: key_map must be an integer tensor (int32 or int64), got {km.dtype}; "
                            f"convert whole numbers with key_map.round().long()")
        km = km.to(self.device, torch.long)
        if km.shape != (self.num_k_blocks,):
            raise ValueError(f"remap_keys: key_map must have shape ({self.num_k_blocks},), got {tuple(km.shape)}")
        used = self.entry_mask()
        new = torch.where(used, km[self.indices.clamp(min=0).long()], torch.full_like(self.indices, -1, dtype=torch.long))
        keep = new >= 0
        cnt = keep.sum(-1, dtype=torch.int32)
        # one read-back for the row width and the range of the map (-1 or [0, num_k_blocks): larger values
        # would wrap in the int32 rows)
        bad = ((km < -1) | (km >= num_k_blocks)).any() if km.numel() else torch.zeros((), dtype=torch.bool)
        top = cnt.max().to(torch.long) if cnt.numel() else torch.zeros((), dtype=torch.long, device=self.device)
        width, is_bad = torch.stack([top, bad.to(top.device, torch.long)]).tolist()
        if is_bad:
            raise ValueError(f"remap_keys: key_map values must be -1 (drop) or in [0, {num_k_blocks}), got "
                             f"{km.tolist()[:8]}{'...' if km.numel() > 8 else ''}")
        width = max(width, 1)
        return BlockIndex(cnt, _compact_rows(keep, new, width), self.block_size, num_k_blocks)

    def cat_rows(self, other: "BlockIndex") -> "BlockIndex":
        """This index's query rows, then ``other``'s (same heads, keys, block size and batch)."""
        if not isinstance(other, BlockIndex):
            raise TypeError(f"cat_rows: expected a BlockIndex, got {type(other).__name__}")
        a, b = self, other
        if (a.num_heads, a.num_k_blocks, a.block_size, a.batch) != (b.num_heads, b.num_k_blocks, b.block_size, b.batch):
            raise ValueError(f"cat_rows: incompatible indices {a!r} and {b!r}")
        w = max(a.max_count, b.max_count)

        def pad(x: "BlockIndex") -> torch.Tensor:
            if x.max_count == w:
                return x.indices
            fill = torch.full((*x.counts.shape, w - x.max_count), -1, dtype=torch.int32, device=x.device)
            return torch.cat([x.indices, fill], dim=-1)

        return BlockIndex(torch.cat([a.counts, b.counts], 2), torch.cat([pad(a), pad(b.to(a.device))], 2),
                          a.block_size, a.num_k_blocks, check=False)

    def key_blocks_used(self) -> torch.Tensor:
        """bool ``[num_k_blocks]``: key blocks that some row attends to."""
        used = torch.zeros(self.num_k_blocks + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.entry_mask(), self.indices.long(),
                          torch.full_like(self.indices, self.num_k_blocks, dtype=torch.long))
        used[idx.reshape(-1)] = True
        return used[: self.num_k_blocks]

    def digest(self) -> str:
        """sha256 of the pattern (shape, block size, counts and used indices): equal iff same pattern."""
        h = hashlib.sha256()
        h.update(repr((self.shape, self.block_size)).encode())
        h.update(self.counts.cpu().numpy().tobytes())
        idx = torch.where(self.entry_mask(), self.indices, torch.full_like(self.indices, -1))
        width = max(int(self.counts.max()) if self.counts.numel() else 0, 1)
        h.update(idx[..., :width].contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def equal(self, other: "BlockIndex") -> bool:
        return isinstance(other, BlockIndex) and self.digest() == other.digest()

    def __repr__(self) -> str:
        cnt = self.counts.float()
        return (
            f"BlockIndex(batch={self.batch}, heads={self.num_heads}, q_blocks={self.num_q_blocks}, "
            f"k_blocks={self.num_k_blocks}, block_size={self.block_size}, density={self.density():.4f}, "
            f"per_row min/mean/max={int(cnt.min()) if cnt.numel() else 0}/"
            f"{float(cnt.mean()) if cnt.numel() else 0:.1f}/{int(cnt.max()) if cnt.numel() else 0}, "
            f"device={self.device})"
        )
