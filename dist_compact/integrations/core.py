"""The integration core shared by every way our attention is installed in a video DiT.

:func:`~dist_compact.integrations.diffusers.sparsify` (stream hooks, our sharding),
:func:`~dist_compact.integrations.diffusers_backend.set_sparse_backend` (diffusers' own attention
processors and context parallelism) and :func:`~dist_compact.integrations.xfuser.sparsify_xfuser`
(xDiT's USP) differ in how the tokens reach the attention; what they share is here:

* :class:`DenoisingState` - the step the next forward belongs to, and :func:`handle_state`;
* :class:`IntegrationHandle` - the base of every handle: the per-layout attention objects (LRU,
  :data:`MAX_LAYOUTS`), the hooks and replaced processors, and their removal (:func:`remove_handle`);
* :func:`checked_install` - the checks and defaults of every install (sparsity config, backend,
  state, layer / head counts, head size, Compact config, tile, stats); :func:`model_kind`;
* :func:`latent_grid`, :func:`text_lengths`, :func:`forward_inputs` - what a forward pre-hook reads
  from the transformer's arguments (:func:`get_arg`, :func:`replace_arg`); :func:`default_tile`;
* :func:`hunyuan_qkv` - HunyuanVideo's joint q, k, v (both block types), the stock processor's steps.

diffusers is imported only when a diffusers model is passed (:func:`diffusers_module`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._util import cdiv, is_int
from ..sparsity.config import SparsityConfig
from ..extras import require
from ..layout import VideoLayout

__all__ = [
    "MAX_LAYOUTS",
    "DEFAULT_TILES",
    "SUPPORTED_MODELS",
    "DenoisingState",
    "IntegrationHandle",
    "diffusers_module",
    "default_tile",
    "replace_arg",
    "get_arg",
    "lru",
    "new_attentions",
    "model_kind",
    "latent_grid",
    "text_lengths",
    "forward_inputs",
    "checked_install",
    "handle_state",
    "remove_handle",
    "hunyuan_qkv",
]

#: Model classes :func:`~dist_compact.integrations.diffusers.sparsify` knows (diffusers' class names,
#: and the embedded model).
SUPPORTED_MODELS = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "EmbeddedDiT")
#: Distinct layouts kept with their own attention objects (LRU).
MAX_LAYOUTS = 4
#: Tiles of 128 tokens (the kernel's fastest block size, see BENCHMARKS.md) tried by default_tile,
#: in order of preference at equal padding (compact tiles first: windows stay round).
DEFAULT_TILES = ((2, 8, 8), (1, 8, 16), (1, 16, 8), (4, 4, 8), (4, 8, 4))

def diffusers_module():
    return require("diffusers", "diffusers", "dist_compact.integrations.diffusers")



def default_tile(grid: Sequence[int]) -> Tuple[int, int, int]:
    """The 128-token tile with the least padding for a token grid ``(T, H, W)``.

    Ties go to the first of ``(2, 8, 8), (1, 8, 16), (1, 16, 8), (4, 4, 8), (4, 8, 4)``. Examples:
    Wan 480p 21x30x52 -> (1, 16, 8) (15% padding); HunyuanVideo 720p 33x45x80 -> (1, 8, 16) (7%).
    """
    T, H, W = grid

    def padded(t):
        return (cdiv(T, t[0]) * t[0]) * (cdiv(H, t[1]) * t[1]) * (cdiv(W, t[2]) * t[2])

    return min(DEFAULT_TILES, key=padded)



@dataclass
class DenoisingState:
    """The denoising step the next transformer forward belongs to (mutable; shared by the hooks).

    Attributes:
        step: 0-based step index of the next forward.
        num_steps: steps of the run (the schedule of a :class:`SparsityConfig` is scaled to it).

    The pipeline runner calls :meth:`begin` before a run and passes :meth:`on_step_end` as the
    pipeline's ``callback_on_step_end`` (or sets ``step`` itself). Several transformers (e.g. Wan2.2's
    two experts) may share one state.
    """

    step: int = 0
    num_steps: int = 50

    def begin(self, num_steps: int) -> "DenoisingState":
        """Start a run of ``num_steps`` steps at step 0."""
        if not is_int(num_steps) or num_steps < 1:
            raise ValueError(f"DenoisingState.begin: num_steps must be an int >= 1, got {num_steps!r}")
        self.step = 0
        self.num_steps = num_steps
        return self

    def on_step_end(self, pipe, step_index: int, timestep, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """diffusers' ``callback_on_step_end``: step ``step_index`` is done, the next is ``+1``."""
        self.step = int(step_index) + 1
        return callback_kwargs

    def check(self) -> None:
        if not (0 <= self.step < self.num_steps):
            raise ValueError(
                f"DenoisingState: step {self.step} is outside [0, num_steps={self.num_steps}); call "
                "state.begin(num_steps) before the run (see dist_compact.integrations.diffusers)"
            )



