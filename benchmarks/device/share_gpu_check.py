"""Ranks sharing ONE GPU: every sequence-parallel layout of generate's pipeline equals one process.

Driven by share_gpu_check.sh (read it first); three kinds of call, all from the repository root:

    python benchmarks/device/share_gpu_check.py --reference --out DIR            # one process: the references
    torchrun --nproc-per-node P benchmarks/device/share_gpu_check.py --out DIR   # P ranks on one GPU
    python benchmarks/device/share_gpu_check.py --summary --out DIR              # the table + CSV

Models (``--models``): ``embedded`` (the shipped tiny DiT, 16 x 48 x 48, its shipped Compact config),
``hunyuan_video`` / ``wan`` (the published transformers with random weights and few layers, at a reduced
video size; diffusers needed), each under Compact + AdaSpa (a static index, so the shards are
cost-balanced; and a fused search, so the block-mass ring runs) for 3 steps: step 0 dense, step 1
the fused search (dense + LSE + block mass), step 2 the sparse step (static union searched index).
The random models' Compact configs are the shipped embedded patterns drawn per head
(``dist_compact.parallel.cost.pooled_compact``), written under DIR.

Each parallel run goes through ``run_generation`` with ``cluster.share_gpus: true`` (gloo with CUDA
tensors, the ring's point-to-point staged through pinned host memory), bf16, the default kernels
(the Gluon kernel where it applies: blocks of 128 on an sm_90 GPU; the embedded model's blocks of 16
use the Triton kernel). Per (layout, model) the latents are compared with the one-process run:
``rel`` = ||a - b|| / ||b|| must be <= the model's limit, no NaN: ``--tol``, and for the models of
``--floor-models`` (default: embedded) ``max(--tol, --floor-factor x floor)``, where ``floor`` is the
model's own bf16-vs-float32 difference in one process (``--reference`` runs both). The embedded model's
guided bf16 floor after 3 steps is ~6e-2 (its ring rows ~4.5e-2). The random transformers keep the
fixed limit: their bf16 and float32 runs pick other blocks in the search at random weights
(HunyuanVideo 0.32, Wan 0.05 apart, 2026-12-03), so a limit from that would not test anything; their
parallel rows are ~5e-3 from one process.
``ws_calls``: calls of the Gluon kernel on rank 0 (counted by wrapping its entry point for this check). ``imbalance`` /
``contiguous``: report.json's ``parallel_balance`` (max / mean computed blocks per rank of the static
index, this plan vs the contiguous split).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "kernels"), os.path.join(_ROOT, "benchmarks")]

MODELS = {
    "embedded": [("model.name", "embedded"), ("model.kind", "embedded"), ("model.frames", "16"),
                 ("model.height", "48"), ("model.width", "48"), ("model.tile", "1,4,4"), ("run.guidance", "4.0")],
    # the GPU-scale embedded model: 16 x 32 x 32 video tokens in tiles of 2 x 8 x 8, 4 heads of 128
    "embedded-gpu": [("model.name", "embedded-gpu"), ("model.kind", "embedded"), ("model.frames", "16"),
                     ("model.height", "128"), ("model.width", "128"), ("model.tile", "2,8,8"),
                     ("run.guidance", "4.0")],
    # 9 x 30 x 53 latent tokens + 256 prompt tokens; 1 dual-stream + 2 single-stream blocks, 24 heads
    "hunyuan_video": [("model.name", "hunyuanvideo"), ("model.kind", "random"), ("model.layers", "3"),
                ("model.frames", "33"), ("model.height", "480"), ("model.width", "848"), ("model.tile", "1,8,16"),
                ("run.guidance", "6.0")],
    # 6 x 30 x 52 latent tokens, 2 blocks, 40 heads
    "wan": [("model.name", "wan2.1-t2v-14b"), ("model.kind", "random"), ("model.layers", "2"),
            ("model.frames", "21"), ("model.height", "480"), ("model.width", "832"), ("model.tile", "1,16,8")],
}
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}
#: attention heads per model: a Ulysses degree that does not divide them is not a layout of that model
HEADS = {"embedded": 6, "embedded-gpu": 4, "hunyuan_video": 24, "wan": 40}
#: ``--variant``: extra overrides that isolate where a difference comes from (the online search picks
#: blocks by top-k of the block mass, so bf16 rounding can change its choice; ``compact`` has no online
#: search, ``fp32`` keeps the search but in float32)
VARIANTS = {"default": [], "compact": [("sparsity.mode", "compact")], "fp32": [("model.dtype", "float32")],
            # AdaSpa's per-head budgets (the paper rule): heads differ in cost after the search, so the
            # Ulysses layouts re-plan their heads online and move the index and LSE (``replans``)
            "paper-heads": [("sparsity.head_adaptive", "true")]}
SCHEDULE = [("sparsity.mode", "compact+adaspa"), ("sparsity.dense_steps", "1"), ("sparsity.search_steps", "[1]"),
            ("sparsity.search_kinds", "[fused]"), ("sparsity.reference_steps", "3"), ("sparsity.sparsity", "0.8"),
            ("run.steps", "3"), ("run.video", "false"), ("run.progress", "false"), ("run.prompt", "a red circle moving right"),
            ("run.seed", "3"), ("model.dtype", "bfloat16")]


def _compact_file(model: str, out: str) -> str:
    """The Compact config of a model: the shipped one for ``embedded``, else a pooled one written under ``out``."""
    if model == "embedded":
        return "embedded-compact-0.5.yaml"
    if model == "embedded-gpu":
        return "embedded-gpu-compact-0.9.yaml"
    from dist_compact.run.jobs.random_weights import published_config
    from dist_compact.models.embedded import shipped_weights
    from dist_compact.parallel.cost import pooled_compact
    from dist_compact.search.config_file import load_config, save_config

    name = dict(MODELS[model])["model.name"]
    layers = int(dict(MODELS[model])["model.layers"])  # HunyuanVideo: a third of them dual-stream, all counted
    _, tcfg, _ = published_config(name, "full", None)
    path = os.path.join(out, f"compact-{model}.yaml")
    shipped = load_config(str(shipped_weights().parent / "embedded-compact-0.5.yaml"))
    save_config(pooled_compact(shipped, name, layers, tcfg["num_attention_heads"]), path)
    return path


#: ``--cpu``: a dry run of the script itself (gloo CPU processes, fp32, the PyTorch kernels, a small video)
CPU = [("cluster.device", "cpu"), ("model.dtype", "float32"), ("run.attn_backend", "torch"), ("model.frames", "5"),
       ("model.height", "36"), ("model.width", "36")]


def _cfg(model: str, out: str, name: str, compact: str, cluster, cpu: bool = False, variant: str = "default"):
    from dist_compact.run.loader import load_run_config

    over = MODELS[model] + SCHEDULE + VARIANTS[variant] + [("sparsity.compact_config", compact), ("run.output_dir", os.path.join(out, "runs")),
                                       ("run.name", name), ("cluster.device", "cuda")] + cluster
    if cpu:
        over = [kv for kv in over if kv != ("cluster.share_gpus", "true")] + CPU
    return load_run_config([], over)


def _count_ws():
    """Wrap the Gluon kernel's entry point to count its calls (instrumentation of this check only)."""
    try:
        import dist_compact_kernels.block_sparse_ws as ws
    except Exception:  # noqa: BLE001 - no Gluon in this Triton: nothing to count
        return lambda: 0
    inner = ws.block_sparse_fwd_ws
    box = [0]

    def counted(*a, **k):
        box[0] += 1
        return inner(*a, **k)

    ws.block_sparse_fwd_ws = counted
    return lambda: box[0]


