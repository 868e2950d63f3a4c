"""Train the embedded DiT on procedural videos to a fixed wall-time budget.

    python -m dist_compact.models.train --minutes 8 --out /path/embedded.safetensors

Rectified flow with velocity prediction (``x_t = (1 - t) x0 + t noise``, target ``noise - x0``),
logit-normal timesteps (as SD3 / Wan), prompts dropped to the empty prompt 10% of the time so that
classifier-free guidance works, AdamW with warm-up and a cosine decay over the *time* budget, bf16
autocast on GPUs, an exponential moving average (EMA) of the weights, which is what gets saved.
The weights (safetensors + ``.sha256``) are written every ``--save-every`` minutes and at the end,
together with a JSON log of the losses; ``--minutes`` counts from the start of the process, so the
whole command ends within it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from .data import make_batch
from .embedded import DEFAULT_WEIGHTS, EmbeddedConfig, EmbeddedDiT, _safetensors, load_embedded, save_embedded

__all__ = ["train", "main", "flow_matching_loss"]


def flow_matching_loss(velocity, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - x0`` at ``x_t = (1-t) x0 + t noise``.

    velocity: ``velocity(x_t, t, text)``, e.g. ``model.forward_plain``; x0, noise: ``[B, C, F, H, W]``;
    t: ``[B]`` in (0, 1); text: int64 ``[B, text_len]``.
    """
    tt = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = velocity(xt, t, text)
    return F.mse_loss(v.float(), (noise - x0).float())