def replace_arg(args: tuple, kwargs: dict, index: int, name: str, fn: Callable) -> Tuple[tuple, dict]:
    """Apply ``fn`` to the argument given positionally at ``index`` or as ``name=``."""
    if len(args) > index:
        args = args[:index] + (fn(args[index]),) + args[index + 1:]
    elif name in kwargs:
        kwargs = dict(kwargs, **{name: fn(kwargs[name])})
    else:
        raise ValueError(f"dist_compact hook: argument {name!r} not found in the call")
    return args, kwargs


def get_arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def lru(cache: "OrderedDict", key, build: Callable, limit: int):
    """``cache[key]``, built by ``build()`` on a miss; the least recently used beyond ``limit`` go."""
    val = cache.get(key)
    if val is None:
        val = cache[key] = build()
        while len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return val


def new_attentions(h, sp=None) -> List[Callable]:
    """Per-layer attention callables of handle ``h`` (its ``attention_factory`` or ``build_attention``,
    ``sparsity``, ``compact``, ``num_layers``) under the sequence-parallel plan ``sp`` (None: none).
    """
    # imported on first use: ``import dist_compact`` does not load the sparse attention and its search
    from ..sparsity.attention import build_attention

    factory = h.attention_factory or build_attention
    compact = h.compact if h.sparsity.uses_compact else None
    attns = list(factory(h.num_layers, h.sparsity, compact, sp))
    if len(attns) != h.num_layers:
        raise ValueError(f"attention factory gave {len(attns)} callables for {h.num_layers} layers")
    return attns



def model_kind(model) -> str:
    name = type(model).__name__
    from ..models.embedded import EmbeddedDiT

    if isinstance(model, EmbeddedDiT):
        return "embedded"
    diffusers = diffusers_module()
    if isinstance(model, diffusers.WanTransformer3DModel) and name == "WanTransformer3DModel":
        return "wan"
    if isinstance(model, diffusers.HunyuanVideoTransformer3DModel) and name == "HunyuanVideoTransformer3DModel":
        return "hunyuan_video"
    raise TypeError(f"sparsify: unsupported model {name}; supported: {', '.join(SUPPORTED_MODELS)}")


