"""One full transformer forward of Wan2.1-14B / HunyuanVideo: dense (SDPA cuDNN) vs our sparse attention.

Run on one GPU from the repository root (diffusers needed; random weights from the published
configs, built directly on the GPU in bf16, nothing downloaded):

    PYTHONPATH=.:kernels python benchmarks/model_forward.py --csv $OUT/model_forward.csv
    PYTHONPATH=.:kernels python benchmarks/model_forward.py --model hunyuan_video --layers 6     # quick estimate
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

Sequence parallelism: under ``torchrun`` (one GPU per process, NCCL; gloo on CPUs with ``--small``)
every process builds the same model (``--seed``, and rank 0's parameters broadcast) and the same
inputs, and each layout of ``--parallel U1xR1,U2xR2,...`` (Ulysses x ring; ``U x R`` must equal the
world size; default ``WORLD_SIZE x 1``, ``1x1`` without torchrun) runs every case with
``sparsify(..., sequence_parallel=SequenceParallel(ParallelConfig(U, R), build_groups(...)))``:
``dense`` is our dense path under the plan (Ulysses all-to-all / ring exchange + SDPA), the sparse
cases the same around the block-sparse op; ``stock`` (diffusers' own processors, the whole sequence
on every process) runs on one process only and is skipped otherwise. On 4 GPUs (H100 / H200 x4),
from the repository root:

    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 4 benchmarks/model_forward.py \
        --model hunyuan_video,wan --layers 6 --parallel 4x1,2x2 --csv $OUT/forward4.csv          # quick estimate
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 4 benchmarks/model_forward.py \
        --model hunyuan_video,wan --parallel 4x1,2x2 --csv $OUT/forward4_full.csv                # all layers
    torchrun --standalone --nproc-per-node 2 benchmarks/model_forward.py --small --parallel 2x1,1x2 --check  # CPU

(1 GPU: the commands at the top, ``--csv $OUT/forward1.csv``; their output is unchanged.) With
P > 1: a barrier before every forward, CUDA events on every rank, the slowest rank per forward
(all_reduce MAX) and then the median over ``--reps`` (attention and per-block times the same way;
attention times include the exchanges). Extra columns (every row): ``parallel``, ``world``,
``ulysses``, ``ring``; ``ring_bytes``: ring point-to-point bytes per attention call summed over
ranks (``RingOps.bytes_sent`` over the timed forwards; the searches' block mass adds a K-only ring,
so ``search_*`` rows can reach 1.5x the dense ring); ``dense_ring_bytes``: a dense ring for the
same layout (every K and V shard to every other ring rank, in each of the U rings);
``peak_gib_max`` / ``peak_gib_ranks``: peak memory, max over ranks and per rank;
``index_cache_mib``: the index / LSE caches of the rank holding the most. ``--check`` (with
``--small`` or ``--layers N``: rank 0 also runs the model alone) reports ``check_max_abs`` /
``check_rel`` of each case's output (gathered to the full sequence) vs the one-process forward.
Rank 0 prints the table and writes the CSV.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[1:1] = [_ROOT, os.path.join(_ROOT, "kernels")]  # dist_compact and its kernels, uninstalled too

from common import Timer, write_csv  # noqa: E402

from dist_compact.models.published import HUNYUAN_VIDEO, SHAPES, SMALL, WAN_14B  # noqa: E402
from dist_compact.models.published import build_transformer as build_model  # noqa: E402
from dist_compact.models.published import transformer_inputs as make_inputs  # noqa: E402
from dist_compact.sparsity.context import AttentionLayer  # noqa: E402


@dataclass
class Case:
    name: str
    sparsity: object  # SparsityConfig or None (stock)
    compact: object = None
    target: Optional[float] = None
    steps: Optional[List[int]] = None  # steps of the state for warm-up + timed forwards


class TimedAttention(AttentionLayer):
    """Wraps one layer's ``attn(q, k, v, ctx)`` and times every call."""

    def __init__(self, inner, timer: Timer):
        self.inner, self.timer = inner, timer

    def __call__(self, q, k, v, ctx):
        s = self.timer.start()
        out = self.inner(q, k, v, ctx)
        self.timer.stop(s, "attn")
        return out

    def cache_nbytes(self) -> int:
        return self.inner.cache_nbytes() if isinstance(self.inner, AttentionLayer) else 0


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


