"""Quality and speed of every sparse mode on a trained embedded model, one GPU, the same noise for all.

Each mode generates the same clips (prompt grid x held-out seeds) through the pipeline's sampler, one
clip per sampler call (its classifier-free-guidance batch of 2 shares one index, as ``generate.py``
does), after one untimed warm-up clip. Per mode it reports:

* the schedule: share of steps sparse, mean density of the sparse-step calls;
* ``attn_flops_vs_dense``: attention FLOPs over the whole run relative to dense: every call counts its
  computed share of blocks (dense steps and fused searches 1) plus, at each search, the block-mass
  pass: ``query_rows / block_size`` of the query rows against all keys, QK^T only (half of a dense
  pass);
* the wall time of denoising (the whole sampler, searches included, device-synchronised per step;
  median over clips) and the speed-up vs dense measured in the same run;
* the median wall time of a step by what it did (``dense_step_ms``, ``search_step_ms``,
  ``sparse_step_ms``; :func:`dist_compact.run.evaluation.step_kinds`), which splits a speed-up into its
  dense warm-up, its searches and its sparse steps;
* PSNR / SSIM vs the dense clip from the same noise (mean, min) and motion-follow % (the motion
  metric of :mod:`dist_compact.models.motion`).

Modes: ``dense`` (SDPA / cuDNN), ``compact`` (searched configs, ``--compact``), ``adaspa`` (the
paper's schedule scaled to the step count), ``compact+adaspa`` (their union), ``window`` (one fixed
3D window at a target density, sliding-tile style) and ``random`` (random key blocks at the same
density, the floor). Every sparse mode runs the same warm-up (``--dense-steps`` of 50 reference
steps dense) so they differ in the pattern alone.

    python benchmarks/quality_speed.py --compact low=C1.yaml --compact high=C2.yaml --densities 0.25,0.15 \\
        --csv benchmarks/results/quality-speed.csv --clips-csv /tmp/clips.csv --png pareto.png
    python benchmarks/quality_speed.py --small      # CPU smoke run: a tiny random model, a few clips

Held-out clips: the seeds start at ``--seed-base`` (default 1000); the Compact configs are searched on
other seeds (``generate.py``'s default seed 0), and no setting here was tuned on these clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_csv  # noqa: E402

from dist_compact.run.evaluation import (CHOOSABLE, STEP_KINDS, SUMMARY_FIELDS, attention_flops_share,  # noqa: E402
                                         choose_demo, step_kinds, write_sparsity_yaml)

def grid_clips(limit: int, seeds: int, seed_base: int):
    """(prompt, seed) pairs: the rotated prompt grid (every colour x shape x motion once) x seeds."""
    from motion_quality import grid_prompts

    grid = [g[0] for g in grid_prompts("rotate")]
    if limit:
        grid = grid[:limit]
    return [(p, seed_base + s) for s in range(seeds) for p in grid]


def build_modes(args, model_name, num_layers, num_heads, layout, base_sparsity):
    """[(mode, level, SparsityConfig, pattern object or None, pattern text)]."""
    from dist_compact.sparsity.config import SparsityConfig
    from dist_compact.patterns.baselines import RandomBlocks, window_for_density
    from dist_compact.search.config_file import load_config

    warm = dict(dense_steps=args.dense_steps, reference_steps=50, dense_threshold=1.0,
                mass_query_rows=base_sparsity.mass_query_rows)
    online = dict(search_steps=(args.dense_steps, 30), search_kinds=("fused", "cached"), head_adaptive=True,
                  head_rule="paper")
    modes = [("dense", "-", SparsityConfig(mode="dense"), None, "dense")]
    compacts = []
    for spec in args.compact:
        level, _, path = spec.partition("=")
        cfg = load_config(path, model=model_name, num_layers=num_layers, num_heads=num_heads)
        compacts.append((level, cfg, path))
        modes.append(("compact", level, SparsityConfig(mode="compact", compact_config=os.path.basename(path), **warm),
                      cfg, os.path.basename(path)))
    if args.densities == "from-compact":
        # the other modes at the densities the searched configs reached on this layout
        densities = [round(compact_density(cfg, layout), 3) for _, cfg, _ in compacts]
    else:
        densities = [float(x) for x in args.densities.split(",")]
    for d in densities:
        modes.append(("adaspa", f"{d:g}", SparsityConfig(mode="adaspa", sparsity=1.0 - d, **warm, **online), None,
                      f"top-k {d:g}, paper head rule"))
    for (level, cfg, path), d in zip(compacts, densities):
        # the union spends about half the budget on each part
        s = min(0.99, 1.0 - d / 2)
        modes.append(("compact+adaspa", f"{level}+{d / 2:g}",
                      SparsityConfig(mode="compact+adaspa", sparsity=s, compact_config=os.path.basename(path),
                                     **warm, **online), cfg,
                      f"{os.path.basename(path)} + top-k {d / 2:g}"))
    for d in densities:
        win, got = window_for_density(layout, num_layers, num_heads, d, model=model_name)
        modes.append(("window", f"{d:g}", SparsityConfig(mode="compact", **warm), win,
                      f"{win.patterns[0][0]} (density {got:.3f})"))
        modes.append(("random", f"{d:g}", SparsityConfig(mode="compact", **warm),
                      RandomBlocks(d, num_layers, num_heads, seed=args.seed_base), f"random {d:g}"))
    only = set(filter(None, args.modes.split(","))) if args.modes else None
    return [m for m in modes if only is None or m[0] in only or m[0] == "dense"]


def compact_density(config, layout) -> float:
    """Mean density of a Compact config over its layers and heads on ``layout``'s video blocks."""
    from dist_compact.patterns.baselines import video_density

    return sum(video_density(config.block_mask(i, layout)[0], layout) for i in range(config.num_layers)) \
        / config.num_layers


