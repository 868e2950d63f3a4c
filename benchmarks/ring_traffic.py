"""Ring point-to-point traffic of the real shapes, no GPU: whole shards vs the key ranges RingOps fetches.

    python benchmarks/ring_traffic.py [--shapes wan480,hunyuan720] [--sources compact-0.5,adaspa] [--ring 4,8]

For each shape, index source (``dist_compact.parallel.cost.Source``: the pooled Compact patterns, AdaSpa's
selection on a synthetic block mass), ring degree and plan (contiguous / balanced, ``cost.plan_for``): the K+V
bytes per layer summed over ranks (bf16, head_dim 128, batch 1, all heads; layers 0 and L/2), as
``RingOps`` moves them (``ring_blocks`` x ``block_kv_bytes``: the key range of each shard the rows use, no
trailing padding) and as a ring sending whole shards would (``ring_needs`` x ``shard_kv_bytes``), and the
largest per-rank received blocks.
"""

from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "kernels")]

from dist_compact.models.embedded import shipped_weights  # noqa: E402
from dist_compact.parallel import ParallelConfig  # noqa: E402
from dist_compact.parallel.cost import (SHAPES, SMALL_SHAPES, Source, padded_layout, plan_for, ring_traffic,  # noqa: E402
                                        shape_layout)
from dist_compact.search.config_file import load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="wan480,hunyuan720")
    ap.add_argument("--sources", default="compact-0.5,adaspa")
    ap.add_argument("--ring", default="4,8")
    ap.add_argument("--small", action="store_true", help="the small shapes of the cost model (a dry run)")
    args = ap.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else {k: SHAPES[k] for k in args.shapes.split(",")}
    print("shape source ring plan bounds range_GB_per_layer whole_shard_GB_per_layer max_blocks_received_per_rank")
    for shape, spec in shapes.items():
        for name in args.sources.split(","):
            compact = None
            if name.startswith("compact-"):
                compact = load_config(str(shipped_weights().parent / f"embedded-{name}.yaml"))
            for R in (int(r) for r in args.ring.split(",")):
                lay = padded_layout(shape_layout(spec), ParallelConfig(1, R))
                src = Source(name, lay, spec["heads"], spec["layers"], compact=compact)
                layers = sorted({0, spec["layers"] // 2})
                for label, bal in (("contiguous", False), ("balanced", True)):
                    bounds, _ = plan_for(src, 1, R, bal)
                    new, old, worst = ring_traffic(src, lay, R, bounds, layers, spec["heads"])
                    print(f"{shape} {name} {R} {label} {','.join(map(str, bounds))} {new / 1e9:.3f} {old / 1e9:.3f} {worst}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
