"""Published transformer configs (diffusers format) and random-weight builders for speed work.

No weights can be downloaded on the machines this project runs on, and speed does not depend on the
weights' values: :func:`build_transformer` builds diffusers' ``WanTransformer3DModel`` (Wan2.1-T2V-14B)
or ``HunyuanVideoTransformer3DModel`` (HunyuanVideo) from the published config with small random
weights, directly on the device in the target dtype; :func:`transformer_inputs` makes inputs of the
pipelines' shapes. ``SMALL`` holds tiny stand-ins of the same structure for CPU tests.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["WAN_14B", "HUNYUAN_VIDEO", "SHAPES", "SMALL", "build_transformer", "transformer_inputs"]

# published configs (diffusers format: Wan-AI/Wan2.1-T2V-14B-Diffusers, hunyuanvideo-community/HunyuanVideo)
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# latents [C, F, H, W] of the benchmark videos and the text length the pipelines use
SHAPES = {"wan": ((16, 21, 60, 104), 512), "hunyuan_video": ((16, 33, 90, 160), 256)}
# tiny stand-ins for --small (CPU)
SMALL = {
    "wan": (dict(WAN_14B, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=64,
                 num_layers=4), ((16, 4, 16, 24), 16)),
    "hunyuan_video": (dict(HUNYUAN_VIDEO, num_attention_heads=2, attention_head_dim=32, num_layers=2, num_single_layers=4,
                     num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)),
                ((16, 4, 16, 24), 16)),
}


def build_transformer(name: str, cfg: dict, device, dtype, layers: Optional[int]):
    """The transformer with random weights, built on ``device`` in ``dtype`` (no fp32 copy)."""
    from ..extras import require

    diffusers = require("diffusers", "diffusers", "the random-weight Wan / HunyuanVideo transformers")
    HunyuanVideoTransformer3DModel, WanTransformer3DModel = (diffusers.HunyuanVideoTransformer3DModel,
                                                             diffusers.WanTransformer3DModel)

    cfg = dict(cfg)
    if layers is not None:
        if name == "wan":
            cfg["num_layers"] = min(layers, cfg["num_layers"])
        else:
            dual = max(1, round(layers / 3))
            cfg["num_layers"], cfg["num_single_layers"] = dual, max(1, layers - dual)
    cls = WanTransformer3DModel if name == "wan" else HunyuanVideoTransformer3DModel
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**cfg)
            # small random weights keep 40-60 bf16 layers finite (speed does not depend on values)
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
                    torch.nn.init.normal_(m.weight, std=0.02)
    finally:
        torch.set_default_dtype(prev)
    return model.eval(), cfg


def transformer_inputs(name: str, latents, text_tokens: int, text_dim: int, pooled_dim: int, valid_text: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, *latents, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    enc = (torch.randn(1, text_tokens, text_dim, generator=g) * 0.1).to(device, dtype)
    if name == "wan":
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False)
    mask = torch.zeros(1, text_tokens, device=device, dtype=dtype)
    mask[:, :valid_text] = 1
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=enc, encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, pooled_dim, generator=g).to(device, dtype),
                guidance=torch.tensor([6000.0], device=device), return_dict=False)
