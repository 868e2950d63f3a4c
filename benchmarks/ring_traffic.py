"""Ring point-to-point traffic of the real shapes, no GPU: whole shards vs the key ranges RingOps fetches.

    python benchmarks/ring_traffic.py [--shapes wan480,hunyuan720] [--sources compact-0.5,adaspa] [--ring 4,8]

For each shape, index source (``scaling_model.Source``: the pooled Compact patterns, AdaSpa's selection on a
synthetic block mass), ring degree and plan (contiguous / balanced, ``scaling_model.plan_for``): the K+V
bytes per layer summed over ranks (bf16, head_dim 128, batch 1, all heads; layers 0 and L/2), as
``RingOps`` moves them (``ring_blocks`` x ``block_kv_bytes``: the key range of each shard the rows use, no
trailing padding) and as a ring sending whole shards would (``ring_needs`` x ``shard_kv_bytes``), and the
largest per-rank received blocks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]

import scaling_model as sm  # noqa: E402

from dist_compact.parallel import (ParallelConfig, block_kv_bytes, ring_bytes, ring_rank_plan,  # noqa: E402
                                   shard_kv_bytes)
from dist_compact.parallel.plan import padded_layout  # noqa: E402


def traffic(src, lay, R: int, bounds, layers, heads: int, head_dim: int = 128, esize: int = 2):
    """(range bytes per layer, whole-shard bytes per layer, max blocks one rank receives)."""
    pb = block_kv_bytes(lay.block_size, batch=1, heads=heads, head_dim=head_dim, element_size=esize)
    kv = shard_kv_bytes(bounds, lay.block_size, batch=1, heads=heads, head_dim=head_dim, element_size=esize)
    new = old = 0.0
    worst = 0
    for l in layers:
        idx = src.index(l)
        blocks = torch.tensor([ring_rank_plan(idx, lay, bounds, r).blocks for r in range(R)])
        new += float(ring_bytes(blocks, pb).sum())
        old += float(ring_bytes(blocks > 0, kv).sum())
        worst = max(worst, int(blocks.sum(1).max()))
    return new / len(layers), old / len(layers), worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="wan480,hunyuan720")
    ap.add_argument("--sources", default="compact-0.5,adaspa")
    ap.add_argument("--ring", default="4,8")
    ap.add_argument("--small", action="store_true", help="the small shape of scaling_model (a dry run)")
    args = ap.parse_args(argv)
    shapes = sm.SMALL_SHAPES if args.small else {k: sm.SHAPES[k] for k in args.shapes.split(",")}
    print("shape source ring plan bounds range_GB_per_layer whole_shard_GB_per_layer max_blocks_received_per_rank")
    for shape, spec in shapes.items():
        for name in args.sources.split(","):
            for R in (int(r) for r in args.ring.split(",")):
                lay = padded_layout(sm._layout(spec), ParallelConfig(1, R))
                src = sm.Source(name, lay, spec["heads"], spec["layers"])
                layers = sorted({0, spec["layers"] // 2})
                for label, bal in (("contiguous", False), ("balanced", True)):
                    bounds, _ = sm.plan_for(src, 1, R, bal)
                    new, old, worst = traffic(src, lay, R, bounds, layers, spec["heads"])
                    print(f"{shape} {name} {R} {label} {','.join(map(str, bounds))} {new / 1e9:.3f} {old / 1e9:.3f} {worst}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
