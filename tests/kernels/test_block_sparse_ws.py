"""The warp-specialized Gluon kernel (kernels/dist_compact_kernels/block_sparse_ws.py).

On any machine: it compiles for sm_90 with the installed Triton (no GPU needed: Triton's own ptxas
builds the cubin), and its partitions get the register budgets and tensor-core instructions it was
written for. On a Hopper GPU: it matches the float64 oracle (output and LSE) on random per-head
masks with empty and full rows, batch 2 with a shared or per-batch index, cross attention,
strided inputs, head_dim 64/128, bf16/fp16, and `block_sparse_fwd` picks it by default; the
schedule knobs (ring depth, grid, consumer loop, tile order) give the same bits.
"""

import re
import subprocess
from pathlib import Path

import pytest
import torch

from dist_compact import BlockIndex
from dist_compact.reference import reference_block_sparse_attention, token_mask
from helpers import assert_close_to_golden, eager_lowp_attention

gluon = pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

import dist_compact_kernels as K  # noqa: E402
from dist_compact_kernels import block_sparse_ws as W  # noqa: E402
from dist_compact_kernels import dispatch as Dsp  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


_COMPILE = """
import json, subprocess, sys, traceback
from pathlib import Path
import triton
from dist_compact_kernels.block_sparse_ws import compile_sm90
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
out = []
for i, (D, variant) in enumerate(json.loads(sys.argv[2])):
    try:
        kern = compile_sm90(D, True, **variant)
        cubin = Path(sys.argv[1]) / f"k{i}.cubin"
        cubin.write_bytes(kern.asm["cubin"])
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        out.append(dict(shared=kern.metadata.shared, sass=sass))
    except Exception:
        out.append(dict(error=traceback.format_exc()))
print(json.dumps(out))
"""

