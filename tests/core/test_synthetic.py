"""Synthetic structured attention: the features give exactly the intended logits and head shapes."""

import pytest
import torch

from dist_compact import VideoLayout
from dist_compact.synthetic import HEAD_KINDS, SyntheticHead, synthetic_logits, synthetic_qkv


@pytest.mark.parametrize("lay", [
    VideoLayout(5, 9, 11, tile=(1, 4, 4), text_tokens=7, slab_multiple=2),
    VideoLayout(4, 8, 12, tile=(2, 4, 4), text_tokens=3, text_position="before"),
], ids=["ragged-text-after-pad", "t2-text-before"])
def test_features_give_the_analytic_logits(lay):
    q, k, v = synthetic_qkv(lay, HEAD_KINDS, head_dim=32, noise=0.0, dtype=torch.float64, text_bias=3.0)
    assert q.shape == (1, lay.padded_len, 4, 32) and v.shape == q.shape
    valid = lay.token_valid()
    assert float(q[:, ~valid].abs().sum() + k[:, ~valid].abs().sum() + v[:, ~valid].abs().sum()) == 0
    video = lay.token_positions()[:, 0] >= 0
    text = valid & ~video
    for h, kind in enumerate(HEAD_KINDS):
        lg = q[0, :, h] @ k[0, :, h].T * 32 ** -0.5
        vv = video.view(-1, 1) & video.view(1, -1)
        ref = synthetic_logits(lay, kind)
        assert float((lg - ref)[vv].abs().max()) < 1e-9, kind
        assert float(ref[vv].max()) == 0.0  # the peak is at the query itself
        torch.testing.assert_close(lg[video][:, text], torch.full((int(video.sum()), int(text.sum())), -3.0,
                                                                  dtype=torch.float64))


def _mass_by_offset(lay, kind):
    """Softmax mass of the first head by |d_slab|, |d_row|, |d_col| in tiles (noise-free, fp64)."""
    lg = synthetic_logits(lay, kind)
    pos = lay.token_positions()
    video = pos[:, 0] >= 0
    p = torch.softmax(lg[video][:, video], dim=-1)
    t = (pos[video] // torch.tensor(lay.tile)).to(torch.int8)
    d = (t[:, None, :] - t[None, :, :]).abs()
    return p, d


def test_head_kinds_have_their_shapes():
    lay = VideoLayout(6, 16, 16, tile=(1, 4, 4))
    n = lay.video_tokens
    p, d = _mass_by_offset(lay, "local")
    near = (d <= 1).all(-1)
    assert float((p * near).sum()) / n > 0.85
    p, d = _mass_by_offset(lay, "cross")
    on_axes = (d[..., 1] == 0) | (d[..., 2] == 0)
    off = (d[..., 1] >= 1) & (d[..., 2] >= 1)
    assert float((p * on_axes).sum()) / n > 0.8
    assert float((p * (on_axes & (d[..., 1:].amax(-1) >= 2))).sum()) / n > 0.15  # arms reach >= 2 tiles
    assert float((p * off).sum()) / n < 0.2
    p, d = _mass_by_offset(lay, "temporal")
    same = (d[..., 1] == 0) & (d[..., 2] == 0)
    assert float((p * same).sum()) / n > 0.9
    assert float((p * (same & (d[..., 0] >= 2))).sum()) / n > 0.3  # far frames get real weight
    p, d = _mass_by_offset(lay, "global")
    assert float((p * (d[..., 0] == 0)).sum()) / n > 0.85
    assert float((p * (d[..., 1:].amax(-1) >= 2)).sum()) / n > 0.3  # spread over the frame


def test_noise_and_options():
    lay = VideoLayout(3, 8, 8, tile=(1, 4, 4))
    a = synthetic_qkv(lay, ["local"], head_dim=32, noise=0.5, seed=1)
    b = synthetic_qkv(lay, ["local"], head_dim=32, noise=0.5, seed=1)
    c = synthetic_qkv(lay, ["local"], head_dim=32, noise=0.5, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    q, k, _ = synthetic_qkv(lay, [SyntheticHead("local", sigma_s=2.0)], head_dim=64, noise=0.3, batch=2,
                            dtype=torch.float64, scale=0.5)
    lg = torch.einsum("bqd,bkd->bqk", q[:, :, 0], k[:, :, 0]) * 0.5
    noise = lg[0] - synthetic_logits(lay, SyntheticHead("local", sigma_s=2.0))
    assert 0.15 < float(noise.std()) < 0.45 and q.shape[0] == 2
    for kw, msg in [(dict(head_dim=16), "head_dim"), (dict(batch=0), "batch"), (dict(noise=-1), "noise")]:
        with pytest.raises(ValueError, match=msg):
            synthetic_qkv(lay, ["local"], **kw)
    with pytest.raises(ValueError, match="kind must be one of"):
        SyntheticHead("diagonal")
    with pytest.raises(ValueError, match="sigma_s must be > 0"):
        SyntheticHead("local", sigma_s=0)