def reference(models, out, cpu=False, variant="default"):
    import torch

    from dist_compact.run.generation import run_generation

    os.makedirs(out, exist_ok=True)
    for m in models:
        compact = _compact_file(m, out)
        t = time.time()
        res = run_generation(_cfg(m, out, f"ref-{m}", compact, [("cluster.nproc", "1")], cpu, variant))
        torch.save(res.latents, os.path.join(out, f"ref-{m}.pt"))
        floor = None
        if variant == "default" and not cpu and m in FLOOR_MODELS:
            # the model's own bf16 floor: the same one-process run in float32
            r32 = run_generation(_cfg(m, out, f"ref32-{m}", compact, [("cluster.nproc", "1")], cpu, "fp32"))
            a, b = res.latents.float(), r32.latents.float()
            floor = float((a - b).norm() / b.norm().clamp(min=1e-30))
        with open(os.path.join(out, f"floor-{m}.json"), "w") as f:
            json.dump({"model": m, "bf16_vs_fp32": floor}, f)
        with open(os.path.join(out, f"compact-{m}.path"), "w") as f:
            f.write(compact)
        print(f"reference {m}: {time.time() - t:.1f} s", flush=True)


FLOOR_MODELS = ("embedded", "embedded-gpu")


def limit_of(out: str, model: str, tol: float, factor: float, floor_models=FLOOR_MODELS):
    """(limit, floor) of a model: ``max(tol, factor * floor)`` for ``floor_models``, else ``tol``;
    floor None (not measured) -> tol."""
    path = os.path.join(out, f"floor-{model}.json")
    floor = None
    if os.path.exists(path):
        with open(path) as f:
            floor = json.load(f).get("bf16_vs_fp32")
    return (tol if floor is None or model not in floor_models else max(tol, factor * floor)), floor