VARIANTS = [(128, {}), (64, {}), (128, dict(overlap=False)), (128, dict(pingpong=True)),
            (128, dict(overlap=False, exp_emu=True)), (128, dict(valid=True)), (64, dict(valid=True, overlap=False)),
            (128, dict(order="longest")), (128, dict(valid=True, order="longest"))]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every variant below compiled for sm_90 by one child process (each compile is its own kernel; one
    interpreter start and Triton import for all of them): ``[{"shared", "sass"} or {"error"}]`` in order."""
    import json
    import os
    import sys

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton ships no cuobjdump")
    # compiled, not interpreted: a child process without TRITON_INTERPRET
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path_factory.mktemp("sm90")), json.dumps(VARIANTS)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("D,variant", VARIANTS)
def test_compiles_for_sm90_with_the_intended_structure(D, variant, compiled):
    got = compiled[VARIANTS.index((D, variant))]
    assert "error" not in got, got.get("error", "")[-3000:]
    sass = got["sass"]
    ops = re.findall(r"(HGMMA|USETMAXREG|UTMALDG|UTMASTG|LDL|STL)\b", sass)
    # two consumers, each D/16 k-steps of QK^T (64x128) and 128/16 of PV (64xD); the ping-pong loop
    # issues a row's first QK^T before the loop (one more copy of it), the overlapped loop also its
    # last PV after the loop
    overlap = variant.get("overlap", not variant.get("pingpong"))  # the launcher's default schedule
    qk_copies = 2 if (variant.get("pingpong") or overlap) else 1
    pv_copies = 2 if overlap else 1
    assert ops.count("HGMMA") == 2 * (qk_copies * D // 16 + pv_copies * 128 // 16)
    # PV takes P from registers (no shared-memory round trip): "HGMMA.64xDx16.F32.BF16 Rd, Ra, gdesc..."
    assert re.search(rf"HGMMA\.64x{D}x16\.F32\.BF16 R\d+, R\d+, gdesc", sass)
    assert "USETMAXREG" in ops, "no register reallocation between the partitions"
    assert "UTMALDG" in ops and "UTMASTG" in ops
    assert "LDL" not in ops and "STL" not in ops, "register spills"
    assert got["shared"] <= 227 * 1024
    # one wait per wgmma group (ptxas did not serialise the products: its C7513/C7514 fallback waits
    # after every k-step), and the overlapped loop waits for QK^T with PV still in flight
    assert sass.count("WARPGROUP.DEPBAR") == 2 * (qk_copies + pv_copies)
    assert ("WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass) == overlap
    # 64 exponentials of P per thread and key block (half of them on the FMA pipe with exp_emu), plus
    # the rescale factor, in each copy of the softmax (the overlapped loop peels the first one)
    ex2 = sass.count("MUFU.EX2") // (2 if overlap else 1)
    per_consumer = 32 if variant.get("exp_emu") else 64
    assert 2 * per_consumer <= ex2 <= 2 * (per_consumer + 4), ex2


def test_schedule_resolves_the_defaults_and_refuses_bad_combinations():
    # the default: the overlapped loop on a 3-deep ring (one Q buffer), one CTA per tile
    assert W.Schedule.of() == W.Schedule(stages=3, pingpong=False, overlap=True, exp_emu=False, persistent=False,
                                         order="natural")
    assert W.Schedule.of().constexprs() == dict(STAGES=3, QBUF=1, PINGPONG=False, OVERLAP=True, EXP_EMU=False,
                                                HAS_ORDER=False)
    assert W.Schedule.of(order="longest").constexprs()["HAS_ORDER"] is True
    # ping-pong turns the default overlap off; the serial loops default to STAGES (2: two Q buffers)
    assert W.Schedule.of(pingpong=True) == W.Schedule(2, True, False, False)
    assert W.Schedule.of(overlap=False).qbuf == 2 and W.Schedule.of(overlap=False, stages=3).qbuf == 1
    assert W.Schedule.of(persistent=3).grid(48, None) == 3 and W.Schedule.of().grid(48, None) == 48
    with pytest.raises(ValueError, match="pick one"):
        W.Schedule.of(pingpong=True, overlap=True)
    with pytest.raises(ValueError, match="stages must be 2 or 3, got 4"):
        W.Schedule.of(stages=4)
    with pytest.raises(ValueError, match=r"order must be one of \('natural', 'longest'\), got 'short'"):
        W.Schedule.of(order="short")
    with pytest.raises(AttributeError):
        W.Schedule.of().stages = 2  # frozen: one resolved schedule per launch


@pytest.mark.parametrize("index_batch", [1, 2])
def test_longest_first_order_is_a_permutation_by_descending_count(index_batch):
    Z, H, nq = 2, 3, 5
    counts = torch.randint(0, 6, (index_batch, H, nq), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    counts[0, 1, 2] = 9  # one long row (a text query block)
    assert W.Schedule.of().tile_order(counts, Z, H, nq) is None
    order = W.Schedule.of(order="longest").tile_order(counts, Z, H, nq)
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(Z * H * nq))
    flat = counts.expand(Z, H, nq).reshape(-1)  # tile t = (z * H + h) * nq + qb
    got = [(-int(flat[t]), t) for t in order.tolist()]
    assert got == sorted(got)  # longest first, ties in the natural order
    assert order[0] == 1 * nq + 2  # z = 0, h = 1, qb = 2


def _golden(q, k, v, idx, scale=None, q_valid=None, kv_valid=None):
    """(float64 golden out, golden LSE, PyTorch eager in the inputs' low precision) of one problem."""
    ref, ref_lse = reference_block_sparse_attention(q.double(), k.double(), v.double(), idx, scale=scale,
                                                    q_valid=q_valid, kv_valid=kv_valid)
    mask = token_mask(idx, q.shape[1], k.shape[1], q_valid, kv_valid)
    return ref, ref_lse, eager_lowp_attention(q, k, v, mask, scale)


# LSE: eager computes it in float32 (error ~1e-6), so the floor is the kernel's own float32 online
# sum with exp2 and the folded log2(e) scale
LSE_ATOL = 2e-3


def _index(B, H, nq, nk, density, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, nq, nk, generator=g) < density
    m[0, 0, 0] = False  # an empty row
    m[-1, -1, -1] = True  # a full row
    m[-1, -1, -1, :] = True
    return BlockIndex.from_dense(m, 128)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize(
    "B,SQ,SK,H,D,dtype,index_batch,lse",
    [
        (2, 1024, 1024, 3, 128, torch.bfloat16, 1, True),
        (2, 768, 1280, 2, 128, torch.float16, 2, True),
        (1, 1024, 1024, 4, 64, torch.bfloat16, 1, False),
        (1, 2048, 2048, 2, 128, torch.bfloat16, 1, True),
    ],
)
def test_matches_float64_oracle(B, SQ, SK, H, D, dtype, index_batch, lse):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(SQ + SK + D)
    # q/k/v as strided views of one packed qkv tensor when the shapes agree (the layout of a fused
    # projection), contiguous otherwise
    if SQ == SK:
        qkv = torch.randn(B, SQ, 3, H, D, device=dev, generator=g).to(dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(B, SQ, H, D, device=dev, generator=g).to(dtype)
        k, v = (torch.randn(B, SK, H, D, device=dev, generator=g).to(dtype) for _ in range(2))
    idx = _index(index_batch, H, SQ // 128, SK // 128, 0.3, seed=D).to(dev)
    assert Dsp.ws_supported(q, k, v, 128)
    out, lse_got = K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, D ** -0.5, return_lse=lse,
                                      impl="ws")
    ref, ref_lse, eager = _golden(q, k, v, idx)
    assert_close_to_golden(out, ref, eager, k=3.0, atol=1e-3)
    # the empty row is exactly zero, with LSE -inf
    assert (out[0, :128, 0] == 0).all()
    if lse:
        assert torch.isneginf(lse_got[0, 0, :128]).all()
        fin = torch.isfinite(ref_lse)
        assert torch.equal(fin, torch.isfinite(lse_got))
        assert_close_to_golden(lse_got[fin], ref_lse[fin], atol=LSE_ATOL, what="lse")
    else:
        assert lse_got is None
    # the Triton kernel is within the same bound
    out_t, _ = K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, D ** -0.5, return_lse=True, impl="triton")
    assert_close_to_golden(out_t, ref, eager, k=3.0, atol=1e-3, what="triton output")


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_auto_dispatch_and_fallbacks(monkeypatch):
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 512, 2, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    idx = _index(1, 2, 4, 4, 0.5, seed=1).to(dev)
    calls = []
    real = W.block_sparse_fwd_ws
    monkeypatch.setattr(W, "block_sparse_fwd_ws", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, 0.1)
    assert calls == [1]
    # valid counts run there too; tuning arguments or fp32 -> the Triton kernel
    valid = torch.tensor([128, 100, 128, 1], dtype=torch.int32, device=dev)
    K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, 0.1, q_valid=valid, kv_valid=valid)
    assert calls == [1, 1]
    K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, 0.1, num_stages=3)
    K.block_sparse_fwd(q.float(), k.float(), v.float(), idx.counts, idx.indices, 128, 0.1)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="warp-specialized kernel cannot run"):
        K.block_sparse_fwd(q.float(), k.float(), v.float(), idx.counts, idx.indices, 128, 0.1, impl="ws")


