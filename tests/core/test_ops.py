"""block_sparse_attention / block_attention_mass / dense_attention against the float64 oracle.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py); on a GPU they compile.
"""

import pytest
import torch

from dist_compact import BlockIndex, VideoLayout, block_attention_mass, block_sparse_attention, dense_attention
from dist_compact.reference import (
    reference_attention,
    reference_block_mass,
    reference_block_sparse_attention,
    token_mask,
    token_valid_mask,
)
from helpers import assert_close_to_golden

# On a CUDA machine the same tests check the compiled kernels; on CPU the Triton interpreter runs them.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on(*xs):
    return [None if x is None else x.to(DEV) for x in xs]

# (name, layout or raw seqlen, block size)
CASES = [
    ("grid3x5x7-text13-bs16", VideoLayout(3, 5, 7, tile=(1, 4, 4), text_tokens=13), None),
    ("grid3x5x7-text13before-bs64", VideoLayout(3, 5, 7, tile=(1, 8, 8), text_tokens=13, text_position="before"), None),
    ("grid2x6x5-notext-bs32", VideoLayout(2, 6, 5, tile=(2, 4, 4)), None),
    ("raw-seq100-bs32", 100, 32),  # seqlen not a multiple of the block, no per-block counts
]


def _mask(nb, H, density, seed, B=1):
    g = torch.Generator().manual_seed(seed)
    if density >= 1.0:
        m = torch.ones(B, H, nb, nb, dtype=torch.bool)
    else:
        m = torch.rand(B, H, nb, nb, generator=g) < density
    if density < 1.0 and nb > 2:
        m[0, 0, 0] = False  # empty row
        m[0, -1, 1] = True  # full row
    return m


