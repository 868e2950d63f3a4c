"""Our attention inside diffusers' video DiTs (and the embedded model): :func:`sparsify`.

::

    from dist_compact.integrations.diffusers import sparsify, denoising_state
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    sparsify(pipe.transformer, SparsityConfig(mode="adaspa", sparsity=0.8))
    state = denoising_state(pipe.transformer)
    state.begin(50)
    video = pipe(prompt, num_inference_steps=50, callback_on_step_end=state.on_step_end).frames

Supported models: diffusers' ``WanTransformer3DModel`` (self-attention sparse; the cross-attention
to the text stays diffusers' own), ``HunyuanVideoTransformer3DModel`` (joint text + video attention
of the dual- and single-stream blocks; the text tokens go to their own blocks after the video
blocks, as our layout's text sink expects; the token refiner's text-only attention stays stock) and
:class:`~dist_compact.models.embedded.EmbeddedDiT`.

How it is installed (the torchtitan way: hooks and processors on the stock modules, no model code
copied per model):

* a forward pre-hook on the transformer reads the latent grid from the input ``hidden_states``
  ``[B, C, F, H, W]`` and the patch size from ``transformer.config`` (``(F/pt, H/ph, W/pw)``
  tokens), the text token count from ``encoder_attention_mask`` (HunyuanVideo), builds the global
  :class:`~dist_compact.layout.VideoLayout` (``sp.layout_for`` applied) and the
  :class:`~dist_compact.sparsity.context.AttentionContext` of this forward (step from the
  :class:`DenoisingState`);
* the video tokens go to block order ONCE per forward, and are sharded there: a hook on the first
  module that sees them as tokens (Wan: pre-hook of ``blocks[0]``; HunyuanVideo: output of
  ``x_embedder``) applies ``layout.to_blocks`` then ``sp.shard``; a hook on the ``rope`` output does
  the same to the rotary tables, so every block sees tokens and their positions in one order. All
  other ops of these blocks are per token, so the order does not change them. A hook on
  ``proj_out``'s output gathers (``sp.gather``) and returns to model order (``from_blocks``);
* the attention modules get our processor: q, k, v exactly as the stock processor (diffusers'
  projection / norm / ``apply_rotary_emb`` helpers), then ``attn(q, k, v, ctx)`` (DenseAttention or
  SparseAttention, wrapped by the sequence-parallel plan), then the stock output projections.

Padding. Ragged tiles hold zero tokens after ``to_blocks``; they are masked as keys (``block_valid``),
their outputs are dropped when leaving block order, so they never reach a real token.

HunyuanVideo text masks. The stock model masks the padded prompt tokens as keys. Here each sample's
valid prompt length ``l`` (from ``encoder_attention_mask``, valid tokens first) is the layout's
``text_tokens``; the padded prompt tokens take no part in attention (their rows get zeros; they
never reach a video token, as in the stock model where they are masked keys). Samples of one batch
with different lengths run as one attention call per distinct length (exact; e.g. the
unconditional half of classifier-free guidance).

The denoising step. Schedules (dense warm-up, searches) need the step index; the transformer does
not know it, so it is read from a :class:`DenoisingState` that the pipeline runner updates:
``state.begin(num_steps)`` before the pipeline call and ``callback_on_step_end=state.on_step_end``
(diffusers calls it after every step ``i``; it sets ``step = i + 1``).
:mod:`dist_compact.run.jobs.diffusers` does both. Without it the step stays 0.

One layout, one set of attention objects: every distinct layout (Wan: one per video size;
HunyuanVideo: one per prompt length) gets its own per-layer attention objects (so the cached
indices of a classifier-free-guidance pair do not evict each other), at most ``MAX_LAYOUTS`` of
them (least recently used dropped).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..sparsity.context import AttentionContext, AttentionLayer
from ..sparsity.attention_ops import AttentionOps
from ..sparsity.config import SparsityConfig
from ..layout import VideoLayout
from .core import (MAX_LAYOUTS, SUPPORTED_MODELS, DenoisingState, IntegrationHandle, checked_install, default_tile,
                   forward_inputs, get_arg, handle_state, hunyuan_qkv, lru, model_kind, new_attentions,
                   remove_handle, replace_arg)

__all__ = [
    "sparsify",
    "unsparsify",
    "sparsify_handle",
    "denoising_state",
    "DenoisingState",
    "SparsifyHandle",
    "default_tile",
    "SUPPORTED_MODELS",
    "MAX_LAYOUTS",
]


@dataclass
class _Group:
    """Samples of one forward that share a layout (one attention call per layer)."""

    layout: VideoLayout
    ctx: AttentionContext
    attns: List[Callable]
    samples: Optional[torch.Tensor]  # int64 batch indices, None = the whole batch


@dataclass
class _Forward:
    """What the hooks computed for the forward in progress."""

    video_layout: VideoLayout  # text_tokens = 0; the stream's block order and shards
    groups: List[_Group]


# ---------------------------------------------------------------------------------------------- handle
class SparsifyHandle(IntegrationHandle):
    """What :func:`sparsify` installed on one transformer; ``sparsify_handle(model)`` returns it.

    Attributes (besides :class:`~dist_compact.integrations.core.IntegrationHandle`'s):
        kind: ``"wan"``, ``"hunyuan_video"`` or ``"embedded"``; num_layers: Wan: self-attention of
            each block; HunyuanVideo: dual-stream then single-stream blocks.
        sp, backend: as given to :func:`sparsify`; ops: this rank's :class:`AttentionOps`.
        stats: the :class:`~dist_compact.stats.AttentionStats` recorder (None: no recording).
        layout: the global layout of the last forward (its first sample group), or None.
    """

    ATTR = "_dist_compact_sparsify"

    def __init__(self, model, kind: str, *, num_layers: int, num_heads: int, head_dim: int,
                 sparsity: SparsityConfig, compact, sp, tile, state: DenoisingState, stats, backend: str,
                 attention_factory: Optional[Callable] = None):
        super().__init__(model, kind, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                         sparsity=sparsity, compact=compact, tile=tile, state=state, stats=stats,
                         attention_factory=attention_factory)
        self.sp = sp
        self.backend = backend
        self.ops = AttentionOps(backend)
        # one layout instance per (grid, text tokens): its maps and their device copies (validated
        # once by the kernels) are built once, not at every forward
        self._layouts: "OrderedDict[Tuple, VideoLayout]" = OrderedDict()
        self._fwd: Optional[_Forward] = None
        self._restore_embedded: Optional[List[Callable]] = None

    # ------------------------------------------------------------------ attention objects
    def _build_attentions(self) -> List[Callable]:
        return new_attentions(self, self.sp)

    def reset(self) -> None:
        """Drop every cached index / LSE (e.g. between videos of different prompts)."""
        super().reset()
        self._layouts.clear()

    def cache_nbytes(self) -> int:
        """Bytes held by the attention layers' caches (indices, LSE), all layouts together."""
        return sum(a.cache_nbytes() for attns in self._bank.values() for a in attns if isinstance(a, AttentionLayer))

    # ------------------------------------------------------------------ per forward
    def _layout(self, grid: Tuple[int, int, int], text_tokens: int = 0) -> VideoLayout:
        """The global layout of ``grid`` with ``text_tokens`` text tokens after the video (cached)."""
        def build() -> VideoLayout:
            if text_tokens:
                return self._layout(grid).with_(text_tokens=text_tokens, text_position="after")
            tile = self.tile if self.tile is not None else default_tile(grid)
            layout = VideoLayout(*grid, tile=tuple(tile))
            return self.sp.layout_for(layout) if self.sp is not None else layout

        return lru(self._layouts, (tuple(grid), text_tokens), build, 2 * MAX_LAYOUTS)

    def _ctx(self, layout: VideoLayout) -> AttentionContext:
        self.state.check()
        return AttentionContext(layout=layout, step=self.state.step, num_steps=self.state.num_steps,
                                ops=self.ops, stats=self.stats)

    def _begin(self, grid: Tuple[int, int, int], text_lengths: Optional[List[int]] = None,
               device=None) -> _Forward:
        """Layouts and contexts of one forward: one sample group per distinct prompt length
        (``text_lengths`` None: no text tokens in the attention); ``device`` holds the batch."""
        lengths = text_lengths if text_lengths is not None else [0]
        distinct = sorted(set(lengths))
        groups: List[_Group] = []
        for n in distinct:
            lay = self._layout(grid, n)
            samples = None
            if len(distinct) > 1:  # made once per forward on the batch's device, used by every layer
                samples = torch.tensor([b for b, m in enumerate(lengths) if m == n], dtype=torch.int64,
                                       device=device)
            groups.append(_Group(lay, self._ctx(lay), self.attentions(lay), samples))
        self._fwd = _Forward(self._layout(grid), groups)
        self.layout = groups[0].layout
        return self._fwd

    def current(self) -> _Forward:
        if self._fwd is None:
            raise RuntimeError(
                "dist_compact: an attention processor ran outside a hooked transformer forward; call the "
                "transformer itself (its hooks set the layout), not one of its blocks"
            )
        return self._fwd

    def _end(self) -> None:
        self._fwd = None

    # ------------------------------------------------------------------ the attention call
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               video_len: int, text_len: int = 0) -> torch.Tensor:
        """Attention of this rank's tokens ``[B, video_len + text_len, H, D]`` (video shard in block
        order, then the ``text_len`` prompt tokens in model order, valid ones first) -> same shape.
        Prompt tokens past a sample's valid length get zeros."""
        fwd = self.current()
        if len(fwd.groups) == 1:  # the whole batch (samples is None)
            return self._attend_group(fwd.groups[0], layer, q, k, v, video_len, text_len)
        out = torch.zeros_like(q)
        for g in fwd.groups:
            idx = g.samples
            o = self._attend_group(g, layer, q.index_select(0, idx), k.index_select(0, idx),
                                   v.index_select(0, idx), video_len, text_len)
            out.index_copy_(0, idx, o)
        return out

    def _attend_group(self, g: _Group, layer: int, q, k, v, video_len: int, text_len: int) -> torch.Tensor:
        layout = g.layout
        n_txt = layout.text_tokens
        if n_txt == 0 and text_len == 0:
            return g.attns[layer](q, k, v, g.ctx)
        pad = layout.num_text_blocks * layout.block_size - n_txt

        def to_local(x):
            # this rank's video blocks, then the valid prompt tokens padded to whole text blocks
            parts = [x[:, :video_len], x[:, video_len:video_len + n_txt]]
            if pad:
                parts.append(x.new_zeros(x.shape[0], pad, *x.shape[2:]))
            return torch.cat(parts, dim=1)

        o = g.attns[layer](to_local(q), to_local(k), to_local(v), g.ctx)
        parts = [o[:, :video_len + n_txt]]
        if text_len > n_txt:
            parts.append(o.new_zeros(o.shape[0], text_len - n_txt, *o.shape[2:]))
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ stream hooks
    def to_stream(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Model-order video tokens -> this rank's block-order shard (along ``dim``)."""
        fwd = self.current()
        lay = fwd.video_layout
        if x.shape[dim] != lay.seq_len:
            raise RuntimeError(
                f"dist_compact: expected {lay.seq_len} video tokens along dim {dim} for {lay}, got "
                f"{tuple(x.shape)} (was the stream permuted twice?)"
            )
        x = lay.to_blocks(x, dim=dim)
        return self.sp.shard(x, lay, dim=dim) if self.sp is not None else x

    def from_stream(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's block-order shard -> every rank's whole sequence in model order."""
        lay = self.current().video_layout
        if self.sp is not None:
            x = self.sp.gather(x, lay, dim=dim)
        return lay.from_blocks(x, dim=dim)

    # ------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Undo :func:`sparsify`: hooks removed, the stock processors / attention restored."""
        if self._restore_embedded is not None:
            self.model.set_attention(self._restore_embedded)
            self._restore_embedded = None
        super().remove()
        self._fwd = None

    def __repr__(self) -> str:
        return (f"SparsifyHandle({self.kind}, layers={self.num_layers}, heads={self.num_heads}, "
                f"mode={self.sparsity.mode!r}, sp={self.sp}, tile={self.tile})")


# ---------------------------------------------------------------------------------------------- processors
class WanSparseAttnProcessor:
    """Processor of a Wan self-attention (``blocks[i].attn1``): stock q/k/v, our attention.

    ``hidden_states``: this rank's ``[B, S_local, C]`` in block order (the hooks put it there);
    ``rotary_emb``: ``(cos, sin)`` ``[1, S_local, 1, head_dim]`` in the same order.
    """

    def __init__(self, handle: SparsifyHandle, layer: int):
        self.handle = handle
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("WanSparseAttnProcessor is for self-attention without a mask (blocks[i].attn1)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            # Wan's tables repeat each frequency for the two channels of a pair, which is what
            # diffusers' generic helper expects with use_real_unbind_dim=-1: the same rotation
            cos, sin = rotary_emb[0][0, :, 0], rotary_emb[1][0, :, 0]
            query = apply_rotary_emb(query, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
            key = apply_rotary_emb(key, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        out = self.handle.attend(self.layer, query, key, value.contiguous(), hidden_states.shape[1])
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class HunyuanVideoSparseAttnProcessor:
    """Processor of HunyuanVideo's joint attention (dual- and single-stream blocks).

    ``hidden_states``: this rank's video tokens ``[B, V_local, C]`` in block order;
    ``encoder_hidden_states``: the prompt tokens ``[B, L, C]`` (every rank); ``image_rotary_emb``:
    ``(cos, sin)`` ``[V_local, head_dim]``. Returns ``(video_out, text_out)`` as the stock processor.
    """

    def __init__(self, handle: SparsifyHandle, layer: int):
        self.handle = handle
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None):
        # attention_mask is the stock model's key mask of the padded prompt tokens; the handle
        # already knows each sample's prompt length from encoder_attention_mask (module doc)
        video_len = hidden_states.shape[1]
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        query, key, value = hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.handle.attend(self.layer, query, key, value.contiguous(), video_len, text_len)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        out, enc_out = out[:, :video_len], out[:, video_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


# ---------------------------------------------------------------------------------------------- install
def _install_diffusers(h: SparsifyHandle, model, kind: str) -> None:
    hooks = h._hooks

    def pre_forward(module, args, kwargs):
        hs, grid, lengths = forward_inputs(model, kind, args, kwargs, "sparsify")
        h._begin(grid, lengths, hs.device)
        if kind == "wan":
            ts = get_arg(args, kwargs, 1, "timestep")
            if isinstance(ts, torch.Tensor) and ts.dim() == 2:  # Wan2.2 TI2V: one timestep per token
                args, kwargs = replace_arg(args, kwargs, 1, "timestep", lambda t: h.to_stream(t, dim=1))
        return args, kwargs

    def post_forward(module, args, output):
        h._end()
        return output

    hooks.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
    hooks.append(model.register_forward_hook(post_forward))

    # rotary tables: Wan [1, S, 1, D] (sequence dim 1), HunyuanVideo [S, D] (dim 0)
    rope_dim = 1 if kind == "wan" else 0
    hooks.append(model.rope.register_forward_hook(
        lambda m, a, out: tuple(h.to_stream(t, dim=rope_dim) for t in out)))
    if kind == "wan":
        hooks.append(model.blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: replace_arg(args, kwargs, 0, "hidden_states", h.to_stream), with_kwargs=True))
    else:
        hooks.append(model.x_embedder.register_forward_hook(lambda m, a, out: h.to_stream(out)))
    hooks.append(model.proj_out.register_forward_hook(lambda m, a, out: h.from_stream(out)))

    if kind == "wan":
        modules = [blk.attn1 for blk in model.blocks]
        proc_cls = WanSparseAttnProcessor
    else:
        modules = [blk.attn for blk in model.transformer_blocks] + [blk.attn for blk in model.single_transformer_blocks]
        proc_cls = HunyuanVideoSparseAttnProcessor
    for layer, mod in enumerate(modules):
        h._restore.append((mod, mod.processor))
        mod.set_processor(proc_cls(h, layer))


def _install_embedded(h: SparsifyHandle, model) -> None:
    h._restore_embedded = list(model.attn)
    model.set_attention(h.attentions(None))

    def pre_forward(module, args, kwargs):
        # the embedded model takes ctx and sp as arguments: supply them when the caller did not
        if len(args) >= 4 or "ctx" in kwargs:
            return args, kwargs
        x = get_arg(args, kwargs, 0, "x")
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            return args, kwargs  # the model's own input check reports it
        # the model's video_layout: its token grid, its text tokens after the video
        layout = h._layout(model.grid(*x.shape[2:]), model.config.text_len)
        h.layout = layout
        kwargs = dict(kwargs, ctx=h._ctx(layout))
        if len(args) < 5 and "sp" not in kwargs and h.sp is not None:
            kwargs["sp"] = h.sp
        return args, kwargs

    h._hooks.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))


def sparsify(transformer, sparsity_config: Optional[SparsityConfig] = None, *, compact=None,
             sequence_parallel=None, tile: Optional[Sequence[int]] = None, state: Optional[DenoisingState] = None,
             stats=None, backend: str = "auto", attention_factory: Optional[Callable] = None):
    """Install dist_compact attention on ``transformer`` (in place) and return it.

    Args:
        transformer: diffusers ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel``, or an
            :class:`~dist_compact.models.embedded.EmbeddedDiT`.
        sparsity_config: the :class:`SparsityConfig` (default: ``SparsityConfig()``, AdaSpa's
            schedule); ``mode="dense"`` gives outputs equal to the stock model.
        compact: the static pattern object of the Compact modes (``index_for(layer, layout,
            num_heads)``, e.g. a :class:`~dist_compact.patterns.CompactConfig`), or a config file path;
            default: ``sparsity_config.compact_config`` loaded when the mode needs one.
        sequence_parallel: this rank's :class:`~dist_compact.parallel.SequenceParallel` plan (None: one
            process). Every rank calls the transformer with the same full inputs and gets the full
            output; inside, each rank holds its shard of the video tokens.
        tile: kernel tile ``(t, h, w)`` in latent tokens; default :func:`default_tile` of each
            forward's grid (or the tile a Compact config was searched with).
        state: the :class:`DenoisingState` to read the step from (default: a new one, see
            :func:`denoising_state`); share one between the transformers of one pipeline.
        stats: an :class:`~dist_compact.stats.AttentionStats` to record into (default: a new one).
        backend: attention kernels, ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.
        attention_factory: ``factory(num_layers, sparsity, compact, sp) -> [attn, ...]`` replacing
            :func:`dist_compact.sparsity.attention.build_attention` (which already wraps with ``sp``).

    Calling it again replaces the previous installation; :func:`unsparsify` removes it.
    """
    kind = model_kind(transformer)
    sparsity, state, num_layers, num_heads, head_dim, compact, tile, stats = checked_install(
        "sparsify", transformer, kind, sparsity_config, backend, state, compact, tile, stats)
    if sequence_parallel is not None:
        if not all(callable(getattr(sequence_parallel, m, None)) for m in ("layout_for", "shard", "gather", "wrap")):
            raise TypeError("sparsify: sequence_parallel must be a SequenceParallel plan "
                            "(layout_for / shard / gather / wrap)")
        sp_cfg = getattr(sequence_parallel, "config", None)
        if sp_cfg is not None:
            sp_cfg.check(num_heads=num_heads)
    old = sparsify_handle(transformer)
    if old is not None:
        old.remove()
    h = SparsifyHandle(transformer, kind, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                       sparsity=sparsity, compact=compact, sp=sequence_parallel, tile=tile, state=state,
                       stats=stats, backend=backend, attention_factory=attention_factory)
    if kind == "embedded":
        _install_embedded(h, transformer)
    else:
        _install_diffusers(h, transformer, kind)
    object.__setattr__(transformer, h.ATTR, h)  # a plain attribute, not a submodule
    return transformer


def sparsify_handle(transformer) -> Optional[SparsifyHandle]:
    """The :class:`SparsifyHandle` of a sparsified transformer, or None."""
    return getattr(transformer, SparsifyHandle.ATTR, None)


def denoising_state(transformer) -> DenoisingState:
    """The :class:`DenoisingState` a sparsified transformer reads its step from."""
    return handle_state(transformer, sparsify_handle(transformer), "sparsify")


def unsparsify(transformer):
    """Remove what :func:`sparsify` installed (stock processors back); returns the transformer."""
    return remove_handle(transformer, sparsify_handle(transformer))
