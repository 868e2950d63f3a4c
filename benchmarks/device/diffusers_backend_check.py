"""dist_compact as diffusers' attention (set_sparse_backend) on the GPU: random Wan / HunyuanVideo, bf16.

Run from the repository root (diffusers 0.42.1 importable):

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/device/diffusers_backend_check.py --out $OUT
    # optional, several ranks: diffusers' own context parallelism (every U x R = world the heads allow)
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 2 \
        benchmarks/device/diffusers_backend_check.py --out $OUT

Per model (``wan``, ``hunyuan_video``) and size (``tiny``: 4 heads of 64, 5x12x20 latents; ``medium``: 12
heads of 128, Wan 13x30x52 = 20,280 tokens, HunyuanVideo 9x30x52 + a 64-token prompt), random weights
seeded alike on every rank, 2 attention layers each:

* ``stock``: the diffusers model with its default attention (SDPA), one GPU, bf16; ``stock_fp32``
  the same in float32 (the error floor of bf16: ``floor = rel(stock, stock_fp32)``);
* ``backend dense``: ``set_sparse_backend(mode="dense")``: rel L2 vs ``stock_fp32`` must be
  <= max(--tol, 2 * floor);
* ``adaspa`` (sparsity 0.8, head-adaptive; fused search at step 0, the found index at step 1) and
  ``compact`` (a uniform window pattern): ``set_sparse_backend`` vs our own ``sparsify`` path, both
  steps: rel L2 <= --tol; the density of the sparse step is printed;
* with torchrun (world P > 1): the backend under ``enable_parallelism(ContextParallelConfig(U, R))``
  for each U x R = P (U dividing the heads): dense vs ``stock_fp32`` as above, sparse vs the one-GPU
  ``sparsify`` and vs our own parallel path (``sparsify(sequence_parallel=...)``), rel L2 <= --tol
  (ring > 1: <= max(--tol, floor), since its partials are rounded and merged in another order);
* timing (one GPU, medium size): ms per forward (CUDA events, median of --rep) of stock, the
  backend dense, and the sparse step (index reused) of ``sparsify`` and of the backend.

Prints one table; writes ``diffusers_backend_check.json`` (rank 0) under --out; exit 1 on a failure.
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch

SIZES = {
    "tiny": dict(heads=4, head_dim=64, frames=5, height=12, width=20, text=24, valid=17, ffn=256, text_dim=64),
    "medium": dict(heads=12, head_dim=128, frames=13, height=30, width=52, text=64, valid=50, ffn=3072,
                   text_dim=256),
}


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def build(name, size):
    """(model fp32 on the CPU, inputs) with the same seed on every rank."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    s = dict(SIZES[size])
    if name == "hunyuan_video" and size == "medium":
        s["frames"] = 9
    d = s["head_dim"]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, s["frames"], 2 * s["height"], 2 * s["width"], generator=g)
    if name == "wan":
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=s["heads"], attention_head_dim=d,
                                  in_channels=16, out_channels=16, text_dim=s["text_dim"], freq_dim=64,
                                  ffn_dim=s["ffn"], num_layers=2, rope_max_seq_len=128)
        inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, s["text"], s["text_dim"], generator=g))
    else:
        m = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=s["heads"],
                                           attention_head_dim=d, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                           text_embed_dim=s["text_dim"], pooled_projection_dim=32,
                                           rope_axes_dim=(d // 4, 3 * d // 8, 3 * d // 8))
        mask = torch.zeros(1, s["text"])
        mask[:, :s["valid"]] = 1
        inputs = dict(hidden_states=x, timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, s["text"], s["text_dim"], generator=g),
                      encoder_attention_mask=mask, pooled_projections=torch.randn(1, 32, generator=g),
                      guidance=torch.tensor([6000.0]))
    return m.eval(), inputs, s["heads"]


def configs(heads):
    from dist_compact.sparsity.config import SparsityConfig
    from dist_compact.patterns import CompactConfig, HeadPattern

    adaspa = SparsityConfig(mode="adaspa", dense_steps=0, search_steps=(0,), search_kinds=("fused",),
                            reference_steps=2, sparsity=0.8, head_adaptive=True)
    compact = SparsityConfig(mode="compact", dense_steps=0)
    return {"adaspa": (adaspa, None),
            "compact": (compact, CompactConfig.uniform(2, heads, HeadPattern.window(0, 1, max_distance=1)))}


class Runner:
    def __init__(self, name, size, dev):
        self.name, self.size, self.dev = name, size, dev
        _, self.inputs, self.heads = build(name, size)

    def model(self, dtype=torch.bfloat16):
        m, _, _ = build(self.name, self.size)
        return m.to(self.dev, dtype)

    def inp(self, dtype=torch.bfloat16):
        return {k: (v.to(self.dev, dtype) if v.is_floating_point() and k != "timestep" else v.to(self.dev))
                for k, v in self.inputs.items()}

    def fwd(self, m, dtype=torch.bfloat16):
        with torch.no_grad():
            out = m(**self.inp(dtype), return_dict=False)[0]
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return out.float()

    def steps(self, m, state):
        state.begin(2)
        outs = []
        for step in range(2):
            state.step = step
            outs.append(self.fwd(m))
        return outs

    def time_ms(self, m, rep, state=None):
        if state is not None:
            state.begin(2)
            state.step = 1
        for _ in range(2):
            self.fwd(m)
        ts = []
        for _ in range(rep):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad():
                inp = self.inp()
                a.record()
                m(**inp, return_dict=False)
                b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]


def max_rel(outs, refs):
    return max(rel(o, x) for o, x in zip(outs, refs))


