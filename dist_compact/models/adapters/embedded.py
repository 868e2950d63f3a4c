"""The embedded tiny DiT (:class:`~dist_compact.models.embedded.EmbeddedDiT`): joint text + video attention
of every block, the prompt tokens in the token stream after the video.

Its hook points are its own (``stream_in``, ``rope``, ``stream_out``; each block's ``processor``),
so it is installed exactly like the diffusers models.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..embedded import EmbeddedDiT
from .base import ModelAdapter, get_arg

__all__ = ["EmbeddedAdapter", "EmbeddedAttnProcessor"]


class EmbeddedAttnProcessor:
    """Processor of block ``layer``: q, k, v ``[B, S_local, heads, head_dim]`` of this rank's stream
    (block order, text blocks included) -> the installer's attention."""

    def __init__(self, handle, layer: int):
        self.handle = handle
        self.layer = layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.handle.attend(self.layer, q, k, v, q.shape[1])


class EmbeddedAdapter(ModelAdapter):
    name = "embedded"
    text_in_stream = True

    @classmethod
    def matches(cls, model) -> bool:
        return type(model) is EmbeddedDiT

    @property
    def num_layers(self) -> int:
        return self.model.config.depth

    @property
    def num_heads(self) -> int:
        return self.model.config.heads

    @property
    def head_dim(self) -> int:
        return self.model.config.head_dim

    def grid(self, hidden_states: torch.Tensor, who: str) -> Tuple[int, int, int]:
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{who}: x must be [batch, channels, frames, height, width], got {got}")
        return self.model.grid(*x.shape[2:])

    def forward_inputs(self, args, kwargs, who):
        x = get_arg(args, kwargs, 0, "x")
        return x, self.grid(x, who), [self.model.config.text_len] * x.shape[0]

    def attention_modules(self) -> List:
        return list(self.model.blocks)

    def processor(self, handle, layer: int) -> EmbeddedAttnProcessor:
        return EmbeddedAttnProcessor(handle, layer)

    def stream_hooks(self, handle) -> List:
        m = self.model
        return [
            m.stream_in.register_forward_hook(lambda mod, a, out: handle.to_stream(out)),
            m.rope.register_forward_hook(lambda mod, a, out: tuple(handle.to_stream(t, dim=1) for t in out)),
            m.stream_out.register_forward_hook(lambda mod, a, out: handle.from_stream(out)),
        ]
