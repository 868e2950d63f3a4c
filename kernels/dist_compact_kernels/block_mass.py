"""Block attention mass (Triton): the statistic of AdaSpa's fused / LSE-cached online search.

Layout: q [Z, SEQ_Q, H, HEAD_DIM], k [Z, SEQ_K, H, HEAD_DIM], lse [Z, H, SEQ_Q] float32 natural log;
mass [Z, H, NQ, NK] float32. For query block i and key block j:

    mass[z, h, i, j] = (1 / n_i) * sum_{t in block i, valid} sum_{s in block j, valid} exp(q_t.k_s*scale - lse_t)

with n_i the number of valid query rows whose lse is finite. Given the exact LSE of dense attention,
each row sums to 1 over j. One program per (query block, z*h) walks all key blocks: QK^T only, no V.
Rows with lse = -inf or beyond Q_VALID are excluded by giving them lse = +inf (exp2 -> 0).

ROWS < BLOCK_SIZE samples ROWS query rows per block, spread evenly over its n valid rows (rows
floor(i*n/ROWS); all rows when n <= ROWS) and averages over them: an unbiased estimate of the
block-row mean at ROWS/BLOCK_SIZE of the cost (the exp2 of every score is the bottleneck).
"""

import torch
import triton
import triton.language as tl

from .block_sparse_fwd import LOG2E, _kv_descriptor, _load_q, _program, _specialisation, launch, tma_ok

__all__ = ["block_mass_fwd"]


@triton.jit
def _block_mass_kernel(
    Q, K, LSE, MASS, Q_VALID, KV_VALID, K_DESC,
    qk_scale,
    stride_qz, stride_qm, stride_qh,
    stride_kz, stride_kn, stride_kh,
    stride_lz, stride_lh,
    stride_mz, stride_mh, stride_mq,
    H, SEQ_Q, SEQ_K, NUM_K_BLOCKS,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_Q_VALID: tl.constexpr,
    HAS_KV_VALID: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    pid_m, z, h, q_start = _program(H, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = tl.minimum(SEQ_Q - q_start, BLOCK_SIZE)
    if HAS_Q_VALID:
        q_rows = tl.minimum(q_rows, tl.load(Q_VALID + pid_m))
    r = tl.arange(0, ROWS)
    if ROWS == BLOCK_SIZE:
        offs_r = r
        row_in = r < q_rows
    else:
        few = q_rows <= ROWS
        offs_r = tl.where(few, r, (r * q_rows) // ROWS)
        row_in = tl.where(few, r < q_rows, q_rows > 0)
    offs_m = q_start + offs_r
    q = _load_q(Q, z, h, offs_m, offs_d, stride_qz, stride_qm, stride_qh, SEQ_Q, UPCAST)
    lse = tl.load(LSE + z * stride_lz + h * stride_lh + offs_m, mask=offs_m < SEQ_Q, other=float("-inf"))
    row_ok = row_in & (lse > float("-inf"))
    lse2 = tl.where(row_ok, lse * 1.4426950408889634, float("inf"))  # log2(e): natural -> base 2
    n_rows = tl.maximum(tl.sum(row_ok.to(tl.float32), 0), 1.0)

    k_base = K + z * stride_kz + h * stride_kh
    m_base = MASS + z * stride_mz + h * stride_mh + pid_m * stride_mq
    for kb in range(0, NUM_K_BLOCKS):
        total = 0.0
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            start_n = tl.cast(kb, tl.int64) * BLOCK_SIZE + sub * BLOCK_N
            if not EVEN_K:
                # block_sparse_fwd._keys_left, written out: through the helper ptxas (-lineinfo)
                # allocates this kernel's registers differently (checked on its sm_90 SASS)
                n_ok = SEQ_K - start_n
                if HAS_KV_VALID:
                    n_ok = tl.minimum(n_ok, tl.load(KV_VALID + kb) - sub * BLOCK_N)
                kmask = offs_n < n_ok
            if USE_TMA:
                k = K_DESC.load([(z * SEQ_K + start_n).to(tl.int32), (h * HEAD_DIM).to(tl.int32)])
            else:
                k_ptrs = k_base + (start_n + offs_n)[:, None] * stride_kn + offs_d[None, :]
                if EVEN_K:
                    k = tl.load(k_ptrs)
                else:
                    k = tl.load(k_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])
            if not EVEN_K:
                p = tl.where(kmask[None, :], p, 0.0)
            total += tl.sum(tl.sum(p, 1), 0)
        tl.store(m_base + kb, total / n_rows)


def block_mass_fwd(q, k, lse, block_size, scale, q_valid=None, kv_valid=None, query_rows=None, num_warps=None,
                   num_stages=None, use_tma=True):
    """Launch the block-mass kernel; inputs are assumed checked by the caller (dist_compact.ops).

    ``query_rows``: rows sampled per query block (a power of two in [16, block_size]); None = all.
    """
    Z, SQ, H, D = q.shape
    SK = k.shape[1]
    nq, nk = triton.cdiv(SQ, block_size), triton.cdiv(SK, block_size)
    mass = torch.empty((Z, H, nq, nk), dtype=torch.float32, device=q.device)
    lse = lse.float().contiguous()
    rows = block_size if query_rows is None else query_rows
    use_tma = bool(use_tma) and tma_ok(k)
    k_desc = _kv_descriptor(k, block_size) if use_tma else k
    dummy = mass
    args = (
        q, k, lse, mass,
        q_valid if q_valid is not None else dummy,
        kv_valid if kv_valid is not None else dummy,
        k_desc,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        mass.stride(0), mass.stride(1), mass.stride(2),
        H, SQ, SK, nk,
    )
    constexprs = dict(_specialisation(q, k, block_size, q_valid, kv_valid), BLOCK_N=block_size, ROWS=rows,
                      USE_TMA=use_tma)
    launch(_block_mass_kernel, (nq, Z * H), args, constexprs,
           num_warps or (8 if rows * D >= 128 * 128 else 4), num_stages or 3)
    return mass
