"""Where a denoising step's time goes on the embedded model: attention, the rest of the forward, the sampler.

Run on a GPU from the repository root (the GPU-scale model, its shipped weights and Compact configs):

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/step_profile.py --csv $OUT/step_profile.csv \\
        --kernels $OUT/step_kernels.txt
    python benchmarks/step_profile.py --small          # CPU: a tiny random model (checks the script runs)

One sampler run per case (the config's steps, guidance pair of 2 clips as ``generate.py`` runs it), after
one untimed warm-up run. Per step: its wall time (device-synchronised, as the sampler times it), the
transformer forward inside it and every attention call inside that (CUDA events around the installed
processors: the whole attention layer, block-order and search work included). Cases:

* ``dense``: our dense path (SDPA, cuDNN);
* ``no-attention``: the same forward with each attention replaced by returning ``v`` (no attention at
  all): what the rest of the transformer costs;
* ``compact <level>`` / ``config <mode>``: the Compact configs given by ``--compact LEVEL=PATH``, and the
  config's own sparsity (its demo), on the config's schedule;
* ``window <d>`` / ``random <d>``: a fixed 3D window and random blocks at the first Compact config's density
  ``d`` (``--no-baselines`` skips them): the same amount of work in other rows;
* ``<compact case> order=<o>``: with ``--orders natural,longest``, each Compact case again with the Hopper
  kernel's tiles started in that order (``block_sparse_ws.Schedule``: ``longest`` = rows with the most key
  blocks first), for an A/B of the tile order in the same run.

Rows, per case and kind of step (dense / search / sparse, :func:`dist_compact.run.evaluation.step_kinds`):
median ``step_ms``, ``forward_ms``, ``attention_ms`` (sum over layers), ``other_forward_ms`` (forward minus
attention) and ``outside_forward_ms`` (step minus forward: guidance, the Euler update, the NaN check).
With ``--kernels``: ``torch.profiler`` over one whole run of the dense, no-attention and (all steps sparse)
first Compact case: each kernel's total time per step, top ``--top`` by time, grouped by kind.
With ``--syncs``: no timing; one run per case under ``torch.cuda.set_sync_debug_mode("warn")``, and per case
the host synchronisations per step and the source lines that made them (a sync drains the launch queue, so
the GPU then waits for the host to launch what follows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Timer, write_csv  # noqa: E402

FIELDS = ["case", "step_kind", "steps", "step_ms", "forward_ms", "attention_ms", "other_forward_ms",
          "outside_forward_ms", "density_sparse_steps", "device"]

#: kernel kinds by name (first match wins)
KERNEL_KINDS = [
    # "lse" not after a letter ("false" in template arguments is not attention)
    ("attention", re.compile(r"fmha|flash|cudnn|attn|attention|sparse|block_mass|(?<![a-z])lse", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|matmul|sm90_|sm80_|ampere|hopper", re.I)),
    ("fused pointwise (compiled)", re.compile(r"^triton_", re.I)),
    ("copy / layout", re.compile(r"copy|cat|gather|scatter|index|transpose|permute|contiguous", re.I)),
    ("elementwise / reduce", re.compile(r"elementwise|reduce|vectorized|norm|softmax", re.I)),
]


def kernel_kind(name: str) -> str:
    for kind, pat in KERNEL_KINDS:
        if pat.search(name):
            return kind
    return "other"


class Timed:
    """An attention processor whose every call is a span ``"attn"`` of ``timer``."""

    def __init__(self, inner, timer):
        self.inner, self.timer = inner, timer

    def __call__(self, q, k, v):
        s = self.timer.start()
        out = self.inner(q, k, v)
        self.timer.stop(s, "attn")
        return out


@contextlib.contextmanager
def tile_order(order):
    """The Hopper kernel's default tile order set to ``order`` for the body (nothing for None)."""
    if order is None:
        yield
        return
    from dist_compact_kernels import block_sparse_ws as ws

    before, ws.ORDER = ws.ORDER, order
    try:
        yield
    finally:
        ws.ORDER = before


