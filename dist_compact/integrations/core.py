"""The one installer mechanism: every way our attention enters a video DiT is an :class:`IntegrationHandle`.

:func:`~dist_compact.integrations.diffusers.sparsify` (stream hooks, our sharding),
:func:`~dist_compact.integrations.diffusers_backend.set_sparse_backend` (diffusers' own attention
processors and context parallelism) and :func:`~dist_compact.integrations.xfuser.sparsify_xfuser`
(xDiT's USP) differ only in how the tokens reach the attention. What a model is comes from its
adapter (:mod:`dist_compact.models.adapters`); what every install shares is here:

* :class:`DenoisingState` - the step the next forward belongs to;
* :class:`IntegrationHandle` - the base of every handle: the checks of an install
  (:meth:`IntegrationHandle.checked`), the per-layout attention objects (LRU, :data:`MAX_LAYOUTS`),
  the layouts and contexts of a forward, the attention call of a layer (:meth:`~IntegrationHandle.attend`),
  the stream to and from block order, the hooks and replaced processors, and their removal;
* :func:`install`, :func:`installed`, :func:`denoising_state`, :func:`unsparsify` - attach a handle to a
  transformer (one at a time), find it, read its step state, remove it: the same for every install.

diffusers is imported only when a diffusers model is passed.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._util import as_int, cdiv
from ..layout import VideoLayout
from ..models.adapters import ModelAdapter
from ..models.embedded import WEIGHTS_DIR
from ..search.config_file import load_compact
from ..ops import SUPPORTED_HEAD_DIMS
from ..sparsity.attention import build_attention
from ..sparsity.attention_ops import AttentionOps
from ..sparsity.config import SparsityConfig
from ..sparsity.context import AttentionContext, AttentionLayer
from ..stats import AttentionStats

__all__ = [
    "MAX_LAYOUTS",
    "DEFAULT_TILES",
    "DenoisingState",
    "IntegrationHandle",
    "default_tile",
    "lru",
    "check_model",
    "install",
    "installed",
    "denoising_state",
    "unsparsify",
]

#: Distinct layouts kept with their own attention objects (LRU).
MAX_LAYOUTS = 4
#: Tiles of 128 tokens (the kernel's fastest block size, see docs/history/notebook.md) tried by default_tile,
#: in order of preference at equal padding (compact tiles first: windows stay round).
DEFAULT_TILES = ((2, 8, 8), (1, 8, 16), (1, 16, 8), (4, 4, 8), (4, 8, 4))
#: The transformer attribute an installed handle lives under (a plain attribute, not a submodule).
ATTR = "_dist_compact"


def default_tile(grid: Sequence[int]) -> Tuple[int, int, int]:
    """The 128-token tile with the least padding for a token grid ``(T, H, W)``.

    Ties go to the first of ``(2, 8, 8), (1, 8, 16), (1, 16, 8), (4, 4, 8), (4, 8, 4)``. Examples:
    Wan 480p 21x30x52 -> (1, 16, 8) (15% padding); HunyuanVideo 720p 33x45x80 -> (1, 8, 16) (7%).
    """
    T, H, W = _grid3(grid, "default_tile")

    def padded(t):
        return (cdiv(T, t[0]) * t[0]) * (cdiv(H, t[1]) * t[1]) * (cdiv(W, t[2]) * t[2])

    return min(DEFAULT_TILES, key=padded)


def _grid3(grid, who: str) -> Tuple[int, int, int]:
    """``grid`` as three positive ints (NumPy integers accepted), else one clear error."""
    vals = None
    if not isinstance(grid, (str, bytes)):
        try:
            vals = tuple(as_int(g) for g in grid)
        except TypeError:
            vals = None
    if vals is None or len(vals) != 3 or not all(v is not None and v >= 1 for v in vals):
        raise ValueError(f"{who}: grid must be three positive ints (frames, height, width) of latent tokens, "
                         f"e.g. (21, 30, 52), got {grid!r}")
    return vals


def _state_int(value, name: str, least: int, hint: str) -> int:
    """``value`` as an int >= ``least`` (NumPy integers accepted; a bool, float or str is none)."""
    v = as_int(value)
    if v is None or v < least:
        raise ValueError(f"{name} must be an int >= {least} ({hint}), got {value!r}")
    return v


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

    def __post_init__(self) -> None:
        self.step = _state_int(self.step, "DenoisingState.step", 0, "the 0-based step of the next forward")
        self.num_steps = _state_int(self.num_steps, "DenoisingState.num_steps", 1, "the steps of the run")

    def begin(self, num_steps: int) -> "DenoisingState":
        """Start a run of ``num_steps`` steps at step 0 (an int; NumPy integers accepted)."""
        n = as_int(num_steps)
        if n is None or n < 1:
            raise ValueError(f"DenoisingState.begin: num_steps must be an int >= 1, got {num_steps!r}")
        self.step = 0
        self.num_steps = n
        return self

    def on_step_end(self, pipe, step_index: int, timestep, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """diffusers' ``callback_on_step_end``: step ``step_index`` is done, the next is ``+1``."""
        i = as_int(step_index)
        if (i is None and isinstance(step_index, torch.Tensor) and step_index.dim() == 0
                and not (step_index.dtype.is_floating_point or step_index.dtype.is_complex
                         or step_index.dtype == torch.bool)):
            i = int(step_index)
        if i is None or i < 0:
            raise ValueError(f"DenoisingState.on_step_end: step_index must be an int >= 0 (the step just done, as "
                             f"diffusers passes it to callback_on_step_end), got {step_index!r}")
        self.step = i + 1
        return callback_kwargs

    def checked_fields(self, who: str) -> None:
        """Refuse a ``step`` / ``num_steps`` that is no int (e.g. set by hand to a float or a string)."""
        for name, least, hint in (("step", 0, "the 0-based step of the next forward"),
                                  ("num_steps", 1, "set it with state.begin(num_steps)")):
            _state_int(getattr(self, name), f"{who}: state.{name}", least, hint)

    def check(self) -> None:
        if as_int(self.step) is None or as_int(self.num_steps) is None:
            raise ValueError(f"DenoisingState: step and num_steps must be ints, got step={self.step!r}, "
                             f"num_steps={self.num_steps!r}; set them with state.begin(num_steps) and "
                             "callback_on_step_end=state.on_step_end")
        if not (0 <= self.step < self.num_steps):
            raise ValueError(
                f"DenoisingState: step {self.step} is outside [0, num_steps={self.num_steps}); call "
                "state.begin(num_steps) before the run (see dist_compact.integrations.diffusers)"
            )


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

    stream_layout: VideoLayout  # the token stream's block order and shards (text in it only if in the stream)
    groups: List[_Group]


