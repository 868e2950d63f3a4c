"""One full transformer forward of Wan2.1-14B / HunyuanVideo: dense (SDPA cuDNN) vs our sparse attention.

Run on one GPU from the repository root (diffusers needed; random weights from the published
configs, built directly on the GPU in bf16, nothing downloaded):

    PYTHONPATH=.:kernels python benchmarks/model_forward.py --csv $OUT/model_forward.csv
    PYTHONPATH=.:kernels python benchmarks/model_forward.py --model hunyuan --layers 6     # quick estimate
    python benchmarks/model_forward.py --small                                             # CPU, tiny configs

Shapes: Wan2.1-T2V-14B 480p 81 frames (latents 16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 tokens, 512
text tokens in the cross-attention), HunyuanVideo 720p 129 frames (16 x 33 x 90 x 160 -> 33 x 45 x 80 =
118,800 tokens + ``--text-tokens`` prompt tokens in the joint attention). Cases, each one forward:

* ``stock``     - diffusers' own processors (HunyuanVideo's passes a key mask, so SDPA cannot use cuDNN);
* ``dense``     - our processors, dense attention (SDPA on the valid tokens, cuDNN first): the baseline;
* ``window@d``  - static 3D windows (a uniform Compact config: the same window for every head) whose
                  index density is closest to ``d``, run through SparseAttention's reuse path;
* ``search_fused`` / ``search_cached`` - AdaSpa's two search steps (dense+LSE then block mass and
                  top-k; block mass with the cached LSE, top-k, then the sparse pass);
* ``adaspa_reuse@0.2`` - the sparse step with the index an AdaSpa search found (density ~0.2).

Per case: median ms per forward of ``--reps`` timed forwards (CUDA events) after ``--warmup``, the
attention time inside it (events around every attention call) and its share, the speedup vs
``dense``, peak memory, the index / LSE cache bytes. With ``--layers N`` the model is built with N
blocks (HunyuanVideo: a third dual-stream), each block type is timed by hooks, and the full model's
forward is estimated as ``measured + sum over block types (missing blocks x mean block time)``.
Finally the 50-step schedules are estimated from the step types: AdaSpa (10 dense, fused search,
LSE-cached search, 38 reuse) and Compact (15 dense, 35 window steps); Wan runs two forwards per step
(classifier-free guidance), HunyuanVideo one (distilled guidance).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from common import write_csv

from dist_compact.integrations.published import HUNYUAN, SHAPES, SMALL, WAN_14B
from dist_compact.integrations.published import build_transformer as build_model
from dist_compact.integrations.published import transformer_inputs as make_inputs


@dataclass
class Case:
    name: str
    sparsity: object  # SparsityConfig or None (stock)
    compact: object = None
    target: Optional[float] = None
    steps: Optional[List[int]] = None  # steps of the state for warm-up + timed forwards


class Timer:
    """CUDA events on a GPU, perf_counter on the CPU; ``elapsed_ms`` after a synchronisation."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start, key="all"):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((key, start, e))
        else:
            self.spans.append((key, start, time.perf_counter()))

    def totals(self) -> Dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: Dict[str, float] = {}
        for key, a, b in self.spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[key] = out.get(key, 0.0) + ms
        return out

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for key, _, _ in self.spans:
            out[key] = out.get(key, 0) + 1
        return out

    def reset(self):
        self.spans = []


class TimedAttention:
    """Wraps one layer's ``attn(q, k, v, ctx)`` and times every call."""

    def __init__(self, inner, timer: Timer):
        self.inner, self.timer = inner, timer

    def __call__(self, q, k, v, ctx):
        s = self.timer.start()
        out = self.inner(q, k, v, ctx)
        self.timer.stop(s, "attn")
        return out

    def __getattr__(self, name):  # cache_info() etc. of the wrapped layer
        return getattr(self.inner, name)


