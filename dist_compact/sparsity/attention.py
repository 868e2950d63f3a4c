"""SparseAttention: the per-layer attention entry point that applies a :class:`SparsityConfig` schedule.

``attn = SparseAttention(layer, config, compact)`` is called by the model as ``attn(q, k, v, ctx)``
(q, k, v: this rank's ``[batch, seq_local, heads_local, head_dim]`` in block order; see
:mod:`dist_compact.sparsity.context`). At each call it asks ``config.action(ctx.step, ctx.num_steps)`` and

* ``DENSE``  -> ``ctx.ops.dense`` (the fastest dense path);
* ``FUSED``  -> ``ctx.ops.dense(return_lse=True)`` (output of the step, exact), ``ctx.ops.block_mass``
  with that LSE, :func:`~dist_compact.sparsity.online.online_select`; caches the index, and the LSE
  while a later LSE-cached search still needs it;
* ``CACHED`` -> ``ctx.ops.block_mass`` with the cached LSE, selection, then ``ctx.ops.attention`` with
  the new index (one pass over QK^T for the search, one sparse pass for the output);
* ``REUSE``  -> ``ctx.ops.attention`` with the cached index (or the static Compact index).

It computes only through ``ctx.ops`` (contract 4 of docs/design.md), so the same object runs under
Ulysses / ring parallelism, where ``ctx.ops`` communicates.

Fallbacks (never an error in the denoising loop): an LSE-cached search with no cached LSE, or a
reuse step with no index (the resolution changed, or the run started mid-schedule), runs a fused
search instead; in ``"compact+adaspa"`` a reuse step with no online index uses the static index.

Cache (one entry per layer object): keyed by (layout, batch, local q shape, device, ops type,
the ops' local query-block range). Any change drops the old entry, so memory stays bounded by one entry per layer:

* the LSE, float32 ``B * H_local * S_local * 4`` bytes, held only from a fused search until the
  last LSE-cached search of the schedule (HunyuanVideo 720p, 24 heads, S=118,784: 11.4 MB per layer);
* the online index, ``B' * H_local * NQ_local * (1 + max_count) * 4`` bytes (``B' = 1`` with a shared
  batch index; density 0.2 at NQ = 928: about 17 MB per layer);
* the localized static index, the same form.

A step number lower than the last one seen starts a new run: the online index and LSE are dropped
(the static index stays).

Batch > 1: ``config.batch_index == "shared"`` (default) searches on the batch-mean block mass and
keeps one index for all samples (the cond/uncond halves of classifier-free guidance attend alike,
and one index halves the index memory); ``"per_sample"`` keeps one index per sample. Budgets are
per head in both cases.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .._util import is_int
from ..block_index import BlockIndex
from ..stats import PerHead
from .attention_ops import global_head_stats
from .config import CACHED, DENSE, FUSED, REUSE, SparsityConfig
from .context import AttentionContext, AttentionLayer, DenseAttention, OnlineState
from .online import OnlineSearchResult, local_query_blocks, online_select

__all__ = ["SparseAttention", "build_attention"]


@dataclass
class _Entry:
    """Cached state of one layer for one shape (see the module doc for the memory bound)."""

    key: Tuple
    static: Optional[BlockIndex] = None  # localized static Compact index
    static_dense: bool = False  # the static index is dense enough to run the dense kernel
    static_density: Optional[torch.Tensor] = None  # [H] all heads
    search: Optional[OnlineSearchResult] = None
    lse: Optional[torch.Tensor] = None
    last_step: int = -1
    _density_list: Optional[PerHead] = None
    _recall_list: Optional[PerHead] = None

    def set_search(self, res: OnlineSearchResult) -> None:
        self.search = res
        self._density_list = self._recall_list = None

    def drop_online(self) -> None:
        self.search = None
        self.lse = None
        self._density_list = self._recall_list = None

    def nbytes(self) -> int:
        n = 0
        for idx in (self.static, self.search.index if self.search else None):
            if idx is not None:
                n += idx.counts.numel() * 4 + idx.indices.numel() * 4
        if self.lse is not None:
            n += self.lse.numel() * self.lse.element_size()
        return n


def _block_mass(ops, q, k, lse, layout, scale, query_rows):
    # sampling as many rows as the block holds is the exact statistic: ask for that directly
    rows = None if query_rows is None or query_rows >= layout.block_size else query_rows
    return ops.block_mass(q, k, lse, layout, scale=scale, query_rows=rows)


class SparseAttention(AttentionLayer):
    """Sparse attention of one layer, following a :class:`SparsityConfig` schedule (module doc).

    Args:
        layer: the layer number (passed to ``compact.index_for`` and recorded in the stats).
        config: the :class:`SparsityConfig`.
        compact: a static pattern object with ``index_for(layer, layout, num_heads) -> BlockIndex``
            (``[1, H, NB, NB]``, global); required by the modes ``"compact"`` and ``"compact+adaspa"``.
    """

    def __init__(self, layer: int, config: SparsityConfig, compact=None):
        if not is_int(layer) or layer < 0:
            raise ValueError(f"SparseAttention.layer must be an int >= 0, got {layer!r}")
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"SparseAttention.config must be a SparsityConfig, got {type(config).__name__}")
        if config.uses_compact and compact is None:
            raise ValueError(f"SparseAttention: mode {config.mode!r} needs a compact pattern object (compact=...)")
        if compact is not None and not callable(getattr(compact, "index_for", None)):
            raise TypeError("SparseAttention.compact must have a method index_for(layer, layout, num_heads)")
        self.layer = layer
        self.config = config
        self.compact = compact if config.uses_compact else None
        self._entry: Optional[_Entry] = None

    # ------------------------------------------------------------------ public helpers
    def reset(self) -> None:
        """Drop the cache (e.g. between videos)."""
        self._entry = None

    @property
    def index(self) -> Optional[BlockIndex]:
        """The cached online index (localized), or None."""
        e = self._entry
        return None if e is None or e.search is None else e.search.index

    @property
    def last_search(self) -> Optional[OnlineSearchResult]:
        """The last online search result (localized index, per-head figures of all heads), or None."""
        e = self._entry
        return None if e is None else e.search

    def export_online(self) -> Optional[OnlineState]:
        e = self._entry
        if e is None or e.search is None:
            return None
        return OnlineState(search=e.search, lse=e.lse, static=e.static)

    def import_online(self, state: OnlineState, perm: torch.Tensor) -> None:
        e = self._entry
        if e is None or e.search is None:
            raise RuntimeError("import_online: this layer has no online search result to replace")
        res = e.search

        def p(t):
            return None if t is None else t[perm.to(t.device)]

        e.set_search(dataclasses.replace(res, index=state.search.index, density=p(res.density),
                                         recall=p(res.recall), budget=p(res.budget)))
        e.lse = state.lse
        if state.static is not None:
            e.static = state.static
            e.static_density = p(e.static_density)

    def cache_nbytes(self) -> int:
        return self._entry.nbytes() if self._entry is not None else 0

    def cache_info(self) -> dict:
        """What the cache holds: key, whether an index / LSE / static index is held, and bytes."""
        e = self._entry
        if e is None:
            return {"key": None, "index": False, "lse": False, "static": False, "nbytes": 0}
        return {"key": e.key, "index": e.search is not None, "lse": e.lse is not None,
                "static": e.static is not None, "nbytes": e.nbytes()}

    # ------------------------------------------------------------------ the call
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cfg = self.config
        action = cfg.action(ctx.step, ctx.num_steps)
        entry = self._entry
        if entry is not None and ctx.step < entry.last_step:
            entry.drop_online()  # a new run: the previous run's index and LSE do not apply
        if action == DENSE:
            if entry is not None:
                entry.last_step = ctx.step
            with self._call(ctx, "dense", q) as rec:
                with self._phase(ctx, "dense", q):
                    out = ctx.ops.dense(q, k, v, ctx.layout, scale=ctx.scale)
                if rec is not None:
                    rec.density = None
            return out

        entry = self._get_entry(q, ctx)
        entry.last_step = ctx.step
        if action == CACHED and entry.lse is None:
            action = FUSED
        if action == REUSE and entry.search is None and entry.static is None:
            action = FUSED
        if action == FUSED:
            return self._fused_search(q, k, v, ctx, entry)
        if action == CACHED:
            return self._cached_search(q, k, v, ctx, entry)
        return self._reuse(q, k, v, ctx, entry)

    # ------------------------------------------------------------------ actions
    def _fused_search(self, q, k, v, ctx, entry: _Entry) -> torch.Tensor:
        ops, layout = ctx.ops, ctx.layout
        with self._call(ctx, "fused_search", q) as rec:
            with self._phase(ctx, "dense_lse", q):
                out, lse = ops.dense(q, k, v, layout, return_lse=True, scale=ctx.scale)
            self._search(q, k, lse, ctx, entry)
            entry.lse = lse if self.config.needs_lse_after(ctx.step, ctx.num_steps) else None
            if rec is not None:
                rec.density = self._densities(entry, ctx.ops)  # of the index found (the step itself ran dense)
                rec.recall = self._recalls(entry, ctx.ops)
        return out

    def _cached_search(self, q, k, v, ctx, entry: _Entry) -> torch.Tensor:
        with self._call(ctx, "cached_search", q) as rec:
            self._search(q, k, entry.lse, ctx, entry)
            if not self.config.needs_lse_after(ctx.step, ctx.num_steps):
                entry.lse = None  # the last cached search has run: release the LSE
            out = self._sparse(q, k, v, ctx, entry.search.index, entry.search.dense_layer)
            if rec is not None:
                rec.density = self._densities(entry, ctx.ops)
                rec.recall = self._recalls(entry, ctx.ops)
        return out

    def _reuse(self, q, k, v, ctx, entry: _Entry) -> torch.Tensor:
        if entry.search is not None:
            index, dense = entry.search.index, entry.search.dense_layer
        else:
            index, dense = entry.static, entry.static_dense
        with self._call(ctx, "dense" if dense else "sparse", q) as rec:
            out = self._sparse(q, k, v, ctx, index, dense)
            if rec is not None:
                rec.density = None if dense else self._densities(entry, ctx.ops)
                rec.recall = None if dense or entry.search is None else self._recalls(entry, ctx.ops)
        return out

    def _search(self, q, k, lse, ctx, entry: _Entry) -> None:
        ops, layout = ctx.ops, ctx.layout
        with self._phase(ctx, "block_mass", q):
            mass = _block_mass(ops, q, k, lse, layout, ctx.scale, self.config.mass_query_rows)
        with self._phase(ctx, "select", q):
            static_mask = entry.static.to_dense() if entry.static is not None else None
            entry.set_search(online_select(mass, layout, ops, self.config, static_mask=static_mask))

    def _sparse(self, q, k, v, ctx, index: BlockIndex, dense: bool) -> torch.Tensor:
        if dense:
            with self._phase(ctx, "dense", q):
                return ctx.ops.dense(q, k, v, ctx.layout, scale=ctx.scale)
        with self._phase(ctx, "sparse", q):
            return ctx.ops.attention(q, k, v, index, ctx.layout, scale=ctx.scale)

    # ------------------------------------------------------------------ cache
    def _get_entry(self, q: torch.Tensor, ctx: AttentionContext) -> _Entry:
        ops, layout = ctx.ops, ctx.layout
        # the local query rows are a function of the ops' rank and the layout (q_blocks): their
        # contiguous video range identifies them without building the id list every call
        key = (layout, q.shape[0], tuple(q.shape[1:]), str(q.device), type(ops).__name__,
               tuple(ops.q_block_range(layout)))
        entry = self._entry
        if entry is not None and entry.key == key:
            return entry
        self._entry = None  # release the old shape's tensors before building the new entry
        entry = _Entry(key=key)
        if self.compact is not None:
            self._load_static(q, ctx, entry)
        self._entry = entry
        return entry

    def _load_static(self, q: torch.Tensor, ctx: AttentionContext, entry: _Entry) -> None:
        ops, layout = ctx.ops, ctx.layout
        Hl = q.shape[2]
        # the global head count: concatenate one row per local head over head shards
        H = ops.gather_heads(torch.zeros(Hl, 1, device=q.device), dim=0).shape[0]
        idx = self.compact.index_for(self.layer, layout, H)
        if not isinstance(idx, BlockIndex):
            raise TypeError(f"compact.index_for must return a BlockIndex, got {type(idx).__name__}")
        nb = layout.num_blocks
        if (idx.num_heads, idx.num_q_blocks, idx.num_k_blocks, idx.block_size) != (H, nb, nb, layout.block_size):
            raise ValueError(
                f"compact.index_for({self.layer}) gave {idx!r}; expected {H} heads, {nb}x{nb} blocks of "
                f"{layout.block_size} for {layout}"
            )
        local = ops.localize(idx.to(q.device), layout)
        entry.static = local
        # per-head density of the static index over real blocks, gathered for one global decision
        rows, row_w = local_query_blocks(ops, layout, q.device)
        key_valid = layout.block_valid(q.device) > 0
        row_w = row_w * key_valid[rows]
        dense_mask = local.to_dense() & key_valid.view(1, 1, 1, -1)
        kept = (dense_mask.sum(-1).double() * row_w.view(1, 1, -1)).sum(dim=(0, 2))
        pairs = float(row_w.sum()) * float(key_valid.sum()) * dense_mask.shape[0]
        local_stats = torch.stack([kept, torch.full((Hl,), pairs, dtype=torch.float64, device=q.device)], dim=1)
        g = global_head_stats(local_stats, ops)
        density = g[:, 0] / g[:, 1].clamp(min=1)
        entry.static_density = density.float()
        # a full index runs dense at any threshold (the op no longer dispatches on its own; one read, once)
        mean = density.mean()
        entry.static_dense = bool((mean > self.config.dense_threshold) | (mean >= 1.0))

    # ------------------------------------------------------------------ stats
    @staticmethod
    def _model_order(t: torch.Tensor, ops) -> PerHead:
        """Per-head figures of all heads (held in the plan's head order) in model head order, left on the
        device until the statistics are read (no host read inside the forward)."""
        return PerHead(t, ops.model_order())

    def _densities(self, entry: _Entry, ops) -> PerHead:
        if entry._density_list is None:
            d = entry.search.density if entry.search is not None else entry.static_density
            entry._density_list = self._model_order(d, ops)
        return entry._density_list

    def _recalls(self, entry: _Entry, ops) -> Optional[PerHead]:
        if entry.search is None:
            return None
        if entry._recall_list is None:
            entry._recall_list = self._model_order(entry.search.recall, ops)
        return entry._recall_list

    def _call(self, ctx, kind: str, q):
        if ctx.stats is None:
            return nullcontext(None)
        return ctx.stats.call(self.layer, ctx.step, kind, device=q.device)

    def _phase(self, ctx, name: str, q):
        if ctx.stats is None:
            return nullcontext()
        return ctx.stats.phase(name, device=q.device)

    def __repr__(self) -> str:
        return f"SparseAttention(layer={self.layer}, mode={self.config.mode!r})"


def build_attention(num_layers: int, sparsity: SparsityConfig, compact=None, sp=None) -> List[Callable]:
    """One attention callable ``attn(q, k, v, ctx)`` per layer for ``sparsity``.

    ``mode == "dense"`` gives :class:`DenseAttention`; other modes give
    :class:`~dist_compact.sparsity.attention.SparseAttention` (``compact`` is the static pattern object of
    the Compact modes, see :func:`load_compact`). With a sequence-parallel plan ``sp`` every layer is
    ``sp.wrap``-ped.
    """
    if not isinstance(sparsity, SparsityConfig):
        raise TypeError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    if sparsity.mode == "dense":
        layers: List[Callable] = [DenseAttention(i) for i in range(num_layers)]
    else:
        layers = [SparseAttention(i, sparsity, compact) for i in range(num_layers)]
    if sp is not None:
        layers = [sp.wrap(a) for a in layers]
    return layers