# ---------------------------------------------------------------------------------------------- handle
class IntegrationHandle:
    """What one install put on one transformer (subclasses: one per install function).

    Attributes:
        model: the transformer; adapter: its :class:`~dist_compact.models.adapters.ModelAdapter`.
        num_layers, num_heads, head_dim: the attention layers we run, their heads and head size.
        sparsity, compact, tile, state, stats, attention_factory, backend: as given to the install
            (``tile`` None = :func:`default_tile` per grid).
        sp: this rank's sequence-parallel plan, or None (one process, or the framework shards).
        ops: this rank's :class:`~dist_compact.sparsity.attention_ops.AttentionOps`.
        layout: the global layout of the last forward (its first sample group), or None.
    """

    WHO = "install"

    def __init__(self, model, adapter: ModelAdapter, *, sparsity: SparsityConfig, compact, tile,
                 state: "DenoisingState", stats, backend: str = "auto", sp=None,
                 attention_factory: Optional[Callable] = None, ops: Optional[AttentionOps] = None):
        self.model = model
        self.adapter = adapter
        self.num_layers, self.num_heads, self.head_dim = adapter.num_layers, adapter.num_heads, adapter.head_dim
        self.sparsity = sparsity
        self.compact = compact
        self.tile = None if tile is None else tuple(tile)
        self.state = state
        self.stats = stats
        self.backend = backend
        self.sp = sp
        self.ops = ops if ops is not None else AttentionOps(backend)
        self.attention_factory = attention_factory
        self.layout: Optional[VideoLayout] = None
        self._bank: "OrderedDict[VideoLayout, List[Callable]]" = OrderedDict()
        # one layout instance per (grid, text tokens): its maps and their device copies (validated
        # once by the kernels) are built once, not at every forward
        self._layouts: "OrderedDict[Tuple, VideoLayout]" = OrderedDict()
        self._fwd: Optional[_Forward] = None
        self._hooks: List[Any] = []
        self._restore: List[Tuple[Any, Any]] = []  # (module, original processor)

    @property
    def kind(self) -> str:
        """The model family's one name (the adapter's)."""
        return self.adapter.name

    # ------------------------------------------------------------------ the checks of every install
    @staticmethod
    def checked(who: str, adapter: ModelAdapter, sparsity_config, backend: str, state, compact, tile, stats, *,
                attention_factory=None):
        """The checks and defaults every install shares (``who`` prefixes the errors): returns ``(sparsity,
        state, compact, tile, stats)`` with the Compact pattern resolved (Compact modes), the tile from it
        unless given, a bad tile refused now, fresh state / stats. Every argument is checked whatever the
        mode (a ``compact`` of the wrong type is refused under ``mode="dense"`` too)."""
        sparsity = sparsity_config if sparsity_config is not None else SparsityConfig()
        if not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"{who}: sparsity_config must be a SparsityConfig, got {type(sparsity).__name__}")
        if not isinstance(backend, str) or backend not in ("auto", "triton", "torch"):
            raise ValueError(f"{who}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if state is None:
            state = DenoisingState()
        if not isinstance(state, DenoisingState):
            raise TypeError(f"{who}: state must be a DenoisingState, got {type(state).__name__}")
        state.checked_fields(who)
        if stats is not None and not all(callable(getattr(stats, m, None)) for m in ("call", "phase")):
            raise TypeError(f"{who}: stats must be a dist_compact.stats.AttentionStats (or None for a new one), "
                            f"got {type(stats).__name__}")
        if attention_factory is not None and not callable(attention_factory):
            raise TypeError(f"{who}: attention_factory must be callable as factory(num_layers, sparsity, compact, sp) "
                            f"-> [attn, ...] (or None), got {type(attention_factory).__name__}")
        compact = _checked_compact(who, compact)
        if tile is not None and (isinstance(tile, (str, bytes)) or not _iterable(tile)):
            raise ValueError(f"{who}: tile must be three positive ints (t, h, w) with t * h * w in (16, 32, 64, 128), "
                             f"e.g. (1, 4, 4), got {tile!r}")
        adapter.check(who)
        if adapter.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{who}: head_dim {adapter.head_dim} of {type(adapter.model).__name__} is not supported "
                             f"by the kernels ({SUPPORTED_HEAD_DIMS})")
        if sparsity.uses_compact:
            compact = _resolve_compact(sparsity, compact, adapter.num_layers, adapter.num_heads)
        if tile is None and compact is not None and getattr(compact, "tile", None) is not None:
            tile = tuple(compact.tile)  # the tile a Compact config was searched with (optional in the protocol)
        if tile is not None:
            tile = tuple(tile)
            VideoLayout(1, 1, 1, tile=tile)  # one clear error for a bad tile, now rather than at the first forward
        return sparsity, state, compact, tile, (stats if stats is not None else AttentionStats())

    # ------------------------------------------------------------------ attention objects
    def attentions(self, layout: VideoLayout) -> List[Callable]:
        """The per-layer attention callables for ``layout`` (built on first use, LRU-bounded)."""
        return lru(self._bank, layout, self._build_attentions, MAX_LAYOUTS)

    def _build_attentions(self) -> List[Callable]:
        return new_attentions(self, self.sp)

    def reset(self) -> None:
        """Drop every cached attention object (indices, LSE), e.g. between videos of different prompts."""
        self._bank.clear()
        self._layouts.clear()

    def cache_nbytes(self) -> int:
        """Bytes held by the attention layers' caches (indices, LSE), all layouts together."""
        return sum(a.cache_nbytes() for attns in self._bank.values() for a in attns if isinstance(a, AttentionLayer))

    # ------------------------------------------------------------------ per forward
    def layout_of(self, grid: Tuple[int, int, int], text_tokens: int = 0) -> VideoLayout:
        """The global layout of ``grid`` with ``text_tokens`` text tokens after the video (cached)."""
        def build() -> VideoLayout:
            if text_tokens:
                return self.layout_of(grid).with_(text_tokens=text_tokens, text_position="after")
            tile = self.tile if self.tile is not None else default_tile(grid)
            layout = VideoLayout(*grid, tile=tuple(tile))
            return self.sp.layout_for(layout) if self.sp is not None else layout

        return lru(self._layouts, (tuple(grid), text_tokens), build, 2 * MAX_LAYOUTS)

    def context(self, layout: VideoLayout) -> AttentionContext:
        """The :class:`AttentionContext` of a forward at the state's step."""
        self.state.check()
        return AttentionContext(layout=layout, step=self.state.step, num_steps=self.state.num_steps,
                                ops=self.ops, stats=self.stats)

    def begin(self, grid: Tuple[int, int, int], text_lengths: Optional[List[int]] = None, device=None) -> None:
        """Layouts and contexts of one forward: one sample group per distinct prompt length
        (``text_lengths`` None: no text tokens in the attention); ``device`` holds the batch."""
        lengths = text_lengths if text_lengths is not None else [0]
        distinct = sorted(set(lengths))
        groups: List[_Group] = []
        for n in distinct:
            lay = self.layout_of(grid, n)
            samples = None
            if len(distinct) > 1:  # made once per forward on the batch's device, used by every layer
                samples = torch.tensor([b for b, m in enumerate(lengths) if m == n], dtype=torch.int64,
                                       device=device)
            groups.append(_Group(lay, self.context(lay), self.attentions(lay), samples))
        stream = groups[0].layout if self.adapter.text_in_stream else self.layout_of(grid)
        self._fwd = _Forward(stream, groups)
        self.layout = groups[0].layout

    def current(self) -> _Forward:
        if self._fwd is None:
            raise RuntimeError(
                "dist_compact: an attention processor ran outside a hooked transformer forward; call the "
                "transformer itself (its hooks set the layout), not one of its blocks"
            )
        return self._fwd

    def end(self) -> None:
        self._fwd = None

    # ------------------------------------------------------------------ the attention call
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               video_len: int, text_len: int = 0) -> torch.Tensor:
        """Attention of this rank's tokens ``[B, video_len + text_len, H, D]`` (video shard in block
        order, then the ``text_len`` prompt tokens in model order, valid ones first; a model whose
        prompt is in the stream hands its whole block-order stream as ``video_len``) -> same shape.
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
        if self.adapter.text_in_stream or (n_txt == 0 and text_len == 0):
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

    # ------------------------------------------------------------------ the token stream
    def to_stream(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Model-order tokens -> this rank's block-order shard (along ``dim``)."""
        lay = self.current().stream_layout
        if x.shape[dim] != lay.seq_len:
            raise RuntimeError(
                f"dist_compact: expected {lay.seq_len} tokens along dim {dim} for {lay}, got "
                f"{tuple(x.shape)} (was the stream permuted twice?)"
            )
        x = lay.to_blocks(x, dim=dim)
        return self.sp.shard(x, lay, dim=dim) if self.sp is not None else x

    def from_stream(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's block-order shard -> every rank's whole sequence in model order."""
        lay = self.current().stream_layout
        if self.sp is not None:
            x = self.sp.gather(x, lay, dim=dim)
        return lay.from_blocks(x, dim=dim)

    # ------------------------------------------------------------------ hooks and processors
    def hook_forward(self, stream: bool) -> None:
        """The transformer's pre-hook (the forward's layouts, from the adapter's view of its
        arguments) and post-hook; with ``stream`` the adapter's stream hooks too."""
        model, adapter = self.model, self.adapter

        def pre_forward(module, args, kwargs):
            hs, grid, lengths = adapter.forward_inputs(args, kwargs, self.WHO)
            self.check_forward(grid)
            self.begin(grid, lengths, hs.device)
            return adapter.on_begin(self, args, kwargs) if stream else (args, kwargs)

        def post_forward(module, args, output):
            self.end()
            return output

        self._hooks.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(post_forward))
        if stream:
            self._hooks.extend(adapter.stream_hooks(self))

    def check_forward(self, grid: Tuple[int, int, int]) -> None:
        """A forward's grid refused before any work (default: every grid runs)."""

    def set_processors(self, make: Callable[[int], Any]) -> List[Any]:
        """Replace the adapter's attention modules' processors with ``make(layer)``; returns them."""
        procs = []
        for layer, mod in enumerate(self.adapter.attention_modules()):
            proc = make(layer)
            self._restore.append((mod, mod.processor))
            self._put_back(mod, proc)
            procs.append(proc)
        return procs

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
        self._fwd = None
        if self.model is not None and installed(self.model) is self:
            object.__delattr__(self.model, ATTR)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kind}, layers={self.num_layers}, heads={self.num_heads}, "
                f"mode={self.sparsity.mode!r}, sp={self.sp}, tile={self.tile})")