def parallel(models, out, tol, cpu=False, variant="default", factor=1.5):
    import torch
    import torch.distributed as dist

    from dist_compact.run.generation import run_generation

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    ws_calls = _count_ws()
    rows = []
    for (u, r) in LAYOUTS[world]:
        for m in models:
            if HEADS[m] % u:
                continue  # not a layout of this model (generate.py refuses it with one error)
            ref_path = os.path.join(out, f"ref-{m}.pt")
            if not os.path.exists(ref_path):
                continue
            with open(os.path.join(out, f"compact-{m}.path")) as f:
                compact = f.read().strip()
            before = ws_calls()
            t = time.time()
            row = dict(layout=f"ulysses{u}" if r == 1 else f"ring{r}" if u == 1 else f"hybrid{u}x{r}", P=world, model=m)
            try:
                res = run_generation(_cfg(m, out, f"P{world}-u{u}r{r}-{m}", compact,
                                          [("cluster.nproc", str(world)), ("cluster.ulysses", str(u)),
                                           ("cluster.ring", str(r)), ("cluster.backend", "gloo"),
                                           ("cluster.share_gpus", "true")], cpu, variant))
                ref = torch.load(ref_path)
                a, b = res.latents.float(), ref.float()
                bal = res.report.get("parallel_balance") or (res.report.get("sparse") or {}).get("parallel_balance") or {}
                row.update(max_abs=float((a - b).abs().max()), rel=float((a - b).norm() / b.norm().clamp(min=1e-30)),
                           nan=bool(torch.isnan(a).any()), imbalance=bal.get("imbalance"),
                           contiguous=bal.get("imbalance_contiguous"), ring_bounds=bal.get("ring_bounds"),
                           online=(bal.get("online") or {}).get("imbalance"),
                           online_contiguous=(bal.get("online") or {}).get("imbalance_contiguous"),
                           replans=sum(r.get("replans", 0) for r in (bal.get("online") or {}).get("per_layer", [])),
                           ws_calls=ws_calls() - before, seconds=round(time.time() - t, 1))
                row["limit"], row["floor"] = limit_of(out, m, tol, factor)
                row["ok"] = (not row["nan"]) and row["rel"] <= row["limit"]
            except Exception as e:  # noqa: BLE001 - one failed case is a row of the table, not the end of the run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                print(f"rank {rank}: {row['layout']} {m} failed: {row['error']}", file=sys.stderr, flush=True)
                if dist.is_initialized():
                    raise  # the other ranks would wait forever in the next collective
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        with open(os.path.join(out, f"rows-P{world}.json"), "w") as f:
            json.dump(rows, f)


def summary(out, tol, factor=1.5):
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    from common import write_csv

    rows = []
    for p in sorted(glob.glob(os.path.join(out, "rows-P*.json"))):
        with open(p) as f:
            rows += json.load(f)
    keys = ["P", "layout", "model", "rel", "limit", "floor", "max_abs", "ok", "imbalance", "contiguous", "online",
            "online_contiguous", "replans", "ws_calls", "seconds"]

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    table = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(t[i]) for t in table)) if table else len(k) for i, k in enumerate(keys)]
    print(f"\nranks sharing one GPU vs one process (bf16 latents after 3 steps, ok: rel <= limit = max({tol:g}, {factor:g} x floor),"
          " floor = the model's one-process bf16 vs float32 difference)")
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
    write_csv(os.path.join(out, "share_gpu_check.csv"), rows,
              fieldnames=keys + ["ring_bounds", "nan", "error"])
    bad = [r for r in rows if not r.get("ok")]
    print(f"{len(rows) - len(bad)}/{len(rows)} ok")
    return 1 if bad or not rows else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "share_gpu"))
    ap.add_argument("--models", default="embedded,hunyuan_video,wan")
    ap.add_argument("--tol", type=float, default=2e-2, help="largest ||a - b|| / ||b|| of the latents (bf16)")
    ap.add_argument("--floor-factor", type=float, default=1.5,
                    help="limit = max(--tol, this x the model's one-process bf16-vs-fp32 difference)")
    ap.add_argument("--reference", action="store_true", help="one process: the reference latents")
    ap.add_argument("--summary", action="store_true", help="print the table and write the CSV")
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    ap.add_argument("--cpu", action="store_true", help="a dry run on CPUs (gloo, fp32, small video, embedded only)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if args.summary:
        return summary(args.out, args.tol, args.floor_factor)
    if args.cpu and models != ["embedded"]:
        ap.error("--cpu runs the embedded model only (--models embedded)")
    if args.reference:
        reference(models, args.out, args.cpu, args.variant)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) not in LAYOUTS:
        ap.error(f"run under torchrun with --nproc-per-node in {sorted(LAYOUTS)}")
    parallel(models, args.out, args.tol, args.cpu, args.variant, args.floor_factor)
    from dist_compact.parallel.launch import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
