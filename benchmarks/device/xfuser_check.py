"""xDiT (xfuser 0.7.0) USP path with dist_compact attention: tiny Wan and HunyuanVideo, bf16, one GPU or more.

Run from the repository root (xfuser, yunchang, distvae, diffusers importable):

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/device/xfuser_check.py --out $OUT
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 4 benchmarks/device/xfuser_check.py --out $OUT

World size = xDiT's Ulysses degree (ring 1). For each model (random weights, seeded identically on
every rank; diffusers' classes converted to xDiT's wrappers by ``xfuser_transformer``):

1. ``stock``: the diffusers model itself, one GPU, no sequence parallelism (reference);
2. ``xdit``: xDiT's wrapper with xDiT's own USP and its default attention backend;
3. ``ours_dense``: the same wrapper after ``sparsify_xfuser(mode="dense")`` -- xDiT's sharding and
   all-to-all, our dense kernel as the registered backend;
4. ``ours_sparse``: AdaSpa, fused search at step 0 then the found index at step 1 (sparsity 0.5):
   prints the density of the sparse calls and the deviation from dense;
5. ``unsparsify``: xDiT's processors back; equal to ``xdit`` again.

Pass: rel L2 (ours_dense vs xdit) <= --tol and (xdit vs stock) <= --tol, no NaN, unsparsified output
bit-equal to xdit, sparse density < 1. Writes ``xfuser_check.json`` (rank 0) under --out; exit 1 on a
mismatch.
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def setup():
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    from xfuser.core.distributed import (get_runtime_state, init_distributed_environment,
                                         initialize_model_parallel, initialize_runtime_state)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed_environment(rank=rank, world_size=world)
    initialize_model_parallel(ulysses_degree=world, ring_degree=1)
    initialize_runtime_state()  # xDiT's ExternalRuntimeState (default engine config)
    rs = get_runtime_state()
    # the wrappers' forward calls increment_step_counter / reads split_text_embed_in_sp, which only
    # DiTRuntimeState (built from a whole pipeline) defines; ExternalRuntimeState lacks them
    if not hasattr(rs, "increment_step_counter"):
        rs.increment_step_counter = lambda: None
    if not hasattr(rs, "split_text_embed_in_sp"):
        rs.split_text_embed_in_sp = True
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world, rs


def tiny_wan(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                              in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256,
                              num_layers=args.layers, rope_max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    F, H, W = args.frames, 2 * args.height, 2 * args.width
    inputs = dict(hidden_states=torch.randn(1, 16, F, H, W, generator=g),
                  timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 24, 64, generator=g))
    return m, inputs


def tiny_hunyuan(args, text_len, valid):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    d = args.head_dim
    axes = (d // 4, 3 * d // 8, 3 * d // 8)
    m = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=args.heads,
                                       attention_head_dim=d, num_layers=args.layers, num_single_layers=args.layers,
                                       num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=64,
                                       pooled_projection_dim=32, rope_axes_dim=axes)
    g = torch.Generator().manual_seed(1)
    F, H, W = args.frames, 2 * args.height, 2 * args.width
    mask = torch.zeros(1, text_len)
    mask[:, :valid] = 1
    inputs = dict(hidden_states=torch.randn(1, 16, F, H, W, generator=g),
                  timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, text_len, 64, generator=g),
                  encoder_attention_mask=mask,
                  pooled_projections=torch.randn(1, 32, generator=g),
                  guidance=torch.tensor([6000.0]))
    return m, inputs


def run_model(name, model, inputs, args, rank, world):
    from dist_compact import denoising_state, installed, unsparsify
    from dist_compact.integrations.xfuser import sparsify_xfuser, xfuser_transformer
    from dist_compact.sparsity.config import SparsityConfig

    dev = torch.device("cuda", torch.cuda.current_device())
    model = model.to(dev, torch.bfloat16).eval()
    inp = {k: (v.to(dev, torch.bfloat16) if v.is_floating_point() and k not in ("timestep",) else v.to(dev))
           for k, v in inputs.items()}

    def fwd(m):
        with torch.no_grad():
            out = m(**inp, return_dict=False)[0]
        torch.cuda.synchronize()
        return out.float()

    row = {"model": name, "world": world}
    stock = fwd(model)  # every rank computes the one-GPU reference (no sequence parallelism)
    xd = xfuser_transformer(model)
    row["xdit_class"] = type(xd).__name__
    from xfuser.core.distributed import get_runtime_state

    row["xdit_backend"] = getattr(get_runtime_state().attention_backend, "name", str(get_runtime_state().attention_backend))
    ref = fwd(xd)
    row["xdit_vs_stock_rel"] = rel(ref, stock)

    sparsify_xfuser(xd, SparsityConfig(mode="dense"))
    t = time.perf_counter()
    dense = fwd(xd)
    row["ours_dense_s"] = time.perf_counter() - t
    row["ours_dense_vs_xdit_rel"] = rel(dense, ref)
    row["ours_dense_vs_stock_rel"] = rel(dense, stock)
    row["ours_dense_max_abs"] = float((dense - ref).abs().max())
    h = installed(xd)
    row["layout"] = repr(h.layout)
    row["ops"] = repr(h.ops)

    sparse_cfg = SparsityConfig(mode="adaspa", dense_steps=0, search_steps=(0,), search_kinds=("fused",),
                                reference_steps=2, sparsity=args.sparsity, head_adaptive=False)
    sparsify_xfuser(xd, sparse_cfg)
    state = denoising_state(xd)
    state.begin(2)
    s0 = fwd(xd)
    state.step = 1
    s1 = fwd(xd)
    summ = installed(xd).stats.summary()
    row["sparse_step0_vs_dense_rel"] = rel(s0, dense)  # a fused search computes its output densely
    row["sparse_step1_vs_dense_rel"] = rel(s1, dense)
    row["density"] = summ.get("mean_density_sparse")
    row["calls"] = summ.get("calls")

    unsparsify(xd)
    back = fwd(xd)
    row["unsparsified_equal"] = bool(torch.equal(back, ref))
    finite = all(torch.isfinite(x).all().item() for x in (ref, dense, s0, s1))
    row["finite"] = finite
    ok = (finite and row["ours_dense_vs_xdit_rel"] <= args.tol and row["xdit_vs_stock_rel"] <= args.tol
          and row["unsparsified_equal"] and row["density"] is not None and row["density"] < 1.0
          and row["sparse_step0_vs_dense_rel"] <= args.tol)
    row["ok"] = bool(ok)
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=4, help="latent frames (patch_t 1)")
    ap.add_argument("--height", type=int, default=16, help="latent tokens per column after patchify")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--text-lens", default="16,18", help="HunyuanVideo prompt lengths (valid tokens); "
                    "one not divisible by the world size takes xDiT's replicated-prompt path")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tol", type=float, default=2e-2, help="rel L2 tolerance at bf16")
    args = ap.parse_args()
    rank, world, _ = setup()
    rows, err = [], None
    try:
        m, inp = tiny_wan(args)
        rows.append(run_model("wan", m, inp, args, rank, world))
        for n in [int(x) for x in args.text_lens.split(",") if x]:
            m, inp = tiny_hunyuan(args, n + 4, n)  # 4 padded prompt tokens, dropped by xDiT's wrapper
            rows.append(run_model(f"hunyuan_video_text{n}", m, inp, args, rank, world))
    except Exception as e:  # report, then fail
        err = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    ok = err is None and all(r["ok"] for r in rows)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        res = {"ok": ok, "error": err, "world": world, "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "rows": rows}
        try:
            import diffusers
            import xfuser

            res["diffusers"], res["xfuser"] = diffusers.__version__, getattr(xfuser, "__version__", None)
        except Exception:
            pass
        with open(os.path.join(args.out, "xfuser_check.json"), "w") as f:
            json.dump(res, f, indent=1)
        print("PASS" if ok else "FAIL", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
