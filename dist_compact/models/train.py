"""Train the embedded DiT on procedural videos to a fixed wall-time budget.

    python -m dist_compact.models.train --minutes 8 --out /path/embedded.safetensors

Rectified flow with velocity prediction (``x_t = (1 - t) x0 + t noise``, target ``noise - x0``),
logit-normal timesteps shifted toward the noise (``--time-shift``, see :func:`sample_times`), prompts dropped to the empty prompt 10% of the time so that
classifier-free guidance works, AdamW with warm-up and a cosine decay over the *time* budget, bf16
autocast on GPUs, an exponential moving average (EMA) of the weights, which is what gets saved.
The weights (safetensors + ``.sha256``) are written every ``--save-every`` minutes and at the end,
together with a JSON log of the losses and a checkpoint (``<out stem>.ckpt.pt``: training weights,
optimizer state, step) that ``--resume`` continues from; every batch is drawn from generators seeded by
(seed, step), so a resumed run sees the batches the uninterrupted one would have. ``--minutes``
counts from the start of the process and covers everything, final validation, save and preview
included: the cost of each is timed and the loop stops early enough, so the whole command ends within
it on any device (the defaults of batch sizes are CPU-sized on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..cmdline import OneLineParser
from .data import make_batch
from .motion import direction_probe
from .embedded import (EmbeddedConfig, EmbeddedDiT, WeightsError, load_embedded, safetensors_io, save_embedded,
                       sha256_of)

__all__ = ["train", "main", "model_config", "flow_matching_loss", "sample_times", "checkpoint_path", "default_rope_split",
           "DEFAULT_OUT"]

#: where a training run writes unless told otherwise: never inside the installed package
DEFAULT_OUT = Path("outputs") / "train" / "embedded.safetensors"


def default_rope_split(head_dim: int) -> tuple:
    """Head-dim channels rotated by (frame, row, col): a quarter by the frame, the rest split evenly
    between rows and columns, each even (32 -> (8, 12, 12), 128 -> (32, 48, 48))."""
    f = (head_dim // 4) // 2 * 2
    r = (head_dim - f) // 4 * 2
    return (f, r, head_dim - f - r)


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


def sample_times(batch: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Training times ``[batch]`` in (0, 1): logit-normal, then the sampler's time shift ``shift``.

    Why the shift: where a clip's object is and which way it goes is decided at high noise (t near 1),
    which the plain logit-normal (median 0.5) rarely draws: P(t > 0.9) is 1.4%; with shift 3 it is
    14%, so the model learns the trajectory, not only the look (SD3 shifts its times the same way for
    larger images).
    """
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    return shift * t / (1 + (shift - 1) * t)


