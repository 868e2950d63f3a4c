"""Does the embedded model move as prompted?  The motion metric over the prompt grid, dense and sparse.

The grid is every colour x shape x motion x background of the data's grammar (8 x 3 x 5 x 4 = 480
prompts, e.g. "a red square moving left on stripes"); ``--backgrounds rotate`` keeps every colour x
shape x motion once with the background rotated through the four (120 prompts). Every prompt runs
with each of ``--seeds`` seeds; seed s gets the noise ``generate.py --seed s`` draws. Every clip is
sampled dense and with each ``--variant`` of the sparsity config (default: the demo's), from the same
noise, in batches through the pipeline's sampler (``dist_compact.run.sampler.sample``), scored by
:mod:`dist_compact.models.motion` and compared with its dense clip (PSNR). One CSV row per (clip,
mode); a summary table per mode last.

    python benchmarks/motion_quality.py --csv benchmarks/results/motion.csv --seeds 2
    python benchmarks/motion_quality.py --backgrounds rotate --seeds 1 --variant "adaspa=sparsity.mode=adaspa"

``--direction-probe`` skips the sampling: it runs :func:`dist_compact.models.motion.direction_probe`
(one guided forward at t = 0.9 per colour x straight motion x seed; does the predicted clip move the
prompted way, and along the prompted axis at all?), which a CPU does in a minute at 48 px:

    python benchmarks/motion_quality.py --config configs/models/embedded-gpu.yaml --direction-probe --seeds 4 \
        --set model.height=48 --set model.width=48

Batches: the sparse runs search one index per sample (``sparsity.batch_index=per_sample``): the
cond and uncond halves of a clip's guidance batch get their own index, where ``generate.py`` (one
clip) shares one between them. ``benchmarks/embedded_quality.py`` measures that exact path.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_csv  # noqa: E402

from embedded_quality import parse_variant  # noqa: E402


def grid_prompts(backgrounds: str = "all"):
    """(prompt, colour, shape, motion, texture) of the grid, in a fixed order."""
    from dist_compact.models.data import COLORS, MOTIONS, SHAPES, TEXTURES

    out = []
    for ci, c in enumerate(COLORS):
        for si, s in enumerate(SHAPES):
            for mi, m in enumerate(MOTIONS):
                texs = list(TEXTURES)
                if backgrounds == "rotate":
                    texs = [texs[(ci + si + mi) % len(texs)]]
                for t in texs:
                    article = "an" if c[0] in "aeiou" else "a"
                    out.append((f"{article} {c} {s} {m} {TEXTURES[t]}", c, s, m, t))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files (default: generate.py's defaults)")
    p.add_argument("--variant", action="append", default=[],
                   help="sparse variant name=key=value;... (default: the config's sparsity, named 'sparse')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every mode, e.g. run.steps=10 (repeatable)")
    p.add_argument("--no-sparse", dest="sparse", action="store_false", help="dense runs only")
    p.add_argument("--backgrounds", choices=("all", "rotate"), default="all")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts of the grid (0: all)")
    p.add_argument("--every", type=int, default=1, help="only every N-th clip of (seeds x grid), for a quick subset")
    p.add_argument("--batch", type=int, default=32, help="clips per sampler call")
    p.add_argument("--csv", default=None)
    p.add_argument("--direction-probe", action="store_true",
                   help="only the direction probe (no sampling): seeds 0 .. --seeds - 1, colours --probe-colours")
    p.add_argument("--probe-colours", default="red,cyan", help="comma-separated colours of the direction probe")
    args = p.parse_args(argv)

    import torch

    from dist_compact import sparsify
    from dist_compact.integrations import DenoisingState
    from dist_compact.run.loader import load_run_config
    from dist_compact.models.embedded import WEIGHTS_DIR, load_embedded, sha256_of, shipped_weights
    from dist_compact.models.motion import score_clips, summarize
    from dist_compact.run.report import psnr
    from dist_compact.run.sampler import sample
    from dist_compact.search.config_file import load_compact
    from dist_compact.stats import AttentionStats

    variants = [parse_variant(v) for v in args.variant] or [("sparse", [])]
    if not args.sparse:
        variants = []
    common = parse_variant("set=" + ";".join(args.set))[1]
    base = load_run_config(args.config, common)
    device = torch.device("cuda" if base.cluster.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = base.model.path or str(shipped_weights(base.model.name))
    model = load_embedded(path, device=device, dtype=dtype)
    mcfg = model.config
    digest = sha256_of(path)
    run = base.run
    if args.direction_probe:
        from dist_compact.models.motion import direction_probe

        colours = [c.strip() for c in args.probe_colours.split(",") if c.strip()]
        res = direction_probe(model, model.tokenizer, base.model.frames, base.model.height, base.model.width,
                              guidance=base.run.guidance, seeds=range(args.seeds), colours=colours, device=device,
                              dtype=dtype)
        print(f"direction probe, {res['clips']} clips ({len(colours)} colours x {len(res['per_motion'])} motions x "
              f"{args.seeds} seeds), "
              f"{base.model.frames}x{base.model.height}x{base.model.width}, guidance {base.run.guidance}, t = 0.9, "
              f"weights {digest[:16]}...")
        print("| right way % | on the axis % | " + " | ".join(f"{m} %" for m in res["per_motion"]) + " |")
        print("|---|---|" + "---|" * len(res["per_motion"]))
        print(f"| {res['right_way_pct']:.1f} | {res['axis_pct']:.1f} | "
              + " | ".join(f"{v:.1f}" for v in res["per_motion"].values()) + " |")
        return 0
    layout = model.video_layout(base.model.frames, base.model.height, base.model.width, base.model.tile)
    grid = grid_prompts(args.backgrounds)
    if args.limit:
        grid = grid[:args.limit]
    clips = [(g, seed) for seed in range(args.seeds) for g in grid][::args.every]
    print(f"{len(clips)} clips ({len(grid)} prompts x {args.seeds} seeds, every {args.every}) on {device}, weights {digest[:16]}...",
          flush=True)

    def noise_of(seed):  # what run_generation draws for run.seed = seed
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((1, mcfg.in_channels, base.model.frames, base.model.height, base.model.width), generator=gen)

    def run_all(sparsity):
        compact = load_compact(sparsity, model=base.model.name, num_layers=mcfg.depth, num_heads=mcfg.heads,
                               shipped_dir=WEIGHTS_DIR)
        videos, dens, seconds = [], [], 0.0
        for i in range(0, len(clips), args.batch):
            part = clips[i:i + args.batch]
            text = model.tokenizer.batch([g[0] for g, _ in part]).to(device)
            noise = torch.cat([noise_of(s) for _, s in part]).to(device)
            stats, state = AttentionStats(timing=False), DenoisingState()
            sparsify(model, sparsity, compact=compact if sparsity.uses_compact else None, tile=layout.tile, state=state,
                     stats=stats, backend=run.attn_backend)
            res = sample(model, text, noise, steps=run.steps, guidance=run.guidance, shift=run.shift, state=state)
            seconds += res.total_seconds
            videos.append(res.latents.float().cpu())
            dens.append(stats.summary()["mean_density_sparse"])
        return torch.cat(videos), dens, seconds

    prompts = [g[0] for g, _ in clips]
    rows, results, summaries = [], {}, {}
    t0 = time.perf_counter()
    modes = [("dense", dataclasses.replace(base.sparsity, mode="dense"))]
    for name, pairs in variants:
        sp = load_run_config(args.config, common + pairs).sparsity
        modes.append((name, dataclasses.replace(sp, batch_index="per_sample")))
    for name, sparsity in modes:
        videos, dens, secs = results[name] = run_all(sparsity)
        print(f"{name}: {secs:.1f} s of sampling", flush=True)
        scores = score_clips(videos, prompts)
        summaries[name] = (summarize(scores), scores, dens)
        for k, ((prompt, c, s, m, t), seed) in enumerate(clips):
            sc = scores[k]
            q = None if name == "dense" else psnr(videos[k], results["dense"][0][k])
            rows.append({"mode": name, "prompt": prompt, "seed": seed, "colour": c, "shape": s, "motion": m,
                         "background": t, "follows": int(sc.follows), "direction": int(sc.direction),
                         "smooth": int(sc.smooth), "visible": int(sc.visible), "travel_px": round(sc.travel, 2),
                         "across_px": round(sc.across, 2), "max_step_px": round(sc.max_step, 2),
                         "jerk": round(sc.jerk, 3), "psnr_vs_dense_db": None if q is None else round(q, 2),
                         "density_sparse_steps": None if name == "dense" else dens[k // args.batch],
                         "weights_sha256": digest, "device": str(device)})
        write_csv(args.csv, rows)  # after every mode: a run cut short keeps what it finished
    print(f"\n{time.perf_counter() - t0:.1f} s; weights {digest}")
    from dist_compact.models.data import MOTIONS

    head = "| mode | clips | follows % | " + " | ".join(f"{m} %" for m in MOTIONS) + \
        " | smooth % | direction % | median max step px | PSNR vs dense dB (median, min) | density, sparse steps |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, (summ, scores, dens) in summaries.items():
        per = []
        for m in MOTIONS:
            sel = [sc.follows for sc in scores if sc.motion == m]
            per.append(f"{100.0 * sum(sel) / max(len(sel), 1):.1f}")
        known = [x for x in dens if x is not None]
        if name == "dense":
            q, d = "-", "-"
        else:
            ps = [r["psnr_vs_dense_db"] for r in rows if r["mode"] == name]
            q = f"{statistics.median(ps):.2f}, {min(ps):.2f}"
            d = f"{statistics.mean(known):.3f}" if known else "-"
        print(f"| {name} | {summ['clips']} | {summ['follows_pct']:.1f} | " + " | ".join(per) +
              f" | {summ['smooth_pct']:.1f} | {summ['direction_pct']:.1f} | {summ['median_max_step']:.2f} | {q} | {d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
