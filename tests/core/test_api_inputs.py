"""Bad arguments to the library API get one clear error before anything is allocated (no silent wrong result)."""

import numpy as np
import pytest
import torch

from dist_compact import BlockIndex, block_attention_mass, block_sparse_attention, dense_attention
from dist_compact.layout import VideoLayout


def _qkv(S=128, H=2, D=64):
    return tuple(torch.randn(1, S, H, D) for _ in range(3))


# ------------------------------------------------------------------ 1. int64 values beyond int32
def test_block_index_refuses_values_that_would_wrap_in_int32():
    with pytest.raises(ValueError, match=r"indices holds 4294967296, outside int32"):
        BlockIndex(torch.ones(1, 1, 1, dtype=torch.int64), torch.tensor([[[[2 ** 32]]]]), 64, 1)
    with pytest.raises(ValueError, match=r"counts holds 4294967297, outside int32"):
        BlockIndex(torch.tensor([[[2 ** 32 + 1]]]), torch.tensor([[[[0]]]]), 64, 1)
    with pytest.raises(ValueError, match=r"num_k_blocks must be an int in \[0, 2\*\*31 - 1\]"):
        BlockIndex(torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32), 64, 2 ** 32)
    ok = BlockIndex(torch.ones(1, 1, 1, dtype=torch.int64), torch.tensor([[[[1]]]]), 64, 2)
    assert ok.indices.tolist() == [[[[1]]]] and ok.counts.dtype == torch.int32


# ------------------------------------------------------------------ 2. select_heads / remap_keys
@pytest.mark.parametrize("heads", [7, -3, [5], [0, 2], torch.tensor([2]), slice(5, 6)], ids=str)
def test_select_heads_out_of_range(heads):
    with pytest.raises(ValueError, match=r"select_heads: .*(out of range|selects none) .*2 heads"):
        BlockIndex.full(1, 2, 2, 2, 64).select_heads(heads)


@pytest.mark.parametrize("heads", [True, [0.5], torch.tensor([1.0]), torch.tensor([True, False]), "0"], ids=str)
def test_select_heads_non_integer(heads):
    with pytest.raises(TypeError, match=r"select_heads: heads must be"):
        BlockIndex.full(1, 2, 2, 2, 64).select_heads(heads)


def test_select_heads_negative_and_numpy_ids_like_python():
    m = torch.rand(1, 3, 2, 2) > 0.5
    idx = BlockIndex.from_dense(m, 64)
    assert torch.equal(idx.select_heads(-1).to_dense(), m[:, 2:3])
    assert torch.equal(idx.select_heads([-1, 0]).to_dense(), m[:, [2, 0]])
    assert torch.equal(idx.select_heads(np.int64(1)).to_dense(), m[:, 1:2])
    assert torch.equal(idx.select_heads(np.array([2, 1])).to_dense(), m[:, [2, 1]])
    assert torch.equal(idx.select_heads(torch.tensor([-3])).to_dense(), m[:, 0:1])


def test_remap_keys_refuses_floats_and_out_of_range_maps():
    idx = BlockIndex.full(1, 1, 2, 2, 64)
    with pytest.raises(TypeError, match=r"key_map must be an integer tensor .*float32"):
        idx.remap_keys(torch.tensor([0.7, 1.9]), 2)
    with pytest.raises(TypeError, match=r"key_map must be an integer tensor .*bool"):
        idx.remap_keys(torch.tensor([True, True]), 2)
    with pytest.raises(ValueError, match=r"key_map values must be -1 \(drop\) or in \[0, 2\)"):
        idx.remap_keys(torch.tensor([0, 2 ** 32 + 1]), 2)  # used to wrap to block 1 in int32
    with pytest.raises(ValueError, match=r"key_map values must be -1"):
        idx.remap_keys(torch.tensor([-2, 1]), 2)
    with pytest.raises(ValueError, match=r"num_k_blocks must be an int"):
        idx.remap_keys(torch.tensor([0, 1]), True)
    assert idx.remap_keys(torch.tensor([-1, 0]), 1).to_dense().all()


