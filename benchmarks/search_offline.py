"""Offline Compact search time: 30 layers x 24 heads at the Hunyuan 720p latent grid 33x45x80.

Run on the GPU device from the repository root (or with ``--small`` on a CPU):

    python benchmarks/search_offline.py [--csv $OUT/search_offline.csv] [--device cuda] [--small] [--threads 1]

The block-mass statistics are random but structured (no model weights): every head is local,
cross-shaped, temporal or global with random widths, multiplicative noise and a small text share,
spread over the relative tile offsets in proportion to how many block pairs each offset has
(:class:`~dist_compact.search.capture.MassStore` layout). For each tile shape it times

* ``search``: :func:`~dist_compact.search.offline.search_store` (the vectorised greedy, all heads at
  once) to tau = 0.9, after one warm-up search on a small store (CUDA start-up not counted);
* ``reduce``: :func:`~dist_compact.search.capture.reduce_block_mass` of one layer's ``[1, 24, NB, NB]``
  block-mass map (what capture adds to each dense attention call), mean of 5;
* ``index``: :meth:`CompactConfig.index_for` of all layers for the layout (CPU, cold cache);

and prints the table (density and recall over the heads, greedy rounds, moves).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_compact import VideoLayout  # noqa: E402
from dist_compact.search.capture import MassStore, reduce_block_mass  # noqa: E402
from dist_compact.search.offline import SearchSettings, search_store  # noqa: E402

FULL = dict(layers=30, heads=24, grid=(33, 45, 80), tiles=[(1, 8, 16), (2, 8, 8)], text=256)
SMALL = dict(layers=2, heads=4, grid=(9, 16, 32), tiles=[(1, 4, 8), (2, 4, 4)], text=32)


def structured_store(layout: VideoLayout, layers: int, heads: int, seed: int = 0) -> MassStore:
    """Random structured statistics: one of local / cross / temporal / global per head."""
    g = torch.Generator().manual_seed(seed)
    s = MassStore.for_layout(layout, layers, heads, model="synthetic")
    nt, nh, nw = s.tile_grid
    N = layers * heads
    d = torch.arange(nt, dtype=torch.float64).view(1, -1, 1, 1)
    r = torch.arange(nh, dtype=torch.float64).view(1, 1, -1, 1)
    c = torch.arange(nw, dtype=torch.float64).view(1, 1, 1, -1)
    rnd = lambda lo, hi: (lo + (hi - lo) * torch.rand(N, 1, 1, 1, generator=g, dtype=torch.float64))  # noqa: E731
    st, sr, sc = rnd(0.3, 4.0), rnd(0.3, 2.5), rnd(0.3, 2.5)
    kind = torch.randint(0, 4, (N, 1, 1, 1), generator=g)
    local = torch.exp(-(d / st) ** 2 - (r / sr) ** 2 - (c / sc) ** 2)
    cross = torch.exp(-(d / st) ** 2) * (torch.exp(-(r / sr) ** 2 * (c + 1)) + torch.exp(-(c / sc) ** 2 * (r + 1)))
    temporal = torch.exp(-(r / (0.3 * sr)) ** 2 - (c / (0.3 * sc)) ** 2).expand(N, nt, nh, nw)
    glob = torch.exp(-(d / (0.3 * st)) ** 2).expand(N, nt, nh, nw)
    w = torch.where(kind == 0, local, torch.where(kind == 1, cross, torch.where(kind == 2, temporal, glob)))
    w = w * s.pairs().unsqueeze(0) * (0.5 + torch.rand(w.shape, generator=g, dtype=torch.float64))
    tokens = layout.seq_len
    rel = w / w.sum(dim=(1, 2, 3), keepdim=True) * tokens
    text = rel.sum(dim=(1, 2, 3)) * 0.05 * torch.rand(N, generator=g, dtype=torch.float64)
    s.rel = rel.reshape(layers, heads, nt, nh, nw)
    s.text = text.view(layers, heads)
    s.total = s.rel.sum(dim=(2, 3, 4)) + s.text
    s.samples[:] = 1
    return s


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2 layers x 4 heads at 9x16x32 (CPU)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 avoids OpenMP spinning on a shared, oversubscribed CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMALL if args.small else FULL
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; {shape['layers']} layers x {shape['heads']} heads, grid {shape['grid']}, "
          f"text {shape['text']}, tau {args.tau}")
    # warm-up (CUDA context, kernels) on a tiny store
    search_store(structured_store(VideoLayout(4, 8, 8, tile=(1, 4, 4)), 1, 2), SearchSettings(tau=args.tau),
                 device=dev)
    rows = []
    for tile in shape["tiles"]:
        lay = VideoLayout(*shape["grid"], tile=tile, text_tokens=shape["text"])
        store = structured_store(lay, shape["layers"], shape["heads"])
        _sync(dev)
        t0 = time.perf_counter()
        res = search_store(store, SearchSettings(tau=args.tau), device=dev)
        _sync(dev)
        t_search = time.perf_counter() - t0
        # capture-side reduction of one layer's map
        NB = lay.num_blocks
        mass = torch.rand(1, shape["heads"], NB, NB, device=dev)
        reduce_block_mass(mass, lay)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            reduce_block_mass(mass, lay)
        _sync(dev)
        t_reduce = (time.perf_counter() - t0) / 5
        del mass
        t0 = time.perf_counter()
        for layer in range(shape["layers"]):
            res.config.index_for(layer, lay, shape["heads"])
        t_index = time.perf_counter() - t0
        rows.append(dict(
            tile="x".join(map(str, tile)), tile_grid="x".join(map(str, store.tile_grid)), blocks=NB,
            heads=shape["layers"] * shape["heads"], search_s=round(t_search, 3), rounds=res.iterations,
            moves=int(res.steps.sum()), density_mean=round(float(res.density.mean()), 4),
            recall_min=round(float(res.recall.min()), 4), recall_mean=round(float(res.recall.mean()), 4),
            reduce_ms_per_layer=round(1e3 * t_reduce, 2), index_for_all_layers_s=round(t_index, 2),
        ))
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["device"] + keys)
            wr.writeheader()
            for r in rows:
                wr.writerow({"device": name, **r})
        print(f"wrote {args.csv}")
    assert all(not math.isnan(r["recall_min"]) and r["recall_min"] >= args.tau - 1e-9 for r in rows)


if __name__ == "__main__":
    main()
