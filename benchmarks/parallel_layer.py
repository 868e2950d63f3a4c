"""Sequence-parallel sparse attention layer: Ulysses, ring and hybrid at P = 1, 2, 4 (one torchrun).

Run on the device kinds nvidia-h200-x2 / nvidia-h200-x4 from the repository root:

    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 4 benchmarks/parallel_layer.py --out $OUT
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 2 benchmarks/parallel_layer.py --out $OUT

or on a CPU (gloo, tiny shape, PyTorch backend) to check the script itself:

    torchrun --standalone --nproc-per-node 4 benchmarks/parallel_layer.py --small

Problem (default): S = 118,784 tokens (latent grid 58x32x64, tile (2, 8, 8): 29 slabs x 4 x 8 tiles
= 928 blocks of 128, no padding), H = 24, head_dim 128, bf16, batch 1. Index: a 3D window built
directly as a BlockIndex -- |slab distance| <= 4 (+-8 frames), |tile row| <= 2, |tile col| <= 4,
the same for every head -- density 0.204.

Every config runs on ranks [0, P) of the world (the rest wait): P = 1 is the local op alone; for
P > 1 the layer is ``SequenceParallel.wrap`` of a layer that localizes the global index and calls
``ctx.ops.attention``, fed the shards of the same inputs. Reported per config:

* ms: median over iterations of the slowest rank's time (CUDA events; barrier before each);
  speedup vs P = 1 and scaling = speedup / P (goal >= 0.9);
* ring: point-to-point bytes actually sent per call (sum over ranks; must equal the prediction
  from the index) vs a dense ring (every K/V shard to every other ring rank);
* a2a: Ulysses all-to-all bytes per call (sum over ranks: q, k, v in, out back);
* max_abs / rel: gathered output vs the one-GPU output (bf16 tolerance: max_abs <= 1.6e-2 and
  rel <= 1e-2).
Ring configs run twice: with overlap (next shards in flight while the local shard computes) and
without (``RingOps.overlap = False``), to show what the overlap hides.

Prints a table on rank 0 and writes ``parallel_layer.csv`` under ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "kernels")]  # dist_compact and dist_compact_kernels, uninstalled

from dist_compact import BlockIndex, VideoLayout, block_sparse_attention  # noqa: E402
from dist_compact.sparsity.context import AttentionContext  # noqa: E402
from dist_compact.sparsity.attention_ops import AttentionOps  # noqa: E402
from dist_compact.parallel import (ParallelConfig, RingOps, SequenceParallel, block_kv_bytes, build_groups,  # noqa: E402
                                   ring_blocks, ring_bytes, ring_shard_bytes)

FULL = dict(grid=(58, 32, 64), tile=(2, 8, 8), heads=24, head_dim=128, text=0, window=(4, 2, 4),
            dtype=torch.bfloat16, backend="triton")
SMALL = dict(grid=(8, 8, 8), tile=(1, 4, 4), heads=4, head_dim=32, text=20, window=(1, 1, 1),
             dtype=torch.float32, backend="torch")


def window_index(layout: VideoLayout, heads: int, window, device) -> BlockIndex:
    """Kept iff |slab distance| <= w and |tile row/col distance| <= (a, b); text rows/cols kept."""
    w, a, b = window
    c = layout.tile_coords().to(device)
    d = (c.view(-1, 1, 3) - c.view(1, -1, 3)).abs()
    vid = (d[..., 0] <= w) & (d[..., 1] <= a) & (d[..., 2] <= b)
    nb, nv = layout.num_blocks, layout.num_video_blocks
    m = torch.ones(nb, nb, dtype=torch.bool, device=device)
    m[:nv, :nv] = vid
    return BlockIndex.from_dense(m.view(1, 1, nb, nb).expand(1, heads, nb, nb), layout.block_size)


def inputs(layout: VideoLayout, heads: int, head_dim: int, dtype, device):
    """The same random q, k, v on every rank (seeded generator on the device)."""
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, layout.padded_len, heads, head_dim, generator=g, device=device, dtype=dtype)
            for _ in range(3)]


class WindowLayer:
    """The inner attention: this rank's part of a fixed global index."""

    def __init__(self, index: BlockIndex):
        self.index = index

    def __call__(self, q, k, v, ctx):
        return ctx.ops.attention(q, k, v, ctx.ops.localize(self.index, ctx.layout), ctx.layout, scale=ctx.scale)