# ------------------------------------------------------------------ 3. sizes refused before allocating
def test_block_mass_refuses_absurd_block_size_before_allocating():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"block_size 1000000000 is far longer than the sequences .*<= 256"):
        block_attention_mass(q, k, torch.zeros(1, 2, 128), 10 ** 9)
    with pytest.raises(ValueError, match=r"index.block_size .* far longer"):
        block_sparse_attention(q, k, k, BlockIndex.full(1, 2, 1, 1, 10 ** 9))
    # a block longer than the sequence is still one (short) block
    mass = block_attention_mass(q[:, :100], k[:, :100], torch.zeros(1, 2, 100), 128, backend="torch")
    assert mass.shape == (1, 2, 1, 1)


def test_video_layout_refuses_more_than_2_31_tokens():
    with pytest.raises(ValueError, match=r"VideoLayout: 10000x10000x10000 .* more than 2\*\*31 - 1"):
        VideoLayout(10 ** 4, 10 ** 4, 10 ** 4)
    with pytest.raises(ValueError, match=r"more than 2\*\*31 - 1"):
        VideoLayout(4, 8, 8, text_tokens=2 ** 31)


def test_block_index_full_bounds_and_dimensions():
    with pytest.raises(ValueError, match=r"BlockIndex.full: 1 x 64 x 100000 x 100000 = 640000000000 entries is more "
                                         r"than 2\*\*31"):
        BlockIndex.full(1, 64, 100000, 100000, 64)
    with pytest.raises(ValueError, match=r"BlockIndex.full: batch must be an int >= 1, got -1"):
        BlockIndex.full(-1, 2, 2, 2, 64)
    with pytest.raises(ValueError, match=r"num_q_blocks must be an int >= 0, got -2"):
        BlockIndex.full(1, 2, -2, 2, 64)
    with pytest.raises(ValueError, match=r"heads must be an int >= 1, got True"):
        BlockIndex.full(1, True, 2, 2, 64)
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got 0"):
        BlockIndex.full(1, 2, 2, 2, 0)
    f = BlockIndex.full(np.int64(1), 2, 3, 0, np.int32(64))
    assert f.shape == (1, 2, 3, 0) and type(f.block_size) is int


# ------------------------------------------------------------------ 4. bool is no int; numpy ints are
def test_bool_is_no_block_size_or_tile():
    q, k, _ = _qkv()
    lse = torch.zeros(1, 2, 128)
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got True"):
        block_attention_mass(q, k, lse, True)
    with pytest.raises(ValueError, match=r"query_rows must be a power of two"):
        block_attention_mass(q, k, lse, 64, query_rows=True)
    with pytest.raises(ValueError, match=r"VideoLayout.tile must be three positive ints"):
        VideoLayout(4, 8, 8, tile=(True, 8, 8))
    with pytest.raises(ValueError, match=r"VideoLayout.text_tokens must be an int >= 0, got True"):
        VideoLayout(4, 8, 8, tile=(1, 8, 8), text_tokens=True)
    with pytest.raises(ValueError, match=r"VideoLayout.slab_multiple must be a positive int, got True"):
        VideoLayout(4, 8, 8, tile=(1, 8, 8), slab_multiple=True)
    with pytest.raises(ValueError, match=r"VideoLayout.frames must be a positive int, got True"):
        VideoLayout(True, 8, 8)


def test_numpy_integers_are_accepted_as_ints():
    q, k, _ = _qkv()
    lse = torch.zeros(1, 2, 128)
    want = block_attention_mass(q, k, lse, 64, backend="torch")
    got = block_attention_mass(q, k, lse, np.int64(64), query_rows=np.int32(64), backend="torch")
    assert torch.equal(got, want)
    lay = VideoLayout(np.int64(4), 8, 8, tile=(np.int64(1), np.int32(8), 8), text_tokens=np.int16(3),
                      slab_multiple=np.int64(2))
    assert lay == VideoLayout(4, 8, 8, tile=(1, 8, 8), text_tokens=3, slab_multiple=2)
    assert all(type(t) is int for t in (*lay.tile, lay.frames, lay.text_tokens, lay.slab_multiple))
    q, k, v = _qkv(S=64, D=32)
    assert torch.equal(dense_attention(q, k, v, block_size=np.int64(32), backend="torch"),
                       dense_attention(q, k, v, block_size=32, backend="torch"))


