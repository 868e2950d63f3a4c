"""Our attention through diffusers' own attention machinery and context parallelism (diffusers 0.42).

::

    from dist_compact import SparsityConfig, denoising_state
    from dist_compact.integrations.diffusers_backend import set_sparse_backend
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    set_sparse_backend(pipe.transformer, SparsityConfig(mode="adaspa", sparsity=0.8))
    # optional, under torchrun: diffusers' own context parallelism, before or after the line above
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ring_degree=2))
    state = denoising_state(pipe.transformer); state.begin(50)
    video = pipe(prompt, num_inference_steps=50, callback_on_step_end=state.on_step_end).frames[0]

HunyuanVideo has no ``_cp_plan`` in diffusers 0.42.1: pass the adapter's,
``enable_parallelism(config=..., cp_plan=cp_plan(pipe.transformer))``.

What diffusers 0.42.1 allows (read from ``models/attention_dispatch.py``, ``models/modeling_utils.py``,
``models/_modeling_parallel.py``, ``hooks/context_parallel.py``):

* Backends are members of the closed enum ``AttentionBackendName``. ``set_attention_backend(name)``,
  the ``attention_backend(name)`` context manager and ``dispatch_attention_fn(backend=...)`` accept
  only those names, and ``_AttentionBackendRegistry.register`` (a private class) keys its dict by
  them. No public API registers a third-party backend. A backend function would in any case see
  only ``query, key, value [B, S, H, D]``, ``attn_mask``, ``dropout_p``, ``is_causal``, ``scale``,
  ``enable_gqa``, ``_parallel_config``: not which layer it serves, nor the video grid.
* The public hook is the attention processor (``module.set_processor``). Processors that carry the
  class attributes ``_attention_backend`` and ``_parallel_config`` are what diffusers configures:
  ``enable_parallelism`` sets ``processor._parallel_config`` on each of them, checks the first one's
  backend for context-parallel support, and installs the model's ``_cp_plan`` hooks.
* Context parallelism (``ContextParallelConfig(ulysses_degree, ring_degree)``): the ``_cp_plan``
  hooks cut the patchified video tokens, in the MODEL's order (raster ``f, r, c``), into
  ``U * R`` equal contiguous chunks (``tensor.chunk``; the length must divide), chunk ``c`` to rank
  ``c`` of the flattened ``(ring, ulysses)`` mesh (ring-major), and all-gather ``proj_out``'s output.
  Ulysses: an all-to-all gives each rank the heads ``[u H/U, (u+1) H/U)`` of its ring group's chunks
  concatenated in rank order, i.e. the contiguous model-order range ``[r V/R, (r+1) V/R)``. Ring
  (``TemplatedRingAttention``): the K/V of the ring group are all-gathered, and the backend's
  ``forward_op(q, k_j, v_j, return_lse=True)`` runs for ``j = r, r+1, ... (mod R)``; the partials are
  merged by their LSE (``out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)``). A backend must
  therefore return ``(out, lse [B, S, H])``; an all ``-inf`` accumulator makes that merge NaN.

So this module installs processors, as :func:`~dist_compact.integrations.diffusers.sparsify` does
(the same per-layer Compact / AdaSpa state, HunyuanVideo's prompt tokens in their own always-kept
blocks), but it leaves the model's token order and its sharding to diffusers: no stream hooks. Each
attention call maps the sequence it gets to our block order:

* one process: the whole sequence -> block order (one scatter), the layer's ``attn(q, k, v, ctx)``,
  back (one gather);
* Ulysses (``ring_degree == 1``): :func:`~dist_compact.parallel.ulysses.seq_to_heads` on diffusers'
  Ulysses group (the same exchange as diffusers', with the replicated prompt sent once), the whole
  sequence of this rank's heads to block order, ``attn`` with a
  :class:`~dist_compact.parallel.ulysses.UlyssesOps`, back;
* ring or Ulysses x ring: ``attn`` runs on the ring chunk with a :class:`ChunkRingOps`: its query
  rows are the tiles the chunk touches (a chunk edge may cut a tile: both ranks then hold part of
  that query block, padded and masked), its attention is diffusers' ``TemplatedRingAttention``
  calling our block-sparse kernel once per key chunk with the index cut to the tiles of that chunk
  and returning our LSE, merged by diffusers. The online search (block mass) all-gathers q, k and the
  LSE of the ring group, so a cut tile gets the mass of all its tokens on both ranks (the same
  selection), and per-head statistics count it once (on the rank holding its first token).

HunyuanVideo's prompt tokens are NOT split (:func:`cp_plan`, the adapter's): every rank holds all of
them; their queries attend every key, they are keys of every video query, and in a ring they are
keys only of the local step (each query sees them once).

What is relied on beyond diffusers' public API (checked by
``tests/integrations/test_diffusers_backend.py::test_diffusers_internals_we_rely_on``, so an upgrade that changes
them fails loudly): ``attention_dispatch.TemplatedRingAttention.apply(q, k, v, attn_mask, dropout_p,
is_causal, scale, enable_gqa, return_lse, forward_op, backward_op, _parallel_config)`` and the call
order of ``forward_op`` (first call ``_save_ctx=True`` with the local chunk, then ``r+1, r+2, ...``);
``ContextParallelConfig``'s set-up attributes ``_ulysses_mesh`` / ``_ring_mesh``.

Limits: inference only (backward raises); no ``ulysses_anything`` / ``ring_anything`` (uneven
chunks) and no tensor parallelism (each one clear error); the video tokens must split into
``U * R`` equal chunks (diffusers' own rule); ``set_attention_backend`` after this call changes
only the processors we did not replace (Wan's cross-attention, HunyuanVideo's token refiner).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..sparsity.context import AttentionContext, AttentionLayer
from ..block_index import BlockIndex
from ..sparsity.config import SparsityConfig
from ..layout import VideoLayout
from ..ops import block_attention_mass, block_sparse_attention
from ..parallel.config import ParallelConfig, ParallelGroups
from ..parallel.ulysses import HeadShardedOps, UlyssesOps, all_gather_cat, heads_to_seq, seq_to_heads
from ..models.adapters import adapter_for
from .._util import as_int
from .core import MAX_LAYOUTS, DenoisingState, IntegrationHandle, check_model, install, lru, new_attentions

__all__ = [
    "set_sparse_backend",
    "BackendHandle",
    "cp_plan",
    "ChunkRingOps",
    "ChunkGeometry",
]

#: LSE given to rows with no key in the FIRST ring step (the local chunk): diffusers' merge turns an
#: all -inf accumulator into NaN. exp(-1000 - lse) is 0 for any real row (|lse| < ~900), and the
#: merge's rounding at this magnitude is <= 3e-5 in the LSE. Rows of an index that keeps the query's
#: own tile (Compact windows) or the prompt (HunyuanVideo) are never empty there.
_EMPTY_FIRST_LSE = -1000.0


# ---------------------------------------------------------------------------------------------- diffusers
def _ring_attention_class():
    """diffusers' ring loop (private; see the module doc for what is relied on)."""
    from diffusers.models import attention_dispatch

    return attention_dispatch.TemplatedRingAttention