def _step_generators(seed: int, step: int, device) -> tuple:
    """The CPU (scenes) and device (noise, times) generators of training step ``step``.

    Seeded by (seed, step), so a resumed run draws exactly the batches the uninterrupted run would.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    dg = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 500_000_000)
    return g, dg


def checkpoint_path(out: Path) -> Path:
    """Where the resumable training state of the weights file ``out`` lives."""
    return out.with_name(out.stem + ".ckpt.pt")


#: what a training checkpoint holds (:func:`checkpoint_path`); anything else is not one
_CKPT_KEYS = ("step", "weights", "sha256", "log", "model", "opt")


def _read_checkpoint(ckpt: Path) -> dict:
    """The checkpoint at ``ckpt`` (tensors and plain data only: ``weights_only``), or one line saying
    it is not one."""
    if not ckpt.is_file():
        raise SystemExit(f"--resume {ckpt}: no such checkpoint (written beside the weights as *.ckpt.pt)")
    with open(ckpt, "rb") as f:
        magic = f.read(4)
    try:
        if magic != b"PK\x03\x04":  # torch.save writes a zip archive
            raise ValueError("not a file written by torch.save")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same mistake for the user
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise SystemExit(f"--resume {ckpt}: not a training checkpoint ({why}); give the *.ckpt.pt written beside "
                         "the weights") from None
    lacks = [k for k in _CKPT_KEYS if k not in state] if isinstance(state, dict) else ["a mapping"]
    if lacks:
        raise SystemExit(f"--resume {ckpt}: not a training checkpoint (it lacks {', '.join(lacks)}); give the "
                         "*.ckpt.pt written beside the weights")
    return state


def _as_options(build):
    """``build()``, an :class:`EmbeddedConfig` error as one line that names the command-line options."""
    try:
        return build()
    except ValueError as e:
        text = re.sub(r"EmbeddedConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise SystemExit(text.replace("EmbeddedConfig: ", "")) from None


def model_config(args: argparse.Namespace) -> EmbeddedConfig:
    """The :class:`EmbeddedConfig` of a fresh model from the command line (checked before any work).

    Raises:
        SystemExit: one line naming the options, e.g. ``--heads 5`` that does not divide ``--dim``.
    """
    dim, heads = args.dim, args.heads
    if dim < 1 or heads < 1:
        raise SystemExit(f"--dim {dim} and --heads {heads} must be >= 1")
    if dim % heads or dim // heads not in (16, 32, 64, 128):
        fits = [str(h) for h in range(1, dim + 1) if dim % h == 0 and dim // h in (16, 32, 64, 128)]
        fix = f"use --heads {' or '.join(fits)}" if fits else "use a --dim that is a multiple of 16"
        raise SystemExit(f"--heads {heads} with --dim {dim}: the head size dim / heads must be 16, 32, 64 or 128 "
                         f"(the kernels' sizes); {fix}")
    dims = dict(dim=dim, depth=args.depth, heads=heads, mlp_ratio=args.mlp_ratio, rope_theta=args.rope_theta,
                rope_split=tuple(args.rope_split) if args.rope_split is not None else default_rope_split(dim // heads))
    size = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    return _as_options(lambda: EmbeddedConfig(**dims, **size))


def _load_weights(option: str, path, device) -> EmbeddedDiT:
    """:func:`load_embedded`, its errors as one line naming ``option``."""
    try:
        return load_embedded(path, device=device)
    except WeightsError as e:
        raise SystemExit(f"{option} {path}: {e}") from None


def train(args: argparse.Namespace, start: Optional[float] = None, *,
          clock: Callable[[], float] = time.time) -> dict:
    """Run the training loop described by the parsed command-line ``args``; returns the log dict.

    ``start``: the ``clock()`` the budget counts from (default: now). The loop stops when the next
    step would not leave time for what must follow it (final validation, save, and the preview if
    it still fits: its step count shrinks to the time left, or it is skipped), all timed as it goes.
    ``clock``: the time source, in seconds (tests give one they control, so no result depends on
    how loaded the machine is).

    Raises:
        SystemExit: one line naming the option, when ``--resume`` / ``--init`` is not what it should
            be, or when the budget leaves no time for one training step (nothing is written then).
    """
    _T0 = clock() if start is None else start
    budget = args.minutes * 60.0

    def _log(msg: str) -> None:
        print(f"[train {clock() - _T0:7.1f}s] {msg}", flush=True)

    def left() -> float:
        return budget - (clock() - _T0)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # sizes that fit a CPU's budget unless given (one step at batch 32 took minutes on 2 cores)
    batch = args.batch_size or (32 if device.type == "cuda" else 4)
    val_batch = args.val_batch or (16 if device.type == "cuda" else 4)
    torch.manual_seed(args.seed)
    state = None
    if args.resume:
        ckpt = Path(args.resume)
        if not ckpt.is_file():
            raise SystemExit(f"--resume {ckpt}: no such checkpoint (written beside the weights as *.ckpt.pt)")
        state = _read_checkpoint(ckpt)
        weights = Path(state["weights"]) if Path(state["weights"]).is_file() else ckpt.with_name(Path(state["weights"]).name)
        if not weights.is_file() or sha256_of(weights) != state["sha256"]:
            raise SystemExit(f"--resume {ckpt}: its EMA weights {weights} are missing or not the ones saved with it "
                             f"(sha256 {state['sha256'][:16]}...)")
        ema = _load_weights("--resume", weights, device)
        model = copy.deepcopy(ema)
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
        _log(f"resumed from {ckpt} at step {state['step']} (EMA from {weights})")
    elif args.init:
        model = _load_weights("--init", args.init, device)
        # progressive resolution: the same weights, trained on from here at another clip size
        size = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
        if size:
            model.config = _as_options(lambda: dataclasses.replace(model.config, **size))
        _log(f"initialised from {args.init}")
    else:
        model = EmbeddedDiT(model_config(args)).to(device)
    model.train()
    cfg = model.config
    if state is None:
        ema = copy.deepcopy(model)
    ema.eval().requires_grad_(False)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model {n_params / 1e6:.2f}M params on {device}; batch {batch}; config {cfg}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("text_pos") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    if state is not None:
        opt_state = state["opt"]
        for st in opt_state["state"].values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and k != "step":
                    st[k] = v.float()
        opt.load_state_dict(opt_state)
    step_fn = model.forward_plain
    if args.compile:
        try:
            step_fn = torch.compile(model.forward_plain)
        except Exception as e:  # compile is an optimisation only
            _log(f"torch.compile unavailable ({e}); training eager")
    frames, height, width = cfg.frames, cfg.height, cfg.width
    # fixed validation batch: same videos, noise and times at every evaluation, so its loss is comparable
    vgen = torch.Generator().manual_seed(args.seed + 1)
    vx, vprompts = make_batch(val_batch, vgen, frames, height, width, device=device)
    vtext = model.tokenizer.batch(vprompts).to(device)
    vt = ((torch.arange(val_batch, dtype=torch.float32) + 0.5) / val_batch).to(device)
    vnoise = torch.randn(vx.shape, generator=vgen).to(device)

    out = Path(args.out)
    ckpt_out = checkpoint_path(out)
    log = {"config": json.loads(cfg.to_json()), "args": vars(args), "train": [], "val": []}
    step = 0
    if state is not None:
        step = int(state["step"])
        log["train"], log["val"] = state["log"]["train"], state["log"]["val"]
        log["resumed"] = state["log"].get("resumed", []) + [{"step": step, "from": str(args.resume)}]
    first_step = step
    autocast = device.type == "cuda" and args.dtype == "bf16"
    loss_sum, loss_count = torch.zeros((), device=device), 0
    cost = {"save": 0.0}  # measured seconds of each kind of work, for the budget

    probe_on = device.type == "cuda" if args.direction_probe is None else args.direction_probe

    def evaluate() -> dict:
        """The EMA model's validation loss and its direction probe (a guided forward at t = 0.9 per
        colour x straight motion: does the predicted clip move the prompted way; motion.direction_probe)."""
        t0 = clock()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            val = float(flow_matching_loss(ema.forward_plain, vx, vtext, vt, vnoise))
            cost["val_loss"] = clock() - t0
            probe = direction_probe(ema.forward_plain, ema.tokenizer, frames, height, width, seeds=(0,),
                                    device=device) if probe_on else None
        cost["eval"] = clock() - t0
        out = {"step": step, "loss": val, "time": clock() - _T0}
        if probe is not None:
            out.update(direction_pct=probe["right_way_pct"], axis_pct=probe["axis_pct"])
        return out

    def val_line(v: dict) -> str:
        line = f"step {v['step']} val loss (EMA) {v['loss']:.4f}"
        if "direction_pct" in v:
            line += f", direction probe {v['direction_pct']:.0f}% right way, {v['axis_pct']:.0f}% on the axis"
        return line

    def save(final: bool) -> None:
        t0 = clock()
        extra = {"steps": step, "minutes": (clock() - _T0) / 60.0, "device": str(device),
                 "batch_size": batch, "seed": args.seed, "time_shift": args.time_shift,
                 "val_loss": log["val"][-1]["loss"] if log["val"] else None}
        digest = save_embedded(ema, out, dtype=torch.bfloat16 if args.save_dtype == "bf16" else torch.float32,
                               extra=extra)
        log["sha256"] = digest
        log_path = out.with_name(out.stem + ".train.json")
        log_path.write_text(json.dumps(log, indent=1, default=str))
        if args.checkpoint:
            dt = torch.bfloat16 if args.ckpt_dtype == "bf16" else torch.float32
            opt_sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never mutate
            opt_sd["state"] = {i: {k: v.detach().to("cpu", dt) if torch.is_tensor(v) and v.is_floating_point()
                                   and k != "step" else v for k, v in st.items()}
                               for i, st in opt_sd["state"].items()}
            tmp = ckpt_out.with_name(f".{ckpt_out.name}.tmp")
            torch.save({"step": step, "weights": str(out), "sha256": digest, "log": log,
                        "model": {k: v.detach().to("cpu", dt) for k, v in model.state_dict().items()},
                        "opt": opt_sd}, tmp)
            tmp.replace(ckpt_out)
        cost["save"] = max(cost["save"], clock() - t0)
        _log(f"{'final' if final else 'periodic'} save: {out} sha256 {digest[:16]}... (step {step})")

    # the first validation also times a forward, which predicts the first step: fwd + bwd is ~3
    # forwards on a GPU (5 assumed: the first step also sets up), but ~12 were seen on a CPU, where
    # SDPA's backward runs the math path and stores every attention matrix
    log["val"].append(evaluate())
    _log(f"{val_line(log['val'][-1])} ({cost['eval']:.2f} s)")
    step_cost = (12.0 if device.type == "cpu" else 5.0) * cost["val_loss"] * batch / val_batch

    def reserve() -> float:
        """Seconds the end needs: final validation and save (+ margin); the preview is optional."""
        return cost["eval"] + max(cost["save"], 0.5) + args.save_margin

    last_save = clock()
    t_loop = clock()
    while True:
        if (args.max_steps and step >= args.max_steps) or (args.stop_after and step - first_step >= args.stop_after):
            break
        if left() < step_cost + reserve():
            if step == first_step:
                # nothing trained: saving would write the starting weights as if they were a result
                raise SystemExit(f"--minutes {args.minutes:g} leaves no time for one training step (one step "
                                 f"~{step_cost:.1f} s, validation and save ~{reserve():.1f} s, {left():.1f} s "
                                 "left); give a larger --minutes")
            break
        if args.max_steps:  # the cosine spans the steps: the same schedule however the run is split
            progress = step / args.max_steps
        else:  # the share of this run's time budget used so far
            progress = (clock() - t_loop) / max(budget - (t_loop - _T0) - reserve(), 1.0)
        lr = _lr_at(step, progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = clock()
        gen, dgen = _step_generators(args.seed, step, device)
        x0, prompts = make_batch(batch, gen, frames, height, width, device=device)
        drop = torch.rand(batch, generator=gen) < args.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        text = model.tokenizer.batch(prompts).to(device)
        t = sample_times(batch, args.time_shift, dgen, device)
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
        done = step - first_step
        # GPU steps are asynchronous: the wall time per step converges over a few steps; the first
        # measured step replaces the forward-based guess, later ones are averaged
        dt = clock() - t_step
        step_cost = dt if done == 1 else max(0.9 * step_cost + 0.1 * dt, (clock() - t_loop) / done)
        if step % args.log_every == 0:
            mean = float(loss_sum) / loss_count
            loss_sum.zero_()
            loss_count = 0
            rate = done / (clock() - t_loop)
            log["train"].append({"step": step, "loss": mean, "lr": lr, "time": clock() - _T0})
            _log(f"step {step} loss {mean:.4f} lr {lr:.2e} ({rate:.2f} steps/s)")
        if step % args.val_every == 0 and left() > cost["eval"] + reserve():
            log["val"].append(evaluate())
            _log(val_line(log["val"][-1]))
        if clock() - last_save > args.save_every * 60.0 and left() > cost["save"] + reserve():
            save(final=False)
            last_save = clock()
    log["val"].append(evaluate())
    _log(f"done: {step} steps ({step - first_step} in this run), final {val_line(log['val'][-1])}")
    save(final=True)
    if args.preview:
        # a preview step is one guided forward (2 clips) per prompt: scale the timed validation forward
        per_step = cost["eval"] * 2 * len(PREVIEW_PROMPTS) / val_batch
        n = min(args.preview_steps, int((left() - args.save_margin) / max(per_step, 1e-6)))
        if n >= 4:
            path = out.with_name(out.stem + ".preview.png")
            preview(ema, PREVIEW_PROMPTS, path, steps=n, guidance=4.0)
            _log(f"preview of {len(PREVIEW_PROMPTS)} prompts, {n} steps (rows; every other frame): {path}")
        else:
            _log(f"preview skipped: {left():.1f} s left, it needs ~{4 * per_step:.1f} s for 4 steps")
    return log


#: prompts of the preview image written after training (one row each)
PREVIEW_PROMPTS = (
    "a red square moving left",
    "a blue circle bouncing on a checkerboard",
    "a yellow triangle moving up on stripes",
    "a green circle moving right on a gradient",
)


def preview(model: EmbeddedDiT, prompts, path, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> None:
    """Sample ``prompts`` with the inference path (the installed attention, here the stock SDPA) and write a PNG grid."""
    import numpy as np

    from ..run.sampler import sample
    from ..png import write_png
    from ..run.report import frame_grid, to_uint8_frames

    cfg = model.config
    device = next(model.parameters()).device
    rows = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(1, cfg.in_channels, cfg.frames, cfg.height, cfg.width, generator=g).to(device)
        text = model.tokenizer.batch([p]).to(device)
        res = sample(model, text, noise, steps=steps, guidance=guidance)
        frames = to_uint8_frames(res.latents[0, :, ::2], 2)
        rows.append(frame_grid(frames, cols=frames.shape[0]))
    write_png(str(path), np.concatenate(rows, axis=0))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dist_compact.models.train", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the whole command")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="weights file to write (+ .sha256, .train.json); default %(default)s. The shipped "
                        "weights inside the package are replaced only with --replace-shipped")
    p.add_argument("--replace-shipped", action="store_true",
                   help="allow --out to name a file inside the installed package (the shipped weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPUs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 4 on the CPU")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of empty prompts (for guidance)")
    p.add_argument("--dim", type=int, default=EmbeddedConfig.dim)
    p.add_argument("--depth", type=int, default=EmbeddedConfig.depth)
    p.add_argument("--heads", type=int, default=EmbeddedConfig.heads)
    p.add_argument("--mlp-ratio", type=int, default=EmbeddedConfig.mlp_ratio)
    p.add_argument("--rope-split", type=int, nargs=3, default=None,
                   help="head-dim channels rotated by frame, row, col (default: a quarter, then half each)")
    p.add_argument("--rope-theta", type=float, default=EmbeddedConfig.rope_theta)
    p.add_argument("--frames", type=int, default=None,
                   help=f"training clip length (default {EmbeddedConfig.frames}, or the --init/--resume model's)")
    p.add_argument("--height", type=int, default=None, help=f"default {EmbeddedConfig.height} (or the model's)")
    p.add_argument("--width", type=int, default=None, help=f"default {EmbeddedConfig.width} (or the model's)")
    p.add_argument("--init", default=None, help="start from these weights (fresh optimizer and step count)")
    p.add_argument("--resume", default=None,
                   help="continue a run from its checkpoint (<out stem>.ckpt.pt: weights, optimizer, step)")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="do not write the resumable checkpoint beside the weights")
    p.add_argument("--save-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="dtype of the saved (EMA) weights file")
    p.add_argument("--ckpt-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="dtype of the checkpoint's model and optimizer tensors (bf16: half the size)")
    p.add_argument("--time-shift", type=float, default=3.0,
                   help="shift of the logit-normal training times toward the noise (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop at this total step (resumed steps count); the LR cosine then spans the steps, "
                        "else the time budget (0: time only)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this run after this many steps (a schedule split over several runs)")
    p.add_argument("--save-every", type=float, default=2.0, help="minutes between periodic saves")
    p.add_argument("--save-margin", type=float, default=2.0,
                   help="seconds kept free beyond the measured cost of the final validation and save")
    p.add_argument("--preview-steps", type=int, default=20, help="denoising steps of the preview (fewer if time is short)")
    p.add_argument("--no-preview", dest="preview", action="store_false",
                   help="skip the preview PNG of a few prompts written after training")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-batch", type=int, default=None, help="default: 16 on a GPU, 4 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--direction-probe", action=argparse.BooleanOptionalAction, default=None,
                   help="at every validation, also log whether the EMA model's predicted clip at t = 0.9 moves the "
                        "prompted way (8 guided clips; default: on a GPU only, on a CPU it costs ~4 validations)")
    return p


def main(argv: Optional[List[str]] = None, *, clock: Callable[[], float] = time.time) -> int:
    """The command line (``--help``); every bad option ends it with one line before any work.

    ``clock``: the time source the ``--minutes`` budget is measured with (see :func:`train`)."""
    start = clock()
    args = build_parser().parse_args(argv)
    for name in ("minutes", "lr", "save_every"):
        val = getattr(args, name)
        if not (math.isfinite(val) and val > 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number > 0, got {val}")
    for name in ("batch_size", "log_every", "val_every", "val_batch", "preview_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.cond_drop < 1 or not 0 < args.ema < 1:
        raise SystemExit("--cond-drop must be in [0, 1) and --ema in (0, 1)")
    if args.max_steps < 0 or args.stop_after < 0:
        raise SystemExit("--max-steps and --stop-after must be >= 0")
    if not args.time_shift > 0:
        raise SystemExit("--time-shift must be > 0")
    if args.init and args.resume:
        raise SystemExit("--init and --resume exclude each other (--resume restores the weights too)")
    if not (args.init or args.resume):
        model_config(args)  # a model that cannot be built fails now, not after loading anything
    out = Path(args.out).resolve()
    package = Path(__file__).resolve().parents[1]
    if not args.replace_shipped and (out == package or package in out.parents):
        raise SystemExit(f"--out {args.out} is inside the installed package ({package}); write elsewhere "
                         f"(default {DEFAULT_OUT}) or pass --replace-shipped to replace the shipped weights")
    if out.is_dir():
        raise SystemExit(f"--out {args.out} is a directory; give a file name, e.g. {Path(args.out) / DEFAULT_OUT.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create its folder ({e.strerror}); choose a writable place") from None
    if not os.access(out.parent, os.W_OK):
        raise SystemExit(f"--out {args.out}: its folder {out.parent} is not writable; choose a writable place")
    safetensors_io()  # fail now, not after the time budget, when the weights cannot be written
    train(args, start=start, clock=clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