# ------------------------------------------------------------------ 5. dense_attention
@pytest.mark.parametrize("bs", [0, -3, "64", True, 64.0], ids=str)
def test_dense_attention_bad_block_size(bs):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got"):
        dense_attention(q, k, v, block_size=bs)


def test_dense_attention_bad_backend_and_return_lse():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'bogus'"):
        dense_attention(q, k, v, backend="bogus")
    with pytest.raises(TypeError, match=r"return_lse must be True or False, got 'no'"):
        dense_attention(q, k, v, return_lse="no")
    with pytest.raises(ValueError, match=r"block_size 100000 is far longer"):
        dense_attention(q, k, v, block_size=100000, return_lse=True)


# ------------------------------------------------------------------ 6. the rest
def test_from_dense_with_a_known_row_width():
    m = torch.zeros(1, 2, 3, 5, dtype=torch.bool)
    m[0, 0, 0, [1, 3]] = True
    m[0, 1, 2, [0, 2, 4]] = True
    read = BlockIndex.from_dense(m, 64)
    same = BlockIndex.from_dense(m, 64, max_count=3)
    assert read.max_count == same.max_count == 3 and torch.equal(read.indices, same.indices)
    wide = BlockIndex.from_dense(m, 64, max_count=5)  # wider than needed: rows padded with -1
    assert wide.max_count == 5 and torch.equal(wide.indices[..., :3], read.indices) and (wide.indices[..., 3:] == -1).all()
    assert torch.equal(wide.to_dense(), m)
    # known width, nothing to read: builds on the meta device too
    assert BlockIndex.from_dense(m.to("meta"), 64, max_count=3).indices.shape == (1, 2, 3, 3)
    for bad in (-1, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"^BlockIndex\.from_dense: max_count must be an int in \[0, 5\] \(the key "
                                             r"blocks\) or None, got "):
            BlockIndex.from_dense(m, 64, max_count=bad)


def test_from_dense_with_no_key_blocks():
    idx = BlockIndex.from_dense(torch.ones(1, 1, 2, 0, dtype=torch.bool), 64)
    assert idx.shape == (1, 1, 2, 0) and idx.counts.tolist() == [[[0, 0]]]
    with pytest.raises(ValueError, match=r"from_dense: block_size must be a positive int, got True"):
        BlockIndex.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), True)


def test_meta_tensors_get_a_clear_error():
    c = torch.ones(1, 1, 1, dtype=torch.int32, device="meta")
    i = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"meta device hold no values"):
        BlockIndex(c, i, 64, 1)
    with pytest.raises(ValueError, match=r"from_dense: tensors on the meta device"):
        BlockIndex.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool, device="meta"), 64)
    assert BlockIndex(c, i, 64, 1, check=False).device.type == "meta"


def test_unsparsify_refuses_a_non_model():
    from dist_compact.integrations.core import unsparsify

    with pytest.raises(TypeError, match=r"unsparsify: transformer must be the model .* got NoneType"):
        unsparsify(None)
    m = torch.nn.Linear(2, 2)
    assert unsparsify(m) is m  # nothing installed: returned as is


@pytest.mark.parametrize("thr", ["x", float("nan"), 0.0, -0.5, 1.5, float("inf"), True], ids=str)
def test_bad_dense_threshold(thr):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dense_threshold must be None \(no dense dispatch\) or a number in \(0, 1\]"):
        block_sparse_attention(q, k, v, BlockIndex.full(1, 2, 2, 2, 64), dense_threshold=thr)


@pytest.mark.parametrize("flag", ["no", 0, 1, None], ids=str)
def test_return_lse_must_be_bool(flag):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"return_lse must be True or False"):
        block_sparse_attention(q, k, v, BlockIndex.full(1, 2, 2, 2, 64), return_lse=flag)


def test_good_thresholds_still_run():
    q, k, v = _qkv()
    idx = BlockIndex.full(1, 2, 2, 2, 64)
    for thr in (None, 1, 0.5, np.float32(0.75)):
        out, lse = block_sparse_attention(q, k, v, idx, dense_threshold=thr, return_lse=True, backend="torch")
        assert out.shape == q.shape and lse.shape == (1, 2, 128)