def new_attentions(h, sp=None) -> List[Callable]:
    """Per-layer attention callables of handle ``h`` (its ``attention_factory`` or ``build_attention``,
    ``sparsity``, ``compact``, ``num_layers``) under the sequence-parallel plan ``sp`` (None: none).
    """
    factory = h.attention_factory or build_attention
    compact = h.compact if h.sparsity.uses_compact else None
    made = factory(h.num_layers, h.sparsity, compact, sp)
    if isinstance(made, (str, bytes, torch.Tensor)) or not _iterable(made):
        raise TypeError(f"{h.WHO}: attention_factory returned {type(made).__name__}; it must return a list of "
                        f"{h.num_layers} attention callables attn(q, k, v, ctx), one per layer")
    attns = list(made)
    if len(attns) != h.num_layers:
        raise ValueError(f"{h.WHO}: attention factory gave {len(attns)} callables for {h.num_layers} layers; "
                         "return one attention callable per layer")
    bad = next((i for i, a in enumerate(attns) if not callable(a)), None)
    if bad is not None:
        raise TypeError(f"{h.WHO}: attention_factory's entry {bad} is {type(attns[bad]).__name__}, not a callable "
                        "attn(q, k, v, ctx); return one attention callable per layer")
    return attns


def _iterable(x) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