def cp_plan(transformer) -> Optional[Dict]:
    """The ``_cp_plan`` to pass to ``transformer.enable_parallelism(config=..., cp_plan=...)``: its
    adapter's (HunyuanVideo ships none in diffusers 0.42.1), or None where the model has its own."""
    check_model("cp_plan", transformer)
    return adapter_for(transformer, "cp_plan").cp_plan()


def _context_config(parallel_config):
    """diffusers' ``ContextParallelConfig`` of a processor's ``_parallel_config`` (None: no CP)."""
    if parallel_config is None:
        return None
    if getattr(parallel_config, "tensor_parallel_config", None) is not None:
        raise NotImplementedError("dist_compact backend: diffusers' tensor parallelism is not supported "
                                  "(use ContextParallelConfig(ulysses_degree=..., ring_degree=...))")
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ulysses_anything or cp.ring_anything:
        raise NotImplementedError("dist_compact backend: ulysses_anything / ring_anything (uneven chunks) are "
                                  "not supported; use a video length divisible by ulysses_degree * ring_degree")
    if getattr(cp, "_ulysses_mesh", None) is None or getattr(cp, "_ring_mesh", None) is None:
        raise RuntimeError("dist_compact backend: the ContextParallelConfig is not set up (call "
                           "transformer.enable_parallelism(config=...))")
    return cp


