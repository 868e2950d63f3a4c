"""One launch of the block-sparse forward at a kernel_bench shape and density, for a profiler.

Nsight Compute on the device (clocks left alone, the second launch is the measured one):

    PYTHONPATH=.:kernels ncu --clock-control none -k regex:block_sparse --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_ws.py --shape hunyuan_video --density 0.5 --variant ws:ov

``--variant`` takes kernel_bench's spec syntax (``ws``, ``ws:ov``, ``ws:emu``, ``triton``, ...). The
script launches the kernel twice (build, then the launch to profile) and prints the effective TFLOP/s
of a third, timed launch (meaningless under a profiler, which replays the kernel).
"""

from __future__ import annotations

import argparse
import math

import torch

from kernel_bench import SHAPES, parse_variants, window_for_density, window_mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="hunyuan_video", choices=sorted(SHAPES))
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--variant", default="ws")
    args = ap.parse_args(argv)

    from dist_compact import BlockIndex
    import dist_compact_kernels as K

    if not torch.cuda.is_available():
        raise SystemExit("profile_ws needs a GPU")
    dev = torch.device("cuda")
    S, H, grid = SHAPES[args.shape]
    bs, D = 128, 128
    nb = S // bs
    cfg = parse_variants(f"x={args.variant}")["x"]
    if cfg is None:
        raise SystemExit("give a kernel variant (ws..., triton, BN:warps:stages), not auto")
    _, win = window_for_density(grid, args.density, dev)
    mask = window_mask(grid, *win, dev)
    dens = mask.float().mean().item()  # what kernel_bench counts
    index = BlockIndex.from_dense(mask.view(1, 1, nb, nb).expand(1, H, nb, nb).contiguous(), bs)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    run = lambda: K.block_sparse_fwd(q, k, v, index.counts, index.indices, bs, scale, return_lse=False, **cfg)
    run()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    flops = 4.0 * H * S * S * D * dens
    print(f"{args.shape} {args.variant} density {dens:.3f} window {win}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TF/s")


if __name__ == "__main__":
    main()