def _checked_compact(who: str, compact):
    """``compact`` as given (a path-like as a str), or one clear error for a value that is neither a
    pattern object nor a config file path."""
    if compact is None or callable(getattr(compact, "index_for", None)):
        return compact
    if isinstance(compact, os.PathLike):
        compact = os.fspath(compact)
    if isinstance(compact, str) and compact:
        return compact
    raise TypeError(f"{who}: compact must be a Compact pattern object with index_for(layer, layout, num_heads) "
                    f"(e.g. a CompactConfig) or a config file path (.yaml / .json), got {compact!r}")


def _resolve_compact(sparsity: SparsityConfig, compact, num_layers: int, num_heads: int):
    """The pattern object of a checked ``compact`` (:func:`_checked_compact`): loaded from its file (or from
    the config's ``compact_config``) where it is a path or None."""
    if compact is None or isinstance(compact, str):
        cfg = sparsity if compact is None else dataclasses.replace(sparsity, compact_config=compact)
        return load_compact(cfg, num_layers=num_layers, num_heads=num_heads, shipped_dir=WEIGHTS_DIR)
    if hasattr(compact, "check_compatible"):
        compact.check_compatible(num_layers=num_layers, num_heads=num_heads)
    return compact


# ---------------------------------------------------------------------------------------------- attach
def check_model(who: str, transformer) -> None:
    """Refuse, with the fix, the objects that wrap a transformer (a diffusers pipeline, ``torch.compile``'s
    module): the install goes on the transformer itself. Anything else goes to the adapters' check."""
    if isinstance(transformer, torch.nn.Module):
        inner = getattr(transformer, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            raise TypeError(f"{who}: got a torch.compile'd {type(inner).__name__} ({type(transformer).__name__}); "
                            f"install on the model itself ({who}(compiled._orig_mod)), then compile")
        return
    inner = getattr(transformer, "transformer", None)
    if isinstance(inner, torch.nn.Module):
        raise TypeError(f"{who}: got the pipeline {type(transformer).__name__}, not a transformer; pass "
                        f"pipe.transformer (and pipe.transformer_2 where the pipeline has two)")


def install(transformer, handle: IntegrationHandle):
    """Attach ``handle`` to ``transformer`` after removing a handle of the same install; a handle of
    another install is an error (remove it first with :func:`unsparsify`). Returns ``transformer``."""
    old = installed(transformer)
    if old is not None:
        if type(old) is not type(handle):
            raise ValueError(f"{handle.WHO}: {type(transformer).__name__} already has {type(old).__name__} "
                             "installed; remove it first with dist_compact.unsparsify(model)")
        old.remove()
    object.__setattr__(transformer, ATTR, handle)  # a plain attribute, not a submodule
    return transformer


def _attrs(transformer, who: str) -> dict:
    d = getattr(transformer, "__dict__", None)
    if not isinstance(d, dict):
        raise TypeError(f"{who}: transformer must be the model (a torch.nn.Module) that sparsify / set_sparse_backend "
                        f"/ sparsify_xfuser installed on, got {type(transformer).__name__}")
    return d


def installed(transformer) -> Optional[IntegrationHandle]:
    """The handle of whatever install put our attention on ``transformer``, or None."""
    return _attrs(transformer, "installed").get(ATTR)


def denoising_state(transformer) -> DenoisingState:
    """The :class:`DenoisingState` an installed transformer reads its step from."""
    h = _attrs(transformer, "denoising_state").get(ATTR)
    if h is None:
        raise ValueError(f"{type(transformer).__name__} has no dist_compact attention installed (call sparsify, "
                         "set_sparse_backend or sparsify_xfuser first)")
    return h.state


def unsparsify(transformer):
    """Remove whatever install put our attention on ``transformer`` (stock processors back); returns it."""
    if not isinstance(transformer, torch.nn.Module) and ATTR not in getattr(transformer, "__dict__", {}):
        raise TypeError(f"unsparsify: transformer must be the model (a torch.nn.Module) that sparsify / "
                        f"set_sparse_backend / sparsify_xfuser installed on, got {type(transformer).__name__}")
    h = installed(transformer)
    if h is not None:
        h.remove()
    return transformer