def test_supported_refuses_what_it_cannot_run():
    cpu = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    assert W.shapes_ok(cpu, cpu, cpu, 128)
    assert not Dsp.ws_supported(cpu, cpu, cpu, 128)  # not a Hopper GPU
    # q/k/v as views of a packed [B, S, 3, H, D] projection: rows strided by 3*H*D, still TMA-able
    q, k, v = torch.zeros(2, 384, 3, 4, 64, dtype=torch.float16).unbind(2)
    assert W.shapes_ok(q, k, v, 128)
    # per-block valid counts: one contiguous int32 per block
    two = torch.full((2,), 100, dtype=torch.int32)
    assert W.shapes_ok(cpu, cpu, cpu, 128, q_valid=two, kv_valid=two)
    bad = {
        "block size 64": (cpu, cpu, cpu, 64, {}),
        "fp32": (cpu.float(), cpu.float(), cpu.float(), 128, {}),
        "mixed dtypes": (cpu, cpu.half(), cpu, 128, {}),
        "head_dim 96": (torch.zeros(1, 256, 2, 96, dtype=torch.bfloat16),) * 3 + (128, {}),
        "seq_q not whole blocks": (torch.zeros(1, 200, 2, 128, dtype=torch.bfloat16), cpu, cpu, 128, {}),
        "seq_k not whole blocks": (cpu, torch.zeros(1, 300, 2, 128, dtype=torch.bfloat16),
                                   torch.zeros(1, 300, 2, 128, dtype=torch.bfloat16), 128, {}),
        "heads not packed": (cpu.transpose(1, 2).contiguous().transpose(1, 2), cpu, cpu, 128, {}),
        "int64 valid counts": (cpu, cpu, cpu, 128, {"q_valid": two.long()}),
        "valid counts of another length": (cpu, cpu, cpu, 128, {"kv_valid": two[:1]}),
        "strided valid counts": (cpu, cpu, cpu, 128, {"kv_valid": torch.zeros(4, dtype=torch.int32)[::2]}),
        # batches not evenly spaced: the [Z*S, H*D] view would read the wrong rows
        "batch gap": (torch.zeros(2, 512, 2, 128, dtype=torch.bfloat16)[:, :256],) * 3 + (128, {}),
    }
    for why, (a, b, c, bs, kw) in bad.items():
        assert not W.shapes_ok(a, b, c, bs, **kw), why
    with pytest.raises(ValueError, match="impl must be"):
        K.block_sparse_fwd(cpu, cpu, cpu, None, None, 128, 0.1, impl="fast")


