"""HunyuanVideo (diffusers' ``HunyuanVideoTransformer3DModel``): the joint text + video attention of the
dual- and single-stream blocks (the token refiner's text-only attention stays stock).

The prompt tokens go to their own blocks after the video blocks, as the layout's text sink expects;
each sample's valid prompt length is read from ``encoder_attention_mask`` (valid tokens first). The
stream goes to block order at ``x_embedder``'s output, the rotary tables at ``rope``'s output, and
comes back at ``proj_out``'s output.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ...extras import require
from .base import ModelAdapter, get_arg, latent_grid

__all__ = ["HunyuanVideoAdapter", "HunyuanVideoSparseAttnProcessor", "hunyuan_qkv", "text_lengths",
           "hunyuan_video_cp_plan"]


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


def text_lengths(mask: Optional[torch.Tensor], batch: int, text_len: int, who: str = "sparsify") -> List[int]:
    """Valid prompt tokens per sample from ``encoder_attention_mask [batch, text_len]`` of 0 / 1 (None: all);
    ``who`` names the install in errors."""
    if mask is None:
        return [text_len] * batch
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, text_len):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{who}: encoder_attention_mask must be [batch, text_len] = [{batch}, {text_len}] (that of "
                         f"encoder_hidden_states), got {got}")
    # the stock model keeps the first sum(mask) prompt tokens of each sample (valid tokens first); one read
    # back gives the lengths and the count of entries that are neither 0 nor 1
    *lengths, bad = torch.cat([mask.sum(dim=1, dtype=torch.int64),
                               ((mask != 0) & (mask != 1)).sum(dtype=torch.int64).view(1)]).tolist()
    if bad:
        raise ValueError(f"{who}: encoder_attention_mask must hold 0 or 1 per prompt token (1 = valid, valid tokens "
                         f"first), got values in [{mask.min().item():g}, {mask.max().item():g}]")
    return [int(n) for n in lengths]


def hunyuan_video_cp_plan() -> Dict:
    """A ``_cp_plan`` for diffusers' ``HunyuanVideoTransformer3DModel`` (it ships none in 0.42.1).

    Splits the patchified video tokens (``x_embedder``'s output) and the rotary tables (``rope``'s
    two outputs, ``[V, head_dim]``) into equal chunks, and gathers ``proj_out``'s output. The prompt
    tokens stay whole on every rank (the stock model's text mask assumes that; our processors read
    the valid lengths from ``encoder_attention_mask``). Only for dist_compact's backend processors:
    diffusers' stock processors would count the replicated prompt once per rank.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {0: rope, 1: rope},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class HunyuanVideoSparseAttnProcessor:
    """Processor of HunyuanVideo's joint attention (dual- and single-stream blocks).

    ``hidden_states``: this rank's video tokens ``[B, V_local, C]`` in block order;
    ``encoder_hidden_states``: the prompt tokens ``[B, L, C]`` (every rank); ``image_rotary_emb``:
    ``(cos, sin)`` ``[V_local, head_dim]``. Returns ``(video_out, text_out)`` as the stock processor.
    """

    def __init__(self, handle, layer: int):
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
        # diffusers' Attention leaves these out (or None) where a block has no output projection
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"

    @classmethod
    def matches(cls, model) -> bool:
        diffusers = require("diffusers", "diffusers", "dist_compact's HunyuanVideo adapter")
        return (isinstance(model, diffusers.HunyuanVideoTransformer3DModel)
                and type(model).__name__ == "HunyuanVideoTransformer3DModel")

    @property
    def num_layers(self) -> int:
        cfg = self.model.config
        return cfg.num_layers + cfg.num_single_layers

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.model.config.attention_head_dim

    def check(self, who: str) -> None:
        if self.model.config.image_condition_type == "token_replace":
            raise ValueError(f"{who}: HunyuanVideo with image_condition_type='token_replace' addresses the "
                             "first frame's tokens by position, which block order moves; not supported")

    def grid(self, hidden_states: torch.Tensor, who: str) -> Tuple[int, int, int]:
        cfg = self.model.config
        return latent_grid(hidden_states, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size), who)

    def forward_inputs(self, args, kwargs, who):
        hs = get_arg(args, kwargs, 0, "hidden_states")
        grid = self.grid(hs, who)
        enc = get_arg(args, kwargs, 2, "encoder_hidden_states")
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3:
            got = tuple(enc.shape) if isinstance(enc, torch.Tensor) else type(enc).__name__
            raise ValueError(f"{who}: encoder_hidden_states must be the prompt tokens [batch, text_len, channels], "
                             f"got {got}")
        mask = get_arg(args, kwargs, 3, "encoder_attention_mask")
        return hs, grid, text_lengths(mask, hs.shape[0], enc.shape[1], who)

    def attention_modules(self) -> List:
        m = self.model
        return [blk.attn for blk in m.transformer_blocks] + [blk.attn for blk in m.single_transformer_blocks]

    def processor(self, handle, layer: int) -> HunyuanVideoSparseAttnProcessor:
        return HunyuanVideoSparseAttnProcessor(handle, layer)

    def stream_hooks(self, handle) -> List:
        m = self.model
        return [
            # rotary tables [S, D]: sequence dim 0
            m.rope.register_forward_hook(lambda mod, a, out: tuple(handle.to_stream(t, dim=0) for t in out)),
            m.x_embedder.register_forward_hook(lambda mod, a, out: handle.to_stream(out)),
            m.proj_out.register_forward_hook(lambda mod, a, out: handle.from_stream(out)),
        ]

    def cp_plan(self) -> Optional[dict]:
        return hunyuan_video_cp_plan()