class World:
    """The torchrun world (or one process): rank 0 prints, barriers, reductions over ranks."""

    def __init__(self, device):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size() if self.on else 1
        self.rank = dist.get_rank() if self.on else 0
        self.device = device  # NCCL reduces CUDA tensors, gloo CPU tensors

    def print(self, *args, **kw) -> None:
        if self.rank == 0:
            print(*args, **kw)

    def barrier(self) -> None:
        """Line the ranks up (the GPU work queued before it done first)."""
        if not self.on:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.dist.all_reduce(torch.zeros(1, device=self.device))

    def max_rows(self, rows: List[List[float]]) -> List[List[float]]:
        """Element-wise max over ranks of a table of floats (the same shape on every rank)."""
        if not self.on or not rows:
            return rows
        t = torch.tensor(rows, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, values: List[float]) -> List[List[float]]:
        """Every rank's ``values``, in rank order."""
        if not self.on:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t)
        return [p.tolist() for p in parts]


def model_config(name: str, small: bool):
    """``(transformer config, latents, text tokens)``: the published model or its tiny ``--small`` stand-in."""
    if small:
        cfg, (latents, text_tokens) = SMALL[name]
        return cfg, latents, text_tokens
    return {"wan": WAN_14B, "hunyuan_video": HUNYUAN_VIDEO}[name], *SHAPES[name]


def block_counts(name: str, cfg: dict) -> Dict[str, int]:
    """Blocks per type (the keys of :func:`block_hooks`) of a config."""
    if name == "wan":
        return {"block": cfg["num_layers"]}
    return {"dual": cfg["num_layers"], "single": cfg["num_single_layers"]}