def no_attention(q, k, v):
    """The stand-in of the no-attention case: the values, unchanged (nothing computed)."""
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[],
                   help="config files (default: configs/models/embedded-gpu.yaml)")
    p.add_argument("--compact", action="append", default=[], metavar="LEVEL=PATH",
                   help="Compact configs to time (default: the shipped embedded-gpu-compact-{0.9,0.8}.yaml)")
    p.add_argument("--prompt", default="a red circle moving right")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (medians over all their steps)")
    p.add_argument("--csv", default=None)
    p.add_argument("--kernels", default=None, help="write the profiler's per-kernel table here")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the fixed window and random blocks at the first Compact config's density")
    p.add_argument("--orders", default="natural",
                   help="comma list of Hopper-kernel tile orders (natural, longest); each order past the first "
                        "repeats the Compact cases with it")
    p.add_argument("--syncs", default=None, metavar="PATH",
                   help="instead of timing, count the host synchronisations of every case (GPU) and write them here")
    p.add_argument("--small", action="store_true", help="CPU smoke run: a tiny random model, 4 steps")
    args = p.parse_args(argv)
    orders = args.orders.split(",")
    known = ("natural", "longest")
    if not orders or any(o not in known for o in orders):
        p.error(f"--orders {args.orders}: each must be one of {', '.join(known)}")
    return run(args)