def density_of(handle):
    ds = [r.mean_density() for r in handle.stats.records if r.kind == "sparse" and r.density]
    return sum(ds) / len(ds) if ds else None


def check_one(r, args, world, rows, failures):
    from diffusers import ContextParallelConfig

    from dist_compact import denoising_state, installed, sparsify
    from dist_compact.integrations.diffusers_backend import cp_plan, set_sparse_backend
    from dist_compact.sparsity.config import SparsityConfig

    tag = f"{r.name}/{r.size}"

    def record(what, value, limit, extra=""):
        ok = value == value and value <= limit  # NaN fails
        rows.append(dict(case=tag, what=what, rel_l2=value, limit=limit, ok=ok, note=extra))
        if not ok:
            failures.append(f"{tag} {what}: rel L2 {value:.3e} > {limit:.3e}")

    timed = args.time and world == 1 and r.size == "medium" and r.dev.type == "cuda"
    stock = r.fwd(r.model())
    stock32 = r.fwd(r.model(torch.float32), torch.float32)
    floor = rel(stock, stock32)
    limit = max(args.tol, 2 * floor)
    # partials merged in a ring round differently from one pass: within bf16's own error
    ring_limit = max(args.tol, floor)
    rows.append(dict(case=tag, what="stock bf16 vs fp32 (floor)", rel_l2=floor, limit=None, ok=True, note=""))
    m = set_sparse_backend(r.model(), SparsityConfig(mode="dense"))
    record("backend dense vs stock fp32", rel(r.fwd(m), stock32), limit)
    plan = cp_plan(r.model())
    for mode, (cfg, compact) in configs(r.heads).items():
        ours = sparsify(r.model(), cfg, compact=compact)
        ref = r.steps(ours, denoising_state(ours))
        m = set_sparse_backend(r.model(), cfg, compact=compact)
        out = r.steps(m, denoising_state(m))
        d = density_of(installed(m))
        note = f"density {d:.3f}" if d is not None else "ran dense (index above the dense threshold)"
        record(f"backend {mode} vs sparsify (steps 0, 1)", max_rel(out, ref), args.tol, note)
        if timed:
            for what, model, state in (("sparsify", ours, denoising_state(ours)),
                                       ("backend", m, denoising_state(m))):
                rows.append(dict(case=tag, what=f"time {what} {mode} (ms)", rel_l2=r.time_ms(model, args.rep, state),
                                 limit=None, ok=True, note=note))
        del ours, m
        if world > 1:
            from dist_compact.parallel import ParallelConfig, SequenceParallel, build_groups

            for U in [u for u in range(1, world + 1) if world % u == 0 and r.heads % u == 0]:
                R = world // U
                cp = ContextParallelConfig(ulysses_degree=U, ring_degree=R)
                m = set_sparse_backend(r.model(), cfg, compact=compact)
                m.enable_parallelism(config=cp, cp_plan=plan)
                out = r.steps(m, denoising_state(m))
                lim = args.tol if R == 1 else ring_limit
                record(f"CP {U}x{R} backend {mode} vs one-GPU sparsify", max_rel(out, ref), lim)
                par = ParallelConfig(ulysses=U, ring=R)
                own = sparsify(r.model(), cfg, compact=compact,
                               sequence_parallel=SequenceParallel(par, build_groups(par)))
                record(f"CP {U}x{R} backend {mode} vs our parallel path",
                       max_rel(out, r.steps(own, denoising_state(own))), lim)
                if mode == "adaspa":
                    dm = set_sparse_backend(r.model(), SparsityConfig(mode="dense"))
                    dm.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R), cp_plan=plan)
                    record(f"CP {U}x{R} backend dense vs stock fp32", rel(r.fwd(dm), stock32), limit)
                del m, own
    if timed:
        dense = SparsityConfig(mode="dense")
        for what, model in (("stock", r.model()), ("backend dense", set_sparse_backend(r.model(), dense))):
            rows.append(dict(case=tag, what=f"time {what} (ms)", rel_l2=r.time_ms(model, args.rep), limit=None,
                             ok=True, note=""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default="wan,hunyuan_video")
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--tol", type=float, default=2e-3, help="rel L2 limit (bf16)")
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--no-time", dest="time", action="store_false")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script (gloo)")
    args = ap.parse_args()

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        if world > 1:
            dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        if world > 1:
            # diffusers 0.42 picks its device as rank % torch.accelerator.device_count(): 0 on a CPU torch
            torch.accelerator.device_count = lambda: 1
            dist.init_process_group("gloo")
    t0 = time.time()
    rows, failures = [], []
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            try:
                check_one(Runner(name, size, dev), args, world, rows, failures)
            except Exception:  # one failing case must not hide the others' results
                failures.append(f"{name}/{size}: {traceback.format_exc()}")
    if rank == 0:
        import diffusers

        print(f"\n{'case':<16} {'check':<48} {'value':>10} {'limit':>10}  ok  note")
        for row in rows:
            lim = "" if row["limit"] is None else f"{row['limit']:.2e}"
            print(f"{row['case']:<16} {row['what']:<48} {row['rel_l2']:>10.3e} {lim:>10}  "
                  f"{'yes' if row['ok'] else 'NO ':<3} {row['note']}")
        for f in failures:
            print("FAIL", f)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "diffusers_backend_check.json"), "w") as fh:
            json.dump(dict(world=world, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           torch=torch.__version__,
                           diffusers=diffusers.__version__, seconds=time.time() - t0, rows=rows, failures=failures),
                      fh, indent=1)
        print(f"{len(rows)} checks, {len(failures)} failures, {time.time() - t0:.0f} s")
    if world > 1:
        dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
