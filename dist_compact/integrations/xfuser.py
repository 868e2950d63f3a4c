"""Our attention as the local attention of xDiT's USP path (xfuser 0.7.0): :func:`sparsify_xfuser`.

::

    from xfuser.core.distributed import (init_distributed_environment, initialize_model_parallel,
                                         initialize_runtime_state)
    init_distributed_environment(rank=rank, world_size=world)
    initialize_model_parallel(ulysses_degree=world, ring_degree=1)
    initialize_runtime_state()                       # or xDiT's pipeline / runner does all three
    transformer = xfuser_transformer(diffusers_wan_or_hunyuan_model)   # or loaded as xDiT's wrapper
    sparsify_xfuser(transformer, SparsityConfig(mode="adaspa", sparsity=0.8))
    state = denoising_state(transformer)             # state.begin(n); callback_on_step_end=state.on_step_end

What xDiT does (read from the xfuser 0.7.0 wheel; the calls this module relies on):

* ``xfuser.core.distributed.init_distributed_environment(world_size=-1, rank=-1,
  distributed_init_method="env://", local_rank=-1, backend=None)``,
  ``initialize_model_parallel(data_parallel_degree=1, classifier_free_guidance_degree=1,
  sequence_parallel_degree=None, ulysses_degree=1, ring_degree=1, ...)`` (which calls yunchang's
  ``set_seq_parallel_pg`` and keeps ``PROCESS_GROUP.ULYSSES_PG`` / ``RING_PG`` in
  ``get_sp_group().ulysses_group`` / ``.ring_group``), ``initialize_runtime_state(pipeline=None,
  engine_config=None)``, ``get_runtime_state()``, ``get_sp_group()``,
  ``get_ulysses_parallel_world_size()``, ``get_ring_parallel_world_size()``,
  ``get_pipeline_parallel_world_size()``, ``get_sequence_parallel_world_size()``.
* ``xfuser.model_executor.layers.usp.USP(query, key, value, dropout_p=0.0, is_causal=False,
  joint_query=None, joint_key=None, joint_value=None, joint_strategy=None, attn_layer=None,
  combine_qkv_a2a=None, backend=None, attention_kwargs=None, head_balance_layer=None,
  kv_head_repeat=1)``: q/k/v ``[B, H, S_local, D]``; Ulysses all-to-all (heads split over the
  Ulysses group in rank order, sequence chunks concatenated in rank order), then
  ``ATTENTION_FUNCTION_REGISTRY[backend or get_runtime_state().attention_backend](q, k, v,
  dropout_p=..., is_causal=..., attention_kwargs=...) -> (out [B, H/U, S, D], lse)`` (through
  ``concat_joint_tensors_decorator``, which appends ``joint_key`` / ``joint_value`` "rear"), then
  the inverse all-to-all. With ring > 1 it calls ``torch``'s ``_templated_ring_attention`` instead.
* ``xfuser.core.distributed.attention_backend.ATTENTION_FUNCTION_REGISTRY``: a plain dict filled by
  ``register_attention_function(AttentionBackendType.X)``; ``USP`` looks ``backend`` up with
  ``.get``, so any hashable key works. ``RuntimeState.set_attention_backend`` accepts only
  ``AttentionBackendType`` members (an Enum, closed), so our backend is selected per call with
  ``backend=`` and never becomes the global default.
* Wan: ``xfuser.model_executor.models.transformers.transformer_wan.xFuserWanTransformer3DWrapper``
  (a ``WanTransformer3DModel``) chunks the patchified video tokens (model order, zero-padded to a
  multiple of ``P``) over the SP group, and ``xFuserWanAttnProcessor(use_ulysses_parallel_attention=
  True, is_cross_attention=False, attention_kwargs=None)`` (``blocks[i].attn1``) calls
  ``self.attention_function(q, k, v, backend=None, attention_kwargs=self.attention_kwargs,
  head_balance_layer=attn, attn_layer=attn)`` with ``self.attention_function = USP``.
* HunyuanVideo: ``transformer_hunyuan_video.xFuserHunyuanVideoTransformer3DWrapper`` keeps only the
  prompt tokens valid in some sample (``encoder_attention_mask.any(0)``), chunks the video tokens
  over the SP group, and chunks the prompt too when its length divides by ``P``
  (``runtime_state.split_text_embed_in_sp``); ``xFuserHunyuanVideoAttnProcessor`` then calls
  ``USP(q, k, v)`` (split text) or ``USP(video q, k, v, joint_query=text q, joint_key=text k,
  joint_value=text v, joint_strategy="rear")`` (text replicated), without ``backend`` or
  ``attention_kwargs``.

Why the registry, and why not our own parallel layer. xDiT shards the sequence in the model
(raster) order inside its wrapper's ``forward`` and exchanges it inside ``USP``; after the Ulysses
all-to-all every rank holds the WHOLE sequence for ``H/U`` heads. That is exactly what our
:class:`~dist_compact.parallel.ulysses.UlyssesOps` expects, so the clean cut is: xDiT's own
projections, RoPE, sharding and all-to-all, and our attention as the registered backend function.
It permutes the sequence it gets (xDiT's chunk order, with text chunks / text copies / xDiT's zero
padding, see :class:`XditSequence`) to our block order with one gather, runs the layer's
``attn(q, k, v, ctx)`` (:class:`~dist_compact.sparsity.context.DenseAttention` or
:class:`~dist_compact.sparsity.attention.SparseAttention`) with ``ctx.ops`` a ``UlyssesOps`` around xDiT's
Ulysses group (``ParallelGroups.from_groups``; handed in explicitly, nothing global here), and
gathers the output back to xDiT's order. The layer index and the handle travel in the per-layer
``attention_kwargs`` dict under ``"dist_compact"``:

* Wan: each ``blocks[i].attn1`` gets a fresh ``xFuserWanAttnProcessor`` whose
  ``attention_function`` is ``USP`` with ``backend="dist_compact"`` (xDiT's own q/k/v, norm and
  RoPE code, FlyDSL fusion included);
* HunyuanVideo: xDiT's processor passes neither ``backend`` nor ``attention_kwargs``, so
  :class:`_HunyuanProcessor` repeats its body (xfuser 0.7.0: the stock q/k/v of
  :func:`~dist_compact.integrations.core.hunyuan_qkv`, then its USP calls) and adds both.

Limits: ring degree 1 only (xDiT's ring path calls the backend once per K/V chunk through torch's
``_templated_ring_attention``; use :class:`dist_compact.parallel.SequenceParallel` for ring / hybrid
with shard skipping); no PipeFusion (pipeline degree 1); no dropout, not causal. Where the video
length does not divide by ``P`` xDiT's Wan wrapper pads zero tokens that its dense backends attend
to as keys; here they are not keys (the stock diffusers result); their output rows are dropped by
xDiT. xfuser needs a CUDA (or ROCm) GPU to import (``xfuser.envs`` raises otherwise); this module
imports it only inside functions.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..sparsity.context import AttentionContext
from ..sparsity.attention_ops import AttentionOps
from ..sparsity.config import SparsityConfig
from ..extras import install_hint
from ..layout import VideoLayout
from ..models.adapters import HunyuanVideoAdapter, ModelAdapter, WanAdapter
from ..models.adapters.hunyuan_video import hunyuan_qkv
from .core import MAX_LAYOUTS, DenoisingState, IntegrationHandle, default_tile, install, lru

__all__ = [
    "BACKEND_KEY",
    "KWARGS_KEY",
    "XditSequence",
    "XfuserHandle",
    "infer_sequence",
    "xdit_attention",
    "register_backend",
    "sparsify_xfuser",
    "xfuser_transformer",
]

#: Key of our function in xfuser's ``ATTENTION_FUNCTION_REGISTRY`` (passed as ``USP(backend=...)``).
BACKEND_KEY = "dist_compact"
#: Key of the per-layer call object in the ``attention_kwargs`` dict that USP hands the backend.
KWARGS_KEY = "dist_compact"

_INSTALL_HINT = (
    "dist_compact.integrations.xfuser needs xfuser==0.7.0 and a CUDA/ROCm GPU (xfuser raises at import "
    f"without one): {install_hint('xdit')} (import-time dependencies for this path: distvae, yunchang, "
    "einops, diffusers, transformers, accelerate; bs4, av, peft, sentencepiece are not imported by it)"
)


def _xfuser():
    """xfuser's modules this integration uses (imported lazily), or one clear ImportError."""
    try:
        from xfuser.core import distributed as xdist
        from xfuser.core.distributed import attention_backend as xab
        from xfuser.model_executor.layers import usp as xusp
    except Exception as e:  # ImportError, or xfuser.envs' NotImplementedError / CUDA errors without a GPU
        raise ImportError(f"{_INSTALL_HINT}; importing it failed with {type(e).__name__}: {e}") from e
    return xdist, xab, xusp