# ---------------------------------------------------------------------------------------------- geometry
def _model_positions(layout: VideoLayout) -> torch.Tensor:
    """int64 ``[V + text blocks * block]``: block-order position of each position of the sequence the
    processors hand over (video in model order, then the prompt padded to whole blocks)."""
    tp = layout.num_text_blocks * layout.block_size
    vid = layout.permutation()[:layout.video_tokens]
    return torch.cat([vid, layout.video_padded_len + torch.arange(tp)])


def _pack(pos: torch.Tensor, bs: int):
    """Tokens at block-order positions ``pos`` (one contiguous model-order range) packed into the
    blocks they touch, valid tokens first: ``(blocks, local position of each token, valid counts,
    whether the block's first token is here)``."""
    blk, slot = pos // bs, pos % bs
    blocks, inv = torch.unique(blk, sorted=True, return_inverse=True)
    # a contiguous model range holds a contiguous run of each tile's slots (raster order inside a tile)
    first = torch.full((blocks.numel(),), bs, dtype=torch.long).scatter_reduce(0, inv, slot, "amin")
    local = inv * bs + slot - first[inv]
    valid = torch.bincount(inv, minlength=blocks.numel()).to(torch.int32)
    return blocks, local, valid, first == 0


@dataclass(frozen=True)
class ChunkGeometry:
    """Where the ring chunks of one layout lie in block order (CPU tensors; ``.to`` per device).

    Ring chunk ``j`` = video tokens ``[j * Vr, (j+1) * Vr)`` in model order (``Vr = V / R``), plus the
    whole prompt (replicated).

    Attributes:
        ring, rank: ring degree ``R`` and this rank's ring position ``r``.
        block_size: the layout's block.
        chunk_video: ``Vr``.
        q_blocks: global ids of the blocks my chunk touches, then the text blocks.
        q_local: int64 ``[Vr + Tp]`` position of each of my tokens in the packed local blocks.
        q_valid: int32 valid tokens per local query block.
        row_weight: 1 for a touched block whose first token is mine, 0 otherwise; text rows 1 on ring
            rank 0 only (rows held by several ranks count once).
        k_local, k_valid, key_map: per key chunk ``j``: packed positions of its video tokens (and of
            the prompt for ``j == r``), valid counts, and global key block -> local (-1 = absent).
    """

    ring: int
    rank: int
    block_size: int
    chunk_video: int
    q_blocks: torch.Tensor
    q_local: torch.Tensor
    q_valid: torch.Tensor
    row_weight: torch.Tensor
    k_local: Tuple[torch.Tensor, ...]
    k_valid: Tuple[torch.Tensor, ...]
    key_map: Tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, layout: VideoLayout, ring: int, rank: int) -> "ChunkGeometry":
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"ChunkGeometry.build: layout must be a VideoLayout, got {type(layout).__name__}")
        R, r = as_int(ring), as_int(rank)
        if R is None or R < 1:
            raise ValueError(f"ChunkGeometry.build: ring must be an int >= 1 (the ring degree), got {ring!r}")
        if r is None or not 0 <= r < R:
            raise ValueError(f"ChunkGeometry.build: rank must be an int in [0, ring - 1 = {R - 1}] (this rank's ring "
                             f"position), got {rank!r}")
        ring, rank = R, r
        V, bs = layout.video_tokens, layout.block_size
        if V % ring:
            raise ValueError(f"dist_compact backend: {V} video tokens do not split into {ring} ring chunks")
        vr = V // ring
        pos = _model_positions(layout)
        nv, nb = layout.num_video_blocks, layout.num_blocks
        text_ids = torch.arange(nv, nb)
        text_valid = layout.block_valid()[nv:]
        text_local = pos[V:] - layout.video_padded_len  # the padded prompt, in its own blocks
        chunks = [_pack(pos[j * vr:(j + 1) * vr], bs) for j in range(ring)]
        blocks, local, valid, first = chunks[rank]
        nlv = blocks.numel()
        q_blocks = torch.cat([blocks, text_ids])
        text_w = torch.full((nb - nv,), 1.0 if rank == 0 else 0.0, dtype=torch.float64)
        weight = torch.cat([first.double(), text_w])
        k_local, k_valid, key_map = [], [], []
        for j, (bj, lj, vj, _) in enumerate(chunks):
            km = torch.full((nb,), -1, dtype=torch.long)
            km[bj] = torch.arange(bj.numel())
            if j == rank:  # the prompt is a key of the local step only: every query sees it once
                km[nv:] = bj.numel() + torch.arange(nb - nv)
                lj = torch.cat([lj, bj.numel() * bs + text_local])
                vj = torch.cat([vj, text_valid])
            k_local.append(lj)
            k_valid.append(vj)
            key_map.append(km)
        return cls(ring, rank, bs, vr, q_blocks, torch.cat([local, nlv * bs + text_local]),
                   torch.cat([valid, text_valid]), weight, tuple(k_local), tuple(k_valid), tuple(key_map))

    def to(self, device) -> "ChunkGeometry":
        def mv(x):
            return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)

        return dataclasses.replace(self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name not in ("ring", "rank", "block_size", "chunk_video")})