def run(args) -> int:
    import torch

    from dist_compact import SparsityConfig, sparsify
    from dist_compact.integrations import DenoisingState
    from dist_compact.models.embedded import load_embedded, sha256_of, shipped_weights
    from dist_compact.run.evaluation import step_kinds
    from dist_compact.run.loader import load_run_config
    from dist_compact.run.sampler import sample
    from dist_compact.search.config_file import load_config
    from dist_compact.stats import AttentionStats

    overrides = []
    if args.small:
        from quality_speed import small_model

        tmp = tempfile.mkdtemp(prefix="step_profile_")
        weights = os.path.join(tmp, "small.safetensors")
        small_model(weights)
        overrides = [("model.path", weights), ("model.name", "small"), ("model.frames", "4"), ("model.height", "32"),
                     ("model.width", "32"), ("model.tile", "1,4,4"), ("run.steps", "4"), ("cluster.device", "cpu"),
                     ("run.attn_backend", "torch"), ("sparsity.mode", "adaspa"), ("sparsity.compact_config", "null")]
    base = load_run_config(args.config or ([] if args.small else ["configs/models/embedded-gpu.yaml"]), overrides)
    want = base.cluster.device
    device = torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    mc, ro = base.model, base.run
    path = mc.path or str(shipped_weights(mc.name))
    model = load_embedded(path, device=device, dtype=dtype)
    if cuda:
        model.compile_pointwise()
    mcfg = model.config
    layout = model.video_layout(mc.frames, mc.height, mc.width, mc.tile)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((1, mcfg.in_channels, mc.frames, mc.height, mc.width), generator=gen).to(device)
    text = model.tokenizer.batch([args.prompt]).to(device)

    compacts = list(args.compact)
    if not compacts and not args.small:
        wdir = os.path.dirname(path)
        compacts = [f"{lv}={os.path.join(wdir, f'{mc.name}-compact-{lv}.yaml')}" for lv in ("0.9", "0.8")]
    warm = dict(dense_steps=base.sparsity.dense_steps, reference_steps=base.sparsity.reference_steps,
                dense_threshold=1.0)
    cases = [("dense", SparsityConfig(mode="dense"), None), ("no-attention", SparsityConfig(mode="dense"), None)]
    first_compact = None
    timed_compacts = []  # the Compact cases (repeated per --orders)
    for spec in compacts:
        level, _, cpath = spec.partition("=")
        cfg = load_config(cpath, model=mc.name, num_layers=mcfg.depth, num_heads=mcfg.heads)
        cases.append((f"compact {level}", SparsityConfig(mode="compact", compact_config=os.path.basename(cpath),
                                                         **warm), cfg))
        first_compact = first_compact or cases[-1]
        timed_compacts.append(cases[-1])
    if args.small:  # no shipped Compact config fits the tiny model: a fixed window stands in
        from dist_compact.patterns.baselines import window_for_density

        win, _ = window_for_density(layout, mcfg.depth, mcfg.heads, 0.5, model="small")
        first_compact = ("window 0.5", SparsityConfig(mode="compact", **warm), win)
        cases.append(first_compact)
        timed_compacts.append(first_compact)
    if first_compact is not None and args.baselines:
        # the fixed 3D window and random blocks at the first Compact config's density: the same work, other rows
        from dist_compact.patterns.baselines import RandomBlocks, video_density, window_for_density

        d = sum(video_density(first_compact[2].block_mask(i, layout)[0], layout)
                for i in range(mcfg.depth)) / mcfg.depth
        win, _ = window_for_density(layout, mcfg.depth, mcfg.heads, d, model=mc.name)
        cases.append((f"window {d:.3f}", SparsityConfig(mode="compact", **warm), win))
        cases.append((f"random {d:.3f}", SparsityConfig(mode="compact", **warm),
                      RandomBlocks(d, mcfg.depth, mcfg.heads, seed=args.seed)))
    order_of = {}  # case name -> the kernel's tile order (the module default where absent)
    for o in args.orders.split(",")[1:]:
        for name, sp, cfg in timed_compacts:
            cases.append((f"{name} order={o}", sp, cfg))
            order_of[cases[-1][0]] = o
    own = base.sparsity
    own_compact = None
    if own.uses_compact and own.compact_config:
        own_compact = load_config(os.path.join(os.path.dirname(path), own.compact_config), model=mc.name,
                                  num_layers=mcfg.depth, num_heads=mcfg.heads)
    if own.mode != "dense":
        cases.append((f"config {own.mode}", own, own_compact))

    def one(name, sparsity, compact, stats=None, timer=None):
        state = DenoisingState()
        sparsify(model, sparsity, compact=compact if sparsity.uses_compact else None, tile=layout.tile, state=state,
                 stats=stats, backend=ro.attn_backend)
        for b in model.blocks:
            inner = no_attention if name == "no-attention" else b.processor
            b.processor = Timed(inner, timer) if timer is not None else inner
        with tile_order(order_of.get(name)):
            return sample(model, text, noise, steps=ro.steps, guidance=ro.guidance, shift=ro.shift, state=state)

    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    if args.syncs:
        lines = [f"# host synchronisations per case, {dev_name}, torch {torch.__version__}, {layout}, {ro.steps} steps "
                 f"(torch.cuda.set_sync_debug_mode('warn'); one run after a warm-up)"]
        for name, sparsity, compact in cases:
            one(name, sparsity, compact)
            lines += sync_report(name, ro.steps, lambda: one(name, sparsity, compact), cuda)
        with open(args.syncs, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    rows = []
    for name, sparsity, compact in cases:
        one(name, sparsity, compact)  # warm-up: compile, autotune, index caches
        per_kind = {}
        for _ in range(args.repeats):
            timer, stats, mark = Timer(device), AttentionStats(timing=False), {}
            h1 = model.register_forward_pre_hook(lambda m, a: mark.__setitem__("fwd", timer.start()))
            h2 = model.register_forward_hook(lambda m, a, o: timer.stop(mark["fwd"], "fwd"))
            try:
                res = one(name, sparsity, compact, stats, timer)
            finally:
                h1.remove()
                h2.remove()
            layers = mcfg.depth
            attn, fwd = timer.span_ms("attn"), timer.span_ms("fwd")
            if len(attn) != layers * ro.steps or len(fwd) != ro.steps:
                raise RuntimeError(f"{name}: {len(attn)} attention calls and {len(fwd)} forwards for "
                                   f"{ro.steps} steps of {layers} layers")
            srows = stats.rows()
            sparse_density = {}  # step -> densities of its sparse calls
            for r in srows:
                if r["kind"] == "sparse" and r["density"] is not None:
                    sparse_density.setdefault(r["step"], []).append(r["density"])
            for i, kind in enumerate(step_kinds(srows, ro.steps)):
                d = sparse_density.get(i)
                per_kind.setdefault(kind, []).append((1e3 * res.step_seconds[i], fwd[i],
                                                      sum(attn[i * layers:(i + 1) * layers]),
                                                      statistics.mean(d) if d else None))
        for kind in ("dense", "search", "sparse"):
            got = per_kind.get(kind)
            if not got:
                continue
            med = [statistics.median(x[j] for x in got) for j in range(3)]
            dens = [x[3] for x in got if x[3] is not None]
            rows.append({"case": name, "step_kind": kind, "steps": len(got) // args.repeats,
                         "step_ms": round(med[0], 3), "forward_ms": round(med[1], 3), "attention_ms": round(med[2], 3),
                         "other_forward_ms": round(med[1] - med[2], 3), "outside_forward_ms": round(med[0] - med[1], 3),
                         "density_sparse_steps": round(statistics.mean(dens), 4) if dens else None,
                         "device": dev_name})
            r = rows[-1]
            print(f"{name:22s} {kind:7s} x{r['steps']:<3d} step {r['step_ms']:8.3f} ms  forward {r['forward_ms']:8.3f}"
                  f"  attention {r['attention_ms']:8.3f}  other {r['other_forward_ms']:8.3f}  outside "
                  f"{r['outside_forward_ms']:7.3f}  density {r['density_sparse_steps']}", flush=True)
    write_csv(args.csv, rows, FIELDS)

    if args.kernels:
        prof_cases = [c for c in cases if c[0] in ("dense", "no-attention")]
        if first_compact is not None:  # every step sparse: the sparse step's kernels alone
            name, sp, cfg = first_compact
            all_sparse = dataclasses.replace(sp, dense_steps=0)
            prof_cases.append((name + " (all steps sparse)", all_sparse, cfg))
        lines = [f"# torch.profiler, {dev_name}, torch {torch.__version__}, {layout}, {ro.steps} steps, "
                 f"weights {sha256_of(path)[:16]}; ms per step (kernel time / steps)"]
        from torch.profiler import ProfilerActivity, profile

        for name, sparsity, compact in prof_cases:
            one(name, sparsity, compact)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                res = one(name, sparsity, compact)
            lines += kernel_table(prof, name, ro.steps, args.top, cuda, 1e3 * res.total_seconds / ro.steps)
        with open(args.kernels, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


def sync_report(name, steps, fn, cuda, top=12):
    """Lines: the host synchronisations of ``fn()`` (a whole run), per step and by the project line that made
    each one (the innermost frame in this repository; else the line the warning names)."""
    import traceback
    import warnings

    import torch

    if not cuda:
        return [f"\n## {name}: no GPU, no device synchronisations to count"]
    where = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
        f = frames[-1] if frames else None
        key = f"{os.path.relpath(f.filename, root)}:{f.lineno} {f.name}" if f else f"{filename}:{lineno}"
        where[key] = where.get(key, 0) + 1

    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    total = sum(where.values())
    lines = [f"\n## {name}: {total} synchronisations, {total / steps:.1f} per step"]
    for k, n in sorted(where.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {n:6d}  {k}")
    return lines


def kernel_table(prof, name, steps, top, cuda, step_ms):
    """Lines: per-kernel device time per step (top ``top``) and the totals by kind."""
    tot = {}
    for e in prof.events():
        if cuda:
            if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
                continue
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        else:
            if e.cpu_parent is not None:  # top-level CPU ops only
                continue
            us = e.cpu_time
        tot[e.name] = tot.get(e.name, 0.0) + us
    total = sum(tot.values())
    lines = [f"\n## {name}: step {step_ms:.3f} ms wall, {total / 1e3 / steps:.3f} ms of "
             f"{'kernels' if cuda else 'top-level ops'} per step"]
    by_kind = {}
    for k, us in tot.items():
        by_kind[kernel_kind(k)] = by_kind.get(kernel_kind(k), 0.0) + us
    for k, us in sorted(by_kind.items(), key=lambda x: -x[1]):
        lines.append(f"  {k:28s} {us / 1e3 / steps:8.3f} ms")
    lines.append("  top kernels:")
    for k, us in sorted(tot.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {us / 1e3 / steps:8.3f} ms  {kernel_kind(k):18s} {k[:110]}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
