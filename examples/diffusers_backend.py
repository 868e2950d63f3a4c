"""A diffusers Wan pipeline with dist_compact's sparse attention, on one GPU or under torchrun.

    python examples/diffusers_backend.py checkpoints/Wan2.1-T2V-1.3B-Diffusers --out corgi.mp4
    torchrun --nproc-per-node 4 examples/diffusers_backend.py checkpoints/Wan2.1-T2V-1.3B-Diffusers \
        --ulysses 2 --ring 2 --out corgi.mp4      # diffusers' own context parallelism, our attention

Every rank runs the same pipeline on the same seed; diffusers shards the video tokens over the
ranks inside the transformer, and rank 0 writes the video (an mp4 through diffusers'
``export_to_video``; ``--out x.pt``: the denoised latents instead, before the VAE). ``--device cpu
--backend torch`` with a tiny pipeline folder is what the tests run (``tests/integrations/test_diffusers_backend.py``).
"""

import argparse
import os

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanPipeline

from dist_compact.sparsity.config import SparsityConfig
from dist_compact import denoising_state
from dist_compact.integrations.diffusers_backend import set_sparse_backend


def generate(path, prompt, steps=50, device="cuda", ulysses=1, ring=1, *, sparsity=None, tile=None, backend="auto",
             dtype=torch.bfloat16, **call):
    """The README example: the frames of one video (``call``: more pipeline arguments)."""
    pipe = WanPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    set_sparse_backend(pipe.transformer, sparsity or SparsityConfig(mode="adaspa", sparsity=0.8), tile=tile,
                       backend=backend)
    if ulysses * ring > 1:  # under torchrun: diffusers' own context parallelism around our attention
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
    state = denoising_state(pipe.transformer).begin(steps)
    return pipe(prompt, num_inference_steps=steps, callback_on_step_end=state.on_step_end,
                generator=torch.Generator().manual_seed(0), **call).frames[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a local diffusers WanPipeline folder")
    ap.add_argument("--prompt", default="a corgi running on a beach at sunset")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--ulysses", type=int, default=1)
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.8, help="AdaSpa sparsity after the dense warm-up")
    ap.add_argument("--dense", action="store_true", help="dense attention (our kernels): the reference")
    ap.add_argument("--tile", default=None, help="kernel tile t,h,w (default: per latent grid)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--max-sequence-length", type=int, default=512)
    ap.add_argument("--out", default="video.mp4")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ulysses * args.ring != world:
        ap.error(f"--ulysses {args.ulysses} x --ring {args.ring} must equal the {world} processes")
    device = torch.device(args.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif world > 1:
        # diffusers 0.42 picks its device as rank % torch.accelerator.device_count(), which is 0 on
        # a CPU-only torch: one CPU "device" per process
        torch.accelerator.device_count = lambda: 1
    sparsity = SparsityConfig(mode="dense") if args.dense else SparsityConfig(mode="adaspa", sparsity=args.sparsity)
    tile = tuple(int(x) for x in args.tile.split(",")) if args.tile else None
    frames = generate(args.model, args.prompt, args.steps, device, args.ulysses, args.ring, sparsity=sparsity,
                      tile=tile, backend=args.backend, dtype=getattr(torch, args.dtype), num_frames=args.frames,
                      height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
                      output_type="latent" if args.out.endswith(".pt") else "np")
    if not dist.is_initialized() or dist.get_rank() == 0:
        if args.out.endswith(".pt"):
            torch.save(frames.cpu(), args.out)
        else:
            from diffusers.utils import export_to_video

            export_to_video(frames, args.out, fps=16)
        print(f"wrote {args.out}")
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