def _xfuser_models():
    try:
        from xfuser.model_executor.models.transformers import transformer_hunyuan_video as hy
        from xfuser.model_executor.models.transformers import transformer_wan as wan
    except Exception as e:
        raise ImportError(f"{_INSTALL_HINT}; importing its Wan / HunyuanVideo wrappers failed with "
                          f"{type(e).__name__}: {e}") from e
    return wan, hy


# ---------------------------------------------------------------------------------------------- sequence
@dataclass(frozen=True)
class XditSequence:
    """The token sequence xDiT's backend function sees on one rank (after the Ulysses all-to-all).

    Attributes:
        video: video tokens ``V`` (the latent grid, model order = raster).
        text: prompt tokens ``L`` in the attention (0 for Wan).
        world: Ulysses degree ``P`` (= SP degree; ring is 1).
        split_text: the prompt is chunked over the ranks like the video (HunyuanVideo when
            ``L % P == 0``); else it is replicated: every query chunk carries all ``L`` text queries
            and the keys are ``[video, text]`` (``joint_strategy="rear"``).
        pad: zero tokens xDiT's Wan wrapper appends to the video so it splits into ``P`` chunks.

    Query order: ``P`` chunks, chunk ``p`` = video tokens ``[p*V/P, (p+1)*V/P)`` (with ``pad``: the
    padded video cut in ``P`` equal pieces), then its text part (``L/P`` tokens ``p*L/P...`` when
    split, all ``L`` when replicated). Key order: the same, except replicated text: ``[video, text]``.
    """

    video: int
    text: int = 0
    world: int = 1
    split_text: bool = True
    pad: int = 0

    @property
    def q_len(self) -> int:
        if self.split_text:
            return self.video + self.pad + self.text
        return self.video + self.pad + self.world * self.text

    @property
    def k_len(self) -> int:
        return self.video + self.pad + self.text

    def model_index(self, which: str = "q") -> torch.Tensor:
        """int64 ``[q_len or k_len]``: the model-order token (video raster, then text) at each
        position of xDiT's sequence; -1 for xDiT's zero padding."""
        V, L, P, pad = self.video, self.text, self.world, self.pad
        vid = torch.cat([torch.arange(V), torch.full((pad,), -1)])
        if L == 0:
            return vid
        text = V + torch.arange(L)
        if which == "k" and not self.split_text:
            return torch.cat([vid, text])
        # rank p's chunk: its video piece, then its text piece (split) or the whole prompt (replicated)
        text = text.view(P, L // P) if self.split_text else text.expand(P, L)
        return torch.cat([vid.view(P, -1), text], dim=1).flatten()


def infer_sequence(video: int, world: int, q_len: int, k_len: int, *, joint: bool) -> XditSequence:
    """The :class:`XditSequence` of a backend call from its lengths.

    Args:
        video: video tokens ``V`` of this forward (from the latent grid).
        world: Ulysses degree ``P``.
        q_len, k_len: ``query.shape[2]`` and ``key.shape[2]`` as the backend gets them.
        joint: the model has prompt tokens in this attention (HunyuanVideo), else only video (Wan).
    """
    if world < 1 or video < 1:
        raise ValueError(f"infer_sequence: video={video} and world={world} must be >= 1")
    if not joint:
        pad = (-video) % world
        seq = XditSequence(video, 0, world, True, pad)
        if q_len != seq.q_len or k_len != seq.k_len:
            raise ValueError(f"dist_compact xDiT backend: expected {seq.q_len} query and key tokens for {video} "
                             f"video tokens over {world} ranks, got q {q_len}, k {k_len} (not a self-attention "
                             "of the video stream?)")
        return seq
    if video % world:
        raise ValueError(f"dist_compact xDiT backend: {video} video tokens do not split into {world} equal "
                         "chunks (xDiT's HunyuanVideo wrapper needs that too)")
    if q_len == k_len:
        L = k_len - video
        seq = XditSequence(video, L, world, True, 0)
        if L < 0 or L % world:
            raise ValueError(f"dist_compact xDiT backend: {q_len} tokens for {video} video tokens over {world} ranks")
        return seq
    L = k_len - video
    if L < 0 or q_len != video + world * L:
        raise ValueError(f"dist_compact xDiT backend: q {q_len} / k {k_len} tokens do not match {video} video "
                         f"tokens over {world} ranks with a replicated prompt")
    return XditSequence(video, L, world, False, 0)


@dataclass(frozen=True)
class _Plan:
    """One backend call shape (grid, query / key lengths, device): our layout and how xDiT's sequence
    maps to block order. Block order = zeros ``[B, padded_len, H, D]`` with row ``dst[i]`` = xDiT
    position ``take[i]`` (``take``: an int n = the first n positions, no gather; else a gather)."""

    layout: VideoLayout
    q_take: Union[int, torch.Tensor]  # xDiT query positions read (first text copy where text is replicated)
    q_dst: torch.Tensor  # their block-order rows
    k_take: Union[int, torch.Tensor]  # the same for keys / values
    k_dst: torch.Tensor
    out_idx: torch.Tensor  # block-order row of each xDiT query position (any row for xDiT's padding)


def _gather_plan(mi: torch.Tensor, layout: VideoLayout) -> Tuple[Union[int, torch.Tensor], torch.Tensor]:
    """``(take, dst)`` for xDiT's sequence with model index ``mi`` (-1: xDiT's padding). Where every
    model token appears once the positions map straight to block rows (one scatter, and no gather
    when the real positions come first); replicated text queries read the first copy of each token."""
    perm = layout.permutation()
    kept = torch.nonzero(mi >= 0).flatten()
    if kept.numel() == layout.seq_len and torch.equal(torch.sort(mi[kept]).values, torch.arange(layout.seq_len)):
        take = kept.numel() if torch.equal(kept, torch.arange(kept.numel())) else kept
        return take, perm[mi[kept]]
    first = torch.full((layout.seq_len,), -1, dtype=torch.long)
    first.scatter_reduce_(0, mi[kept], kept, reduce="amin", include_self=False)
    if (first < 0).any():
        raise RuntimeError("dist_compact xDiT backend: a token of the layout is missing from xDiT's sequence")
    return first, perm


def _build_plan(layout: VideoLayout, seq: XditSequence, device) -> _Plan:
    mq = seq.model_index("q")
    q_take, q_dst = _gather_plan(mq, layout)
    k_take, k_dst = (q_take, q_dst) if seq.split_text or not seq.text else _gather_plan(seq.model_index("k"), layout)
    out_idx = layout.permutation()[mq.clamp(min=0)]
    to = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    return _Plan(layout, to(q_take), to(q_dst), to(k_take), to(k_dst), to(out_idx))


def _to_blocks(x: torch.Tensor, take: Union[int, torch.Tensor], dst: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """xDiT ``[B, H, S, D]`` -> block order ``[B, padded_len, H, D]`` (zeros in the padding)."""
    x = x.narrow(2, 0, take) if isinstance(take, int) else x.index_select(2, take)
    B, H, _, D = x.shape
    return x.new_zeros(B, layout.padded_len, H, D).index_copy_(1, dst, x.transpose(1, 2))


# ---------------------------------------------------------------------------------------------- handle
class XfuserHandle(IntegrationHandle):
    """What :func:`sparsify_xfuser` installed on one transformer (``dist_compact.integrations.installed(model)``).

    Attributes (besides :class:`~dist_compact.integrations.core.IntegrationHandle`'s):
        ops: the :class:`AttentionOps` of this rank (``UlyssesOps`` on xDiT's Ulysses group when
            ``P > 1``).
        world: the Ulysses degree ``P``.
        grid: the latent token grid of the forward in progress (set by a pre-hook), or None.
        layout: the layout of the last attention call.
    """

    WHO = "sparsify_xfuser"

    def __init__(self, model, adapter: ModelAdapter, *, sparsity: SparsityConfig, compact=None, tile=None,
                 state: Optional[DenoisingState] = None, stats=None, ops: Optional[AttentionOps] = None,
                 world: int = 1, attention_factory: Optional[Callable] = None):
        if adapter.name not in ("wan", "hunyuan_video"):
            raise ValueError(f"XfuserHandle: the model must be Wan or HunyuanVideo, got {adapter.name!r}")
        super().__init__(model, adapter, sparsity=sparsity, compact=compact, tile=tile,
                         state=state if state is not None else DenoisingState(), stats=stats,
                         attention_factory=attention_factory, ops=ops)
        self.world = world
        self.grid: Optional[Tuple[int, int, int]] = None
        # one plan (layout instance + gathers) per call shape: the layout's maps and their device
        # copies, and the gathers, are built once, not at every layer of every forward
        self._plans: "OrderedDict[Tuple, _Plan]" = OrderedDict()

    # ------------------------------------------------------------------ pieces
    def layout_for(self, grid: Sequence[int], text_tokens: int) -> VideoLayout:
        tile = self.tile if self.tile is not None else default_tile(tuple(grid))
        return VideoLayout(*grid, tile=tile, text_tokens=text_tokens, text_position="after")

    def _plan(self, q_len: int, k_len: int, device) -> _Plan:
        """The plan of a call with these lengths in the current grid (checked and built on first use)."""
        def build() -> _Plan:
            T, H, W = self.grid
            seq = infer_sequence(T * H * W, self.world, q_len, k_len, joint=self.kind == "hunyuan_video")
            return _build_plan(self.layout_for(self.grid, seq.text), seq, device)

        return lru(self._plans, (self.grid, q_len, k_len, device), build, 4 * MAX_LAYOUTS)

    def reset(self) -> None:
        """Drop cached attention objects (indices, LSE) and gathers."""
        super().reset()
        self._plans.clear()

    # ------------------------------------------------------------------ the backend call
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
        """xDiT's backend call for layer ``layer``: ``[B, H/P, S, D]`` each -> out ``[B, H/P, S_q, D]``."""
        if dropout_p:
            raise ValueError("dist_compact xDiT backend: dropout is not supported (inference only)")
        if is_causal:
            raise ValueError("dist_compact xDiT backend: causal attention is not supported")
        if self.grid is None:
            raise RuntimeError("dist_compact xDiT backend: no latent grid; call the sparsified transformer itself "
                               "(its forward pre-hook reads the grid)")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 4:
                raise ValueError(f"dist_compact xDiT backend: {name} must be [B, H, S, D], got {tuple(t.shape)}")
        if key.shape != value.shape or key.shape[:2] != query.shape[:2] or key.shape[3] != query.shape[3]:
            raise ValueError(f"dist_compact xDiT backend: q {tuple(query.shape)}, k {tuple(key.shape)}, "
                             f"v {tuple(value.shape)} do not match")
        if query.shape[1] * self.world != self.num_heads:
            raise ValueError(f"dist_compact xDiT backend: {query.shape[1]} local heads x {self.world} ranks != "
                             f"{self.num_heads} heads (ring degree > 1 or head balancing is not supported)")
        plan = self._plan(query.shape[2], key.shape[2], query.device)
        layout = self.layout = plan.layout
        q = _to_blocks(query, plan.q_take, plan.q_dst, layout)
        k = _to_blocks(key, plan.k_take, plan.k_dst, layout)
        v = _to_blocks(value, plan.k_take, plan.k_dst, layout)
        self.state.check()
        ctx = AttentionContext(layout=layout, step=self.state.step, num_steps=self.state.num_steps, ops=self.ops,
                               stats=self.stats)
        out = self.attentions(layout)[layer](q, k, v, ctx)
        # block order [B, padded_len, H, D] -> xDiT's [B, H, S_q, D]
        return out.to(query.dtype).index_select(1, plan.out_idx).transpose(1, 2)

    # ------------------------------------------------------------------ removal
    def _put_back(self, module, processor) -> None:
        module.processor = processor  # xDiT's processors are plain attributes

    def begin(self, grid, text_lengths=None, device=None) -> None:
        self.grid = tuple(grid)  # the layouts follow from each call's lengths (``_plan``)

    def end(self) -> None:
        self.grid = None

    def remove(self) -> None:
        super().remove()
        self.grid = None

    def __repr__(self) -> str:
        return (f"XfuserHandle({self.kind}, layers={self.num_layers}, heads={self.num_heads}, ulysses={self.world}, "
                f"mode={self.sparsity.mode!r}, tile={self.tile})")


@dataclass(frozen=True)
class _LayerCall:
    """What the per-layer ``attention_kwargs`` carries to :func:`xdit_attention`."""

    handle: XfuserHandle
    layer: int


def xdit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                   is_causal: bool = False, attention_kwargs: Optional[Dict[str, Any]] = None):
    """The function registered in xfuser's ``ATTENTION_FUNCTION_REGISTRY`` under :data:`BACKEND_KEY`.

    xDiT's backend signature: q, k, v ``[B, H_local, S, D]`` -> ``(out [B, H_local, S_q, D], None)``.
    The layer comes from ``attention_kwargs["dist_compact"]`` (installed by :func:`sparsify_xfuser`).
    """
    call = (attention_kwargs or {}).get(KWARGS_KEY)
    if not isinstance(call, _LayerCall):
        raise RuntimeError(f"USP(backend={BACKEND_KEY!r}) was called without attention_kwargs[{KWARGS_KEY!r}]; "
                           "install it with dist_compact.integrations.xfuser.sparsify_xfuser")
    return call.handle.attend(call.layer, query, key, value, dropout_p, is_causal), None


def register_backend() -> str:
    """Put :func:`xdit_attention` into xfuser's registry (idempotent); returns :data:`BACKEND_KEY`."""
    _, xab, _ = _xfuser()
    xab.ATTENTION_FUNCTION_REGISTRY[BACKEND_KEY] = xdit_attention
    return BACKEND_KEY


def _usp_with_backend(usp: Callable) -> Callable:
    """``USP`` with our backend when the caller leaves ``backend`` None (xFuserWanAttnProcessor)."""
    @functools.wraps(usp)
    def call(*args, backend=None, **kwargs):
        return usp(*args, backend=BACKEND_KEY if backend is None else backend, **kwargs)

    return call


# ---------------------------------------------------------------------------------------------- processors
class _HunyuanProcessor:
    """xfuser 0.7.0's ``xFuserHunyuanVideoAttnProcessor.__call__`` step by step, with
    ``backend=BACKEND_KEY`` and the layer's ``attention_kwargs`` added to its ``USP`` calls."""

    def __init__(self, handle: XfuserHandle, layer: int):
        self.handle = handle
        self.layer = layer
        self.attention_kwargs = {KWARGS_KEY: _LayerCall(handle, layer)}

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None, *args, **kwargs):
        xdist, _, xusp = _xfuser()
        usp = functools.partial(xusp.USP, dropout_p=0.0, is_causal=False, backend=BACKEND_KEY,
                                attention_kwargs=self.attention_kwargs)

        # the stock q, k, v [B, S, H, D] in xDiT's head-major layout [B, H, S, D]
        query, key, value = (t.transpose(1, 2) for t in
                             hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        rs = xdist.get_runtime_state()
        n_text = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None
                  else rs.max_condition_sequence_length)
        n_query = query.shape[2] - n_text
        if xdist.get_pipeline_parallel_world_size() == 1 and rs.split_text_embed_in_sp:
            out = usp(query, key, value)
        elif xdist.get_sequence_parallel_world_size() > 1:
            query, eq = query.split([n_query, n_text], dim=2)
            key, ek = key.split([n_query, n_text], dim=2)
            value, ev = value.split([n_query, n_text], dim=2)
            out = usp(query, key, value, joint_query=eq, joint_key=ek, joint_value=ev, joint_strategy="rear")
        else:
            out = usp(query, key, value)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n = encoder_hidden_states.shape[1]
            out, encoder_hidden_states = out[:, :-n], out[:, -n:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return out, encoder_hidden_states


# ---------------------------------------------------------------------------------------------- install
def _adapter(transformer) -> ModelAdapter:
    """The adapter of xDiT's wrappers (checked against xfuser's classes: they subclass diffusers' models)."""
    wan, hy = _xfuser_models()
    if isinstance(transformer, wan.xFuserWanTransformer3DWrapper):
        return WanAdapter(transformer)
    if isinstance(transformer, hy.xFuserHunyuanVideoTransformer3DWrapper):
        return HunyuanVideoAdapter(transformer)
    raise TypeError(
        f"sparsify_xfuser: {type(transformer).__name__} is not xDiT's xFuserWanTransformer3DWrapper or "
        "xFuserHunyuanVideoTransformer3DWrapper (only those shard the sequence for USP); convert a diffusers "
        "model with dist_compact.integrations.xfuser.xfuser_transformer(model)"
    )


def _ops_for(num_heads: int, backend: str, ulysses_group=None):
    """(ops, P): AttentionOps on one rank, UlyssesOps on xDiT's Ulysses group otherwise."""
    xdist, _, _ = _xfuser()
    if xdist.get_ring_parallel_world_size() > 1:
        raise NotImplementedError("sparsify_xfuser: xDiT ring degree > 1 is not supported (ring_attn calls the backend "
                                  "per K/V chunk); use ulysses_degree = sp_degree, or dist_compact.parallel")
    if xdist.get_pipeline_parallel_world_size() > 1:
        raise NotImplementedError("sparsify_xfuser: PipeFusion (pipeline degree > 1) is not supported")
    P = xdist.get_ulysses_parallel_world_size()
    if P == 1:
        return AttentionOps(backend), 1
    from ..parallel.config import ParallelConfig, ParallelGroups
    from ..parallel.ulysses import UlyssesOps

    cfg = ParallelConfig(ulysses=P, ring=1).check(num_heads=num_heads)
    group = ulysses_group if ulysses_group is not None else xdist.get_sp_group().ulysses_group
    return UlyssesOps(ParallelGroups.from_groups(cfg, group, None), backend), P


def sparsify_xfuser(transformer, sparsity_config: Optional[SparsityConfig] = None, *, compact=None,
                    tile: Optional[Sequence[int]] = None, state: Optional[DenoisingState] = None, stats=None,
                    backend: str = "auto", ulysses_group=None, attention_factory: Optional[Callable] = None):
    """Make xDiT's USP path of ``transformer`` run dist_compact attention (in place); returns it.

    Args:
        transformer: xDiT's ``xFuserWanTransformer3DWrapper`` or ``xFuserHunyuanVideoTransformer3DWrapper``
            (diffusers' ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel`` as xDiT runs
            them; :func:`xfuser_transformer` converts a diffusers model). xfuser's distributed
            environment, model-parallel groups (ring degree 1) and runtime state must exist.
        sparsity_config: :class:`SparsityConfig` (default ``SparsityConfig()``); ``mode="dense"`` is
            our dense kernel (equal to xDiT's dense backends at bf16 tolerance).
        compact: static Compact pattern object or config path (Compact modes).
        tile: kernel tile ``(t, h, w)``; default :func:`~.diffusers.default_tile` of each grid.
        state, stats: as :func:`dist_compact.integrations.diffusers.sparsify`.
        backend: our kernels, ``"auto"``, ``"triton"`` or ``"torch"``.
        ulysses_group: the Ulysses process group (default xDiT's ``get_sp_group().ulysses_group``).
        attention_factory: ``factory(num_layers, sparsity, compact, None) -> [attn, ...]``.
    """
    adapter = _adapter(transformer)
    _, _, xusp = _xfuser()
    sparsity, state, compact, tile, stats = XfuserHandle.checked(
        "sparsify_xfuser", adapter, sparsity_config, backend, state, compact, tile, stats)
    ops, world = _ops_for(adapter.num_heads, backend, ulysses_group)
    register_backend()
    h = XfuserHandle(transformer, adapter, sparsity=sparsity, compact=compact, tile=tile, state=state, stats=stats,
                     ops=ops, world=world, attention_factory=attention_factory)
    install(transformer, h)
    h.hook_forward(stream=False)
    if adapter.name == "wan":
        wan, _ = _xfuser_models()
        for i, mod in enumerate(adapter.attention_modules()):
            if not isinstance(mod.processor, wan.xFuserWanAttnProcessor):
                raise TypeError(f"sparsify_xfuser: blocks[{i}].attn1 has {type(mod.processor).__name__}, not xDiT's "
                                "xFuserWanAttnProcessor")

        def make(layer):
            proc = wan.xFuserWanAttnProcessor(use_ulysses_parallel_attention=True, is_cross_attention=False,
                                              attention_kwargs={KWARGS_KEY: _LayerCall(h, layer)})
            proc.attention_function = _usp_with_backend(xusp.USP)
            return proc
    else:
        def make(layer):
            return _HunyuanProcessor(h, layer)
    h.set_processors(make)
    return transformer


def xfuser_transformer(model):
    """xDiT's wrapper of a diffusers ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel``
    sharing its parameter and buffer tensors (built from the config; ``load_state_dict(assign=True)``).

    The wrappers are what xDiT's runners load (``xFuserWanTransformer3DWrapper.from_pretrained`` /
    ``xFuserHunyuanVideoTransformer3DWrapper``); their ``forward`` shards the sequence for USP.
    """
    wan, hy = _xfuser_models()
    if isinstance(model, (wan.xFuserWanTransformer3DWrapper, hy.xFuserHunyuanVideoTransformer3DWrapper)):
        return model
    name = type(model).__name__
    if name == "WanTransformer3DModel":
        cls = wan.xFuserWanTransformer3DWrapper
    elif name == "HunyuanVideoTransformer3DModel":
        cls = hy.xFuserHunyuanVideoTransformer3DWrapper
    else:
        raise TypeError(f"xfuser_transformer: unsupported model {name}")
    new = cls.from_config(model.config)
    # the same parameter and buffer tensors (no copy; per-tensor dtypes kept, e.g. fp32 norms)
    new.load_state_dict(model.state_dict(), assign=True)
    own = dict(new.named_buffers())
    for name, buf in model.named_buffers():  # non-persistent ones too (RoPE tables)
        if name in own:
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, attr, buf)
    return new.to(next(model.parameters()).device).train(model.training)
