"""What dist_compact knows of one model family, in one place: :class:`ModelAdapter`.

An installer (:mod:`dist_compact.integrations`) asks the adapter of a transformer for everything
model-specific and nothing else:

* its one name (``"wan"``, ``"hunyuan_video"``, ``"embedded"``) and its attention layers, heads and
  head size;
* the latent token grid and the per-sample prompt lengths of a forward (what a pre-hook reads from
  the transformer's arguments);
* the attention modules and, for each, a processor that computes the stock q, k, v and hands them to
  the installer's handle (``handle.attend(layer, q, k, v, video_len, text_len)``);
* the hook points of the token stream: where the tokens (and their rotary tables) go to block order
  and to this rank's shard ONCE per forward (``handle.to_stream``), and where the output comes back
  (``handle.from_stream``);
* the context-parallel plan diffusers needs for it (None: the model's own).

A new model family is one adapter; no installer changes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["ModelAdapter", "get_arg", "replace_arg", "latent_grid"]


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
    """The argument given positionally at ``index`` or as ``name=`` (``default`` when absent)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class ModelAdapter:
    """One model family's knowledge (module doc); built around one transformer instance.

    Attributes:
        name: the family's one name.
        text_in_stream: the prompt tokens travel in the token stream after the video (they go to
            block order and shards with it; the embedded model); False: they come as separate
            encoder states and join inside each attention (HunyuanVideo) or not at all (Wan).
        model: the transformer.
    """

    name = ""
    text_in_stream = False

    def __init__(self, model):
        self.model = model

    @classmethod
    def matches(cls, model) -> bool:
        """Whether ``model`` is of this family (exact classes: a subclass may change the forward)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ dimensions
    @property
    def num_layers(self) -> int:
        """Attention layers dist_compact runs (their order is the layer numbering)."""
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def check(self, who: str) -> None:
        """Refuse a configuration of the model that the installers cannot run (``who`` names the caller)."""

    # ------------------------------------------------------------------ a forward's inputs
    def grid(self, hidden_states: torch.Tensor, who: str) -> Tuple[int, int, int]:
        """The latent token grid ``(T, H, W)`` of the forward's input."""
        raise NotImplementedError

    def forward_inputs(self, args: tuple, kwargs: dict, who: str) -> Tuple[torch.Tensor, Tuple[int, int, int],
                                                                         Optional[List[int]]]:
        """``(hidden_states, grid, text lengths)`` of a transformer forward's arguments: the valid
        prompt tokens per sample in the attention (None: no prompt tokens in it)."""
        hs = get_arg(args, kwargs, 0, "hidden_states")
        return hs, self.grid(hs, who), None

    # ------------------------------------------------------------------ hook points
    def attention_modules(self) -> List[Any]:
        """The modules whose processor is replaced, in layer order."""
        raise NotImplementedError

    def processor(self, handle, layer: int) -> Callable:
        """The processor of layer ``layer``: the stock q, k, v, then ``handle.attend``."""
        raise NotImplementedError

    def stream_hooks(self, handle) -> List[Any]:
        """Register the hooks that move the token stream to block order and this rank's shard once
        per forward (tokens and rotary tables, and the per-token timesteps where a model has them),
        and back at the output; returns the hook handles."""
        raise NotImplementedError

    def on_begin(self, handle, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """After the forward's layouts are known (stream installs only): adjust the forward's
        arguments (default: none)."""
        return args, kwargs

    def cp_plan(self) -> Optional[dict]:
        """The ``_cp_plan`` diffusers' context parallelism needs for this model (None: its own)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


def latent_grid(hidden_states: torch.Tensor, patch: Tuple[int, int, int], who: str) -> Tuple[int, int, int]:
    """Latent token grid of ``hidden_states [B, C, F, H, W]`` under the patch ``(pt, ph, pw)``; ``who``
    prefixes the errors."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"{who}: hidden_states must be [batch, channels, frames, height, width], got {got}")
    pt, ph, pw = patch
    _, _, F, H, W = hidden_states.shape
    # the patch-embedding convolution drops a remainder, and so does the grid
    grid = (F // pt, H // ph, W // pw)
    if min(grid) < 1:
        raise ValueError(f"{who}: latents {tuple(hidden_states.shape)} are smaller than the patch ({pt}, {ph}, {pw})")
    return grid
