"""The static baselines of the quality/speed benchmark: a fixed 3D window at a target density and
random key blocks; both keep the text sink and run through SparseAttention like a Compact config."""

import pytest
import torch

from dist_compact.sparsity.attention import SparseAttention
from dist_compact.sparsity.context import AttentionContext
from dist_compact.sparsity.attention_ops import AttentionOps
from dist_compact.sparsity.config import SparsityConfig
from dist_compact.layout import VideoLayout
from dist_compact.patterns.baselines import RandomBlocks, video_density, window_for_density
from dist_compact.reference import reference_block_sparse_attention

LAYOUT = VideoLayout(6, 8, 12, tile=(2, 4, 4), text_tokens=5, text_position="after")


@pytest.mark.parametrize("target", [0.2, 0.45, 0.8])
def test_window_density_is_near_the_target(target):
    cfg, got = window_for_density(LAYOUT, 2, 3, target)
    mask = cfg.block_mask(1, LAYOUT)[0]
    assert abs(video_density(mask[0], LAYOUT) - got) < 1e-9
    # the nearest window of this coarse grid: no other half-extent is closer by more than the rule's 15%
    assert abs(got - target) <= 0.2 * target + 0.1
    # one window for every layer and head; the text sink is kept
    assert torch.equal(mask[0], mask[2]) and torch.equal(cfg.block_mask(0, LAYOUT)[0], mask)
    text = LAYOUT.is_text_block()
    assert mask[:, :, text].all() and mask[:, text, :].all()


def test_random_blocks_keep_the_same_count_per_row_and_differ_by_layer_and_head():
    rb = RandomBlocks(0.3, num_layers=2, num_heads=3, seed=5)
    m = rb.block_mask(0, LAYOUT)[0]
    video = ~LAYOUT.is_text_block() & (LAYOUT.block_valid() > 0)
    sub = m[:, video][:, :, video]
    n = int(video.sum())
    assert (sub.sum(-1) == round(0.3 * n)).all()
    assert not torch.equal(sub[0], sub[1]) and not torch.equal(m, rb.block_mask(1, LAYOUT)[0])
    assert torch.equal(m, RandomBlocks(0.3, 2, 3, seed=5).block_mask(0, LAYOUT)[0])  # a function of the seed
    idx = rb.index_for(0, LAYOUT, 3)
    assert torch.equal(idx.to_dense()[0], m)
    with pytest.raises(ValueError, match="3 heads"):
        rb.index_for(0, LAYOUT, 4)
    with pytest.raises(ValueError, match="density"):
        RandomBlocks(0.0, 2, 3)


@pytest.mark.parametrize("pattern", ["window", "random"])
def test_baselines_run_as_compact_patterns(pattern):
    """Through SparseAttention (mode compact) the output is the reference attention with the pattern's mask."""
    H, D = 3, 16
    pat = window_for_density(LAYOUT, 1, H, 0.4)[0] if pattern == "window" else RandomBlocks(0.4, 1, H)
    attn = SparseAttention(0, SparsityConfig(mode="compact", dense_steps=0), pat)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, LAYOUT.padded_len, H, D, generator=g) for _ in range(3))
    ctx = AttentionContext(layout=LAYOUT, step=0, num_steps=4, ops=AttentionOps("torch"))
    out = attn(q, k, v, ctx)
    bv = LAYOUT.block_valid()
    ref, _ = reference_block_sparse_attention(q.double(), k.double(), v.double(), pat.index_for(0, LAYOUT, H),
                                              q_valid=bv, kv_valid=bv)
    valid = LAYOUT.token_valid()
    assert (out[:, valid].double() - ref[:, valid]).abs().max() < 1e-5
