"""Block-sparse forward: ours vs FlexAttention (same block mask) vs SDPA-cuDNN dense, side by side.

Run on a GPU from the repository root:

    PYTHONPATH=.:kernels python benchmarks/kernel_bench.py --csv $OUT/kernel.csv

For every shape and density it first checks every variant against a float64 reference on sampled
(head, query block) rows (fresh random inputs, output poisoned with NaN before the run), then times
it with ``triton.testing.do_bench`` (median). Effective TFLOP/s counts computed blocks only:
``4 * B * H * S * S * d * density / time``. Masks are 3D block windows (|dt|<=wt, |dh|<=wh, |dw|<=ww on
a grid of blocks), the pattern family Compact Attention produces.
"""

from __future__ import annotations

import argparse
import json
import itertools
import math
import sys

import torch

from common import write_csv

SHAPES = {
    # name: (S, H, block grid (t, h, w) with t*h*w*128 == S)
    "hunyuan_video": (118_784, 24, (29, 4, 8)),
    "wan": (32_768, 40, (16, 4, 4)),
}


def window_mask(grid, wt, wh, ww, device):
    t, h, w = grid
    b = torch.arange(t * h * w, device=device)
    bt, bh, bw = b // (h * w), (b // w) % h, b % w
    m = ((bt[:, None] - bt[None, :]).abs() <= wt) & ((bh[:, None] - bh[None, :]).abs() <= wh) & (
        (bw[:, None] - bw[None, :]).abs() <= ww
    )
    return m


def _axis_share(n, w):
    """Share of pairs (i, j) in [0, n)^2 with |i - j| <= w."""
    i = torch.arange(n)
    return ((i[:, None] - i[None, :]).abs() <= w).double().mean().item()


def window_for_density(grid, target, device):
    """The 3D window (wt, wh, ww) whose block density is closest to target (the density factorises)."""
    t, h, w = grid
    best = None
    for wt, wh, ww in itertools.product(range(t), range(h), range(w)):
        d = _axis_share(t, wt) * _axis_share(h, wh) * _axis_share(w, ww)
        if best is None or abs(d - target) < abs(best[0] - target):
            best = (d, (wt, wh, ww))
    return best


def check_rows(out, q, k, v, dense_mask, bs, heads, qblocks, scale):
    """Max relative error of out vs a float64 reference on the sampled (head, query block) rows."""
    errs = []
    for h in heads:
        for qb in qblocks:
            rows = slice(qb * bs, (qb + 1) * bs)
            keep = dense_mask[qb].nonzero().squeeze(1)
            cols = (keep[:, None] * bs + torch.arange(bs, device=q.device)).reshape(-1)
            qq = q[0, rows, h].double()
            kk = k[0, cols, h].double()
            vv = v[0, cols, h].double()
            p = torch.softmax(qq @ kk.T * scale, dim=-1)
            ref = p @ vv
            got = out[0, rows, h].double()
            if torch.isnan(got).any():
                return float("nan")
            errs.append(((got - ref).norm() / ref.norm()).item())
    return max(errs)


