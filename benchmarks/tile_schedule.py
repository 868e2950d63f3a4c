"""A model (not a measurement) of how long the Hopper kernel's grid takes in each tile order.

Run on any machine from the repository root:

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/tile_schedule.py          # the shipped GPU model's configs

The warp-specialized kernel (kernels/dist_compact_kernels/block_sparse_ws.py) launches one CTA per
(batch, head, query block) tile and one CTA fits on an SM at a time (its shared memory), so the GPU
hands tiles to SMs as they free up, in launch order. This script replays that: each tile costs
``overhead + its key-block count`` (in key-block units), ``--sms`` SMs take the next tile when free,
and the grid ends when the last SM does. It compares the natural order (query blocks of one head after
another) with longest rows first (``Schedule.order = "longest"``) and with the bound no order can beat
(``max(total / SMs, longest tile)``), per layer of each Compact config at the model's shape.

What it leaves out: memory traffic and L2 hits (the natural order keeps the CTAs that run together on
one head), the tail of each tile's pipeline and any launch overhead. The kernel's measured times are in
BENCHMARKS.md; ``step_profile.py --orders natural,longest`` measures the two orders on a GPU.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_csv  # noqa: E402

FIELDS = ["config", "layer", "density", "longest_row", "natural", "longest", "bound", "saving"]


def grid_time(costs, sms: int) -> float:
    """When the last of ``sms`` SMs is done, tiles of ``costs`` handed out in order to the first free SM."""
    free = [0.0] * min(sms, len(costs))
    heapq.heapify(free)
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free, default=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/models/embedded-gpu.yaml", help="the model's run config")
    p.add_argument("--compact", action="append", default=[], metavar="PATH",
                   help="Compact configs (default: the model's shipped <name>-compact-{0.9,0.8}.yaml)")
    p.add_argument("--batch", type=int, default=2, help="clips per forward (2: a guidance pair)")
    p.add_argument("--sms", type=int, default=132, help="SMs (an H100 SXM has 132)")
    p.add_argument("--overhead", type=float, default=1.5,
                   help="a tile's cost beyond its key blocks, in key-block units (Q load, output store)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    for name, value in (("--batch", args.batch), ("--sms", args.sms)):
        if value < 1:
            p.error(f"{name} {value}: give a positive count")
    if args.overhead < 0:
        p.error(f"--overhead {args.overhead}: give a cost of at least 0")

    from dist_compact.models.embedded import load_embedded, shipped_weights
    from dist_compact.run.loader import load_run_config
    from dist_compact.search.config_file import load_config

    mc = load_run_config([args.config], []).model
    path = mc.path or str(shipped_weights(mc.name))
    model = load_embedded(path)  # checksum-checked; only its config and layout are used
    mcfg = model.config
    layout = model.video_layout(mc.frames, mc.height, mc.width, mc.tile)
    compacts = args.compact or [os.path.join(os.path.dirname(path), f"{mc.name}-compact-{lv}.yaml")
                                for lv in ("0.9", "0.8")]
    print(f"# {layout}, batch {args.batch}, {mcfg.heads} heads, {args.sms} SMs, tile cost = {args.overhead} + key "
          f"blocks; grid time in key-block units (a model, not a measurement)")
    rows = []
    for cpath in compacts:
        cfg = load_config(cpath, model=mc.name, num_layers=mcfg.depth, num_heads=mcfg.heads)
        tot = {"natural": 0.0, "longest": 0.0, "bound": 0.0}
        for layer in range(mcfg.depth):
            idx = cfg.index_for(layer, layout, mcfg.heads)
            counts = idx.counts.expand(args.batch, mcfg.heads, idx.num_q_blocks).reshape(-1).tolist()
            costs = [c + args.overhead for c in counts]
            t = {"natural": grid_time(costs, args.sms), "longest": grid_time(sorted(costs, reverse=True), args.sms),
                 "bound": max(sum(costs) / args.sms, max(costs))}
            for k in tot:
                tot[k] += t[k]
            rows.append({"config": os.path.basename(cpath), "layer": layer, "density": round(idx.density(), 4),
                         "longest_row": max(counts), **{k: round(v, 1) for k, v in t.items()},
                         "saving": round(1 - t["longest"] / t["natural"], 4)})
        rows.append({"config": os.path.basename(cpath), "layer": "all", "density": None, "longest_row": None,
                     **{k: round(v, 1) for k, v in tot.items()}, "saving": round(1 - tot["longest"] / tot["natural"], 4)})
    for r in rows:
        print(f"{r['config']:32s} layer {str(r['layer']):>3s}  density {r['density'] if r['density'] is not None else '-':>6}"
              f"  natural {r['natural']:8.1f}  longest first {r['longest']:8.1f}  bound {r['bound']:8.1f}"
              f"  saving {100 * r['saving']:5.1f}%")
    write_csv(args.csv, rows, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
