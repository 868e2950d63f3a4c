"""Block-sparse attention forward with log-sum-exp (Triton).

Layout: q [Z, SEQ_Q, H, HEAD_DIM], k/v [Z, SEQ_K, H, HEAD_DIM] (any strides, last dim contiguous);
out like q; lse [Z, H, SEQ_Q] float32, natural log. The pattern is BCSR: counts [Zi, H, NQ] int32 and
indices [Zi, H, NQ, L] int32 (Zi == Z or 1, stride 0 broadcast). One program = one query block of
BLOCK_SIZE rows for one (z, h); it walks the row's key blocks, each in BLOCK_SIZE // BLOCK_N tiles,
with the online softmax of FlashAttention in base 2 (log2(e) folded into the scale).

Masking: keys at or beyond SEQ_K, and keys beyond KV_VALID[kb] inside block kb, are masked; the
EVEN_K specialisation (no per-block valid counts, SEQ_K a multiple of BLOCK_SIZE) skips all of it.
Rows with nothing visible get 0 and lse = -inf (the running max is made finite before exp2 so an
all-masked tile cannot produce NaN). Padded query rows (beyond Q_VALID[qb]) are written as 0 / -inf.
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "block_sparse_fwd_triton", "interpreting", "launch", "tma_ok"]

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Largest num_stages that fitted in shared memory, per kernel specialisation (see launch()).
_STAGES_THAT_FIT = {}


def launch(kernel, grid, args, constexprs, num_warps, num_stages):
    """Launch ``kernel``, retrying with fewer pipeline stages if its shared memory does not fit.

    Deeper pipelines need a K/V buffer per stage; whether they fit depends on the specialisation
    (masking keeps more tiles live) and on the device, so the first launch finds out and the answer
    is remembered per (kernel, constexprs, device).
    """
    from triton.runtime.errors import OutOfResources

    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), tuple(sorted(constexprs.items())),
           num_warps, str(args[0].device))
    stages = min(num_stages, _STAGES_THAT_FIT.get(key, num_stages))
    while True:
        try:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=stages)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _STAGES_THAT_FIT[key] = stages
        return


@triton.jit
def _program(H, BLOCK_SIZE: tl.constexpr):
    # grid (NQ, Z*H), query blocks fastest: neighbouring programs share a head and most of their key
    # blocks, so K/V tiles hit in L2 (a head-fastest "heaviest row first" grid measured 25% slower)
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = (pid_zh // H).to(tl.int64)
    h = (pid_zh % H).to(tl.int64)
    return pid_m, z, h, pid_m * BLOCK_SIZE


@triton.jit
def _load_q(Q, z, h, offs_m, offs_d, stride_qz, stride_qm, stride_qh, SEQ_Q, UPCAST: tl.constexpr):
    # query rows offs_m of (z, h); rows at or beyond SEQ_Q read as 0
    q_ptrs = Q + z * stride_qz + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < SEQ_Q, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _keys_left(KV_VALID, kb, sub, start_n, SEQ_K, HAS_KV_VALID: tl.constexpr, BLOCK_N: tl.constexpr):
    # how many keys from start_n on (tile `sub` of key block kb) are valid: before SEQ_K and, with
    # per-block valid counts, before KV_VALID[kb]; the tile's mask is offs_n < that
    n_ok = SEQ_K - start_n
    if HAS_KV_VALID:
        n_ok = tl.minimum(n_ok, tl.load(KV_VALID + kb) - sub * BLOCK_N)
    return n_ok


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, LSE, COUNTS, INDICES, Q_VALID, KV_VALID, K_DESC, V_DESC,
    qk_scale,
    stride_qz, stride_qm, stride_qh,
    stride_kz, stride_kn, stride_kh,
    stride_vz, stride_vn, stride_vh,
    stride_oz, stride_om, stride_oh,
    stride_lz, stride_lh,
    stride_cz, stride_ch,
    stride_iz, stride_ih, stride_iq,
    H, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_Q_VALID: tl.constexpr,
    HAS_KV_VALID: tl.constexpr,
    EVEN_K: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    pid_m, z, h, q_start = _program(H, BLOCK_SIZE)
    offs_m = q_start + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = SEQ_Q - q_start
    if HAS_Q_VALID:
        q_rows = tl.minimum(q_rows, tl.load(Q_VALID + pid_m))
    q = _load_q(Q, z, h, offs_m, offs_d, stride_qz, stride_qm, stride_qh, SEQ_Q, UPCAST)

    cnt = tl.load(COUNTS + z * stride_cz + h * stride_ch + pid_m)
    idx_base = INDICES + z * stride_iz + h * stride_ih + pid_m * stride_iq
    k_base = K + z * stride_kz + h * stride_kh
    v_base = V + z * stride_vz + h * stride_vh

    m_i = tl.full([BLOCK_SIZE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE, HEAD_DIM], dtype=tl.float32)

    for j in range(0, cnt):
        kb = tl.load(idx_base + j)
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            start_n = tl.cast(kb, tl.int64) * BLOCK_SIZE + sub * BLOCK_N
            if USE_TMA:
                # K/V seen as 2D [Z*SEQ_K, H*HEAD_DIM]: the copy engine fetches the tile, no address math
                row = (z * SEQ_K + start_n).to(tl.int32)
                k = K_DESC.load([row, (h * HEAD_DIM).to(tl.int32)])
                v = V_DESC.load([row, (h * HEAD_DIM).to(tl.int32)])
                if not EVEN_K:
                    kmask = offs_n < _keys_left(KV_VALID, kb, sub, start_n, SEQ_K, HAS_KV_VALID, BLOCK_N)
                    # rows past this batch's end belong to the next batch: zero them
                    v = tl.where(kmask[:, None], v, 0.0)
            else:
                rows_n = (start_n + offs_n)[:, None]
                k_ptrs = k_base + rows_n * stride_kn + offs_d[None, :]
                v_ptrs = v_base + rows_n * stride_vn + offs_d[None, :]
                if EVEN_K:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    kmask = offs_n < _keys_left(KV_VALID, kb, sub, start_n, SEQ_K, HAS_KV_VALID, BLOCK_N)
                    k = tl.load(k_ptrs, mask=kmask[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_K:
                qk = tl.where(kmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # an all-masked tile leaves m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    row_ok = tl.arange(0, BLOCK_SIZE) < q_rows
    has = row_ok & (l_i > 0.0)
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    o_ptrs = O + z * stride_oz + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < SEQ_Q)
    if RETURN_LSE:
        # m_i and log2(l_i) are in base 2; times ln(2) gives the natural-log LSE
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + z * stride_lz + h * stride_lh + offs_m, lse, mask=offs_m < SEQ_Q)


def _default_config(block_size: int, head_dim: int, tma: bool):
    """(BLOCK_N, num_warps, num_stages), from the H100 sweeps in docs/history/notebook.md: BLOCK_N = block size
    with 8 warps for 128x128 tiles (BLOCK_N 64 or 4 warps: 10-20% slower); 3 stages on the pointer
    path, 4 with tensor descriptors (steadier across densities). Smaller tiles need fewer warps."""
    block_n = block_size
    num_warps = 8 if block_size * head_dim >= 128 * 128 else 4
    return block_n, num_warps, (4 if tma else 3)


def tma_ok(x: torch.Tensor) -> bool:
    """K/V can be read through a 2D tensor descriptor [Z*S, H*D]: Hopper or newer, compiled mode,
    head_dim contiguous and rows of every batch evenly spaced (16-byte aligned strides)."""
    if x.device.type != "cuda" or interpreting() or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    Z, S, H, D = x.shape
    es = x.element_size()
    return (x.stride(3) == 1 and x.stride(2) == D and (Z == 1 or x.stride(0) == S * x.stride(1))
            and (x.stride(1) * es) % 16 == 0 and x.data_ptr() % 16 == 0)


def _specialisation(q, k, block_size, q_valid, kv_valid) -> dict:
    """The compile-time arguments the Triton kernels (this one and block_mass) share: fp32 products
    in IEEE precision, fp16/bf16 ones upcast under the interpreter (its dot wants fp32); EVEN_K when
    no key tile needs a mask."""
    return dict(HEAD_DIM=q.shape[3], BLOCK_SIZE=block_size, HAS_Q_VALID=q_valid is not None,
                HAS_KV_VALID=kv_valid is not None, EVEN_K=kv_valid is None and k.shape[1] % block_size == 0,
                UPCAST=interpreting() and q.dtype != torch.float32,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _kv_descriptor(x: torch.Tensor, rows: int):
    """A tensor descriptor of x [Z, S, H, D] seen as 2D [Z*S, H*D] (what tma_ok checked), tiles of rows x D."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    Z, S, H, D = x.shape
    return TensorDescriptor(x, [Z * S, H * D], [x.stride(1), 1], [rows, D])