def mass_rows(rows, shape, q, k, v, bs, scale, ms_cudnn, rep):
    """Time the pieces of a fused online search: dense pass with LSE (ours, cuDNN) and block mass."""
    import triton

    from dist_compact import BlockIndex, block_attention_mass, block_sparse_attention
    from dist_compact.reference import reference_block_mass

    B, S, H, D = q.shape
    nb = S // bs
    full = BlockIndex.full(1, H, nb, nb, bs, device=q.device)
    _, lse = block_sparse_attention(q, k, v, full, return_lse=True)
    # cuDNN dense attention returning the LSE (a private ATen op; checked against our LSE here)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    try:
        f = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                        scale=scale)
        res = f()
        lse_c = res[1].reshape(B, H, S)
        err = (lse_c.float() - lse).abs().max().item()
        ms = triton.testing.do_bench(f, warmup=25, rep=rep, return_mode="median")
        rows.append(dict(shape=shape, impl="cudnn_dense_with_lse", density=1.0, ms=ms,
                         tflops=4.0 * H * S * S * D / ms / 1e9, err=err, speedup_vs_cudnn=ms_cudnn / ms))
        print(f"{shape:8s} cudnn+lse      {ms:8.2f} ms  max|lse - ours| = {err:.2e} lse shape {tuple(res[1].shape)}",
              flush=True)
    except Exception as e:
        print(f"{shape} cudnn+lse FAILED: {type(e).__name__}: {e}", flush=True)
    mass = block_attention_mass(q, k, lse, bs)
    # check sampled rows against the float64 reference
    hs = [0, H - 1]
    r0 = (nb // 2) * bs
    ref = reference_block_mass(q[:, r0:r0 + bs, hs].double(), k[:, :, hs].double(), lse[:, hs, r0:r0 + bs].double(), bs)
    err = (mass[:, hs, nb // 2: nb // 2 + 1] - ref).abs().max().item()
    rowsum = mass.sum(-1)
    ms = triton.testing.do_bench(lambda: block_attention_mass(q, k, lse, bs), warmup=25, rep=rep, return_mode="median")
    rows.append(dict(shape=shape, impl="block_mass", density=1.0, ms=ms, tflops=2.0 * H * S * S * D / ms / 1e9,
                     err=err, speedup_vs_cudnn=ms_cudnn / ms))
    print(f"{shape:8s} block_mass     {ms:8.2f} ms ({ms / ms_cudnn:.2f} x cuDNN dense) err={err:.2e} "
          f"row sums in [{rowsum.min().item():.4f}, {rowsum.max().item():.4f}]", flush=True)


def parse_variants(text: str) -> dict:
    """``--variants`` -> {name: None (block_sparse_attention) or block_sparse_fwd keyword arguments}."""
    if text == "default":
        return {"ours": None}
    variants = {}
    for spec in text.split(","):
        name, cfg = spec.split("=")
        if cfg == "auto":  # block_sparse_attention with its defaults (dense dispatch included)
            variants[name] = None
            continue
        kind, *rest = cfg.split(":")
        if kind in ("ws", "triton"):  # a whole kernel with its own defaults, ws switches after colons
            variants[name] = dict(impl=kind)
            for r in rest:
                if r.isdigit():
                    variants[name]["ws_stages"] = int(r)
                elif r in ("grid", "persistent"):
                    variants[name]["ws_persistent"] = r == "persistent"
                elif r in ("pp", "nopp"):
                    variants[name]["ws_pingpong"] = r == "pp"
                elif r in ("ov", "noov"):
                    variants[name]["ws_overlap"] = r == "ov"
                elif r in ("emu", "noemu"):
                    variants[name]["ws_exp_emu"] = r == "emu"
                elif r in ("longest", "natural"):
                    variants[name]["ws_order"] = r
                else:
                    raise ValueError(f"variant {name}: unknown ws option {r!r}")
            continue
        bn, nw, ns = (int(x) for x in [kind] + rest[:2])
        flags = set(rest[2:])
        if flags - {"tma"}:
            raise ValueError(f"variant {name}: unknown flags {sorted(flags - {'tma'})} (known: tma)")
        variants[name] = dict(block_n=bn, num_warps=nw, num_stages=ns, use_tma="tma" in flags, impl="triton")
    return variants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="hunyuan_video,wan")
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.19,0.12")
    ap.add_argument("--variants", default="default",
                    help="comma list of name=BN:warps:stages[:tma] (the Triton kernel; tma: K/V through tensor "
                         "descriptors), name=ws (the warp-specialized Gluon kernel; ws:2/ws:3 K/V stages, ws:grid one "
                         "CTA per tile, ws:persistent, ws:pp ping-pong consumers, ws:ov softmax overlapped with the previous PV, "
                         "ws:emu half the exponentials on the FMA pipe, ws:longest tiles with the most key blocks "
                         "first), name=triton (Triton kernel defaults), name=auto (block_sparse_attention), or 'default' (= ours=auto)")
    ap.add_argument("--mass", action="store_true", help="also time block_attention_mass and cuDNN dense+LSE")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--list-variants", action="store_true", help="print the parsed --variants as JSON and exit")
    args = ap.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if args.list_variants:
        print(json.dumps(variants))
        return 0

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dist_compact import BlockIndex, block_sparse_attention
    import dist_compact_kernels as K

    assert torch.cuda.is_available(), "kernel_bench needs a GPU"
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    rows = []
    bs, D = 128, 128
    for shape in args.shapes.split(","):
        S, H, grid = SHAPES[shape]
        nb = S // bs
        assert grid[0] * grid[1] * grid[2] == nb
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        dense_flops = 4.0 * H * S * S * D
        # dense baseline: SDPA cuDNN
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            f_cudnn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)
            o = f_cudnn().transpose(1, 2)
            full = torch.ones(nb, nb, dtype=torch.bool, device=dev)
            err = check_rows(o, q, k, v, full, bs, [0, H - 1], [0, nb // 2, nb - 1], scale)
            ms_cudnn = triton.testing.do_bench(f_cudnn, warmup=25, rep=args.rep, return_mode="median")
        rows.append(dict(shape=shape, impl="sdpa_cudnn", density=1.0, ms=ms_cudnn,
                         tflops=dense_flops / ms_cudnn / 1e9, err=err, speedup_vs_cudnn=1.0))
        print(f"{shape:8s} sdpa_cudnn     d=1.000 {ms_cudnn:8.2f} ms {dense_flops / ms_cudnn / 1e9:6.0f} TF/s err={err:.2e}", flush=True)
        for target in [float(x) for x in args.densities.split(",")]:
            if target >= 1.0:
                mask = torch.ones(nb, nb, dtype=torch.bool, device=dev)
                win = None
            else:
                _, win = window_for_density(grid, target, dev)
                mask = window_mask(grid, *win, dev)
            dens = mask.float().mean().item()
            index = BlockIndex.from_dense(mask.view(1, 1, nb, nb).expand(1, H, nb, nb).contiguous(), bs)
            flops = dense_flops * dens
            qbs = [0, nb // 3, nb - 1]
            for name, cfg in variants.items():
                if cfg is None:
                    fn = lambda: block_sparse_attention(q, k, v, index)
                else:
                    fn = lambda: K.block_sparse_fwd(q, k, v, index.counts, index.indices, bs, scale, return_lse=False,
                                                    **cfg)[0]
                try:
                    fn()  # compile
                    torch.cuda.synchronize()
                    # poison: free a NaN-filled buffer of the output's size so the allocator hands it
                    # to the next output; unwritten elements then show up as NaN in the check
                    poison = torch.full_like(q, float("nan"))
                    del poison
                    out = fn()
                    err = check_rows(out, q, k, v, mask, bs, [0, H - 1], qbs, scale)
                    ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
                except Exception as e:  # report, keep going
                    print(f"{shape} {name} d={dens:.3f} FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                rows.append(dict(shape=shape, impl=name, density=dens, ms=ms, tflops=flops / ms / 1e9, err=err,
                                 speedup_vs_cudnn=ms_cudnn / ms))
                print(f"{shape:8s} {name:14s} d={dens:.3f} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TF/s "
                      f"x{ms_cudnn / ms:5.2f} vs cudnn err={err:.2e} win={win}", flush=True)
            if flex is not None:
                bm = index.to_block_mask(S, S)
                ff = lambda: flex(qt, kt, vt, block_mask=bm, scale=scale)
                try:
                    o = ff().transpose(1, 2)
                    err = check_rows(o, q, k, v, mask, bs, [0, H - 1], qbs, scale)
                    ms = triton.testing.do_bench(ff, warmup=25, rep=args.rep, return_mode="median")
                    rows.append(dict(shape=shape, impl="flex", density=dens, ms=ms, tflops=flops / ms / 1e9,
                                     err=err, speedup_vs_cudnn=ms_cudnn / ms))
                    print(f"{shape:8s} {'flex':14s} d={dens:.3f} {ms:8.2f} ms {flops / ms / 1e9:6.0f} TF/s "
                          f"x{ms_cudnn / ms:5.2f} vs cudnn err={err:.2e}", flush=True)
                except Exception as e:
                    print(f"{shape} flex d={dens:.3f} FAILED: {type(e).__name__}: {e}", flush=True)
        if args.mass:
            mass_rows(rows, shape, q, k, v, bs, scale, ms_cudnn, args.rep)
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()

    print("\n| shape | impl | density | ms | eff. TFLOP/s | x vs cuDNN dense | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['density']:.3f} | {r['ms']:.2f} | {r['tflops']:.0f} | "
              f"{r['speedup_vs_cudnn']:.2f} | {r['err']:.1e} |")
    write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