def _lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    # cosine from base to 10% of base over the time budget
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(args: argparse.Namespace, start: Optional[float] = None) -> dict:
    """Run the training loop described by the parsed command-line ``args``; returns the log dict.

    ``start``: the ``time.time()`` the budget counts from (default: now).
    """
    _T0 = time.time() if start is None else start

    def _log(msg: str) -> None:
        print(f"[train {time.time() - _T0:7.1f}s] {msg}", flush=True)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    if args.init:
        model = load_embedded(args.init, device=device)
        _log(f"initialised from {args.init}")
    else:
        cfg = EmbeddedConfig(dim=args.dim, depth=args.depth, heads=args.heads, frames=args.frames,
                             height=args.height, width=args.width)
        model = EmbeddedDiT(cfg).to(device)
    model.train()
    cfg = model.config
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model {n_params / 1e6:.2f}M params on {device}; config {cfg}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("text_pos") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    step_fn = model.forward_plain
    if args.compile:
        try:
            step_fn = torch.compile(model.forward_plain)
        except Exception as e:  # compile is an optimisation only
            _log(f"torch.compile unavailable ({e}); training eager")
    gen = torch.Generator().manual_seed(args.seed)  # scene parameters (small, on the CPU)
    # noise and times on the device: a CPU randn of a whole batch of videos would stall a GPU step
    dgen = torch.Generator(device=device).manual_seed(args.seed + 2)
    frames, height, width = cfg.frames, cfg.height, cfg.width
    # fixed validation batch: same videos, noise and times at every evaluation, so its loss is comparable
    vgen = torch.Generator().manual_seed(args.seed + 1)
    vx, vprompts = make_batch(args.val_batch, vgen, frames, height, width, device=device)
    vtext = model.tokenizer.batch(vprompts).to(device)
    vt = ((torch.arange(args.val_batch, dtype=torch.float32) + 0.5) / args.val_batch).to(device)
    vnoise = torch.randn(vx.shape, generator=vgen).to(device)

    budget = args.minutes * 60.0
    margin = args.save_margin
    out = Path(args.out)
    log = {"config": json.loads(cfg.to_json()), "args": vars(args), "train": [], "val": []}
    autocast = device.type == "cuda" and args.dtype == "bf16"
    last_save = time.time()
    loss_sum, loss_count = torch.zeros((), device=device), 0
    step = 0
    t_loop = time.time()

    def evaluate() -> float:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            return float(flow_matching_loss(ema.forward_plain, vx, vtext, vt, vnoise))

    def save(final: bool) -> None:
        extra = {"steps": step, "minutes": (time.time() - _T0) / 60.0, "device": str(device),
                 "batch_size": args.batch_size, "seed": args.seed,
                 "val_loss": log["val"][-1]["loss"] if log["val"] else None}
        digest = save_embedded(ema, out, extra=extra)
        log_path = out.with_name(out.stem + ".train.json")
        log_path.write_text(json.dumps(log, indent=1, default=str))
        _log(f"{'final' if final else 'periodic'} save: {out} sha256 {digest[:16]}... (step {step})")

    while True:
        elapsed = time.time() - _T0
        if elapsed > budget - margin or (args.max_steps and step >= args.max_steps):
            break
        progress = (time.time() - t_loop) / max(budget - margin - (t_loop - _T0), 1.0)
        lr = _lr_at(step, progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, prompts = make_batch(args.batch_size, gen, frames, height, width, device=device)
        drop = torch.rand(args.batch_size, generator=gen) < args.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        text = model.tokenizer.batch(prompts).to(device)
        t = torch.sigmoid(torch.randn(args.batch_size, generator=dgen, device=device))
        noise = torch.randn(x0.shape, generator=dgen, device=device)
        try:
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                loss = flow_matching_loss(step_fn, x0, text, t, noise)
        except Exception as e:
            if not args.compile or step_fn == model.forward_plain:
                raise
            _log(f"compiled model failed ({type(e).__name__}: {e}); falling back to eager")
            step_fn = model.forward_plain
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():  # one multi-tensor update, not one launch per parameter
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        # summed on the device: no host sync per step, only when logging
        loss_sum += loss.detach().float()
        loss_count += 1
        step += 1
        if step % args.log_every == 0:
            mean = float(loss_sum) / loss_count
            loss_sum.zero_()
            loss_count = 0
            rate = step / (time.time() - t_loop)
            log["train"].append({"step": step, "loss": mean, "lr": lr, "time": time.time() - _T0})
            _log(f"step {step} loss {mean:.4f} lr {lr:.2e} ({rate:.2f} steps/s)")
        if step % args.val_every == 0:
            vl = evaluate()
            log["val"].append({"step": step, "loss": vl, "time": time.time() - _T0})
            _log(f"step {step} val loss (EMA) {vl:.4f}")
        if time.time() - last_save > args.save_every * 60.0:
            save(final=False)
            last_save = time.time()
    log["val"].append({"step": step, "loss": evaluate(), "time": time.time() - _T0})
    _log(f"done: {step} steps, final val loss (EMA) {log['val'][-1]['loss']:.4f}")
    save(final=True)
    if args.preview:
        path = out.with_name(out.stem + ".preview.png")
        preview(ema, PREVIEW_PROMPTS, path, steps=20, guidance=4.0)
        _log(f"preview of {len(PREVIEW_PROMPTS)} prompts (rows; every other frame): {path}")
    return log


#: prompts of the preview image written after training (one row each)
PREVIEW_PROMPTS = (
    "a red square moving left",
    "a blue circle bouncing on a checkerboard",
    "a yellow triangle moving up on stripes",
    "a green circle moving right on a gradient",
)


def preview(model: EmbeddedDiT, prompts, path, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> None:
    """Sample ``prompts`` with the inference path (block order, DenseAttention) and write a PNG grid."""
    import numpy as np

    from ..context import DenseAttention
    from ..pipeline import sample
    from ..png import write_png
    from ..report import frame_grid, to_uint8_frames

    cfg = model.config
    device = next(model.parameters()).device
    model.set_attention([DenseAttention(i) for i in range(cfg.depth)])
    layout = model.video_layout(cfg.frames, cfg.height, cfg.width)
    rows = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(1, cfg.in_channels, cfg.frames, cfg.height, cfg.width, generator=g).to(device)
        text = model.tokenizer.batch([p]).to(device)
        res = sample(model, text, noise, steps=steps, layout=layout, guidance=guidance)
        frames = to_uint8_frames(res.latents[0, :, ::2], 2)
        rows.append(frame_grid(frames, cols=frames.shape[0]))
    write_png(str(path), np.concatenate(rows, axis=0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_compact.models.train", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the whole command")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write (+ .sha256, .train.json)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPUs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of empty prompts (for guidance)")
    p.add_argument("--dim", type=int, default=EmbeddedConfig.dim)
    p.add_argument("--depth", type=int, default=EmbeddedConfig.depth)
    p.add_argument("--heads", type=int, default=EmbeddedConfig.heads)
    p.add_argument("--frames", type=int, default=EmbeddedConfig.frames, help="training clip length")
    p.add_argument("--height", type=int, default=EmbeddedConfig.height)
    p.add_argument("--width", type=int, default=EmbeddedConfig.width)
    p.add_argument("--init", default=None, help="start from these weights (continue training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--save-every", type=float, default=2.0, help="minutes between periodic saves")
    p.add_argument("--save-margin", type=float, default=20.0,
                   help="seconds kept for the final evaluation, save and preview")
    p.add_argument("--no-preview", dest="preview", action="store_false",
                   help="skip the preview PNG of a few prompts written after training")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-batch", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    start = time.time()
    args = build_parser().parse_args(argv)
    for name in ("minutes", "lr", "save_every"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    for name in ("batch_size", "log_every", "val_every", "val_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.cond_drop < 1 or not 0 < args.ema < 1:
        raise SystemExit("--cond-drop must be in [0, 1) and --ema in (0, 1)")
    _safetensors()  # fail now, not after the time budget, when the weights cannot be written
    train(args, start=start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