def _variant_problem(seed):
    # 2 x 3 x 8 = 48 query tiles at density 0.4 with an empty and a full row
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(2, 1024, 3, 128, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))
    idx = _index(2, 3, 8, 8, 0.4, seed=seed + 1).to(dev)
    run = lambda **kw: K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, 0.088, impl="ws", **kw)
    return (q, k, v, idx), run


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# The ring depth, the grid and ping-pong turns change when things happen, not what is computed: for
# each consumer loop (overlapped, serial) outputs and LSE are equal bit for bit.
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("overlap", [True, False])
def test_three_stage_ring_matches_two_stage(overlap):
    _, run = _variant_problem(3)
    assert _same(run(ws_stages=3, ws_overlap=overlap), run(ws_stages=2, ws_overlap=overlap))


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("stages,overlap", [(2, False), (3, False), (2, True), (3, True)])
def test_persistent_walk_matches_one_cta_per_tile(stages, overlap):
    # 3 CTAs over 48 tiles: each walks 16 tiles, so the Q buffer(s) and the K/V ring turn over many
    # times (empty rows included); the result must not depend on the grid
    _, run = _variant_problem(4)
    ref = run(ws_persistent=False, ws_overlap=overlap)
    assert _same(run(ws_stages=stages, ws_persistent=3, ws_overlap=overlap), ref)
    assert _same(run(ws_stages=stages, ws_persistent=True, ws_overlap=overlap), ref)


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("kw", [dict(), dict(ws_persistent=3), dict(ws_overlap=False, ws_stages=2)])
def test_longest_first_order_matches_the_natural_order(kw):
    # the order changes when a tile starts, not what it computes: equal bit for bit, per-batch index
    (q, k, v, idx), run = _variant_problem(5)
    assert not torch.equal(idx.counts[0], idx.counts[1])
    assert _same(run(ws_order="longest", **kw), run(ws_order="natural", **kw))


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("persistent", [False, 3])
def test_pingpong_consumers_match(persistent):
    (q, k, v, idx), run = _variant_problem(7)
    got = run(ws_pingpong=True, ws_persistent=persistent)
    assert _same(got, run(ws_pingpong=False, ws_overlap=False))
    oracle, _, eager = _golden(q, k, v, idx, scale=0.088)
    assert_close_to_golden(got[0], oracle, eager, k=3.0, atol=1e-3)


# The overlapped loop issues PV(j-1) after QK^T(j) but performs the same operations on the accumulator
# in the same order as the serial loop (rescale by alpha_j, then add P_j V_j): equal bit for bit, with
# either ring depth and grid.
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("kw", [dict(), dict(ws_overlap=True, ws_stages=2), dict(ws_overlap=True, ws_persistent=3),
                                dict(ws_persistent=True)])
def test_overlapped_loop_equals_the_serial_loop(kw):
    _, run = _variant_problem(8)
    assert _same(run(**kw), run(ws_overlap=False))
    with pytest.raises(ValueError, match="pick one"):
        run(ws_overlap=True, ws_pingpong=True)


# The FMA-pipe exponentials round differently (every second one is a polynomial): checked against the
# float64 oracle (output and LSE) and within bf16 rounding of the default.
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("overlap", [False, True])
def test_fma_pipe_exponentials_match_the_oracle(overlap):
    (q, k, v, idx), run = _variant_problem(8)
    out, lse = run(ws_exp_emu=True, ws_overlap=overlap)
    ref_out, _ = run()
    oracle, oracle_lse, eager = _golden(q, k, v, idx, scale=0.088)
    assert_close_to_golden(out, oracle, eager, k=3.0, atol=1e-3)
    assert_close_to_golden(ref_out, oracle, eager, k=3.0, atol=1e-3, what="default exponentials")
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_to_golden(lse[finite], oracle_lse[finite], atol=LSE_ATOL, what="lse")
    assert not torch.equal(out, ref_out)  # the polynomial really ran


# Padding inside blocks (text tokens, ragged tiles): padded keys masked, padded V rows zeroed in shared
# memory (here they hold NaN and inf, as uninitialised padding may), padded query rows 0 / -inf; a key
# block with no valid key, a query block with none, and rows whose only keys are padding.
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("kw", [dict(), dict(ws_overlap=False), dict(ws_exp_emu=True), dict(ws_persistent=3),
                                dict(ws_order="longest")])