def _scatter(x: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
    """``x [B, n, H, D]`` -> zeros ``[B, length, H, D]`` with row ``pos[i]`` = ``x[:, i]``."""
    out = x.new_zeros(x.shape[0], length, *x.shape[2:])
    return out.index_copy_(1, pos, x)


# ---------------------------------------------------------------------------------------------- ring ops
class ChunkRingOps(HeadShardedOps):
    """:class:`~dist_compact.sparsity.attention_ops.AttentionOps` of one rank of diffusers' ring (or Ulysses x ring).

    Tensors handed in: the ring chunk as diffusers holds it after its Ulysses exchange,
    ``[B, Vr + Tp, H/U, D]`` (video in model order, then the padded prompt), see
    :class:`ChunkGeometry`; the LSE ``[B, H/U, Vr + Tp]``. Query rows: the blocks the chunk touches
    (``q_blocks``; a cut tile is partly here), key numbering global.

    ``attention`` / ``dense`` run diffusers' ``TemplatedRingAttention`` with our forward op (our
    kernel on one key chunk, the index cut to it, returning our LSE); ``block_mass`` all-gathers q, k and
    the LSE over the ring group; ``reduce_rows`` all-reduces over it; ``gather_heads`` all-gathers
    over the Ulysses group.
    """

    def __init__(self, groups: ParallelGroups, parallel_config, layout: VideoLayout, backend: str = "auto"):
        super().__init__(groups, backend)
        self.parallel_config = parallel_config
        self._cpu = ChunkGeometry.build(layout, groups.config.ring, groups.ring_rank)
        self._geo: Dict[str, ChunkGeometry] = {}
        self._pos: Dict[str, torch.Tensor] = {}
        self._subs: "OrderedDict[int, Tuple[BlockIndex, List[BlockIndex]]]" = OrderedDict()

    def geometry(self, device) -> ChunkGeometry:
        key = str(device)
        if key not in self._geo:
            self._geo[key] = self._cpu.to(device)
        return self._geo[key]

    # ------------------------------------------------------------------ what is local
    def q_block_range(self, layout: VideoLayout) -> Tuple[int, int]:
        """Video blocks touched by this chunk, as a range (a cache key; use :meth:`q_blocks`)."""
        b = self._cpu.q_blocks[: self._cpu.q_blocks.numel() - layout.num_text_blocks]
        return (int(b[0]), int(b[-1]) + 1)

    def q_blocks(self, layout: VideoLayout) -> torch.Tensor:
        return self._cpu.q_blocks

    def row_weight(self, layout: VideoLayout) -> torch.Tensor:
        return self._cpu.row_weight

    def localize(self, index: BlockIndex, layout: VideoLayout) -> BlockIndex:
        h0, h1 = self.head_range(index.num_heads)
        if (h0, h1) != (0, index.num_heads):
            index = index.select_heads(slice(h0, h1))
        return index.select_rows_at(self._cpu.q_blocks)

    # ------------------------------------------------------------------ compute
    def _per_chunk(self, index: Optional[BlockIndex], heads: int, device) -> List[BlockIndex]:
        """The localized ``index`` (None: dense) cut to each key chunk, renumbered (cached per object)."""
        key = id(index)
        hit = self._subs.get(key)
        if hit is not None and hit[0] is index:
            return hit[1]
        g = self.geometry(device)
        if index is None:
            nq = g.q_valid.numel()
            subs = [BlockIndex.full(1, heads, nq, v.numel(), g.block_size, device=device) for v in g.k_valid]
        else:
            subs = [index.remap_keys(km, v.numel()) for km, v in zip(g.key_map, g.k_valid)]
        self._subs[key] = (index, subs)
        while len(self._subs) > 4:
            self._subs.popitem(last=False)
        return subs

    def _ring(self, q, k, v, index: Optional[BlockIndex], layout: VideoLayout, return_lse: bool, scale):
        g = self.geometry(q.device)
        subs = self._per_chunk(index, q.shape[2], q.device)
        R, r, vr, bs = g.ring, g.rank, g.chunk_video, layout.block_size
        nq = g.q_valid.numel()
        step = [0]

        def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale_, enable_gqa, return_lse_,
                       _save_ctx=True, _parallel_config=None):
            if _save_ctx:  # diffusers' first call: the local chunk
                step[0] = 0
            j = (r + step[0]) % R
            first = step[0] == 0
            step[0] += 1
            if not first:
                key, value = key[:, :vr], value[:, :vr]  # another rank's copy of the prompt is not a key
            nk = g.k_valid[j].numel()
            qb = _scatter(query, g.q_local, nq * bs)
            kb, vb = _scatter(key, g.k_local[j], nk * bs), _scatter(value, g.k_local[j], nk * bs)
            ob, lb = block_sparse_attention(qb, kb, vb, subs[j], scale=scale_, return_lse=True, q_valid=g.q_valid,
                                            kv_valid=g.k_valid[j], backend=self.backend)
            out = ob.index_select(1, g.q_local).float()
            lse = lb.index_select(2, g.q_local).transpose(1, 2)
            if first:
                lse = lse.masked_fill(lse == float("-inf"), _EMPTY_FIRST_LSE)
            return out, lse.contiguous()

        def backward_op(ctx, grad_out, *args, **kwargs):
            raise NotImplementedError("dist_compact backend: inference only (no backward)")

        out, lse = _ring_attention_class().apply(q, k, v, None, 0.0, False, scale, False, True, forward_op,
                                                 backward_op, self.parallel_config)
        if not return_lse:
            return out
        return out, lse.float().transpose(1, 2).contiguous()

    def attention(self, q, k, v, index: BlockIndex, layout: VideoLayout, *, return_lse: bool = False,
                  scale: Optional[float] = None):
        return self._ring(q, k, v, index, layout, return_lse, scale)

    def dense(self, q, k, v, layout: VideoLayout, *, return_lse: bool = False, scale: Optional[float] = None):
        return self._ring(q, k, v, None, layout, return_lse, scale)

    def block_mass(self, q, k, lse, layout: VideoLayout, *, scale: Optional[float] = None,
                   query_rows: Optional[int] = None) -> torch.Tensor:
        """``[B, H/U, local query blocks, num_blocks]`` over every token of each touched block."""
        g = self.geometry(q.device)
        R, vr, bs = g.ring, g.chunk_video, layout.block_size
        rg = self.groups.ring_group
        B, S, Hl, _ = q.shape

        def whole(x, dim):  # the ring group's chunks -> the whole sequence (video of all chunks, my prompt)
            xs = all_gather_cat(x, rg, dim).unflatten(dim, (R, S))
            vid = xs.narrow(dim + 1, 0, vr).flatten(dim, dim + 1)
            return torch.cat([vid, x.narrow(dim, vr, S - vr)], dim=dim)

        pos = self._positions(layout, q.device)
        qg, kg = _scatter(whole(q, 1), pos, layout.padded_len), _scatter(whole(k, 1), pos, layout.padded_len)
        lg = lse.new_zeros(B, Hl, layout.padded_len).index_copy_(2, pos, whole(lse, 2))
        rows = g.q_blocks
        qs = qg.unflatten(1, (layout.num_blocks, bs)).index_select(1, rows).flatten(1, 2)
        ls = lg.unflatten(2, (layout.num_blocks, bs)).index_select(2, rows).flatten(2, 3)
        bv = layout.block_valid(q.device)
        return block_attention_mass(qs, kg, ls, bs, scale=scale, q_valid=bv.index_select(0, rows), kv_valid=bv,
                                    query_rows=query_rows, backend=self.backend)

    def _positions(self, layout: VideoLayout, device) -> torch.Tensor:
        key = str(device)
        if key not in self._pos:
            self._pos[key] = _model_positions(layout).to(device)
        return self._pos[key]

    # ------------------------------------------------------------------ global statistics
    def reduce_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ring group (weight rows with :meth:`row_weight` first)."""
        t = t.clone()
        dist.all_reduce(t, group=self.groups.ring_group)
        return t

    def __repr__(self) -> str:
        return f"ChunkRingOps({self.groups!r}, backend={self.backend!r})"


# ---------------------------------------------------------------------------------------------- per layer
class _LayerAttention(AttentionLayer):
    """``attn(q, k, v, ctx)`` of one layer as :class:`BackendHandle` calls it: q, k, v are this rank's
    ``[B, Vc + Tp, H, D]`` (its diffusers chunk of the video in model order, then the padded prompt);
    maps them to what the layer's inner attention (DenseAttention / SparseAttention) expects."""

    def __init__(self, handle: "BackendHandle", layer: int, inner: Callable):
        self.handle = handle
        self.layer = layer
        self.inner = inner

    def __call__(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        h, layout = self.handle, ctx.layout
        cp = _context_config(h.processors[self.layer]._parallel_config)
        U, R = (1, 1) if cp is None else (cp.ulysses_degree, cp.ring_degree)
        tp = layout.num_text_blocks * layout.block_size
        vc = layout.video_tokens // (U * R)
        if layout.video_tokens % (U * R) or q.shape[1] != vc + tp:
            raise RuntimeError(
                f"dist_compact backend (layer {self.layer}): got {q.shape[1]} tokens, expected {vc} video tokens "
                f"(1/{U * R} of {layout.video_tokens}) + {tp} prompt tokens; diffusers' cp plan must split the "
                "video tokens only (HunyuanVideo: enable_parallelism(..., cp_plan=cp_plan(transformer)))")
        ops = h.ops_for(layout, h.processors[self.layer]._parallel_config, q.device)
        ug = ops.groups.ulysses_group if U > 1 else None
        u = ops.groups.ulysses_rank if U > 1 else 0
        if U > 1:
            q, k, v = seq_to_heads([q, k, v], vc, ug, u, U)
        sub = dataclasses.replace(ctx, ops=ops)
        if R > 1:
            out = self.inner(q, k, v, sub)
        else:  # the whole sequence: block order, the layer, back
            pos = h.positions(layout, q.device)
            n = layout.padded_len
            out = self.inner(_scatter(q, pos, n), _scatter(k, pos, n), _scatter(v, pos, n), sub)
            out = out.index_select(1, pos)
        if U > 1:
            out = heads_to_seq(out, vc, ug, u, U)
        return out

    def cache_nbytes(self) -> int:
        return self.inner.cache_nbytes() if isinstance(self.inner, AttentionLayer) else 0


# ---------------------------------------------------------------------------------------------- handle
class BackendHandle(IntegrationHandle):
    """What :func:`set_sparse_backend` installed (``dist_compact.integrations.installed(model)``).

    No stream hooks: the model keeps its token order and diffusers its sharding. ``processors``: our
    processor of each layer (diffusers sets their ``_parallel_config``).
    """

    WHO = "set_sparse_backend"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processors: List = []
        self._ops: "OrderedDict[Tuple, object]" = OrderedDict()
        self._pos: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()

    def _build_attentions(self) -> List[Callable]:
        return [_LayerAttention(self, i, a) for i, a in enumerate(new_attentions(self, None))]

    def positions(self, layout: VideoLayout, device) -> torch.Tensor:
        return lru(self._pos, (layout, str(device)), lambda: _model_positions(layout).to(device), 2 * MAX_LAYOUTS)

    def ops_for(self, layout: VideoLayout, parallel_config, device):
        """This rank's ops for ``layout`` under diffusers' ``parallel_config`` (built once)."""
        cp = _context_config(parallel_config)
        if cp is None:
            return self.ops

        def build():
            U, R = cp.ulysses_degree, cp.ring_degree
            cfg = ParallelConfig(ulysses=U, ring=R).check(num_heads=self.num_heads)
            ug = cp._ulysses_mesh.get_group() if U > 1 else None
            rg = cp._ring_mesh.get_group() if R > 1 else None
            groups = ParallelGroups.from_groups(cfg, ug, rg)
            if R == 1:
                return UlyssesOps(groups, self.backend)
            return ChunkRingOps(groups, parallel_config, layout, self.backend)

        return lru(self._ops, (layout, id(parallel_config), str(device)), build, 2 * MAX_LAYOUTS)

    def check_forward(self, grid: Tuple[int, int, int]) -> None:
        cp = _context_config(self.processors[0]._parallel_config)
        if cp is not None:
            n = cp.ulysses_degree * cp.ring_degree
            V = grid[0] * grid[1] * grid[2]
            if V % n:
                raise ValueError(f"set_sparse_backend: {V} video tokens {grid} do not split into "
                                 f"ulysses_degree * ring_degree = {n} equal chunks (diffusers' context parallelism "
                                 "needs that)")

    def reset(self) -> None:
        super().reset()
        self._ops.clear()
        self._pos.clear()


def _backend_processor(h: BackendHandle, layer: int, stock):
    """The adapter's processor of ``layer``, carrying diffusers' processor settings (``_attention_backend``,
    ``_parallel_config``: what diffusers configures; ``enable_parallelism`` may have run first, so the
    stock processor's are kept)."""
    proc = h.adapter.processor(h, layer)
    proc._parallel_config = getattr(stock, "_parallel_config", None)
    proc._attention_backend = getattr(stock, "_attention_backend", None)
    return proc


def set_sparse_backend(transformer, sparsity_config: Optional[SparsityConfig] = None, *, compact=None,
                       tile: Optional[Sequence[int]] = None, state: Optional[DenoisingState] = None, stats=None,
                       backend: str = "auto", attention_factory: Optional[Callable] = None):
    """Make dist_compact the attention of ``transformer``'s video self-attention (in place); returns it.

    Args:
        transformer: diffusers' ``WanTransformer3DModel`` (Wan2.1 / 2.2) or
            ``HunyuanVideoTransformer3DModel``; with or without ``enable_parallelism`` (before or after
            this call; HunyuanVideo with ``cp_plan=cp_plan(transformer)``).
        sparsity_config, compact, tile, state, stats, backend, attention_factory: as
            :func:`dist_compact.integrations.diffusers.sparsify` (``attention_factory`` gets ``sp=None``).

    :func:`dist_compact.unsparsify` puts the stock processors back (with diffusers' settings).

    The outputs equal :func:`~dist_compact.integrations.diffusers.sparsify`'s for the same config
    (the same per-layer state), on one process and under diffusers' context parallelism.
    """
    check_model("set_sparse_backend", transformer)
    adapter = adapter_for(transformer, "set_sparse_backend")
    if adapter.name == "embedded":
        raise TypeError("set_sparse_backend: the embedded model has no diffusers attention processors; use sparsify")
    sparsity, state, compact, tile, stats = BackendHandle.checked(
        "set_sparse_backend", adapter, sparsity_config, backend, state, compact, tile, stats,
        attention_factory=attention_factory)
    h = BackendHandle(transformer, adapter, sparsity=sparsity, compact=compact, tile=tile, state=state, stats=stats,
                      backend=backend, attention_factory=attention_factory)
    install(transformer, h)
    h.hook_forward(stream=False)
    stock = [mod.processor for mod in adapter.attention_modules()]
    h.processors = h.set_processors(lambda layer: _backend_processor(h, layer, stock[layer]))
    return transformer
