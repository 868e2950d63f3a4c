"""Cost of AdaSpa's online search and its share of a 50-step schedule.

Run on a GPU from the repository root (HunyuanVideo 720p shape: S = 118,784, H = 24, d = 128, bf16,
block 128 = tile (2, 8, 8) on a 58 x 32 x 64 latent grid, 928 blocks):

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/search_overhead.py --csv $OUT/search_overhead.csv

At the GPU-scale embedded model's shape (its guidance pair of 2 clips shares one index; 129 blocks, 4 heads):

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/search_overhead.py --grid 16 32 32 --tile 2 8 8 --text 12 \
        --text-position after --heads 4 --batch 2 --query-rows 32 --steps 20

or on a CPU in seconds (tiny shape, PyTorch backend; checks that the script runs, timings mean little):

    python benchmarks/search_overhead.py --small

Timed (``triton.testing.do_bench`` median on CUDA, mean of ``--cpu-reps`` calls on CPU), all through
the code a run uses (:class:`~dist_compact.sparsity.attention.SparseAttention`, ``AttentionOps``):

* ``dense_sdpa``       a dense step: ``ops.dense`` (SDPA; cuDNN forced on CUDA);
* ``dense_lse``        the dense pass of a fused search (``ops.dense(return_lse=True)``);
* ``block_mass[rows]`` the block mass, exact and with ``rows`` sampled query rows per block;
* ``select``           :func:`~dist_compact.sparsity.online.online_select` (top-k at density 0.2 with the
  paper's head rule, text sink, statistics, BlockIndex build);
* ``sparse``           ``ops.attention`` with the searched index (density ~0.2);
* ``fused_search`` / ``cached_search`` / ``reuse``: whole ``SparseAttention`` calls at a fused-search
  step, an LSE-cached-search step and a reuse step.

Then the 50-step estimate with searches at {10, 30}: 10 dense steps, one fused search, one cached
search, 38 reuse steps. ``search_share`` = time of the two search calls / all attention time;
``overhead_share`` = (block mass + selection) x 2 / all attention time: the work the searches add on
top of producing their steps' outputs (goal <= 3%). One row per block-mass variant (exact and
sampled rows), each measured through whole ``SparseAttention`` calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import write_csv


def _bench(fn, device, rep_ms, cpu_reps):
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
    fn()
    t0 = time.perf_counter()
    for _ in range(cpu_reps):
        fn()
    return (time.perf_counter() - t0) / cpu_reps * 1e3


def count_select_ops(mass, layout, cfg):
    """(tensor ops, values read back to the host) of one ``online_select`` on CPU tensors: on a GPU each op is
    a kernel launch and each read waits for the device's queue. Counted at the dispatcher (after one call
    that fills the caches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_compact.sparsity.attention_ops import AttentionOps
    from dist_compact.sparsity.online import online_select

    class Count(TorchDispatchMode):
        ops = reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    ops = AttentionOps(backend="torch")
    online_select(mass, layout, ops, cfg)
    with Count():
        online_select(mass, layout, ops, cfg)
    return Count.ops, Count.reads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny CPU shape (smoke run)")
    ap.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"))
    ap.add_argument("--tile", type=int, nargs=3, default=None, metavar=("t", "h", "w"))
    ap.add_argument("--text", type=int, default=0, help="text tokens")
    ap.add_argument("--text-position", choices=["before", "after"], default="after",
                    help="text tokens before or after the video tokens in the model's order")
    ap.add_argument("--batch", type=int, default=1,
                    help="clips per call (2: a guidance pair, one index shared by the batch)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--query-rows", default="none,64,32,16", help="block-mass variants: none = exact")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dense-threshold", type=float, default=None,
                    help="SparsityConfig.dense_threshold (default its own; the GPU models' configs use 1.0)")
    ap.add_argument("--count-ops", action="store_true",
                    help="only count, on the CPU, the tensor ops of one selection at this shape (random block mass) "
                         "and the values it reads back to the host; no timings")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) on CUDA")
    ap.add_argument("--cpu-reps", type=int, default=2)
    ap.add_argument("--csv", default=None, help="CSV path (default $OUT/search_overhead.csv when $OUT is set)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")

    from dist_compact import VideoLayout
    from dist_compact.sparsity.attention import SparseAttention
    from dist_compact.sparsity.context import AttentionContext
    from dist_compact.sparsity.attention_ops import AttentionOps
    from dist_compact.sparsity.config import SparsityConfig
    from dist_compact.ops import block_attention_mass
    from dist_compact.sparsity.online import online_select

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    if args.small:
        grid, tile, H, D, dtype = (4, 16, 16), (2, 4, 4), 4, 32, torch.float32
    else:
        grid, tile, H, D, dtype = (58, 32, 64), (2, 8, 8), 24, 128, torch.bfloat16
    grid = tuple(args.grid) if args.grid else grid
    tile = tuple(args.tile) if args.tile else tile
    H = args.heads or H
    D = args.head_dim or D
    if args.dtype:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    layout = VideoLayout(*grid, tile=tile, text_tokens=args.text, text_position=args.text_position)
    S, bs = layout.padded_len, layout.block_size
    ops = AttentionOps(backend="auto" if cuda else "torch")
    info = (f"{torch.cuda.get_device_name()} " if cuda else "CPU ") + f"torch {torch.__version__}"
    try:
        import triton

        info += f" triton {triton.__version__}"
    except ImportError:
        pass
    print(f"# {info}\n# {layout}, batch {args.batch}, H={H}, d={D}, {dtype}, sparsity {args.sparsity}", flush=True)

    if args.count_ops:
        cfg = SparsityConfig(sparsity=args.sparsity, mass_query_rows=None, **(
            {} if args.dense_threshold is None else {"dense_threshold": args.dense_threshold}))
        mass = torch.rand(args.batch, H, layout.num_blocks, layout.num_blocks, generator=torch.Generator().manual_seed(0))
        n_ops, reads = count_select_ops(mass, layout, cfg)
        print(f"# selection on the CPU: {n_ops} tensor ops, {reads} values read back to the host", flush=True)
        return [n_ops]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(args.batch, S, H, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    # the calls are timed at steps of the 50-step frame their search steps are given in; --steps only sets
    # the schedule of the estimate below
    ctx_of = lambda step: AttentionContext(layout=layout, step=step, num_steps=50, ops=ops)
    timings = {}

    def timed(name, fn):
        ms = _bench(fn, device, args.rep, args.cpu_reps)
        timings[name] = ms
        print(f"{name:22s} {ms:10.3f} ms", flush=True)
        return ms

    torch.set_grad_enabled(False)
    cudnn = None
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cudnn = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    if cudnn is not None:
        with cudnn():
            timed("dense_sdpa", lambda: ops.dense(q, k, v, layout))
    else:
        timed("dense_sdpa", lambda: ops.dense(q, k, v, layout))
    timed("dense_lse", lambda: ops.dense(q, k, v, layout, return_lse=True))
    _, lse = ops.dense(q, k, v, layout, return_lse=True)

    variants = [None if x.strip().lower() == "none" else int(x) for x in args.query_rows.split(",")]
    variants = [r for r in variants if r is None or r <= bs]
    bv = layout.block_valid(device)
    for rows in variants:
        timed(f"block_mass[{rows or 'all'}]",
              lambda r=rows: block_attention_mass(q, k, lse, bs, block_valid=bv, query_rows=r, backend=ops.backend))

    # a fused search (searches at 10, 30, 40 so the LSE stays cached for repeated step-30 calls)
    # mass_query_rows=None: these calls measure the exact block mass; sampled variants are set below
    base = dict(sparsity=args.sparsity, search_steps=(10, 30, 40), search_kinds=("fused", "cached", "cached"),
                mass_query_rows=None)
    if args.dense_threshold is not None:
        base["dense_threshold"] = args.dense_threshold
    cfg = SparsityConfig(**base)
    mass = ops.block_mass(q, k, lse, layout)
    timed("select", lambda: online_select(mass, layout, ops, cfg))
    res = online_select(mass, layout, ops, cfg)
    print(f"# searched index: {res.index}", flush=True)
    timed("sparse", lambda: ops.attention(q, k, v, res.index, layout))

    attn = SparseAttention(0, cfg)
    timed("fused_search", lambda: attn(q, k, v, ctx_of(10)))
    timed("cached_search", lambda: attn(q, k, v, ctx_of(30)))
    timed("reuse", lambda: attn(q, k, v, ctx_of(31)))
    density = attn.index.density()

    sched = SparsityConfig(sparsity=args.sparsity).schedule(args.steps)
    n_dense = sched.dense_steps
    n_searches = len(sched.searches)
    n_reuse = args.steps - n_dense - n_searches
    print(f"\n# {args.steps}-step schedule: {n_dense} dense, searches {sched.searches}, {n_reuse} reuse; "
          f"index density {density:.3f}")
    header = ["shape", "device", "query_rows", "dense_ms", "dense_lse_ms", "block_mass_ms", "select_ms", "sparse_ms",
              "fused_search_ms", "cached_search_ms", "total_attention_ms", "search_share", "overhead_share"]
    print(f"{'mass rows':>9s} {'fused ms':>10s} {'cached ms':>10s} {'total ms':>12s} {'search %':>9s} {'overhead %':>10s}")
    out_rows = []
    for rows in variants:
        mass_ms = timings[f"block_mass[{rows or 'all'}]"]
        if rows is None:
            fused, cached = timings["fused_search"], timings["cached_search"]
        else:
            a = SparseAttention(0, SparsityConfig(**{**base, "mass_query_rows": rows}))
            fused = _bench(lambda: a(q, k, v, ctx_of(10)), device, args.rep, args.cpu_reps)
            cached = _bench(lambda: a(q, k, v, ctx_of(30)), device, args.rep, args.cpu_reps)
        search_types = [kind for _, kind in sched.searches]
        search_ms = sum(fused if kind == "fused" else cached for kind in search_types)
        total = n_dense * timings["dense_sdpa"] + search_ms + n_reuse * timings["reuse"]
        overhead = n_searches * (mass_ms + timings["select"])
        row = dict(shape=f"B={q.shape[0]} S={S} H={H} d={D} {str(dtype).replace('torch.', '')}", device=info,
                   query_rows=rows or "all", dense_ms=timings["dense_sdpa"], dense_lse_ms=timings["dense_lse"],
                   block_mass_ms=mass_ms, select_ms=timings["select"], sparse_ms=timings["reuse"],
                   fused_search_ms=fused, cached_search_ms=cached, total_attention_ms=total,
                   search_share=search_ms / total, overhead_share=overhead / total)
        out_rows.append(row)
        print(f"{str(rows or 'all'):>9s} {fused:10.2f} {cached:10.2f} {total:12.1f} {100 * search_ms / total:8.2f}% "
              f"{100 * overhead / total:9.2f}%")
    path = args.csv or (os.path.join(os.environ["OUT"], "search_overhead.csv") if os.environ.get("OUT") else None)
    if write_csv(path, out_rows, header):
        print(f"# wrote {path}")
    return out_rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
