"""Block-sparse attention forward for Hopper, warp-specialized (Gluon).

Why a second kernel: the Triton kernel (block_sparse_fwd.py) issues the QK^T and PV tensor-core
products and the softmax from the same warps, with CTA-wide barriers between pipeline stages, so
the tensor cores idle while the exponentials run (docs/history/notebook.md, the kernel notes). Here one
program = one 128-row query block of one (z, h), split over three partitions:

* the loader (the default partition, 4 warps, few registers) reads the row's key-block indices and
  streams K/V tiles into a 3-deep shared-memory ring with the tensor-memory accelerator (TMA),
  each stage guarded by a "ready" and an "empty" mbarrier;
* two consumers (one warpgroup each, 240 registers) own 64 query rows each and run the online
  softmax of FlashAttention over the tiles. They never synchronise with each other, and each issues
  QK^T of block j together with PV of block j-1, so its softmax of j overlaps its own previous
  product as well as the other consumer's (FA3's in-warpgroup overlap: +13-26% on an H100 over the
  serial loop, which stays available as ``overlap=False``).

Layouts and limits: q, k, v [Z, S, H, D] with the (H, D) dims packed (stride(2) == D, stride(3)
== 1), bf16/fp16, D in (64, 128), block size 128, S_q and S_k multiples of 128, optional per-block
valid counts (padding inside blocks, as layouts with text or ragged tiles have); the Triton kernel
serves every other case. K/V are read as a 2D [Z*S_k, H*D] view, the
output is written through a [Z*S_q, H*D] view. LSE is natural-log, -inf (and output 0) for rows
without any key block.

Only compiled on sm_90 GPUs; dispatch.ws_supported says when block_sparse_fwd may use it.
"""

from dataclasses import dataclass
from typing import Union

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .block_sparse_fwd import LOG2E

__all__ = ["Schedule", "block_sparse_fwd_ws", "compile_sm90", "shapes_ok"]

