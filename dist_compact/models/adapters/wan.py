"""Wan2.1 / Wan2.2 (diffusers' ``WanTransformer3DModel``): the video self-attention of each block.

The cross-attention to the prompt (``blocks[i].attn2``) stays diffusers' own. The stream goes to
block order at ``blocks[0]``'s input (and Wan2.2 TI2V's per-token timesteps with it), the rotary
tables at ``rope``'s output, and comes back at ``proj_out``'s output.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...extras import require
from .base import ModelAdapter, get_arg, latent_grid, replace_arg

__all__ = ["WanAdapter", "WanSparseAttnProcessor"]


class WanSparseAttnProcessor:
    """Processor of a Wan self-attention (``blocks[i].attn1``): stock q/k/v, our attention.

    ``hidden_states``: this rank's ``[B, S_local, C]`` in block order (the hooks put it there);
    ``rotary_emb``: ``(cos, sin)`` ``[1, S_local, 1, head_dim]`` in the same order.
    """

    def __init__(self, handle, layer: int):
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


class WanAdapter(ModelAdapter):
    name = "wan"

    @classmethod
    def matches(cls, model) -> bool:
        diffusers = require("diffusers", "diffusers", "dist_compact's Wan adapter")
        return isinstance(model, diffusers.WanTransformer3DModel) and type(model).__name__ == "WanTransformer3DModel"

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.model.config.attention_head_dim

    def grid(self, hidden_states: torch.Tensor, who: str) -> Tuple[int, int, int]:
        return latent_grid(hidden_states, tuple(self.model.config.patch_size), who)

    def attention_modules(self) -> List:
        return [blk.attn1 for blk in self.model.blocks]

    def processor(self, handle, layer: int) -> WanSparseAttnProcessor:
        return WanSparseAttnProcessor(handle, layer)

    def on_begin(self, handle, args, kwargs):
        ts = get_arg(args, kwargs, 1, "timestep")
        if isinstance(ts, torch.Tensor) and ts.dim() == 2:  # Wan2.2 TI2V: one timestep per token
            args, kwargs = replace_arg(args, kwargs, 1, "timestep", lambda t: handle.to_stream(t, dim=1))
        return args, kwargs

    def stream_hooks(self, handle) -> List:
        m = self.model
        return [
            # rotary tables [1, S, 1, D]: sequence dim 1
            m.rope.register_forward_hook(lambda mod, a, out: tuple(handle.to_stream(t, dim=1) for t in out)),
            m.blocks[0].register_forward_pre_hook(
                lambda mod, args, kwargs: replace_arg(args, kwargs, 0, "hidden_states", handle.to_stream),
                with_kwargs=True),
            m.proj_out.register_forward_hook(lambda mod, a, out: handle.from_stream(out)),
        ]