def _axis_share(n: int, w: Optional[int]) -> float:
    """Share of tile pairs (i, j) in [0, n)^2 with |i - j| <= w (None: all)."""
    if w is None or w >= n - 1:
        return 1.0
    i = torch.arange(n)
    return float(((i[:, None] - i[None, :]).abs() <= w).double().mean())


def window_config(layout, num_layers: int, num_heads: int, target: float):
    """The uniform Compact window ``(rows, cols, max slab distance)`` whose video density is closest to
    ``target`` (the density of a box window factorises over the axes), as a CompactConfig."""
    from dist_compact.patterns import CompactConfig, HeadPattern
    from dist_compact.patterns.compact import real_tile_grid

    nt, nh, nw = real_tile_grid(layout)
    best = None
    for dt, dr, dc in itertools.product(range(nt), range(nh), range(nw)):
        d = _axis_share(nt, dt) * _axis_share(nh, dr) * _axis_share(nw, dc)
        if best is None or abs(d - target) < abs(best[0] - target):
            best = (d, dt, dr, dc)
    _, dt, dr, dc = best
    pattern = HeadPattern.window(dr, dc, max_distance=dt)
    return CompactConfig.uniform(num_layers, num_heads, pattern), (dt, dr, dc)


def block_hooks(model, name: str, timer: Timer):
    """Time every transformer block by type (forward pre/post hooks with events)."""
    handles = []
    groups = {"block": model.blocks} if name == "wan" else {
        "dual": model.transformer_blocks, "single": model.single_transformer_blocks}
    for key, blocks in groups.items():
        for b in blocks:
            box = {}
            handles.append(b.register_forward_pre_hook(lambda m, a, box=box: box.__setitem__("s", timer.start())))
            handles.append(b.register_forward_hook(lambda m, a, o, box=box, key=key: timer.stop(box["s"], key)))
    return handles