def block_sparse_fwd_triton(q, k, v, counts, indices, block_size, scale, q_valid=None, kv_valid=None,
                            return_lse=True, block_n=None, num_warps=None, num_stages=None, use_tma=True):
    """Launch the Triton kernel (dispatch.block_sparse_fwd picks it; inputs checked by dist_compact.ops).

    ``use_tma`` reads K/V through tensor descriptors (Hopper's copy engine) when the device and the
    strides allow (+7-12% on an H100), else falls back to pointer loads; ``block_n`` / ``num_warps`` /
    ``num_stages`` default to `_default_config`. Returns (out, lse) with lse None unless return_lse.
    """
    Z, SQ, H, D = q.shape
    SK = k.shape[1]
    nq = triton.cdiv(SQ, block_size)
    out = torch.empty_like(q)
    lse = torch.empty((Z, H, SQ), dtype=torch.float32, device=q.device) if return_lse else out
    use_tma = bool(use_tma) and tma_ok(k) and tma_ok(v)
    bn, nw, ns = _default_config(block_size, D, use_tma)
    block_n = block_n or bn
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    k_desc, v_desc = (_kv_descriptor(k, block_n), _kv_descriptor(v, block_n)) if use_tma else (k, v)
    dummy = counts
    grid = (nq, Z * H)
    args = (
        q, k, v, out, lse, counts, indices,
        q_valid if q_valid is not None else dummy,
        kv_valid if kv_valid is not None else dummy,
        k_desc, v_desc,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1),
        indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1), indices.stride(2),
        H, SQ, SK,
    )
    constexprs = dict(_specialisation(q, k, block_size, q_valid, kv_valid), BLOCK_N=block_n, RETURN_LSE=return_lse,
                      USE_TMA=use_tma)
    launch(_block_sparse_fwd_kernel, grid, args, constexprs, num_warps, num_stages)
    return out, (lse if return_lse else None)