def test_valid_counts_match_the_oracle(kw):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11)
    B, H, nb = 2, 3, 6
    q, k, v = (torch.randn(B, nb * 128, H, 128, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))
    valid = torch.tensor([128, 77, 0, 128, 1, 64], dtype=torch.int32, device=dev)
    idx = _index(1, H, nb, nb, 0.6, seed=12)
    idx.counts[0, 0, 1] = 1
    idx.indices[0, 0, 1, 0] = 2  # a row whose only key block has no valid key
    idx = idx.to(dev)
    pad = torch.arange(128, device=dev)[None, :] >= valid[:, None]  # [nb, 128]
    pad = pad.reshape(1, nb * 128, 1, 1)
    oracle, oracle_lse, eager = _golden(q.masked_fill(pad, 0), k.masked_fill(pad, 0), v.masked_fill(pad, 0), idx,
                                        scale=0.088, q_valid=valid, kv_valid=valid)
    qp, kp = q.masked_fill(pad, float("nan")), k.masked_fill(pad, float("inf"))
    vp = v.masked_fill(pad, float("nan"))
    vp[:, 128 + 77] = float("inf")
    out, lse = K.block_sparse_fwd(qp, kp, vp, idx.counts, idx.indices, 128, 0.088, q_valid=valid, kv_valid=valid,
                                  impl="ws", **kw)
    assert torch.isfinite(out).all()
    assert_close_to_golden(out, oracle, eager, k=3.0, atol=1e-3)
    assert (out.masked_select(pad.expand_as(out)) == 0).all()  # padded query rows
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_to_golden(lse[finite], oracle_lse[finite], atol=LSE_ATOL, what="lse")
    tri, _ = K.block_sparse_fwd(qp, kp, vp, idx.counts, idx.indices, 128, 0.088, q_valid=valid,
                                kv_valid=valid, impl="triton")
    assert_close_to_golden(tri, oracle, eager, k=3.0, atol=1e-3, what="triton output")
    with pytest.raises(ValueError, match="ping-pong"):
        K.block_sparse_fwd(q, k, v, idx.counts, idx.indices, 128, 0.088, q_valid=valid, impl="ws", ws_pingpong=True)


def test_measured_dense_threshold():
    from dist_compact import ops
    from dist_compact.sparsity.config import SparsityConfig

    assert ops.measured_dense_threshold(torch.device("cpu"), torch.bfloat16, 128, 128) == 1.0
    # the schedule's default is the measured Triton crossover, kept at 0.75 (published figures)
    assert SparsityConfig().dense_threshold == ops.TRITON_DENSE_CROSSOVER == 0.75
    if HOPPER:
        dev = torch.device("cuda")
        assert ops.measured_dense_threshold(dev, torch.bfloat16, 128, 128) == 1.0
        assert ops.measured_dense_threshold(dev, torch.bfloat16, 128, 64) == ops.TRITON_DENSE_CROSSOVER
        assert ops.measured_dense_threshold(dev, torch.float32, 128, 128) == 1.0


def test_a_gluon_build_failure_falls_back_once_then_errors_propagate(monkeypatch):
    import types

    from triton.compiler.errors import CompilationError

    monkeypatch.setattr(Dsp, "_WS", [W])
    monkeypatch.setattr(Dsp, "_WS_BUILT", [])

    def broken(*a, **kw):
        raise CompilationError("src", None, "a Gluon API this kernel does not know")

    fake = types.SimpleNamespace(block_sparse_fwd_ws=broken)
    # forced ("ws"): the error surfaces
    with pytest.raises(CompilationError):
        Dsp._run_ws(fake, (), {}, auto=False)
    # auto, never built: a warning, the module is switched off, the caller falls back
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert Dsp._run_ws(fake, (), {}, auto=True) is None
    assert Dsp._WS == [None] and Dsp._ws_module() is None
    # once the kernel has run in this process, a later failure is a real error, not a fallback
    ok = types.SimpleNamespace(block_sparse_fwd_ws=lambda *a, **kw: "out")
    assert Dsp._run_ws(ok, (), {}, auto=True) == "out"
    with pytest.raises(CompilationError):
        Dsp._run_ws(fake, (), {}, auto=True)
    # other errors (bad input, a crash) are never swallowed
    with pytest.raises(ValueError):
        Dsp._run_ws(types.SimpleNamespace(block_sparse_fwd_ws=lambda *a, **kw: (_ for _ in ()).throw(ValueError())),
                  (), {}, auto=True)