def small_model(path: str) -> None:
    """A tiny random model of the same family for the CPU smoke run (4 heads, 4 x 32 x 32 px)."""
    import torch

    from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT, save_embedded

    torch.manual_seed(0)
    cfg = EmbeddedConfig(dim=64, depth=2, heads=4, mlp_ratio=2, rope_split=(4, 6, 6), frames=4, height=32, width=32)
    model = EmbeddedDiT(cfg)
    with torch.no_grad():  # adaLN-Zero starts at zero: give the output layers weights so clips differ by mode
        for m in (model.mod_proj[1], model.final_mod[1], model.final):
            m.weight.normal_(0, 0.02)
    save_embedded(model, path)


def search_small_compact(model, layout, text, noise, steps, out_dir, levels, backend):
    """Capture one dense run and search a Compact config per tau (the CPU smoke run's stand-ins)."""
    from dist_compact.search.capture import CaptureAttention, MassStore
    from dist_compact.search.config_file import save_config
    from dist_compact.search.offline import SearchSettings, search_store
    from dist_compact import SparsityConfig, sparsify, unsparsify
    from dist_compact.integrations import DenoisingState
    from dist_compact.run.sampler import sample

    cfg = model.config
    store = MassStore.for_layout(layout, cfg.depth, cfg.heads, model="small")
    state = DenoisingState()
    sparsify(model, SparsityConfig(mode="dense"), tile=layout.tile, state=state, backend=backend,
             attention_factory=lambda n, s, c, sp: [CaptureAttention(i, store) for i in range(n)])
    sample(model, text, noise, steps=steps, guidance=4.0, shift=3.0, state=state)
    unsparsify(model)
    out = []
    for level, tau in levels:
        config = search_store(store, SearchSettings(tau=tau), model="small").config
        path = os.path.join(out_dir, f"compact-{level}.yaml")
        save_config(config, path)
        out.append(f"{level}={path}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[],
                   help="config files (default: configs/models/embedded-gpu.yaml)")
    p.add_argument("--compact", action="append", default=[], metavar="LEVEL=PATH",
                   help="a searched Compact config per level (repeatable, in the order of --densities)")
    p.add_argument("--densities", default="0.25,0.15",
                   help="target densities of adaspa / window / random, or 'from-compact': those the --compact "
                        "configs reach on this layout")
    p.add_argument("--dense-steps", type=int, default=10, help="warm-up of every sparse mode, of 50 reference steps")
    p.add_argument("--modes", default="", help="only these modes (comma list; dense always runs)")
    p.add_argument("--limit", type=int, default=0, help="prompts of the rotated grid (0: all 120)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed-base", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    p.add_argument("--csv", default=None, help="one row per mode")
    p.add_argument("--clips-csv", default=None, help="one row per (mode, clip)")
    p.add_argument("--json", default=None, help="summary rows and run facts")
    p.add_argument("--png", default=None, help="PSNR vs speed-up figure (needs Pillow for its text)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny random model, 4 clips, 4 steps")
    p.add_argument("--choose", default=None, metavar="JSON",
                   help="no run: pick the demo sparsity from a --json of an earlier run (choose_demo's rule)")
    p.add_argument("--sparsity-out", default=None, help="with --choose: the sparsity YAML to write")
    args = p.parse_args(argv)
    if args.choose:
        with open(args.choose) as f:
            row = choose_demo(json.load(f)["summary"])
        print(f"chosen: {row['mode']} {row['level']} ({row['speedup_vs_dense']}x, {row['psnr_mean_db']} dB)")
        if args.sparsity_out:
            write_sparsity_yaml(row, args.sparsity_out, os.path.basename(args.choose))
        return 0
    if args.small:
        return _small(args)
    return run(args)


def _small(args) -> int:
    tmp = tempfile.mkdtemp(prefix="quality_speed_")
    weights = os.path.join(tmp, "small.safetensors")
    small_model(weights)
    args.config = args.config or []
    args._overrides = [("model.path", weights), ("model.name", "small"), ("model.frames", "4"),
                       ("model.height", "32"), ("model.width", "32"), ("model.tile", "1,4,4"),
                       ("run.steps", str(args.steps or 4)), ("cluster.device", "cpu"), ("run.attn_backend", "torch")]
    args.limit = args.limit or 4
    args._small_dir = tmp
    return run(args)


def run(args) -> int:
    import torch

    from dist_compact import sparsify
    from dist_compact.integrations import DenoisingState
    from dist_compact.run.loader import load_run_config
    from dist_compact.models.embedded import load_embedded, sha256_of, shipped_weights
    from dist_compact.models.motion import score_clips, summarize
    from dist_compact.run.report import psnr, ssim
    from dist_compact.run.sampler import sample
    from dist_compact.stats import AttentionStats

    configs = args.config or ([] if args.small else ["configs/models/embedded-gpu.yaml"])
    overrides = list(getattr(args, "_overrides", []))
    if args.steps is not None and not args.small:
        overrides.append(("run.steps", str(args.steps)))
    base = load_run_config(configs, overrides)
    want = base.cluster.device
    device = torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mc, run_opts = base.model, base.run
    path = mc.path or str(shipped_weights(mc.name))
    model = load_embedded(path, device=device, dtype=dtype)
    if device.type == "cuda":
        model.compile_pointwise()
    mcfg = model.config
    digest = sha256_of(path)
    layout = model.video_layout(mc.frames, mc.height, mc.width, mc.tile)
    clips = grid_clips(args.limit, args.seeds, args.seed_base)

    def noise_of(seed):  # what generate.py --seed draws
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((1, mcfg.in_channels, mc.frames, mc.height, mc.width), generator=gen).to(device)

    if args.small and not args.compact:
        args.compact = search_small_compact(model, layout, model.tokenizer.batch([clips[0][0]]).to(device),
                                            noise_of(0), run_opts.steps, args._small_dir,
                                            [("high", 0.95), ("low", 0.8)], run_opts.attn_backend)
    modes = build_modes(args, mc.name, mcfg.depth, mcfg.heads, layout, base.sparsity)
    print(f"{len(clips)} clips x {len(modes)} modes, {run_opts.steps} steps, {layout}, {device}, "
          f"weights {digest[:16]}...", flush=True)

    def one(sparsity, pattern, prompt, seed, stats=None):
        text = model.tokenizer.batch([prompt]).to(device)
        state = DenoisingState()
        sparsify(model, sparsity, compact=pattern if sparsity.uses_compact else None, tile=layout.tile, state=state,
                 stats=stats, backend=run_opts.attn_backend)
        return sample(model, text, noise_of(seed), steps=run_opts.steps, guidance=run_opts.guidance,
                      shift=run_opts.shift, state=state)

    dense_videos = []
    summary, clip_rows = [], []
    t_all = time.perf_counter()
    for mode, level, sparsity, pattern, text in modes:
        one(sparsity, pattern, clips[0][0], clips[0][1] + 7919)  # warm-up: compile, autotune, index caches
        secs, videos, flops, dens, sparse_share = [], [], [], [], []
        kind_secs = {k: [] for k in STEP_KINDS}  # every step's wall time, by what the step did
        for k, (prompt, seed) in enumerate(clips):
            stats = AttentionStats(timing=False) if mode != "dense" else None
            res = one(sparsity, pattern, prompt, seed, stats)
            secs.append(res.total_seconds)
            videos.append(res.latents.float().cpu())
            rows = stats.rows() if stats is not None else []
            for kind, sec in zip(step_kinds(rows, run_opts.steps), res.step_seconds):
                kind_secs[kind].append(sec)
            if stats is not None:
                s = stats.summary()
                flops.append(attention_flops_share(s, rows, layout.block_size, sparsity.mass_query_rows))
                dens.append(s["mean_density_sparse"])
                sparse_steps = {r["step"] for r in rows if r["kind"] in ("sparse", "cached_search")}
                sparse_share.append(len(sparse_steps) / run_opts.steps)
        vids = torch.cat(videos)
        if mode == "dense":
            dense_videos = vids
        scores = score_clips(vids, [c[0] for c in clips])
        q = [psnr(vids[i], dense_videos[i]) for i in range(len(clips))] if mode != "dense" else []
        s_ = [ssim(vids[i], dense_videos[i]) for i in range(len(clips))] if mode != "dense" else []
        for i, (prompt, seed) in enumerate(clips):
            clip_rows.append({"mode": mode, "level": level, "prompt": prompt, "seed": seed,
                              "denoise_s": round(secs[i], 5), "follows": int(scores[i].follows),
                              "psnr_db": round(q[i], 3) if q else None, "ssim": round(s_[i], 5) if s_ else None,
                              "attn_flops_vs_dense": round(flops[i], 4) if flops else 1.0,
                              "density_sparse_steps": round(dens[i], 4) if dens and dens[i] is not None else None})
        row = {"mode": mode, "level": level, "pattern": text, "clips": len(clips), "steps": run_opts.steps,
               "sparse_step_share": round(statistics.mean(sparse_share), 3) if sparse_share else 0.0,
               "density_sparse_steps": round(statistics.mean([d for d in dens if d is not None]), 4)
               if any(d is not None for d in dens) else None,
               "attn_flops_vs_dense": round(statistics.mean(flops), 4) if flops else 1.0,
               "denoise_s_median": round(statistics.median(secs), 5),
               "speedup_vs_dense": None,
               "psnr_mean_db": round(statistics.mean(q), 3) if q else None,
               "psnr_min_db": round(min(q), 3) if q else None,
               "ssim_mean": round(statistics.mean(s_), 5) if s_ else None,
               "motion_follow_pct": round(summarize(scores)["follows_pct"], 2),
               **{f"{k}_step_ms": round(1e3 * statistics.median(v), 3) if v else None for k, v in kind_secs.items()},
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "weights_sha256": digest}
        # the YAML of modes a config file can express (the baselines' patterns are built in code)
        row["sparsity"] = dataclasses.asdict(sparsity) if mode in CHOOSABLE else None
        row["speedup_vs_dense"] = round(summary[0]["denoise_s_median"] / row["denoise_s_median"], 3) if summary else 1.0
        summary.append(row)
        print(f"{mode:15s} {level:10s} {row['denoise_s_median']:.4f} s  x{row['speedup_vs_dense']:.2f}  "
              f"PSNR {row['psnr_mean_db']}  motion {row['motion_follow_pct']}%  flops {row['attn_flops_vs_dense']}  "
              f"step ms dense/search/sparse {row['dense_step_ms']}/{row['search_step_ms']}/{row['sparse_step_ms']}",
              flush=True)
        # every output after every mode: a run cut short keeps what it finished
        write_csv(args.csv, [{k: r[k] for k in SUMMARY_FIELDS} for r in summary], SUMMARY_FIELDS)
        write_csv(args.clips_csv, clip_rows)
        facts = {"clips": len(clips), "seeds": [args.seed_base, args.seed_base + args.seeds - 1],
                 "steps": run_opts.steps, "guidance": run_opts.guidance, "shift": run_opts.shift,
                 "layout": repr(layout), "weights_sha256": digest, "torch": torch.__version__,
                 "seconds": round(time.perf_counter() - t_all, 1), "modes_done": len(summary),
                 "modes": len(modes), "summary": summary}
        if device.type == "cuda":
            import triton

            facts.update(device=torch.cuda.get_device_name(device), triton=triton.__version__)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(facts, f, indent=1)
        if args.png and len(summary) > 1:
            write_pareto(summary, args.png, title=f"{mc.name}: PSNR vs speed-up ({len(clips)} clips, "
                                                  f"{facts.get('device', 'cpu')})")
    print_table(summary)
    return 0


def print_table(summary) -> None:
    print("\n| mode | level | steps sparse | density (sparse steps) | attention FLOPs vs dense | denoise s (median) "
          "| speed-up | PSNR dB mean / min | SSIM | motion % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        dens = "-" if r["density_sparse_steps"] is None else f"{r['density_sparse_steps']:.3f}"
        q = "-" if r["psnr_mean_db"] is None else f"{r['psnr_mean_db']:.2f} / {r['psnr_min_db']:.2f}"
        s = "-" if r["ssim_mean"] is None else f"{r['ssim_mean']:.4f}"
        print(f"| {r['mode']} | {r['level']} | {100 * r['sparse_step_share']:.0f}% | {dens} | "
              f"{r['attn_flops_vs_dense']:.3f} | {r['denoise_s_median']:.3f} | {r['speedup_vs_dense']:.2f}x | {q} | {s} | "
              f"{r['motion_follow_pct']:.1f} |")


def write_pareto(summary, path, title="PSNR vs speed-up") -> None:
    """The figure: one point per sparse (mode, level), PSNR vs dense against speed-up."""
    from dist_compact.png import scatter_figure, write_png

    pts = [r for r in summary if r["mode"] != "dense" and r["psnr_mean_db"] is not None]
    series = {}
    for r in pts:
        psnr_v = r["psnr_mean_db"] if math.isfinite(r["psnr_mean_db"]) else 60.0
        series.setdefault(r["mode"], []).append((r["speedup_vs_dense"], psnr_v, str(r["level"])))
    img = scatter_figure(series, title=title, x_label="speed-up of denoising vs dense (x)",
                         y_label="PSNR vs dense (dB, mean over clips)", hlines=[(30.0, "30 dB")],
                         vlines=[(2.0, "2.0x")])
    write_png(path, img)


if __name__ == "__main__":
    sys.exit(main())