def _problem(case, H, D, dtype, density, seed, B=2, index_batch=1):
    name, spec, bs = case
    g = torch.Generator().manual_seed(seed)
    if isinstance(spec, VideoLayout):
        S, bs, bv = spec.padded_len, spec.block_size, spec.block_valid()
    else:
        S, bv = spec, None
    nb = -(-S // bs)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))
    idx = BlockIndex.from_dense(_mask(nb, H, density, seed, B=index_batch), bs)
    return q, k, v, idx, bv


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=["empty", "d0.3", "full"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_matches_golden(case, density, backend):
    q, k, v, idx, bv = _problem(case, H=2, D=32, dtype=torch.float32, density=density, seed=1)
    dq, dk, dv, dbv = _on(q, k, v, bv)
    out, lse = block_sparse_attention(dq, dk, dv, idx.to(DEV), return_lse=True, block_valid=dbv, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close_to_golden(out, ref, atol=2e-5)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), "LSE must be -inf exactly where nothing is visible"
    assert_close_to_golden(lse[fin], rlse[fin], atol=2e-5, what="lse")
    # rows with nothing visible (empty index rows, padded query rows) are exactly zero
    assert torch.all(out.transpose(1, 2)[~fin] == 0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=["empty", "d0.3", "full"])
def test_torch_path_without_lse_matches_golden(case, density):
    """The CPU path without LSE (SDPA with the cached token mask): empty and padded rows are 0."""
    q, k, v, idx, bv = _problem(case, H=2, D=32, dtype=torch.float32, density=density, seed=11, B=2, index_batch=2)
    out = block_sparse_attention(q, k, v, idx, block_valid=bv, backend="torch")
    out2 = block_sparse_attention(q, k, v, idx, block_valid=bv, backend="torch")  # cached mask
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    assert_close_to_golden(out, ref, atol=2e-5)
    assert torch.equal(out, out2)
    assert torch.all(out.transpose(1, 2)[~torch.isfinite(rlse)] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_low_precision_within_eager_error(case, dtype, head_dim):
    q, k, v, idx, bv = _problem(case, H=2, D=head_dim, dtype=dtype, density=0.4, seed=2, B=1, index_batch=1)
    dq, dk, dv, dbv = _on(q, k, v, bv)
    out, lse = block_sparse_attention(dq, dk, dv, idx.to(DEV), return_lse=True, block_valid=dbv, backend="triton")
    out, lse = out.cpu(), lse.cpu()
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    mask = token_mask(idx, q.shape[1], k.shape[1], bv, bv)
    eager, _ = reference_attention(q.float(), k.float(), v.float(), mask)
    eager = eager.to(dtype)  # what PyTorch eager gives in this dtype (fp32 math, rounded output)
    assert_close_to_golden(out, ref, eager, k=3.0, atol=1e-3)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rlse[fin]).abs().max() < 1e-3


def test_per_sample_index_and_strided_inputs():
    case = CASES[0]
    q, k, v, idx, bv = _problem(case, H=3, D=32, dtype=torch.float32, density=0.5, seed=3, B=2, index_batch=2)
    # non-contiguous q/k/v: views of a [B, S, 3, H, D] packed qkv tensor
    qkv = torch.stack([q, k, v], dim=2).to(DEV)
    qs, ks, vs = qkv.unbind(2)
    assert not qs.is_contiguous()
    out = block_sparse_attention(qs, ks, vs, idx.to(DEV), block_valid=bv.to(DEV), backend="triton").cpu()
    ref, _ = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    assert_close_to_golden(out, ref, atol=2e-5)


def test_cross_lengths_for_ring_shards():
    """q and k of different lengths, separate valid counts (a ring step: my queries, another shard)."""
    lay = VideoLayout(4, 5, 6, tile=(1, 4, 4), text_tokens=5)
    S, bs, bv = lay.padded_len, lay.block_size, lay.block_valid()
    nb = lay.num_blocks
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, S, 2, 32, generator=g) for _ in range(3))
    qs, ks = slice(0, 4 * bs), slice(4 * bs, S)
    idx = BlockIndex.from_dense(_mask(nb, 2, 0.6, 4), bs).select_rows(0, 4).select_keys(4, nb)
    dq, dk, dv, dbv = _on(q, k, v, bv)
    out, lse = block_sparse_attention(
        dq[:, qs], dk[:, ks], dv[:, ks], idx.to(DEV), return_lse=True, q_valid=dbv[:4], kv_valid=dbv[4:],
        backend="triton",
    )
    out, lse = out.cpu(), lse.cpu()
    ref, rlse = reference_block_sparse_attention(
        q[:, qs].double(), k[:, ks].double(), v[:, ks].double(), idx, q_valid=bv[:4], kv_valid=bv[4:]
    )
    assert_close_to_golden(out, ref, atol=2e-5)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_mass(case, backend):
    q, k, v, idx, bv = _problem(case, H=2, D=32, dtype=torch.float32, density=1.0, seed=5, B=1)
    _, lse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    bs = idx.block_size
    dq, dk, dlse, dbv = _on(q, k, lse.float(), bv)
    mass = block_attention_mass(dq, dk, dlse, bs, block_valid=dbv, backend=backend).cpu()
    ref = reference_block_mass(q.double(), k.double(), lse, bs, q_valid=bv, kv_valid=bv)
    assert mass.shape == (1, 2, idx.num_q_blocks, idx.num_k_blocks) and mass.dtype == torch.float32
    assert (mass - ref).abs().max() < 1e-5
    # with the dense LSE, every block row that has a valid query sums to 1
    rows = mass.sum(-1)
    has_q = (bv > 0) if bv is not None else torch.ones(idx.num_q_blocks, dtype=torch.bool)
    assert torch.allclose(rows[..., has_q], torch.ones_like(rows[..., has_q]), atol=1e-5)
    assert torch.all(rows[..., ~has_q] == 0)