def run_model(name: str, args, device, dtype, rows: List[dict]) -> None:
    from dist_compact.integrations.diffusers import sparsify, sparsify_handle, unsparsify
    from dist_compact.pipeline import build_attention
    from dist_compact.schedule import SparsityConfig
    from dist_compact.stats import AttentionStats

    full_cfg, (latents, text_tokens) = (SMALL[name] if args.small else
                                        ({"wan": WAN_14B, "hunyuan": HUNYUAN}[name], SHAPES[name]))
    t0 = time.perf_counter()
    model, cfg = build_model(name, full_cfg, device, dtype, args.layers)
    built_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    text_dim = cfg["text_dim"] if name == "wan" else cfg["text_embed_dim"]
    valid = min(args.text_tokens, text_tokens) if name == "hunyuan" else text_tokens
    inputs = make_inputs(name, latents, text_tokens, text_dim, cfg.get("pooled_projection_dim", 0), valid, device,
                         dtype)
    heads = cfg["num_attention_heads"]
    run_layers = cfg["num_layers"] + cfg.get("num_single_layers", 0)
    full_counts = ({"block": full_cfg["num_layers"]} if name == "wan" else
                   {"dual": full_cfg["num_layers"], "single": full_cfg["num_single_layers"]})
    print(f"# {name}: {params / 1e9:.2f} B params ({run_layers} of "
          f"{sum(full_counts.values())} layers) built in {built_s:.1f} s; latents {tuple(latents)}", flush=True)

    timer = Timer(device)
    # --small: 16-token tiles, so the tiny grid has enough blocks for the densities to differ
    tile = tuple(args.tile) if args.tile else ((1, 4, 4) if args.small else None)
    backend = "torch" if args.small else "auto"

    def factory(n, sparsity, compact, sp):
        return [TimedAttention(a, timer) for a in build_attention(n, sparsity, compact, sp)]

    # a layout to size the windows: one dense forward sets it
    sparsify(model, SparsityConfig(mode="dense"), tile=tile, backend=backend)
    with torch.no_grad():
        model(**inputs)
    layout = sparsify_handle(model).layout
    print(f"# {name}: {layout}", flush=True)
    R = args.warmup + args.reps
    cases = [Case("stock", None), Case("dense", SparsityConfig(mode="dense"))]
    for d in args.densities:
        compact, win = window_config(layout, run_layers, heads, d)
        cases.append(Case(f"window@{d:g}", SparsityConfig(mode="compact", dense_steps=0), compact, d))
    if not args.no_search:
        cases.append(Case("search_fused", SparsityConfig(
            mode="adaspa", dense_steps=0, search_steps=tuple(range(R)), search_kinds=("fused",) * R,
            reference_steps=R, sparsity=0.8, mass_query_rows=args.mass_rows), steps=list(range(R))))
        # step 0: a fused search keeps the LSE; steps 1..R: LSE-cached searches
        cases.append(Case("search_cached", SparsityConfig(
            mode="adaspa", dense_steps=0, search_steps=tuple(range(R + 1)),
            search_kinds=("fused",) + ("cached",) * R, reference_steps=R + 1, sparsity=0.8,
            mass_query_rows=args.mass_rows), steps=list(range(R + 1))))
        cases.append(Case("adaspa_reuse@0.2", SparsityConfig(
            mode="adaspa", dense_steps=0, search_steps=(0,), search_kinds=("fused",), reference_steps=R + 1,
            sparsity=0.8, mass_query_rows=args.mass_rows), steps=list(range(R + 1))))
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    hooks = block_hooks(model, name, timer)
    results = {}
    try:
        for case in cases:
            unsparsify(model)
            stats = None
            if case.sparsity is not None:
                stats = AttentionStats(timing=False)
                sparsify(model, case.sparsity, compact=case.compact, tile=tile, backend=backend, stats=stats,
                         attention_factory=factory)
                state = sparsify_handle(model).state
                steps = case.steps or [0] * R
                state.begin(max(steps) + 1 if case.steps else 1)
            else:
                steps = [0] * R
            # the warm-up forwards (and the fused search that precedes cached / reuse steps) are not timed
            pre = len(steps) - args.reps
            times, attn, per_block = [], [], {}
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                for i, step in enumerate(steps):
                    if case.sparsity is not None:
                        state.step = step
                    timer.reset()
                    s = timer.start()
                    out = model(**inputs)[0]
                    timer.stop(s, "forward")
                    tot = timer.totals()
                    if i >= pre:
                        times.append(tot["forward"])
                        attn.append(tot.get("attn", float("nan")))
                        cnt = timer.counts()
                        for key in full_counts:
                            per_block.setdefault(key, []).append(tot.get(key, 0.0) / max(1, cnt.get(key, 1)))
            finite = bool(torch.isfinite(out).all())
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            ms = statistics.median(times)
            attn_ms = statistics.median(attn)
            run_counts = ({"block": cfg["num_layers"]} if name == "wan" else
                          {"dual": cfg["num_layers"], "single": cfg["num_single_layers"]})
            est = ms + sum((full_counts[k] - run_counts[k]) * statistics.median(v) for k, v in per_block.items())
            attn_full = attn_ms * sum(full_counts.values()) / run_layers if not math.isnan(attn_ms) else float("nan")
            density = None
            if stats is not None:
                summ = stats.summary()
                density = summ.get("mean_density_sparse") or summ.get("mean_density")
            h = sparsify_handle(model)
            idx_mb = h.cache_nbytes() / 2**20 if h is not None else 0.0
            results[case.name] = est
            row = dict(model=name, case=case.name, target=case.target, density=density, layers_run=run_layers,
                       layers_full=sum(full_counts.values()), ms_forward=ms, est_full_ms=est, attn_ms=attn_ms,
                       est_full_attn_ms=attn_full, attn_share=attn_full / est if est else None, peak_gib=peak,
                       index_cache_mib=idx_mb, finite=finite, tokens=layout.seq_len, padded=layout.padded_len,
                       tile="x".join(map(str, layout.tile)))
            rows.append(row)
            dens = "" if density is None else f"d={density:.3f}"
            print(f"{name:8s} {case.name:18s} {dens:8s} {ms:10.1f} ms ({run_layers} layers)  full est {est:10.1f} ms  "
                  f"attn {attn_full:9.1f} ms ({(attn_full / est if est else 0):5.1%})  peak {peak:6.1f} GiB  "
                  f"index {idx_mb:8.2f} MiB{'' if finite else '  NON-FINITE OUTPUT'}", flush=True)
    finally:
        for hd in hooks:
            hd.remove()
        unsparsify(model)
    base = results.get("dense")
    if base:
        for row in rows:
            if row["model"] == name:
                row["speedup_vs_dense"] = base / row["est_full_ms"]
        print(f"# {name}: speedup vs dense (full-model estimate): " + ", ".join(
            f"{r['case']} {r['speedup_vs_dense']:.2f}x" for r in rows if r["model"] == name), flush=True)
        cfg_mult = 2 if name == "wan" else 1
        if {"search_fused", "search_cached", "adaspa_reuse@0.2"} <= set(results):
            adaspa = (10 * base + results["search_fused"] + results["search_cached"]
                      + 38 * results["adaspa_reuse@0.2"]) * cfg_mult / 1e3
            print(f"# {name}: 50 steps x {cfg_mult} forward(s): dense {50 * base * cfg_mult / 1e3:.1f} s, AdaSpa d=0.2 "
                  f"schedule {adaspa:.1f} s ({50 * base * cfg_mult / 1e3 / adaspa:.2f}x)", flush=True)
        for d in args.densities:
            key = f"window@{d:g}"
            if key in results:
                comp = (15 * base + 35 * results[key]) * cfg_mult / 1e3
                print(f"# {name}: 50 steps, Compact windows d~{d:g} after 15 dense: {comp:.1f} s "
                      f"({50 * base * cfg_mult / 1e3 / comp:.2f}x)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wan,hunyuan", help="comma list of wan, hunyuan")
    ap.add_argument("--densities", default="0.4,0.2,0.12", help="window densities")
    ap.add_argument("--layers", type=int, default=None, help="build N blocks and scale per-block times to the model")
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per case (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per case")
    ap.add_argument("--tile", type=int, nargs=3, default=None, help="kernel tile t h w (default: least padding)")
    ap.add_argument("--text-tokens", type=int, default=256, help="valid HunyuanVideo prompt tokens (of 256)")
    ap.add_argument("--cases", default=None, help="comma list of case names to run (default: all)")
    ap.add_argument("--no-search", action="store_true", help="skip the AdaSpa search / reuse cases")
    ap.add_argument("--mass-rows", type=lambda x: None if x == "all" else int(x), default=None,
                    help="query rows sampled per block in the searches' block mass: 'all' (exact, default) or N")
    ap.add_argument("--small", action="store_true", help="tiny configs on the CPU (a smoke test)")
    ap.add_argument("--csv", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    args.densities = [float(x) for x in args.densities.split(",") if x]
    args.cases = set(args.cases.split(",")) if args.cases else None
    if args.small:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("model_forward.py: no GPU; use --small for the CPU smoke test", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    import diffusers

    print(f"# diffusers {diffusers.__version__}", flush=True)
    rows: List[dict] = []
    ctx = None
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the dense baseline: cuDNN first (fastest on Hopper, see BENCHMARKS.md), then flash / efficient
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        try:
            ctx = sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch < 2.6: no priorities, the default order (flash / cuDNN first)
            ctx = sdpa_kernel(order)
        ctx.__enter__()
    try:
        for name in args.model.split(","):
            run_model(name.strip(), args, device, dtype, rows)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if write_csv(args.csv, rows, list(dict.fromkeys(k for r in rows for k in r))):
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
