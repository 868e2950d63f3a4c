"""AdaSpa (online) vs Compact (static, searched offline) on structured synthetic attention.

Runs on a CPU in about a minute (float32 attention, float64 references):

    python benchmarks/adaspa_vs_compact.py [--csv results.csv]

Data: :func:`dist_compact.synthetic.synthetic_qkv` heads ``local, cross, temporal, global`` on a
layout with text tokens; "prompt A" (seed 0) and "prompt B" (seed 1) differ in their content noise,
text features and values. Compact configs are searched on prompt A (``CaptureAttention`` +
``search_store`` at several recall floors ``tau``) and evaluated on prompt B, as a shipped config
would be; AdaSpa searches prompt B itself (its fused search) at the Compact config's density and at
the target density 0.2. Recall = kept share of the exact softmax mass (mean over real video query
blocks); error = relative L2 error of the output vs float64 dense attention.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from common import write_csv


def real_density(index, layout) -> torch.Tensor:
    """float64 [H]: kept (query block, key block) pairs over the pairs of non-empty blocks."""
    real = layout.block_valid(index.device) > 0
    m = index.to_dense() & real.view(1, 1, -1, 1) & real.view(1, 1, 1, -1)
    return m.double().sum(dim=(0, 2, 3)) / (m.shape[0] * float(real.sum()) ** 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(12, 16, 16), metavar=("T", "H", "W"))
    ap.add_argument("--tile", type=int, nargs=3, default=(1, 4, 4), metavar=("t", "h", "w"))
    ap.add_argument("--text", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.5, help="content noise (logit std) of synthetic_qkv")
    ap.add_argument("--taus", default="0.8,0.9,0.95")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)

    from dist_compact import BlockIndex, VideoLayout
    from dist_compact.sparsity.context import AttentionContext
    from dist_compact.sparsity.attention_ops import AttentionOps
    from dist_compact.sparsity.config import SparsityConfig
    from dist_compact.reference import reference_block_mass, reference_block_sparse_attention
    from dist_compact.search.capture import CaptureAttention, MassStore
    from dist_compact.search.offline import SearchSettings, search_store
    from dist_compact.sparsity.online import kept_mass_share, online_select
    from dist_compact.synthetic import synthetic_qkv

    torch.set_grad_enabled(False)
    kinds = ["local", "cross", "temporal", "global"]
    H = len(kinds)
    layout = VideoLayout(*args.grid, tile=tuple(args.tile), text_tokens=args.text)
    ops = AttentionOps(backend="torch")
    bv = layout.block_valid()
    rows = (bv > 0) & ~layout.is_text_block()
    qa, ka, va = synthetic_qkv(layout, kinds, head_dim=args.head_dim, noise=args.noise, seed=0)
    qb, kb, vb = synthetic_qkv(layout, kinds, head_dim=args.head_dim, noise=args.noise, seed=1)
    full = BlockIndex.full(1, H, layout.num_blocks, layout.num_blocks, layout.block_size)
    dense, lse = reference_block_sparse_attention(qb.double(), kb.double(), vb.double(), full, q_valid=bv, kv_valid=bv)
    mass = reference_block_mass(qb.double(), kb.double(), lse, layout.block_size, q_valid=bv, kv_valid=bv).float()
    print(f"# {layout}, heads {kinds}, d={args.head_dim}, noise {args.noise}")

    def measure(name, index):
        out = ops.attention(qb, kb, vb, index, layout)
        rec = kept_mass_share(mass, index.to_dense())[:, :, rows].mean(dim=(0, 2)).double()
        err = [float((out[..., h, :].double() - dense[..., h, :]).norm() / dense[..., h, :].norm())
               for h in range(H)]
        tot = float((out.double() - dense).norm() / dense.norm())
        dens = real_density(index, layout)
        row = dict(method=name, density=float(dens.mean()), recall=float(rec.mean()), error=tot,
                   **{f"density_{kinds[h]}": float(dens[h]) for h in range(H)},
                   **{f"recall_{kinds[h]}": float(rec[h]) for h in range(H)},
                   **{f"error_{kinds[h]}": err[h] for h in range(H)})
        print(f"{name:34s} density {row['density']:.3f} recall {row['recall']:.3f} err {tot:.4f} | per head "
              + " ".join(f"{kinds[h]}: d={dens[h]:.2f} r={rec[h]:.3f} e={err[h]:.3f}" for h in range(H)), flush=True)
        return row

    nkv = int((bv > 0).sum())

    def adaspa(density, rule=None, static=None):
        """The AdaSpa index whose realised density (text rows and columns included) is the largest
        one not above ``density`` (the top-k budget counts text columns; text rows are full)."""
        target = density
        for _ in range(4 * nkv):
            cfg = SparsityConfig(sparsity=1.0 - max(target, 1.0 / nkv), head_adaptive=rule is not None,
                                 head_rule=rule or "paper", dense_threshold=1.0)
            sm = None if static is None else static.to_dense()
            idx = online_select(mass, layout, ops, cfg, static_mask=sm).index
            if float(real_density(idx, layout).mean()) <= density + 1e-9 or target <= 1.0 / nkv:
                return idx
            target -= 0.5 / nkv
        return idx

    # Compact configs searched on prompt A
    store = MassStore.for_layout(layout, 1, H, model="synthetic")
    CaptureAttention(0, store)(qa, ka, va, AttentionContext(layout=layout, ops=ops))
    out_rows = []
    compact_at = {}
    for tau in (float(t) for t in args.taus.split(",")):
        res = search_store(store, SearchSettings(tau=tau))
        idx = res.config.index_for(0, layout, H)
        row = measure(f"compact tau={tau} (searched on A)", idx)
        compact_at[tau] = (idx, row["density"])
        out_rows.append(row)
        d = row["density"]
        out_rows.append(measure(f"adaspa uniform at d<={d:.3f}", adaspa(d)))
        out_rows.append(measure(f"adaspa recall-heads at d<={d:.3f}", adaspa(d, "recall")))
    out_rows.append(measure("adaspa uniform at d<=0.2", adaspa(0.2)))
    out_rows.append(measure("adaspa paper-heads at d<=0.2", adaspa(0.2, "paper")))
    out_rows.append(measure("adaspa recall-heads at d<=0.2", adaspa(0.2, "recall")))
    # compact + adaspa: the tightest static config united with online top-k, at the next config's density
    taus = sorted(compact_at)
    if len(taus) > 1:
        static, d_next = compact_at[taus[0]][0], compact_at[taus[1]][1]
        out_rows.append(measure(f"compact tau={taus[0]} U adaspa, d<={d_next:.3f}", adaspa(d_next, static=static)))
    if write_csv(args.csv, out_rows):
        print(f"# wrote {args.csv}")
    return out_rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
