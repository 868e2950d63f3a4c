"""Every bad input to the core ops gets one clear error."""

import pytest
import torch

from dist_compact import BlockIndex, block_attention_mass, block_sparse_attention


def _ok(S=64, H=2, D=32, dtype=torch.float32, bs=32):
    q, k, v = (torch.randn(1, S, H, D, dtype=dtype) for _ in range(3))
    nb = -(-S // bs)
    return q, k, v, BlockIndex.full(1, H, nb, nb, bs)


def test_wrong_rank():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match=r"\[batch, seqlen, heads, head_dim\]"):
        block_sparse_attention(q[0], k, v, idx)


def test_mismatched_qkv():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match="must agree"):
        block_sparse_attention(q, k[:, :, :1], v, idx)
    with pytest.raises(ValueError, match="same shape"):
        block_sparse_attention(q, k, v[:, :32], idx)


def test_unsupported_dtype_and_head_dim():
    q, k, v, idx = _ok()
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attention(q.double(), k.double(), v.double(), idx)
    with pytest.raises(TypeError, match="share one dtype"):
        block_sparse_attention(q, k.half(), v.half(), idx)
    q, k, v, idx = _ok(D=48)
    with pytest.raises(ValueError, match="head_dim 48"):
        block_sparse_attention(q, k, v, idx)


def test_index_for_other_shape():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match="3 heads"):
        block_sparse_attention(q, k, v, BlockIndex.full(1, 3, 2, 2, 32))
    with pytest.raises(ValueError, match="query x"):
        block_sparse_attention(q, k, v, BlockIndex.full(1, 2, 3, 3, 32))
    with pytest.raises(ValueError, match="batch"):
        block_sparse_attention(q, k, v, BlockIndex.full(2, 2, 2, 2, 32).select_heads(slice(0, 2)).__class__(
            torch.full((3, 2, 2), 2, dtype=torch.int32), torch.zeros(3, 2, 2, 2, dtype=torch.int32), 32, 2))
    with pytest.raises(TypeError, match="BlockIndex"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool))


def test_device_mix():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match="one device"):
        block_sparse_attention(q, k.to("meta"), v, idx)
    with pytest.raises(ValueError, match="index is on"):
        block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), idx)


def test_bad_valid_counts():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        block_sparse_attention(q, k, v, idx, block_valid=torch.tensor([32, 32, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        block_sparse_attention(q, k, v, idx, block_valid=torch.tensor([32, 33], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32/int64"):
        block_sparse_attention(q, k, v, idx, block_valid=torch.tensor([32.0, 3.0]))


def test_forward_only():
    q, k, v, idx = _ok()
    q.requires_grad_(True)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="forward-only"):
        block_sparse_attention(q, k, v, idx)
    with torch.no_grad():
        block_sparse_attention(q, k, v, idx, backend="torch")


def test_block_mass_bad_lse_and_backend():
    q, k, v, idx = _ok()
    with pytest.raises(ValueError, match=r"lse must be \[batch, heads, seq_q\]"):
        block_attention_mass(q, k, torch.zeros(1, 2, 63), 32)
    with pytest.raises(ValueError, match="backend must be"):
        block_sparse_attention(q, k, v, idx, backend="cuda")


def test_valid_counts_checked_again_after_in_place_change():
    """Counts are validated once per tensor (no per-call device sync), but an in-place edit is seen."""
    q, k, v, idx = _ok()
    bv = torch.tensor([32, 20], dtype=torch.int32)
    block_sparse_attention(q, k, v, idx, block_valid=bv, backend="torch")
    bv[1] = 40
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        block_sparse_attention(q, k, v, idx, block_valid=bv, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_block_index_refuses_non_integer_tensors(dtype):
    """Float block numbers were truncated silently (2.7 -> block 2): refused, naming the tensor and the fix."""
    counts = torch.ones(1, 1, 2, dtype=torch.int32)
    indices = torch.tensor([[[[0], [1]]]])
    with pytest.raises(TypeError, match=r"indices must be an integer tensor \(int32 or int64\), got torch\."
                                        r".*indices\.round\(\)\.int\(\)"):
        BlockIndex(counts, indices.to(dtype), 32, 2)
    with pytest.raises(TypeError, match=r"counts must be an integer tensor"):
        BlockIndex(counts.to(dtype), indices, 32, 2)
    assert BlockIndex(counts.long(), indices.long(), 32, 2).indices.dtype == torch.int32


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, "0.1", True],
                         ids=["nan", "inf", "-inf", "zero", "negative", "string", "bool"])
def test_bad_scale_is_refused_everywhere(scale):
    from dist_compact import dense_attention
    from dist_compact.reference import (reference_attention, reference_block_mass, reference_block_sparse_attention,
                                        torch_block_sparse_attention)

    q, k, v, idx = _ok()
    lse = torch.zeros(1, 2, 64)
    msg = r"scale must be a finite number > 0 \(or None for head_dim \*\* -0.5 = 0.176777\), got "
    calls = [lambda: block_sparse_attention(q, k, v, idx, scale=scale, backend="torch"),
             lambda: block_attention_mass(q, k, lse, 32, scale=scale, backend="torch"),
             lambda: dense_attention(q, k, v, block_size=32, scale=scale, backend="torch"),
             lambda: reference_attention(q, k, v, scale=scale),
             lambda: reference_block_sparse_attention(q, k, v, idx, scale=scale),
             lambda: torch_block_sparse_attention(q, k, v, idx, scale=scale),
             lambda: reference_block_mass(q, k, lse, 32, scale=scale)]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()
    out = block_sparse_attention(q, k, v, idx, scale=0.1, backend="torch")  # a positive finite scale still works
    assert torch.isfinite(out).all()