def latent_grid(cfg, kind: str, hidden_states: torch.Tensor, who: str = "sparsify") -> Tuple[int, int, int]:
    """Latent token grid of ``hidden_states [B, C, F, H, W]`` under the patch size of ``cfg`` (the
    model's config; ``kind`` "wan" or "hunyuan_video"); ``who`` prefixes the errors."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"{who}: hidden_states must be [batch, channels, frames, height, width], got {got}")
    if kind == "wan":
        pt, ph, pw = cfg.patch_size
    else:
        pt, ph, pw = cfg.patch_size_t, cfg.patch_size, cfg.patch_size
    _, _, F, H, W = hidden_states.shape
    # the patch-embedding convolution drops a remainder, and so does the grid
    grid = (F // pt, H // ph, W // pw)
    if min(grid) < 1:
        raise ValueError(f"{who}: latents {tuple(hidden_states.shape)} are smaller than the patch ({pt}, {ph}, {pw})")
    return grid


def text_lengths(mask: Optional[torch.Tensor], batch: int, text_len: int) -> List[int]:
    if mask is None:
        return [text_len] * batch
    if mask.dim() != 2 or mask.shape != (batch, text_len):
        raise ValueError(f"sparsify: encoder_attention_mask must be [batch, text_len] = [{batch}, {text_len}], "
                         f"got {tuple(mask.shape)}")
    # the stock model keeps the first sum(mask) prompt tokens of each sample (valid tokens first)
    return [int(n) for n in mask.sum(dim=1, dtype=torch.int64).tolist()]



def checked_install(who: str, transformer, kind: str, sparsity_config, backend: str, state, compact, tile, stats):
    """The checks and defaults every install shares (``who`` prefixes the errors): returns ``(sparsity,
    state, num_layers, num_heads, head_dim, compact, tile, stats)`` with the Compact pattern resolved
    (Compact modes), the tile from it unless given, a bad tile refused now, fresh state / stats."""
    sparsity = sparsity_config if sparsity_config is not None else SparsityConfig()
    if not isinstance(sparsity, SparsityConfig):
        raise TypeError(f"{who}: sparsity_config must be a SparsityConfig, got {type(sparsity).__name__}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"{who}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if state is None:
        state = DenoisingState()
    if not isinstance(state, DenoisingState):
        raise TypeError(f"{who}: state must be a DenoisingState, got {type(state).__name__}")
    cfg = transformer.config
    if kind == "embedded":
        num_layers, num_heads, head_dim = cfg.depth, cfg.heads, cfg.head_dim
    else:
        num_heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        num_layers = cfg.num_layers + (cfg.num_single_layers if kind == "hunyuan_video" else 0)
        if kind == "hunyuan_video" and getattr(cfg, "image_condition_type", None) == "token_replace":
            raise ValueError(f"{who}: HunyuanVideo with image_condition_type='token_replace' addresses the "
                             "first frame's tokens by position, which block order moves; not supported")
    from ..ops import SUPPORTED_HEAD_DIMS

    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{who}: head_dim {head_dim} of {type(transformer).__name__} is not supported by the "
                         f"kernels ({SUPPORTED_HEAD_DIMS})")
    if sparsity.uses_compact:
        compact = _resolve_compact(sparsity, compact, num_layers, num_heads)
    if tile is None and compact is not None and getattr(compact, "tile", None) is not None:
        tile = tuple(compact.tile)
    if tile is not None:
        tile = tuple(tile)
        VideoLayout(1, 1, 1, tile=tile)  # one clear error for a bad tile, now rather than at the first forward
    if stats is None:
        from ..stats import AttentionStats

        stats = AttentionStats()
    return sparsity, state, num_layers, num_heads, head_dim, compact, tile, stats


def _resolve_compact(sparsity: SparsityConfig, compact, num_layers: int, num_heads: int):
    from ..search.config_file import load_compact

    if compact is None or isinstance(compact, str):
        cfg = sparsity if compact is None else dataclasses.replace(sparsity, compact_config=compact)
        return load_compact(cfg, num_layers=num_layers, num_heads=num_heads)
    if not callable(getattr(compact, "index_for", None)):
        raise TypeError("sparsify: compact must have index_for(layer, layout, num_heads) or be a config file path")
    if hasattr(compact, "check_compatible"):
        compact.check_compatible(num_layers=num_layers, num_heads=num_heads)
    return compact



def handle_state(transformer, handle, install: str) -> DenoisingState:
    """``handle.state``; a ValueError naming the ``install`` function when ``handle`` is None."""
    if handle is None:
        raise ValueError(f"{type(transformer).__name__} is not sparsified (call {install} first)")
    return handle.state


def remove_handle(transformer, handle):
    """``handle.remove()`` unless it is None; returns ``transformer``."""
    if handle is not None:
        handle.remove()
    return transformer


def forward_inputs(model, kind: str, args: tuple, kwargs: dict, who: str):
    """``(hidden_states, grid, text lengths)`` of a transformer forward's arguments (a pre-hook's
    view): the latent token grid, and HunyuanVideo's valid prompt length per sample (None for Wan)."""
    hs = get_arg(args, kwargs, 0, "hidden_states")
    grid = latent_grid(model.config, kind, hs, who)
    lengths = None
    if kind == "hunyuan_video":
        enc = get_arg(args, kwargs, 2, "encoder_hidden_states")
        mask = get_arg(args, kwargs, 3, "encoder_attention_mask")
        lengths = text_lengths(mask, hs.shape[0], enc.shape[1])
    return hs, grid, lengths