def configs_for(world: int, heads: int):
    out = [(1, 1)]
    p = 2
    while p <= world:
        if heads % p == 0:
            out.append((p, 1))
        out.append((1, p))
        u = 2
        while u < p:
            if heads % u == 0:
                out.append((u, p // u))
            u *= 2
        p *= 2
    return out


def timed(fn, group, iters: int, warmup: int, device) -> float:
    """Median over iterations of the slowest rank's milliseconds."""
    cuda = device.type == "cuda"
    flag = torch.zeros(1, device=device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if group is not None:
            dist.all_reduce(flag, group=group)  # line the ranks up
        if cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(t.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny CPU-friendly shape (checks the script)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--text", type=int, default=None, help="text tokens (default 0; 20 with --small)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    prm = dict(SMALL if args.small else FULL)
    if args.text is not None:
        prm["text"] = args.text
    iters = args.iters or (3 if args.small else 10)

    cuda = torch.cuda.is_available() and not args.small
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    H, D, dtype, backend = prm["heads"], prm["head_dim"], prm["dtype"], prm["backend"]
    layout = VideoLayout(*prm["grid"], tile=prm["tile"], text_tokens=prm["text"])

    rows = []
    ref = None
    for (u, r) in configs_for(world, H):
        P = u * r
        cfg = ParallelConfig(u, r)
        sub = dist.new_group(list(range(P))) if 1 < P < world else (dist.group.WORLD if P == world > 1 else None)
        if P == 1:  # every rank: the one-GPU reference output (rank 0's time is reported)
            lay = layout
            q, k, v = inputs(lay, H, D, dtype, device)
            index = window_index(lay, H, prm["window"], device)
            bv = lay.block_valid(device)
            ref = (lay, block_sparse_attention(q, k, v, index, block_valid=bv, backend=backend))
            ms = timed(lambda: block_sparse_attention(q, k, v, index, block_valid=bv, backend=backend), None,
                       iters, args.warmup, device)
            rows.append(dict(config="single", ulysses=1, ring=1, P=1, overlap="", ms=ms, density=index.density()))
            dist.barrier()
            continue
        if rank >= P:
            dist.barrier()
            continue
        sp = SequenceParallel(cfg, build_groups(cfg, world_group=sub if P < world else None))
        lay = sp.layout_for(layout)
        q, k, v = inputs(lay, H, D, dtype, device)
        index = window_index(lay, H, prm["window"], device)
        ctx = AttentionContext(layout=lay, ops=AttentionOps(backend))
        attn = sp.wrap(WindowLayer(index))
        ql, kl, vl = (sp.shard(t, lay) for t in (q, k, v))
        out = sp.gather(attn(ql, kl, vl, ctx), lay)
        ops = attn.ops
        if ref is not None and ref[0] == lay:
            diff = (out.float() - ref[1].float())
            max_abs = diff.abs().max().item()
            rel = (diff.norm() / ref[1].float().norm().clamp(min=1e-30)).item()
        else:
            max_abs = rel = float("nan")
        ring_ops = isinstance(ops, RingOps)
        esize = q.element_size()
        traffic = {}
        if u > 1:  # q, k, v and out: (u-1)/u of each local video tensor leaves the rank
            vl_tok = sp.video_blocks_per_rank(lay) * lay.block_size
            traffic["a2a_bytes"] = 4 * (u - 1) * vl_tok * H * D * esize // u * P
        if ring_ops:
            shard = ring_shard_bytes(lay, r, batch=q.shape[0], heads=H // u, head_dim=D, element_size=esize)
            h0, h1 = ops.head_range(H)
            blocks = ring_blocks(index.select_heads(slice(h0, h1)), lay, r, bounds=ops.bounds(lay))
            per_block = block_kv_bytes(lay.block_size, batch=q.shape[0], heads=H // u, head_dim=D, element_size=esize)
            pred = torch.tensor([float(ring_bytes(blocks, per_block).sum())], dtype=torch.float64, device=device)
            dist.all_reduce(pred, group=sub)  # each Ulysses rank's ring predicts its own heads
            # every ring rank of a ring group computed the same group total
            traffic.update(ring_pred=pred.item() / r, dense_ring_bytes=float(r * (r - 1) * shard * u))
        for overlap in ((True, False) if ring_ops else (None,)):
            if overlap is not None:
                ops.overlap = overlap
                ops.reset_counters()
            ms = timed(lambda: attn(ql, kl, vl, ctx), sub, iters, args.warmup, device)
            row = dict(config=f"ulysses{u}xring{r}", ulysses=u, ring=r, P=P,
                       overlap="" if overlap is None else ("on" if overlap else "off"), ms=ms,
                       density=index.density(), max_abs=max_abs, rel=rel, **traffic)
            if ring_ops:
                sent = torch.tensor([ops.bytes_sent / max(ops.calls, 1)], dtype=torch.float64, device=device)
                dist.all_reduce(sent, group=sub)
                row.update(ring_bytes=sent.item(), ring_vs_dense=sent.item() / max(row["dense_ring_bytes"], 1))
            rows.append(row)
        dist.barrier(group=sub)
        dist.barrier()

    if rank == 0:
        t1 = rows[0]["ms"]
        for row in rows:
            row["speedup"] = t1 / row["ms"]
            row["scaling"] = row["speedup"] / row["P"]
            if "max_abs" in row:
                row["ok"] = bool(row["max_abs"] <= 1.6e-2 and row["rel"] <= 1e-2) if dtype != torch.float32 else \
                    bool(row["max_abs"] <= 1e-5)
            if "ring_bytes" in row:
                row["ok"] = row.get("ok", True) and abs(row["ring_bytes"] - row["ring_pred"]) < 0.5
        dev = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"\nsparse attention layer: S={layout.padded_len} H={H} d={D} {str(dtype).split('.')[-1]} "
              f"density={rows[0]['density']:.3f} window={prm['window']} text={prm['text']} on {world} x {dev}")
        hdr = f"{'config':<18}{'P':>2} {'ovl':>4} {'ms':>9} {'speedup':>8} {'scaling':>8} {'ring MB':>9} " \
              f"{'dense MB':>9} {'ratio':>6} {'a2a MB':>8} {'max_abs':>9} {'rel':>9} ok"
        print(hdr)
        for row in rows:
            mb = lambda key: f"{row[key] / 1e6:9.1f}" if key in row else f"{'':>9}"  # noqa: E731
            print(f"{row['config']:<18}{row['P']:>2} {row['overlap']:>4} {row['ms']:9.2f} {row['speedup']:8.2f} "
                  f"{row['scaling']:8.2f} {mb('ring_bytes')} {mb('dense_ring_bytes')} "
                  f"{row.get('ring_vs_dense', float('nan')):6.2f} {mb('a2a_bytes')[1:]} "
                  f"{row.get('max_abs', float('nan')):9.2e} {row.get('rel', float('nan')):9.2e} {row.get('ok', '')}")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "parallel_layer.csv")
        keys = ["config", "ulysses", "ring", "P", "overlap", "ms", "speedup", "scaling", "density", "ring_bytes",
                "ring_pred", "dense_ring_bytes", "ring_vs_dense", "a2a_bytes", "max_abs", "rel", "ok"]
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["device", "world"] + keys, extrasaction="ignore")
            wr.writeheader()
            for row in rows:
                wr.writerow({"device": dev, "world": world, **row})
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