def dense_ring_bytes(layout, ulysses: int, ring: int, heads: int, head_dim: int, esize: int) -> float:
    """Ring point-to-point bytes of one dense attention call (batch 1), summed over ranks: in each of the
    ``ulysses`` rings (on ``heads / ulysses`` heads) every ring rank sends its K and V shard to the
    ``ring - 1`` others."""
    from dist_compact.parallel import ring_shard_bytes

    shard = ring_shard_bytes(layout, ring, batch=1, heads=heads // ulysses, head_dim=head_dim, element_size=esize)
    return float(ulysses * ring * (ring - 1) * shard)


def run_model(name: str, args, device, dtype, rows: List[dict], plans=None, world: Optional[World] = None) -> None:
    from dist_compact.sparsity.attention import build_attention
    from dist_compact.sparsity.config import SparsityConfig
    from dist_compact import installed, sparsify, unsparsify
    from dist_compact.run.jobs.random_weights import weights_fingerprint
    from dist_compact.parallel import Coordinator, ParallelAttention, RingOps, SequenceParallel
    from dist_compact.stats import AttentionStats

    world = world or World(device)
    plans = plans or [SequenceParallel()]
    say = world.print
    full_cfg, latents, text_tokens = model_config(name, args.small)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the same random weights on every rank (checked by a digest, not copied)
    model, cfg = build_model(name, full_cfg, device, dtype, args.layers)
    Coordinator().check_same(f"{name} random weights", weights_fingerprint(model))
    built_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    text_dim = cfg["text_dim"] if name == "wan" else cfg["text_embed_dim"]
    valid = min(args.text_tokens, text_tokens) if name == "hunyuan_video" else text_tokens
    inputs = make_inputs(name, latents, text_tokens, text_dim, cfg.get("pooled_projection_dim", 0), valid, device,
                         dtype)
    heads = cfg["num_attention_heads"]
    head_dim = cfg["attention_head_dim"]
    esize = torch.empty((), dtype=dtype).element_size()
    full_counts, run_counts = block_counts(name, full_cfg), block_counts(name, cfg)
    run_layers, full_layers = sum(run_counts.values()), sum(full_counts.values())
    say(f"# {name}: {params / 1e9:.2f} B params ({run_layers} of "
        f"{full_layers} layers) built in {built_s:.1f} s; latents {tuple(latents)}", flush=True)

    timer = Timer(device)
    # --small: 16-token tiles, so the tiny grid has enough blocks for the densities to differ
    tile = tuple(args.tile) if args.tile else ((1, 4, 4) if args.small else None)
    backend = "torch" if args.small else "auto"
    built: List = []  # this case's attention layers (under a plan: ParallelAttention, whose .ops count ring bytes)

    def factory(n, sparsity, compact, sp):
        attns = build_attention(n, sparsity, compact, sp)
        built.extend(attns)
        return [TimedAttention(a, timer) for a in attns]

    def sp_arg(plan):
        return plan if plan.enabled else None

    def ring_ops():
        return [a.ops for a in built if isinstance(a, ParallelAttention) and isinstance(a.ops, RingOps)]

    # a layout to size the windows: one dense forward sets it (under the first plan: every rank takes part)
    sparsify(model, SparsityConfig(mode="dense"), tile=tile, backend=backend, sequence_parallel=sp_arg(plans[0]))
    with torch.no_grad():
        model(**inputs)
    layout = installed(model).layout
    say(f"# {name}: {layout}", flush=True)
    R = args.warmup + args.reps
    cases = [Case("stock", None), Case("dense", SparsityConfig(mode="dense"))]
    for d in args.densities:
        compact, _ = window_config(layout, run_layers, heads, d)
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

    def start(case: Case, stats=None, **kw):
        """``(state, steps)``: the model sparsified for ``case`` (stock: unsparsified, no state) and the
        denoising steps of its forwards (warm-up and timed)."""
        unsparsify(model)
        if case.sparsity is None:
            return None, [0] * R
        sparsify(model, case.sparsity, compact=case.compact, tile=tile, backend=backend, stats=stats, **kw)
        state = installed(model).state
        state.begin(max(case.steps) + 1 if case.steps else 1)
        return state, case.steps or [0] * R

    def reference(case: Case) -> torch.Tensor:
        """The case's output on this process alone (no plan): the same steps, the last output."""
        st, steps = start(case, AttentionStats(timing=False))
        with torch.no_grad():
            for step in steps:
                st.step = step
                o = model(**inputs)[0]
        unsparsify(model)
        return o

    hooks = block_hooks(model, name, timer)
    refs: Dict[str, torch.Tensor] = {}  # --check: case -> one-process output (rank 0)
    try:
        for plan in plans:
            u, r = plan.config.ulysses, plan.config.ring
            label = f"{u}x{r}"
            # one process: the output of the single-device script, unchanged
            tag = f"{label:5s} " if world.size > 1 else ""
            sub = f" {label}" if world.size > 1 else ""
            results = {}
            if plan.enabled and any(c.sparsity is None for c in cases):
                say(f"# {name}{sub}: stock (diffusers' own processors) skipped: it runs the whole sequence on "
                    f"every process, meaningful on one process only", flush=True)
            shown_layout = layout
            for case in cases:
                if case.sparsity is None and plan.enabled:
                    continue
                built.clear()
                stats = None if case.sparsity is None else AttentionStats(timing=False)
                state, steps = start(case, stats, attention_factory=factory, sequence_parallel=sp_arg(plan))
                # the warm-up forwards (and the fused search that precedes cached / reuse steps) are not timed
                pre = len(steps) - args.reps
                samples = {key: [] for key in ("forward", "attn", *full_counts)}  # ms per timed forward
                attn_calls = 0
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    for i, step in enumerate(steps):
                        if state is not None:
                            state.step = step
                        if i == pre:  # ring bytes of the timed forwards only
                            for ops in ring_ops():
                                ops.reset_counters()
                        world.barrier()
                        timer.reset()
                        s = timer.start()
                        out = model(**inputs)[0]
                        timer.stop(s, "forward")
                        tot = timer.totals()
                        if i >= pre:
                            cnt = timer.counts()
                            attn_calls += cnt.get("attn", 0)
                            samples["forward"].append(tot["forward"])
                            samples["attn"].append(tot.get("attn", float("nan")))
                            for key in full_counts:  # mean time of one block of this type
                                samples[key].append(tot.get(key, 0.0) / max(1, cnt.get(key, 1)))
                # per forward: the slowest rank (one process: as measured); then the medians over the forwards
                med = {key: statistics.median(v)
                       for key, v in zip(samples, world.max_rows(list(samples.values())))}
                finite = bool(torch.isfinite(out).all())
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                ms, attn_ms = med["forward"], med["attn"]
                est = ms + sum((full_counts[k] - run_counts[k]) * med[k] for k in full_counts)
                attn_full = attn_ms * full_layers / run_layers if not math.isnan(attn_ms) else float("nan")
                density = None
                if stats is not None:
                    summ = stats.summary()
                    density = summ.get("mean_density_sparse") or summ.get("mean_density")
                h = installed(model)
                lay = h.layout if h is not None and h.layout is not None else layout
                idx_mb = h.cache_nbytes() / 2**20 if h is not None else 0.0
                # ring point-to-point bytes per attention call on this rank (K/V shards; a search's block mass adds K)
                ring_local = sum(o.bytes_sent for o in ring_ops()) / max(attn_calls, 1)
                peaks, idx_mbs, rings, finites, densities = zip(*world.gather(
                    [peak, idx_mb, ring_local, float(finite), float("nan") if density is None else density]))
                peak_max = max(peaks) if not any(math.isnan(p) for p in peaks) else float("nan")
                idx_mb, ring_sent, finite = max(idx_mbs), sum(rings), all(f > 0 for f in finites)
                if world.on and density is not None:  # each rank's share of rows / heads: the mean
                    density = statistics.fmean(densities)
                dense_ring = dense_ring_bytes(lay, u, r, heads, head_dim, esize)
                check = {}
                if args.check and plan.enabled and case.sparsity is not None:
                    if world.rank == 0:
                        ref = refs.get(case.name)
                        if ref is None:
                            ref = refs[case.name] = reference(case)
                        diff = out.float() - ref.float()
                        check = dict(check_max_abs=diff.abs().max().item(),
                                     check_rel=(diff.norm() / ref.float().norm().clamp(min=1e-30)).item())
                    world.barrier()
                results[case.name] = est
                row = dict(model=name, case=case.name, target=case.target, density=density, layers_run=run_layers,
                           layers_full=full_layers, ms_forward=ms, est_full_ms=est, attn_ms=attn_ms,
                           est_full_attn_ms=attn_full, attn_share=attn_full / est if est else None, peak_gib=peak,
                           index_cache_mib=idx_mb, finite=finite, tokens=lay.seq_len, padded=lay.padded_len,
                           tile="x".join(map(str, lay.tile)), parallel=label, world=world.size, ulysses=u, ring=r,
                           ring_bytes=ring_sent, dense_ring_bytes=dense_ring, peak_gib_max=peak_max,
                           peak_gib_ranks=";".join(f"{p:.2f}" for p in peaks), **check)
                rows.append(row)
                if world.size > 1 and lay != shown_layout:
                    say(f"# {name}{sub}: {lay}", flush=True)
                    shown_layout = lay
                dens = "" if density is None else f"d={density:.3f}"
                extra = ""
                if r > 1:
                    extra += f"  ring {ring_sent / 2**20:8.2f} of {dense_ring / 2**20:8.2f} MiB/call"
                if check:
                    extra += f"  check max_abs {check['check_max_abs']:.1e} rel {check['check_rel']:.1e}"
                say(f"{name:8s} {tag}{case.name:18s} {dens:8s} {ms:10.1f} ms ({run_layers} layers)  full est "
                    f"{est:10.1f} ms  attn {attn_full:9.1f} ms ({(attn_full / est if est else 0):5.1%})  peak "
                    f"{peak_max:6.1f} GiB  index {idx_mb:8.2f} MiB{extra}{'' if finite else '  NON-FINITE OUTPUT'}",
                    flush=True)
            base = results.get("dense")
            if base:
                mine = [row for row in rows if row["model"] == name and row["parallel"] == label]
                for row in mine:
                    row["speedup_vs_dense"] = base / row["est_full_ms"]
                say(f"# {name}{sub}: speedup vs dense (full-model estimate): " + ", ".join(
                    f"{row['case']} {row['speedup_vs_dense']:.2f}x" for row in mine), flush=True)
                cfg_mult = 2 if name == "wan" else 1
                dense_s = 50 * base * cfg_mult / 1e3
                if {"search_fused", "search_cached", "adaspa_reuse@0.2"} <= set(results):
                    adaspa = (10 * base + results["search_fused"] + results["search_cached"]
                              + 38 * results["adaspa_reuse@0.2"]) * cfg_mult / 1e3
                    say(f"# {name}{sub}: 50 steps x {cfg_mult} forward(s): dense {dense_s:.1f} s, "
                        f"AdaSpa d=0.2 schedule {adaspa:.1f} s ({dense_s / adaspa:.2f}x)", flush=True)
                for d in args.densities:
                    key = f"window@{d:g}"
                    if key in results:
                        comp = (15 * base + 35 * results[key]) * cfg_mult / 1e3
                        say(f"# {name}{sub}: 50 steps, Compact windows d~{d:g} after 15 dense: {comp:.1f} s "
                            f"({dense_s / comp:.2f}x)", flush=True)
    finally:
        for hd in hooks:
            hd.remove()
        unsparsify(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_parallel(text: str) -> List[tuple]:
    """``"4x1,2x2"`` -> ``[(4, 1), (2, 2)]`` (ulysses, ring)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            u, r = (int(x) for x in part.split("x"))
        except ValueError:
            raise ValueError(f"--parallel: {part!r} is not ULYSSESxRING (e.g. 4x1 or 2x2)") from None
        if u < 1 or r < 1:
            raise ValueError(f"--parallel: {part!r}: degrees must be >= 1")
        out.append((u, r))
    if not out:
        raise ValueError("--parallel: no layout given (e.g. --parallel 4x1,2x2)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wan,hunyuan_video", help="comma list of wan, hunyuan_video")
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
    ap.add_argument("--parallel", default=None,
                    help="comma list of sequence-parallel layouts ULYSSESxRING, each using every process (u x r = "
                         "world size), e.g. 4x1,2x2; default: WORLD_SIZEx1 (1x1 without torchrun)")
    ap.add_argument("--check", action="store_true",
                    help="also run every case as one process on rank 0 and report the output's max abs / rel error "
                         "(needs --small or --layers N)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (the same on every rank)")
    ap.add_argument("--csv", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    args.densities = [float(x) for x in args.densities.split(",") if x]
    args.cases = set(args.cases.split(",")) if args.cases else None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    def fail(msg: str) -> int:  # the same on every rank; printed once
        if rank == 0:
            print(f"model_forward.py: {msg}", file=sys.stderr, flush=True)
        return 2

    from dist_compact.parallel import ParallelConfig, ParallelConfigError
    from dist_compact.parallel.launch import local_device, shutdown

    names = [n.strip() for n in args.model.split(",") if n.strip()]
    for n in names:
        if n not in ("wan", "hunyuan_video"):
            return fail(f"unknown model {n!r}; --model takes a comma list of wan, hunyuan_video")
    try:
        layouts = parse_parallel(args.parallel or f"{world_size}x1")
        configs = [ParallelConfig(u, r) for u, r in layouts]
        for c in configs:
            if c.degree != world_size:
                hint = (f"launch it with `torchrun --standalone --nproc-per-node {c.degree} benchmarks/model_forward.py "
                        f"...`" if world_size == 1 else f"every --parallel layout must use all {world_size} processes")
                raise ParallelConfigError(
                    f"--parallel {c.ulysses}x{c.ring} needs ulysses x ring = {c.degree} processes but "
                    f"{world_size} {'was' if world_size == 1 else 'were'} launched; {hint}")
            for n in names:
                try:
                    c.check(num_heads=model_config(n, args.small)[0]["num_attention_heads"])
                except ParallelConfigError as e:
                    raise ParallelConfigError(f"--parallel {c.ulysses}x{c.ring} for {n}: {e}") from None
    except (ValueError, ParallelConfigError) as e:
        return fail(str(e))
    if args.check and not (args.small or args.layers):
        return fail("--check also runs the whole model as one process on rank 0: use it with --small or --layers N")
    if args.small:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            return fail("no GPU; use --small for the CPU smoke test")
        device, dtype = local_device(), torch.bfloat16
    try:
        return _run(args, names, configs, device, dtype)
    finally:
        shutdown()


def _run(args, names, configs, device, dtype) -> int:
    from dist_compact.parallel import init_distributed

    # the first call starts the process group (torchrun env); every rank builds every layout's groups, in
    # one order (collective). Long timeout: --check runs one-process forwards on rank 0 while the others wait
    plans = [init_distributed(c, backend="nccl" if device.type == "cuda" else "gloo", timeout_s=3600)
             for c in configs]
    world = World(device)
    if device.type == "cuda":
        world.print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}"
                    + (f" x {world.size} processes" if world.size > 1 else ""), flush=True)
    import diffusers

    world.print(f"# diffusers {diffusers.__version__}", flush=True)
    if world.size > 1:
        world.print(f"# {world.size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}); layouts "
                    + ", ".join(str(c) for c in configs) + "; times: slowest rank per forward, then the median",
                    flush=True)
    elif args.check:
        world.print("# --check: one process, nothing to compare", flush=True)
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
        for name in names:
            run_model(name, args, device, dtype, rows, plans, world)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if world.rank == 0 and write_csv(args.csv, rows, list(dict.fromkeys(k for r in rows for k in r))):
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