# ---------------------------------------------------------------------------------------------- handle
class IntegrationHandle:
    """What one install put on one transformer (subclasses: one per install function).

    Attributes:
        ATTR: the transformer attribute the handle lives under (a plain attribute, not a submodule).
        kind: ``"wan"``, ``"hunyuan_video"`` or ``"embedded"``.
        num_layers, num_heads, head_dim: the attention layers we run, their heads and head size.
        sparsity, compact, tile, state, stats, attention_factory: as given to the install
            (``tile`` None = :func:`default_tile` per grid).
        layout: the global layout of the last forward, or None.
    """

    ATTR = ""

    def __init__(self, model, kind: str, *, num_layers: int, num_heads: int, head_dim: int,
                 sparsity: SparsityConfig, compact, tile, state: DenoisingState, stats,
                 attention_factory: Optional[Callable] = None):
        self.model = model
        self.kind = kind
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.sparsity = sparsity
        self.compact = compact
        self.tile = None if tile is None else tuple(tile)
        self.state = state
        self.stats = stats
        self.attention_factory = attention_factory
        self.layout: Optional[VideoLayout] = None
        self._bank: "OrderedDict[VideoLayout, List[Callable]]" = OrderedDict()
        self._hooks: List[Any] = []
        self._restore: List[Tuple[Any, Any]] = []  # (module, original processor)

    def attentions(self, layout: VideoLayout) -> List[Callable]:
        """The per-layer attention callables for ``layout`` (built on first use, LRU-bounded)."""
        return lru(self._bank, layout, self._build_attentions, MAX_LAYOUTS)

    def _build_attentions(self) -> List[Callable]:
        return new_attentions(self, None)

    def reset(self) -> None:
        """Drop every cached attention object (indices, LSE), e.g. between videos of different prompts."""
        self._bank.clear()

    def _put_back(self, module, processor) -> None:
        module.set_processor(processor)

    def remove(self) -> None:
        """Undo the install: hooks removed, the original processors back, the handle detached."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, proc in self._restore:
            self._put_back(module, proc)
        self._restore.clear()
        self.reset()
        if self.model is not None and getattr(self.model, self.ATTR, None) is self:
            object.__delattr__(self.model, self.ATTR)


# ---------------------------------------------------------------------------------------------- HunyuanVideo
def hunyuan_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                image_rotary_emb) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, V + L, heads, head_dim]`` of HunyuanVideo's joint attention, as its stock
    processor computes them: the video tokens ``hidden_states [B, V, C]`` then the prompt tokens
    ``encoder_hidden_states [B, L, C]`` (None: video only).

    Single-stream blocks (no ``add_q_proj``) project video and prompt together; dual-stream blocks
    project the prompt with the ``add_*`` projections. The rotary embedding goes to the video
    tokens only; the norms act on the head dimension.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    video_len = hidden_states.shape[1]
    joint_inputs = attn.add_q_proj is None and encoder_hidden_states is not None
    if joint_inputs:  # single-stream block: one projection for video and text
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

    def heads(proj, x, norm=None):
        y = proj(x).unflatten(2, (attn.heads, -1))
        return y if norm is None else norm(y)

    query = heads(attn.to_q, hidden_states, attn.norm_q)
    key = heads(attn.to_k, hidden_states, attn.norm_k)
    value = heads(attn.to_v, hidden_states)
    if image_rotary_emb is not None:  # the video tokens only
        def rope(x):
            vid = apply_rotary_emb(x[:, :video_len], image_rotary_emb, sequence_dim=1)
            return torch.cat([vid, x[:, video_len:]], dim=1) if joint_inputs else vid

        query, key = rope(query), rope(key)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        query = torch.cat([query, heads(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)], dim=1)
        key = torch.cat([key, heads(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)], dim=1)
        value = torch.cat([value, heads(attn.add_v_proj, encoder_hidden_states)], dim=1)
    return query, key, value