LN2 = gl.constexpr(0.6931471805599453)
BLOCK = 128  # query and key block size (rows of Q per program, keys per K/V tile)
ROWS = 64  # query rows per consumer warpgroup
STAGES = 2  # K/V ring depth (3 also fits: Q 32 KiB + 3 x 64 KiB of K/V, the output reuses Q's buffer)
PINGPONG = False
OVERLAP = True  # measured: +13-26% over the serial consumer loop on an H100 (docs/history/notebook.md)
EXP_EMU = False
PERSISTENT = False  # measured: the one-CTA-per-tile grid was as fast or faster (docs/history/notebook.md)
ORDER = "natural"  # the order tiles start in; "longest" (longest rows first) is not yet measured
ORDERS = ("natural", "longest")
CONSUMER_REGS = gl.constexpr(240)
# Later Tritons renamed the TMA copies (async_copy_global_to_shared -> async_load, async_copy_shared_to_global
# -> async_store) and made the old names raise; the kernels call whichever this Triton has (same arguments)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.constexpr_function
def _acc_layout(n):
    # wgmma accumulator of a 64 x n tile on one warpgroup
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _tile(t, NQ, H, COUNTS, INDICES, ORDER, stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
          HAS_ORDER: gl.constexpr):
    # tile t = query block t % NQ of (z, h) = divmod(t // NQ, H): query blocks fastest, so the CTAs
    # running at the same time share a head and most of their key blocks (L2 hits). With an order,
    # the t-th tile to start is ORDER[t] (the launcher's longest rows first: a long row that starts
    # last would run alone at the end of the grid)
    if HAS_ORDER:
        t = gl.load(ORDER + t)
    qb = t % NQ
    zh = t // NQ
    z = zh // H
    h = zh % H
    cnt = gl.load(COUNTS + z * stride_cz + h * stride_ch + qb)
    idx = INDICES + z * stride_iz + h * stride_ih + qb * stride_iq
    return qb, z, h, cnt, idx


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
            COUNTS, INDICES, ORDER, stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
            NQ, H, SEQ_Q, SEQ_K, num_tiles, HEAD_DIM: gl.constexpr, STAGES_: gl.constexpr,
            QBUF: gl.constexpr, HAS_ORDER: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    kv_bytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    kv = 0  # K/V tiles issued so far by this CTA: ring slot kv % STAGES_, pass kv // STAGES_
    i = 0  # query tiles issued so far
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        qb, z, h, cnt, idx = _tile(t, NQ, H, COUNTS, INDICES, ORDER, stride_cz, stride_ch, stride_iz, stride_ih,
                                   stride_iq, HAS_ORDER)
        col = h * HEAD_DIM
        qs = i % QBUF
        # a fresh barrier counts as having completed the phase before phase 0: the first pass
        # over a ring waits on parity 1 and goes straight through
        mbarrier.wait(q_empty.index(qs), ((i // QBUF) & 1) ^ 1)
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        _tma_load(q_desc, [z * SEQ_Q + qb * BLOCK_M, col], q_ready.index(qs), q_smem.index(qs))
        for j in range(cnt):
            s = kv % STAGES_
            mbarrier.wait(empty.index(s), ((kv // STAGES_) & 1) ^ 1)
            row = z * SEQ_K + gl.load(idx + j) * BLOCK_N
            mbarrier.expect(ready.index(s), kv_bytes)
            _tma_load(k_desc, [row, col], ready.index(s), k_smem.index(s))
            _tma_load(v_desc, [row, col], ready.index(s), v_smem.index(s))
            kv += 1
        i += 1


# exp2 of x <= 0 (the softmax's exponents) for one element of each pair on the FMA pipe instead of the
# special-function unit (MUFU: 16 results per clock per SM on Hopper, the softmax's scarcest unit):
# 2^x = 2^j * 2^r with j = round(x) (added to the exponent bits) and 2^r, |r| <= 1/2, a degree-3
# polynomial (relative error 7.5e-5, far below bf16's 3.9e-3 rounding of P). x below -126 gives 0 (as
# masked keys, x = -inf, must; 2^-126 is negligible next to the row's maximum, 2^0).
_EXP2_PAIR_ASM = gl.constexpr("""{
.reg .f32 t, j, r, p;
.reg .b32 jb, pb;
.reg .pred tiny;
ex2.approx.ftz.f32 $0, $2;
setp.lt.f32 tiny, $3, 0fC2FC0000;
max.ftz.f32 t, $3, 0fC2FC0000;
add.rn.ftz.f32 j, t, 0f4B400000;
sub.rn.ftz.f32 r, j, 0f4B400000;
sub.rn.ftz.f32 r, t, r;
fma.rn.ftz.f32 p, r, 0f3D61FBAC, 0f3E786F0F;
fma.rn.ftz.f32 p, p, r, 0f3F31798D;
fma.rn.ftz.f32 p, p, r, 0f3F7FFB49;
mov.b32 jb, j;
shl.b32 jb, jb, 23;
mov.b32 pb, p;
add.s32 pb, pb, jb;
selp.b32 pb, 0, pb, tiny;
mov.b32 $1, pb;
}""")


@gluon.jit
def _exp2_scores(x, EXP_EMU: gl.constexpr):
    if EXP_EMU:
        return gl.inline_asm_elementwise(_EXP2_PAIR_ASM, "=f,=f,f,f", [x], dtype=gl.float32, is_pure=True, pack=2)
    else:
        return gl.exp2(x)


@gluon.jit
def _zero_padded_rows(tile, n_ok, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    # rows n_ok.. of a K/V tile in shared memory set to 0 (padding may hold anything; P is 0 there but
    # 0 * inf is NaN). Both consumers do it before their first product that reads the tile: the
    # second writes zeros over zeros.
    R: gl.constexpr = 16
    layout: gl.constexpr = gl.BlockedLayout([1, HEAD_DIM // 8], [4, 8], [4, 1], [1, 0])
    for r0 in gl.static_range(0, BLOCK_N, R):
        if r0 + R > n_ok:
            sub = tile.slice(r0, R, dim=0)
            x = sub.load(layout)
            rows = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, layout))
            sub.store(gl.where(rows[:, None] < n_ok, x, gl.zeros_like(x)))
    fence_async_shared()


@gluon.jit
def _key_valid(idx, j, KV_VALID, v_tile, HAS_KV_VALID: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_DIM: gl.constexpr):
    # valid keys of the row's j-th key block (BLOCK_N without counts); pads its V rows with zeros
    n_ok = BLOCK_N
    if HAS_KV_VALID:
        n_ok = gl.load(KV_VALID + gl.load(idx + j))
        if n_ok < BLOCK_N:
            _zero_padded_rows(v_tile, n_ok, BLOCK_N, HEAD_DIM)
    return n_ok


@gluon.jit
def _mask_keys(sc, n_ok, HAS_KV_VALID: gl.constexpr, s_layout: gl.constexpr):
    BLOCK_N: gl.constexpr = sc.shape[1]
    if HAS_KV_VALID:
        if n_ok < BLOCK_N:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            sc = gl.where(cols[None, :] < n_ok, sc, float("-inf"))
    return sc


@gluon.jit
def _online_softmax(sc, m_i, l_i, qk_scale, EXP_EMU: gl.constexpr, MASKED: gl.constexpr):
    # online softmax in base 2, the scale folded into one FFMA per score (scale > 0): P, the new
    # running max, the factor alpha that rescales what came before, the new row sums
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    m_use = m_new
    if MASKED:
        # a row whose keys so far are all masked keeps m = -inf: subtract 0 instead (P = 0, not NaN)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp2_scores(gl.fma(sc, qk_scale, -m_use[:, None]), EXP_EMU)
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, alpha, l_i


@gluon.jit
def _softmax_step(sc, m_i, l_i, acc, qk_scale, o_rows: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr,
                  EXP_EMU: gl.constexpr, MASKED: gl.constexpr):
    # the serial loop's step: P as the PV product's register operand and the rescaled running state
    p, m_new, alpha, l_i = _online_softmax(sc, m_i, l_i, qk_scale, EXP_EMU, MASKED)
    acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
    return gl.convert_layout(p.to(dtype), p_layout), m_new, l_i, acc


# The three consumer schedules. Each runs one consumer's online softmax over the cnt key blocks of a
# tile, from K/V ring position kv, and returns the running state (m_i, l_i, acc) and the new ring
# position (ping-pong also its turn count). All three perform the same accumulator operations in the
# same order (rescale by alpha_j, then add P_j V_j): they differ in when the products are issued.


@gluon.jit
def _serial_loop(q, k_smem, v_smem, ready, empty, idx, cnt, kv, m_i, l_i, acc, zero_s, KV_VALID, qk_scale,
                 o_rows: gl.constexpr, p_layout: gl.constexpr, s_layout: gl.constexpr, dtype: gl.constexpr,
                 STAGES_: gl.constexpr, EXP_EMU: gl.constexpr, HAS_KV_VALID: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    # QK^T(j), softmax(j), PV(j), each waited for before the next
    for j in range(cnt):
        s = kv % STAGES_
        mbarrier.wait(ready.index(s), (kv // STAGES_) & 1)
        n_ok = _key_valid(idx, j, KV_VALID, v_smem.index(s), HAS_KV_VALID, BLOCK_N, HEAD_DIM)
        sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
        sc = _mask_keys(sc, n_ok, HAS_KV_VALID, s_layout)
        pv, m_i, l_i, acc = _softmax_step(sc, m_i, l_i, acc, qk_scale, o_rows, p_layout, dtype, EXP_EMU,
                                          HAS_KV_VALID)
        acc = warpgroup_mma(pv, v_smem.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(s), count=1)
        kv += 1
    return m_i, l_i, acc, kv


@gluon.jit
def _pingpong_loop(q, k_smem, v_smem, ready, empty, turn, cnt, kv, ph, m_i, l_i, acc, zero_s, qk_scale,
                   o_rows: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr, STAGES_: gl.constexpr,
                   EXP_EMU: gl.constexpr, WHICH: gl.constexpr):
    # FA3's ping-pong: the two consumers take turns on the tensor cores (a "turn" mbarrier
    # each, armed by the other consumer right after it has issued its products), so one's
    # softmax runs while the other's products do. A turn = PV of block j with QK^T of j+1.
    if cnt > 0:
        s = kv % STAGES_
        mbarrier.wait(ready.index(s), (kv // STAGES_) & 1)
        mbarrier.wait(turn.index(WHICH), (ph & 1) ^ (1 - WHICH))
        sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - WHICH), count=1)
        ph += 1
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
        for j in range(cnt):
            s = (kv + j) % STAGES_
            sn = (kv + j + 1) % STAGES_
            pv, m_i, l_i, acc = _softmax_step(sc, m_i, l_i, acc, qk_scale, o_rows, p_layout, dtype, EXP_EMU, False)
            if j + 1 < cnt:
                mbarrier.wait(ready.index(sn), ((kv + j + 1) // STAGES_) & 1)
            mbarrier.wait(turn.index(WHICH), (ph & 1) ^ (1 - WHICH))
            acc_t = warpgroup_mma(pv, v_smem.index(s), acc, is_async=True)
            if j + 1 < cnt:
                sc_t = warpgroup_mma(q, k_smem.index(sn).permute((1, 0)), zero_s, use_acc=False,
                                     is_async=True)
                mbarrier.arrive(turn.index(1 - WHICH), count=1)
                acc, sc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t, sc_t))
            else:
                mbarrier.arrive(turn.index(1 - WHICH), count=1)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t,))
            ph += 1
            mbarrier.arrive(empty.index(s), count=1)
        kv += cnt
    return m_i, l_i, acc, kv, ph


@gluon.jit
def _overlapped_loop(q, k_smem, v_smem, ready, empty, idx, cnt, kv, m_i, l_i, acc, zero_s, KV_VALID, qk_scale,
                     o_rows: gl.constexpr, p_layout: gl.constexpr, s_layout: gl.constexpr, dtype: gl.constexpr,
                     STAGES_: gl.constexpr, EXP_EMU: gl.constexpr, HAS_KV_VALID: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    # FA3's in-warpgroup overlap: QK^T of block j and PV of block j-1 are issued back to back and
    # the softmax of j may run while PV(j-1) is on the tensor cores (wgmma groups retire in order,
    # so waiting with one outstanding waits for QK^T only). The accumulator is rescaled and the
    # next P written to its registers only after PV(j-1) has retired. A K/V stage is held from
    # QK^T(j) to PV(j), one iteration longer than in the serial loop (use 3 stages).
    # With valid counts, a block's padded keys are masked after its QK^T and its padded V rows
    # zeroed before its PV (_key_valid, _mask_keys).
    if cnt > 0:
        s = kv % STAGES_
        mbarrier.wait(ready.index(s), (kv // STAGES_) & 1)
        n_ok = _key_valid(idx, 0, KV_VALID, v_smem.index(s), HAS_KV_VALID, BLOCK_N, HEAD_DIM)
        sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
        sc = _mask_keys(sc, n_ok, HAS_KV_VALID, s_layout)
        p, m_i, alpha, l_i = _online_softmax(sc, m_i, l_i, qk_scale, EXP_EMU, HAS_KV_VALID)
        pv = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, cnt):
            sp = (kv + j - 1) % STAGES_
            s = (kv + j) % STAGES_
            mbarrier.wait(ready.index(s), ((kv + j) // STAGES_) & 1)
            n_ok = _key_valid(idx, j, KV_VALID, v_smem.index(s), HAS_KV_VALID, BLOCK_N, HEAD_DIM)
            sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(pv, v_smem.index(sp), acc, is_async=True)
            sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc,))
            sc = _mask_keys(sc, n_ok, HAS_KV_VALID, s_layout)
            p, m_i, alpha, l_i = _online_softmax(sc, m_i, l_i, qk_scale, EXP_EMU, HAS_KV_VALID)
            # p rides through the wait so that its conversion (into the registers PV(j-1) reads)
            # stays after it
            acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            pv = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.arrive(empty.index(sp), count=1)
        s = (kv + cnt - 1) % STAGES_
        acc = warpgroup_mma(pv, v_smem.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(s), count=1)
        kv += cnt
    return m_i, l_i, acc, kv


@gluon.jit
def _consumer(o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn, LSE, Q_VALID, KV_VALID,
              COUNTS, INDICES, ORDER, stride_cz, stride_ch, stride_iz, stride_ih, stride_iq, stride_lz, stride_lh,
              NQ, H, SEQ_Q, num_tiles, qk_scale, RETURN_LSE: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES_: gl.constexpr, QBUF: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr,
              EXP_EMU: gl.constexpr, HAS_Q_VALID: gl.constexpr, HAS_KV_VALID: gl.constexpr, HAS_ORDER: gl.constexpr,
              WHICH: gl.constexpr):
    dtype: gl.constexpr = o_desc.dtype
    ROWS_: gl.constexpr = o_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = 2 * ROWS_
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    kv = 0
    i = 0
    ph = 0  # turns taken (ping-pong)
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        qb, z, h, cnt, idx = _tile(t, NQ, H, COUNTS, INDICES, ORDER, stride_cz, stride_ch, stride_iz, stride_ih,
                                   stride_iq, HAS_ORDER)
        qs = i % QBUF
        mbarrier.wait(q_ready.index(qs), (i // QBUF) & 1)
        q = q_smem.index(qs).slice(WHICH * ROWS_, ROWS_, dim=0)
        m_i = gl.full([ROWS_], float("-inf"), gl.float32, layout=s_rows)
        l_i = gl.full([ROWS_], 0.0, gl.float32, layout=s_rows)
        acc = gl.zeros([ROWS_, HEAD_DIM], gl.float32, layout=o_layout)
        zero_s = gl.zeros([ROWS_, BLOCK_N], gl.float32, layout=s_layout)
        if PINGPONG:
            m_i, l_i, acc, kv, ph = _pingpong_loop(q, k_smem, v_smem, ready, empty, turn, cnt, kv, ph, m_i, l_i, acc,
                                                   zero_s, qk_scale, o_rows, p_layout, dtype, STAGES_, EXP_EMU, WHICH)
        elif OVERLAP:
            m_i, l_i, acc, kv = _overlapped_loop(q, k_smem, v_smem, ready, empty, idx, cnt, kv, m_i, l_i, acc, zero_s,
                                                 KV_VALID, qk_scale, o_rows, p_layout, s_layout, dtype, STAGES_,
                                                 EXP_EMU, HAS_KV_VALID, BLOCK_N, HEAD_DIM)
        else:
            m_i, l_i, acc, kv = _serial_loop(q, k_smem, v_smem, ready, empty, idx, cnt, kv, m_i, l_i, acc, zero_s,
                                             KV_VALID, qk_scale, o_rows, p_layout, s_layout, dtype, STAGES_, EXP_EMU,
                                             HAS_KV_VALID, BLOCK_N, HEAD_DIM)

        has = l_i > 0.0
        if HAS_Q_VALID:  # padded query rows: 0 and LSE -inf
            rows = WHICH * ROWS_ + gl.arange(0, ROWS_, layout=s_rows)
            has = has & (rows < gl.load(Q_VALID + qb))
        inv = gl.where(has, 1.0 / gl.where(has, l_i, 1.0), 0.0)
        if HAS_Q_VALID:  # a padded query row may hold anything (NaN * 0 is NaN): select, not scale
            acc = gl.where(gl.convert_layout(has, o_rows)[:, None], acc * gl.convert_layout(inv, o_rows)[:, None], 0.0)
        else:
            acc = acc * gl.convert_layout(inv, o_rows)[:, None]
        # the output is staged in this consumer's own rows of the Q buffer: its last QK^T product
        # has completed (waited above) and no other partition reads these rows
        q.store(acc.to(dtype))
        fence_async_shared()
        row_o = z * SEQ_Q + qb * BLOCK_M + WHICH * ROWS_
        _tma_store(o_desc, [row_o, h * HEAD_DIM], q)
        if RETURN_LSE:
            lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2, float("-inf"))
            offs = z * stride_lz + h * stride_lh + qb * BLOCK_M + WHICH * ROWS_ + gl.arange(0, ROWS_, layout=s_rows)
            gl.store(LSE + offs, lse)
        tma.store_wait(pendings=0)
        mbarrier.arrive(q_empty.index(qs), count=1)  # the loader may refill this Q buffer
        i += 1


@gluon.jit
def _block_sparse_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, Q_VALID, KV_VALID, COUNTS, INDICES, ORDER, qk_scale,
                            stride_lz, stride_lh, stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
                            H, SEQ_Q, SEQ_K, NQ, num_tiles,
                            HEAD_DIM: gl.constexpr, RETURN_LSE: gl.constexpr, STAGES: gl.constexpr,
                            QBUF: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr,
                            EXP_EMU: gl.constexpr, HAS_Q_VALID: gl.constexpr, HAS_KV_VALID: gl.constexpr,
                            HAS_ORDER: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [QBUF, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(QBUF):
        mbarrier.init(q_ready.index(b), count=1)
        mbarrier.init(q_empty.index(b), count=2)  # one arrival per consumer
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=2)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(2):
        mbarrier.init(turn.index(b), count=1)  # consumer b may issue; armed by the other consumer

    gl.warp_specialize(
        [
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, COUNTS, INDICES,
                       ORDER, stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
                       NQ, H, SEQ_Q, SEQ_K, num_tiles, HEAD_DIM, STAGES, QBUF, HAS_ORDER)),
            (_consumer, (o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn, LSE, Q_VALID, KV_VALID,
                         COUNTS, INDICES, ORDER,
                         stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
                         stride_lz, stride_lh, NQ, H, SEQ_Q, num_tiles, qk_scale, RETURN_LSE, HEAD_DIM,
                         STAGES, QBUF, PINGPONG, OVERLAP, EXP_EMU, HAS_Q_VALID, HAS_KV_VALID, HAS_ORDER, 0)),
            (_consumer, (o_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn, LSE, Q_VALID, KV_VALID,
                         COUNTS, INDICES, ORDER,
                         stride_cz, stride_ch, stride_iz, stride_ih, stride_iq,
                         stride_lz, stride_lh, NQ, H, SEQ_Q, num_tiles, qk_scale, RETURN_LSE, HEAD_DIM,
                         STAGES, QBUF, PINGPONG, OVERLAP, EXP_EMU, HAS_Q_VALID, HAS_KV_VALID, HAS_ORDER, 1)),
        ],
        [4, 4],
        [CONSUMER_REGS, CONSUMER_REGS],
    )


def shapes_ok(q, k, v, block_size, q_valid=None, kv_valid=None) -> bool:
    """True when this kernel takes these inputs, on any device (the sm_90 check is the dispatcher's,
    dispatch.ws_supported): block 128, bf16/fp16, head_dim 64/128, sequences in
    whole blocks, (H, D) packed and 16-byte aligned rows (TMA's 2D views); valid counts, if any, one
    contiguous int32 per block."""
    if block_size != BLOCK:
        return False
    for valid, seq in ((q_valid, q.shape[1]), (kv_valid, k.shape[1])):
        if valid is not None and (valid.dtype != torch.int32 or not valid.is_contiguous()
                                  or valid.shape != (seq // BLOCK,) or valid.device != q.device):
            return False
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return False
    Z, SQ, H, D = q.shape
    SK = k.shape[1]
    if D not in (64, 128) or SQ % BLOCK or SK % BLOCK:
        return False
    for x in (q, k, v):
        if x.stride(3) != 1 or x.stride(2) != D or (Z > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
            return False
        if (x.stride(1) * x.element_size()) % 16 or x.data_ptr() % 16:
            return False
    return True


def _view2d(x):
    Z, S, H, D = x.shape
    return x.as_strided((Z * S, H * D), (x.stride(1), 1))


@dataclass(frozen=True)
class Schedule:
    """The kernel's schedule knobs for one launch, checked; `Schedule.of` fills in the defaults. The
    launcher and compile_sm90 both build one, so a compiled variant is the one a launch would get.

    ``stages``: K/V ring depth, 2 or 3. ``pingpong`` / ``overlap``: the consumer schedule (ping-pong
    turns on the tensor cores, the in-warpgroup overlap, or neither: the serial loop); ping-pong and
    overlap exclude each other. ``exp_emu``: every second exponential of P on the FMA pipe.
    ``persistent``: the grid (False: one CTA per tile; True: one per SM; an int: that many CTAs).
    ``order``: the order tiles start in: ``"natural"`` (query blocks of one head after another) or
    ``"longest"`` (rows with the most key blocks first, ties in the natural order).
    """

    stages: int
    pingpong: bool
    overlap: bool
    exp_emu: bool
    persistent: Union[bool, int] = False
    order: str = "natural"

    def __post_init__(self):
        if self.pingpong and self.overlap:
            raise ValueError("pingpong and overlap are two different consumer schedules; pick one")
        object.__setattr__(self, "stages", int(self.stages))
        if self.stages not in (2, 3):
            raise ValueError(f"stages must be 2 or 3, got {self.stages}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    @classmethod
    def of(cls, stages=None, persistent=None, pingpong=None, overlap=None, exp_emu=None, order=None) -> "Schedule":
        """The schedule a call gets, defaults filled in: asking for ping-pong turns the default overlap
        off; the overlapped loop holds a stage one iteration longer, so it defaults to 3 stages."""
        pingpong = PINGPONG if pingpong is None else bool(pingpong)
        overlap = (OVERLAP and not pingpong) if overlap is None else bool(overlap)
        return cls(stages=stages or (3 if overlap else STAGES), pingpong=pingpong, overlap=overlap,
                   exp_emu=EXP_EMU if exp_emu is None else bool(exp_emu),
                   persistent=PERSISTENT if persistent is None else persistent,
                   order=ORDER if order is None else order)

    @property
    def qbuf(self) -> int:
        # shared memory: QBUF x 32 KiB of Q + stages x 64 KiB of K/V <= 227 KiB
        return 2 if self.stages == 2 else 1

    def constexprs(self) -> dict:
        """The kernel's compile-time arguments for this schedule (the grid is not one of them)."""
        return dict(STAGES=self.stages, QBUF=self.qbuf, PINGPONG=self.pingpong, OVERLAP=self.overlap,
                    EXP_EMU=self.exp_emu, HAS_ORDER=self.order != "natural")

    def tile_order(self, counts, Z: int, H: int, nq: int):
        """The ``ORDER`` argument: None in the natural order, else int32 ``[Z * H * nq]``, the tiles
        (``(z * H + h) * nq + qb``) by descending key-block count, ties in the natural order. Computed on
        counts' device, nothing read back."""
        if self.order == "natural":
            return None
        flat = counts.expand(Z, H, nq).reshape(-1)
        return torch.argsort(flat, descending=True, stable=True).to(torch.int32)

    def grid(self, num_tiles: int, device) -> int:
        if self.persistent is True:
            return min(num_tiles, torch.cuda.get_device_properties(device).multi_processor_count)
        if self.persistent:  # an int: that many CTAs (the tests use a few to make each walk many tiles)
            return min(num_tiles, int(self.persistent))
        return num_tiles


def block_sparse_fwd_ws(q, k, v, counts, indices, scale, return_lse=True, stages=None, persistent=None,
                        pingpong=None, overlap=None, exp_emu=None, q_valid=None, kv_valid=None, order=None):
    """Launch the warp-specialized kernel (the caller checked `dispatch.ws_supported`). Returns (out, lse|None).

    ``stages``: K/V ring depth, 2 or 3 (default: 3 with the overlapped loop, else STAGES).
    ``persistent``: True = one CTA per SM walking the tiles with a stride (with 2 stages the next
    tile's Q is prefetched into a second buffer); an int = that many CTAs; False (default, see
    PERSISTENT) = one CTA per tile. ``overlap`` (default OVERLAP): each consumer issues QK^T(j) with
    PV(j-1) and runs the softmax of j while PV(j-1) is in flight (FA3's in-warpgroup overlap).
    ``pingpong``: the serial consumer loop with the two consumers taking turns on the tensor cores
    (FA3's ping-pong; turns overlap off); default PINGPONG. ``exp_emu``: every second exponential of
    P on the FMA pipe (`_EXP2_PAIR_ASM`); default EXP_EMU. ``stages``, ``persistent``, ``pingpong``
    and ``overlap`` change the schedule only: the accumulator sees the same operations in the same
    order (rescale, then add P V), so the output is equal bit for bit to the serial loop's;
    ``exp_emu`` rounds differently (within bf16 of the oracle). ``q_valid`` / ``kv_valid``: int32
    valid tokens per query / key block (padded keys masked, their V rows zeroed in shared memory;
    padded query rows give 0 and LSE -inf); not with ``pingpong``. ``order`` (default ORDER): the
    order tiles start in (`Schedule`); like the grid, it changes when a tile runs, not what it computes.
    """
    Z, SQ, H, D = q.shape
    SK = k.shape[1]
    nq = SQ // BLOCK
    sched = Schedule.of(stages, persistent, pingpong, overlap, exp_emu, order)
    if sched.pingpong and (q_valid is not None or kv_valid is not None):
        raise ValueError("the ping-pong schedule does not take valid counts (the default schedule does)")
    out = torch.empty((Z, SQ, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Z, H, SQ), dtype=torch.float32, device=q.device) if return_lse else None
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    tile = gl.NVMMASharedLayout.get_default_for([BLOCK, D], gdt)
    half = gl.NVMMASharedLayout.get_default_for([ROWS, D], gdt)
    q_desc = TensorDescriptor.from_tensor(_view2d(q), [BLOCK, D], tile)
    k_desc = TensorDescriptor.from_tensor(_view2d(k), [BLOCK, D], tile)
    v_desc = TensorDescriptor.from_tensor(_view2d(v), [BLOCK, D], tile)
    o_desc = TensorDescriptor.from_tensor(_view2d(out), [ROWS, D], half)
    lse_arg = lse if lse is not None else counts
    num_tiles = nq * Z * H
    tile_order = sched.tile_order(counts, Z, H, nq)
    _block_sparse_ws_kernel[(sched.grid(num_tiles, q.device),)](
        q_desc, k_desc, v_desc, o_desc, lse_arg, q_valid if q_valid is not None else counts,
        kv_valid if kv_valid is not None else counts, counts, indices,
        tile_order if tile_order is not None else counts, scale * LOG2E,
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1),
        indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1), indices.stride(2),
        H, SQ, SK, nq, num_tiles,
        HEAD_DIM=D, RETURN_LSE=bool(return_lse), HAS_Q_VALID=q_valid is not None, HAS_KV_VALID=kv_valid is not None,
        **sched.constexprs(), num_warps=4,
    )
    return out, lse


def compile_sm90(head_dim=128, return_lse=True, dtype="bf16", stages=None, pingpong=None, overlap=None, exp_emu=None,
                 valid=False, order=None):
    """Compile the kernel for sm_90 without a GPU (Triton's bundled ptxas) and return the compiled
    kernel (``.asm["cubin"]``, ``.metadata``); the schedule arguments and their defaults are the
    launcher's. The tests use it to check, on any machine, that this Triton still builds the kernel
    with the intended structure. Not under TRITON_INTERPRET=1."""
    constexprs = dict(HEAD_DIM=head_dim, RETURN_LSE=bool(return_lse), HAS_Q_VALID=bool(valid),
                      HAS_KV_VALID=bool(valid),
                      **Schedule.of(stages, None, pingpong, overlap, exp_emu, order).constexprs())
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    tile = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gdt)
    half = gl.NVMMASharedLayout.get_default_for([ROWS, head_dim], gdt)
    kinds = {"q_desc": f"tensordesc<{dtype}[{BLOCK}, {head_dim}],{tile!r}>",
             "o_desc": f"tensordesc<{dtype}[{ROWS}, {head_dim}],{half!r}>",
             "LSE": "*fp32", "COUNTS": "*i32", "INDICES": "*i32", "ORDER": "*i32", "qk_scale": "fp32",
             "Q_VALID": "*i32", "KV_VALID": "*i32", **dict.fromkeys(constexprs, "constexpr")}
    kinds["k_desc"] = kinds["v_desc"] = kinds["q_desc"]
    fn = _block_sparse_ws_kernel
    sig = {n: kinds.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