@pytest.mark.parametrize("rows", [16, 32])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "lay",
    [
        VideoLayout(3, 5, 7, tile=(1, 8, 8), text_tokens=13),  # blocks of 64 with 35, 28, ... valid rows
        VideoLayout(3, 9, 10, tile=(1, 4, 8), text_tokens=13),  # 19 blocks of 32 (rows 32 = all rows)
    ],
    ids=["bs64", "bs32-19blocks"],
)
def test_block_mass_sampled_rows(rows, backend, lay):
    """Sampled query rows: kernel == float64 reference with the same rows; close to the exact mass."""
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, lay.padded_len, 2, 32, generator=g) for _ in range(2))
    bv = lay.block_valid()
    full = BlockIndex.full(1, 2, lay.num_blocks, lay.num_blocks, lay.block_size)
    _, lse = reference_block_sparse_attention(q.double(), k.double(), k.double(), full, q_valid=bv, kv_valid=bv)
    dq, dk, dlse, dbv = _on(q, k, lse.float(), bv)
    mass = block_attention_mass(dq, dk, dlse, lay.block_size, block_valid=dbv, query_rows=rows, backend=backend).cpu()
    ref = reference_block_mass(q.double(), k.double(), lse, lay.block_size, q_valid=bv, kv_valid=bv, query_rows=rows)
    exact = reference_block_mass(q.double(), k.double(), lse, lay.block_size, q_valid=bv, kv_valid=bv)
    assert (mass - ref).abs().max() < 1e-5
    if rows < lay.block_size:
        assert not torch.allclose(ref, exact, atol=1e-6), "sampling must change the statistic on ragged blocks"
    else:
        assert torch.allclose(ref, exact, atol=1e-9), "query_rows == block_size is the exact statistic"
    has_q = bv > 0
    assert torch.allclose(mass.sum(-1)[..., has_q], torch.ones(1, 2, int(has_q.sum())), atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        block_attention_mass(dq, dk, dlse, lay.block_size, block_valid=dbv, query_rows=24, backend=backend)


def test_dense_attention_drops_padding():
    lay = VideoLayout(3, 5, 7, tile=(1, 4, 4), text_tokens=13)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, lay.padded_len, 2, 32, generator=g) for _ in range(3))
    bv = lay.block_valid()
    full = BlockIndex.full(1, 2, lay.num_blocks, lay.num_blocks, lay.block_size)
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), full, q_valid=bv, kv_valid=bv)
    dq, dk, dv, dbv = _on(q, k, v, bv)
    out = dense_attention(dq, dk, dv, block_size=lay.block_size, block_valid=dbv).cpu()
    # SDPA on GPUs may use TF32/reduced-precision paths for fp32: allow that error there
    assert_close_to_golden(out, ref, atol=2e-5 if DEV.type == "cpu" else 2e-3)
    out2, lse2 = dense_attention(dq, dk, dv, block_size=lay.block_size, block_valid=dbv, return_lse=True)
    out2, lse2 = out2.cpu(), lse2.cpu()
    assert_close_to_golden(out2, ref, atol=2e-5)
    fin = torch.isfinite(rlse)
    assert torch.allclose(lse2[fin].double(), rlse[fin], atol=2e-5)



# (q_valid, kv_valid) per-block counts of 16-token blocks: a partial last block (queries taken whole),
# padding over more than a block at the tail (sliced), padding inside (gathered), other key lengths
PADDINGS = {
    "tail-partial": ([16, 16, 16, 5], [16, 16, 16, 5]),
    "tail-blocks": ([16, 16, 9, 0], [16, 3, 0, 0]),
    "inside": ([16, 7, 16, 16], [4, 16, 16, 16]),
    "cross-lengths": ([16, 16, 16, 5], [16, 16, 11, 0, 0]),
}


