"""Sparse-vs-dense quality of the embedded model's main job, for several sparsity settings.

Each variant runs the main job (``run_generation``) with ``compare_dense`` on every prompt: the sparse
run and a dense run from the same noise. Prints and writes one row per (variant, prompt): mean density
of the sparse attention calls, PSNR / SSIM of sparse vs dense, seconds per run.

    python benchmarks/embedded_quality.py --csv benchmarks/results/embedded_quality.csv \
        --variant adaspa-0.25= --variant "compact=sparsity.mode=compact;sparsity.compact_config=X.yaml;model.tile=1,4,4"

A variant is ``name=key=value;key=value`` (generate.py ``--section.key`` overrides without the dashes).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_csv  # noqa: E402

PROMPTS = ("a red square moving left", "a blue circle bouncing on stripes", "a yellow triangle moving up")


def parse_variant(text: str):
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected name=key=value;...")
    pairs = []
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value")
        pairs.append((key, value))
    return name, pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="config files (default: 1gpu.yaml)")
    p.add_argument("--variant", action="append", default=[], help="name=key=value;... (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help=f"prompts (default: {PROMPTS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--csv", default=None, help="rows written after every run")
    p.add_argument("--video", action="store_true", help="also write mp4/gif (needs imageio-ffmpeg)")
    args = p.parse_args(argv)

    from dist_compact.run.loader import load_run_config
    from dist_compact.run.generation import run_generation

    configs = args.config or ["configs/cluster/1gpu.yaml"]
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    prompts = args.prompt or list(PROMPTS)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for name, pairs in variants:
            for i, prompt in enumerate(prompts):
                overrides = [*pairs, ("run.prompt", prompt), ("run.seed", str(args.seed)),
                             ("run.compare_dense", "true"), ("run.progress", "false"),
                             ("run.output_dir", out_dir), ("run.name", f"{name}-{i}"),
                             ("run.video", str(args.video).lower())]
                if args.steps is not None:
                    overrides.append(("run.steps", str(args.steps)))
                cfg = load_run_config(configs, overrides)
                t0 = time.perf_counter()
                res = run_generation(cfg)
                q = res.report["quality"]
                sparse = res.report["sparse"]
                row = {"variant": name, "prompt": prompt, "seed": args.seed, "steps": cfg.run.steps,
                       "mode": cfg.sparsity.mode, "mean_density": sparse.get("mean_density"),
                       "density_sparse_steps": sparse.get("mean_density_sparse"),
                       "psnr_db": round(q["psnr_db"], 2), "ssim": round(q["ssim"], 4),
                       "seconds_both_runs": round(time.perf_counter() - t0, 2),
                       "device": res.report.get("device")}
                rows.append(row)
                print(row, flush=True)
                write_csv(args.csv, rows)
    print("\nvariant                       density (all calls, sparse-step calls)   PSNR dB (mean, min)   SSIM (mean)")
    for name, _ in variants:
        rs = [r for r in rows if r["variant"] == name]
        dens = [r["mean_density"] for r in rs if r["mean_density"] is not None] or [float("nan")]
        sp = [r["density_sparse_steps"] for r in rs if r["density_sparse_steps"] is not None] or [float("nan")]
        print(f"{name:28s}  {statistics.mean(dens):7.3f} {statistics.mean(sp):7.3f}   "
              f"{statistics.mean(r['psnr_db'] for r in rs):6.2f} {min(r['psnr_db'] for r in rs):6.2f}"
              f"          {statistics.mean(r['ssim'] for r in rs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
