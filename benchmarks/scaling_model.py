"""Sequence-parallel scaling on ONE GPU: every rank's real local attention work timed, communication
added from measured bandwidths, predicted step time and scaling efficiency per layout, cost-balanced
vs contiguous shards.

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/scaling_model.py --out $OUT          # one H200, ~3 min
    python benchmarks/scaling_model.py --imbalance-only --sources compact-0.5,compact-0.6,compact-0.8,adaspa \
        --out /tmp/sm                                                                   # CPU: the imbalance table
    python benchmarks/scaling_model.py --small                                          # CPU dry run (seconds)
    # a multi-GPU machine: the same prediction, and the real layer measured beside it
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 4 benchmarks/scaling_model.py --measure --out $OUT

The shapes, index sources, plans and the model's assumptions are those of
:mod:`dist_compact.parallel.cost` (read its module doc); this script loads the shipped Compact configs,
times every rank's calls and writes the tables.
CSV: ``scaling_model.csv`` (predictions) and ``imbalance.csv`` (every source, shape, layout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "kernels")]  # dist_compact and dist_compact_kernels, uninstalled

from common import write_csv  # noqa: E402

from dist_compact import VideoLayout  # noqa: E402
from dist_compact.models.embedded import DEFAULT_WEIGHTS  # noqa: E402
from dist_compact.parallel import ParallelConfig  # noqa: E402
from dist_compact.parallel.cost import (A2A_GBPS, HEAD_DIM, P2P_GBPS, SHAPES, SMALL_SHAPES, Source, Work,  # noqa: E402
                                        imbalance_rows, layouts_for, measure, padded_layout, predict, shape_layout)
from dist_compact.search.config_file import load_config  # noqa: E402


def shipped_compact(source: str):
    """The shipped Compact config an index source pools (``compact-0.5`` -> embedded-compact-0.5.yaml), or None."""
    if not source.startswith("compact-"):
        return None
    return load_config(str(DEFAULT_WEIGHTS.parent / f"embedded-{source}.yaml"))


def make_timer(device: torch.device):
    """``timer(fn, reps)`` -> median ms (CUDA events on a GPU, perf_counter on the CPU), after one warm-up."""
    def run(fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    return run


def _print_table(title: str, rows: List[dict], keys: Sequence[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r.get(k, "")).rjust(w) for k, w in zip(keys, widths)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the CSV files (default $OUT)")
    ap.add_argument("--shapes", default="hunyuan720,wan480")
    ap.add_argument("--sources", default="compact-0.5,adaspa",
                    help="index sources of the imbalance table (all: compact-0.5,compact-0.6,compact-0.8,adaspa)")
    ap.add_argument("--timed-sources", default="compact-0.5,adaspa", help="index sources the GPU part times")
    ap.add_argument("--P", default="2,4,8", help="rank counts")
    ap.add_argument("--measure-layers", type=int, default=2, help="layers timed per source (scaled to all layers)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--a2a-gbps", type=float, default=A2A_GBPS, help="all-to-all GB/s sent per rank")
    ap.add_argument("--p2p-gbps", type=float, default=P2P_GBPS, help="ring point-to-point GB/s per rank")
    ap.add_argument("--backend", default="auto", help="kernel backend (auto: the Gluon / Triton kernel on GPUs)")
    ap.add_argument("--imbalance-only", action="store_true", help="the CPU part only (no timing)")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (a dry run of every part)")
    ap.add_argument("--measure", action="store_true",
                    help="under torchrun with P GPUs: also time the real wrapped layer of every layout of P ranks")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.small:  # a dry run of every part in seconds: one timed source, P = 2 and 4, one layer, one rep
        args.timed_sources, args.P, args.measure_layers, args.reps = "compact-0.5", "2,4", 1, 1
    shapes = SMALL_SHAPES if args.small else {k: SHAPES[k] for k in args.shapes.split(",")}
    Ps = [int(p) for p in args.P.split(",")]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.measure:
        from dist_compact.parallel import init_distributed

        if world == 1:
            raise SystemExit("scaling_model.py --measure: run under torchrun with one process per GPU")
        init_distributed(ParallelConfig(1, world))  # NCCL on GPUs, gloo on CPUs; groups per layout below
        if torch.cuda.is_available() and not args.small:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = args.backend if device.type == "cuda" else "torch"
    timer = make_timer(device)
    imb, pred, meas = [], [], []
    t0 = time.time()
    sources = args.sources.split(",")
    timed = args.timed_sources.split(",")
    for shape, spec in shapes.items():
        # the layout padding depends on the degrees (SequenceParallel.layout_for): group the layouts by it
        groups: Dict[VideoLayout, List[Tuple[int, str, int, int]]] = {}
        for P in Ps:
            for name, U, R in layouts_for(P, spec["heads"]):
                groups.setdefault(padded_layout(shape_layout(spec), ParallelConfig(U, R)), []).append((P, name, U, R))
        for src_name in dict.fromkeys(sources + ([] if args.imbalance_only else timed)):
            for lay, entries in groups.items():
                src = Source(src_name, lay, spec["heads"], spec["layers"], compact=shipped_compact(src_name))
                if src_name in sources:
                    imb += imbalance_rows(src, shape, entries)
                if args.imbalance_only or src_name not in timed:
                    continue
                work = Work(lay, spec["heads"], HEAD_DIM if not args.small else 32, dtype, device, backend)
                ml = sorted(set(int(x) for x in torch.linspace(0, spec["layers"] - 1, args.measure_layers).round()))
                rows = predict(src, work, ml, entries, a2a_gbps=args.a2a_gbps, p2p_gbps=args.p2p_gbps,
                               reps=args.reps, timer=timer)
                if args.measure:
                    got = measure(src, work, ml, entries, args.reps, timer=timer)
                    for row in rows:
                        row["measured_ms"] = got.get((row["layout"], row["plan"]), "")
                pred += [dict(shape=shape, **row) for row in rows]
                del work
    if rank == 0:
        imb.sort(key=lambda r: (r["shape"], r["source"], r["P"], r["layout"]))
        _print_table("imbalance (max / mean computed blocks per rank, summed over layers)", imb,
                     ["shape", "source", "density", "P", "layout", "contiguous", "balanced", "balanced_oracle",
                      "balanced_slab_aligned", "contiguous_worst_layer", "balanced_worst_layer"])
        if pred:
            pred.sort(key=lambda r: (r["shape"], r["source"], r["P"], r["layout"], r["plan"]))
            _print_table(f"predicted attention time per step (a2a {args.a2a_gbps:g} GB/s, p2p {args.p2p_gbps:g} GB/s)",
                         pred, ["shape", "source", "P", "layout", "plan", "t1_ms", "step_ms", "efficiency",
                                "step_overlap_ms", "efficiency_overlap", "a2a_mb_per_layer", "p2p_mb_per_layer"]
                         + (["measured_ms"] if args.measure else []))
        if args.out:
            write_csv(os.path.join(args.out, "imbalance.csv"), imb)
            write_csv(os.path.join(args.out, "scaling_model.csv"), pred)
        print(f"\n{time.time() - t0:.1f} s")
    if args.measure:
        from dist_compact.parallel.launch import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