@pytest.mark.parametrize("pad", list(PADDINGS), ids=list(PADDINGS))
def test_dense_attention_padding_patterns(pad):
    qv, kvv = (torch.tensor(c, dtype=torch.int32) for c in PADDINGS[pad])
    SQ, SK, bs = 16 * len(qv), 16 * len(kvv), 16
    dtype = torch.float32 if DEV.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, SQ, 3, 32, generator=g)
    k, v = (torch.randn(2, SK, 3, 32, generator=g) for _ in range(2))
    full = BlockIndex.full(1, 3, len(qv), len(kvv), bs)
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), full, q_valid=qv, kv_valid=kvv)
    dq, dk, dv, dqv, dkv = _on(q.to(dtype), k.to(dtype), v.to(dtype), qv, kvv)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    out = dense_attention(dq, dk, dv, block_size=bs, q_valid=dqv, kv_valid=dkv).float().cpu()
    assert_close_to_golden(out, ref, atol=atol)
    pad_rows = ~token_valid_mask(SQ, bs, qv)
    assert torch.equal(out[:, pad_rows], torch.zeros_like(out[:, pad_rows]))
    out2, lse2 = dense_attention(dq, dk, dv, block_size=bs, q_valid=dqv, kv_valid=dkv, return_lse=True)
    assert_close_to_golden(out2.float().cpu(), ref, atol=atol)
    lse2 = lse2.cpu()
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse2), fin)
    assert torch.allclose(lse2[fin].double(), rlse[fin], atol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("pad,gathers", [("tail-partial", False), ("tail-blocks", False), ("inside", True)])
def test_dense_attention_gathers_only_for_padding_inside(pad, gathers):
    """Padding at the tail is sliced off (views), not gathered and scattered back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    qv, kvv = (torch.tensor(c, dtype=torch.int32) for c in PADDINGS[pad])
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    dense_attention(q, k, v, block_size=16, q_valid=qv, kv_valid=kvv)  # the positions are cached per tensor
    with Ops() as ops:
        dense_attention(q, k, v, block_size=16, q_valid=qv, kv_valid=kvv)
    assert bool(ops.seen & {"index_select", "index_copy", "index_copy_"}) == gathers, ops.seen


VARIANTS = [
    dict(use_tma=False),
    pytest.param(dict(use_tma=True), marks=pytest.mark.skipif(DEV.type != "cuda", reason="TMA needs a GPU")),
    pytest.param(dict(use_tma=True, num_stages=3),
                 marks=pytest.mark.skipif(DEV.type != "cuda", reason="TMA needs a GPU")),
    pytest.param(dict(block_n=32, use_tma=True),
                 marks=pytest.mark.skipif(DEV.type != "cuda", reason="slow in the interpreter")),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["pointers", "tma", "tma-s3", "tma-bn32"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_variants_match_golden(case, variant, dtype):
    """Every kernel variant the launcher can pick (tensor descriptors or pointers, tile configs)."""
    import dist_compact_kernels as K

    q, k, v, idx, bv = _problem(case, H=3, D=64, dtype=dtype, density=0.5, seed=7, B=2, index_batch=1)
    dq, dk, dv, dbv = _on(q, k, v, bv)
    di = idx.to(DEV)
    out, lse = K.block_sparse_fwd(dq, dk, dv, di.counts, di.indices, idx.block_size, 64 ** -0.5, dbv, dbv,
                                  return_lse=True, **variant)
    ref, rlse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, q_valid=bv, kv_valid=bv)
    out, lse = out.cpu(), lse.cpu()
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close_to_golden(out, ref, atol=atol)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rlse[fin]).abs().max() < (2e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.skipif(DEV.type != "cuda", reason="cuDNN attention needs a GPU")
def test_cudnn_takes_the_sliced_keys_of_tail_padding():
    """dense_attention slices tail padding off K / V (strided views): cuDNN must run them, not refuse them
    (a refusal would fall back to a slower kernel without a word)."""
    from dist_compact import ops

    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 640, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    res = ops._cudnn_dense_with_lse(q, k[:, :523], v[:, :523], 128 ** -0.5)
    if res is None and ops._cudnn_dense_with_lse(q, k[:, :523].contiguous(), v[:, :523].contiguous(),
                                                 128 ** -0.5) is None:
        pytest.skip("no cuDNN attention on this GPU / build")
    assert res is not None, "cuDNN refused strided K / V that it takes when contiguous"
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k[:, :523].transpose(1, 2).float(), v[:, :523].transpose(1, 2).float(),
        scale=128 ** -0.5).transpose(1, 2)
    assert (res[0].float() - ref).abs().max().item() < 2e-2
