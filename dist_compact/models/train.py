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
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .._util import control_chars
from ..cmdline import NAME_MAX, OneLineParser, path_problem, show_path
from .data import make_batch
from .motion import direction_probe
from .embedded import (WEIGHTS_FORMAT, EmbeddedConfig, EmbeddedDiT, WeightsError, load_embedded,
                       pending_checksum_path, safetensors_io, sha256_of)

__all__ = ["train", "main", "cli", "TrainingFailed", "Interrupted", "model_config", "flow_matching_loss", "sample_times", "checkpoint_path", "default_rope_split",
           "DEFAULT_OUT"]

#: where a training run writes unless told otherwise: never inside the installed package
DEFAULT_OUT = Path("outputs") / "train" / "embedded.safetensors"


class TrainingFailed(SystemExit):
    """The run itself failed (e.g. its loss became NaN): one line, exit status 1 from :func:`cli`; nothing
    non-finite is saved and the last complete save is kept."""


class Interrupted(SystemExit):
    """Ctrl-C or SIGTERM: one line, exit status 130 from :func:`cli`; the last complete save is kept."""


#: the bounds :func:`main` checks before any work (a clip, a batch and a model that fit a machine)
MAX_FRAMES, MAX_SIDE, MAX_CLIP_PIXELS, MAX_TOKENS = 1024, 4096, 1 << 24, 1 << 16
MAX_BATCH, MAX_DIM, MAX_DEPTH, MAX_MLP_RATIO = 4096, 8192, 256, 16
MAX_BATCH_BYTES = 8 << 30

# SIGINT / SIGTERM while the saved set is being renamed into place wait until the set is complete
_SIGNALS = {"defer": 0, "pending": None}


def _on_signal(signum, frame):  # noqa: ARG001 - a signal handler's signature
    if _SIGNALS["defer"]:
        _SIGNALS["pending"] = signum
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


class _DeferSignals:
    """Within: SIGINT / SIGTERM are held and raised (as KeyboardInterrupt) on leaving."""

    def __enter__(self):
        _SIGNALS["defer"] += 1

    def __exit__(self, *exc):
        _SIGNALS["defer"] -= 1
        if not _SIGNALS["defer"] and _SIGNALS["pending"] is not None:
            signum, _SIGNALS["pending"] = _SIGNALS["pending"], None
            if exc[0] is None:
                raise KeyboardInterrupt(signal.Signals(signum).name)
        return False


def sidecar_paths(out: Path) -> dict:
    """The files a run writes beside its weights ``out``: ``{role: path}``."""
    return {"sha256": out.with_name(out.name + ".sha256"), "checkpoint": checkpoint_path(out),
            "log": out.with_name(out.stem + ".train.json"), "preview": out.with_name(out.stem + ".preview.png")}


def temp_paths(out: Path) -> dict:
    """The temporaries the saved set is written to before it is renamed into place: ``{role: path}``."""
    side = sidecar_paths(out)
    return {"weights": out.with_name(f".{out.name}.tmp"), "sha256": pending_checksum_path(out),
            "checkpoint": side["checkpoint"].with_name(f".{side['checkpoint'].name}.tmp"),
            "log": side["log"].with_name(f".{side['log'].name}.tmp")}


def _finite(name: str, val: float, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = math.isfinite(val) and (val > low if low_open else val >= low) and val <= high
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise SystemExit(f"--{name.replace('_', '-')} must be a finite number {rng}, got {val}")


def _check_options(args: argparse.Namespace) -> None:
    """Every number of the command line in its range (one line naming the option and the fix)."""
    for name in ("minutes", "save_every"):
        _finite(name, getattr(args, name), 0, low_open=True)
    _finite("lr", args.lr, 0, 1.0, low_open=True)
    _finite("weight_decay", args.weight_decay, 0, 1.0)
    _finite("save_margin", args.save_margin, 0)
    if args.save_margin >= args.minutes * 60.0:
        raise SystemExit(f"--save-margin {args.save_margin:g} s must be less than the --minutes budget "
                         f"({args.minutes * 60.0:g} s); give a smaller --save-margin")
    _finite("time_shift", args.time_shift, 0, 1e6, low_open=True)
    _finite("rope_theta", args.rope_theta, 1, 1e12, low_open=True)
    for name in ("batch_size", "log_every", "val_every", "val_batch", "preview_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "val_batch"):
        if getattr(args, name) is not None and getattr(args, name) > MAX_BATCH:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} is too large; give at most {MAX_BATCH}")
    if args.preview_steps > 1000:
        raise SystemExit(f"--preview-steps {args.preview_steps} is too many; give at most 1000")
    if not 0 <= args.cond_drop < 1 or not 0 < args.ema < 1:
        raise SystemExit("--cond-drop must be in [0, 1) and --ema in (0, 1)")
    if args.max_steps < 0 or args.stop_after < 0:
        raise SystemExit("--max-steps and --stop-after must be >= 0")
    if args.warmup < 0:
        raise SystemExit(f"--warmup {args.warmup} must be >= 0 (steps)")
    if not 0 <= args.seed < 2 ** 32:
        raise SystemExit(f"--seed {show_path(args.seed)} must be an integer in [0, {2 ** 32 - 1}]")
    if args.depth < 1 or args.depth > MAX_DEPTH or args.dim > MAX_DIM:
        raise SystemExit(f"--depth must be in [1, {MAX_DEPTH}] and --dim at most {MAX_DIM}, got --depth {args.depth} "
                         f"--dim {args.dim}")
    if not 1 <= args.mlp_ratio <= MAX_MLP_RATIO:
        raise SystemExit(f"--mlp-ratio {args.mlp_ratio} must be in [1, {MAX_MLP_RATIO}]")
    if args.frames is not None and not 1 <= args.frames <= MAX_FRAMES:
        raise SystemExit(f"--frames {args.frames} must be in [1, {MAX_FRAMES}]")
    for name in ("height", "width"):
        val = getattr(args, name)
        if val is not None and not 16 <= val <= MAX_SIDE:
            raise SystemExit(f"--{name} {val} must be in [16, {MAX_SIDE}] pixels (the procedural scenes need 16)")


def _check_sizes(cfg: EmbeddedConfig, batch: int, val_batch: int) -> None:
    """The clip and batch of the run fit (one line naming the options, before any memory is taken)."""
    f, h, w = cfg.frames, cfg.height, cfg.width
    where = f"--frames {f} --height {h} --width {w}"
    if h < 16 or w < 16:
        raise SystemExit(f"{where}: --height and --width must be >= 16 (the procedural scenes need 16)")
    pixels = f * h * w
    tokens = pixels // max(1, cfg.patch[0] * cfg.patch[1] * cfg.patch[2])
    if pixels > MAX_CLIP_PIXELS or tokens > MAX_TOKENS:
        raise SystemExit(f"{where}: a clip of {pixels} pixels ({tokens} tokens) is too large (at most "
                         f"{MAX_CLIP_PIXELS} pixels and {MAX_TOKENS} tokens); give smaller --frames/--height/--width")
    need = max(batch, val_batch) * cfg.in_channels * pixels * 4
    if need > MAX_BATCH_BYTES:
        raise SystemExit(f"{where} with a batch of {max(batch, val_batch)}: one batch of clips takes "
                         f"{need / 2 ** 30:.1f} GiB (at most {MAX_BATCH_BYTES / 2 ** 30:.0f}); give a smaller "
                         "--batch-size / --val-batch or clip")


def _check_device(text: str) -> torch.device:
    """``--device`` as a device this machine has, or one line."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise SystemExit(f"--device {show_path(text)} is not a device to train on; give auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {text}: CUDA is not available on this machine; give --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); give "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _check_out(arg: str) -> tuple:
    """``--out``: a writable file name whose set (weights, sidecars, temporaries) can be written and
    replaces nothing but regular files."""
    bad = control_chars(arg)
    if bad:
        raise SystemExit(f"--out {show_path(arg)}: the name holds control characters ({bad}); give a plain file name")
    if not arg:
        raise SystemExit("--out is empty; give a file name, e.g. " + str(DEFAULT_OUT))
    try:
        out = Path(arg).resolve()
        for part in out.parts:
            if len(os.fsencode(part)) > NAME_MAX:
                raise SystemExit(f"--out {show_path(arg)}: a name in the path is longer than {NAME_MAX} bytes; "
                                 "choose a shorter name")
        names = [out, *sidecar_paths(out).values(), *temp_paths(out).values()]
        longest = max(names, key=lambda q: len(os.fsencode(q.name)))
        if len(os.fsencode(longest.name)) > NAME_MAX:
            raise SystemExit(f"--out {show_path(arg)}: the file name is too long: the run also writes "
                             f"{short(longest.name)} ({len(os.fsencode(longest.name))} bytes, at most {NAME_MAX}); "
                             f"give a name of at most {len(os.fsencode(out.name)) - (len(os.fsencode(longest.name)) - NAME_MAX)} bytes")
        package = Path(__file__).resolve().parents[1]
        return out, package, names
    except OSError as e:
        raise SystemExit(f"--out {show_path(arg)}: {path_problem(e)}") from None


def _check_existing(arg: str, names) -> None:
    """Every file of the set that exists is a regular file (never replace a device, a pipe or a socket)."""
    for q in names:
        try:
            mode = os.stat(q).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SystemExit(f"--out {show_path(arg)}: {show_path(q)}: {path_problem(e)}") from None
        if q == names[0] and stat.S_ISDIR(mode):
            continue  # said below, with its fix
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, a pipe or a socket)"
            raise SystemExit(f"--out {show_path(arg)}: {show_path(q)} exists and is {what}, which a run never "
                             "replaces; give another --out")


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
    try:
        mode = os.stat(ckpt).st_mode
    except FileNotFoundError:
        raise SystemExit(f"--resume {show_path(ckpt)}: no such checkpoint (written beside the weights as *.ckpt.pt)") from None
    except (OSError, ValueError) as e:
        why = path_problem(e) if isinstance(e, OSError) else "a path cannot hold a NUL character"
        raise SystemExit(f"--resume {show_path(ckpt)}: {why}; give the *.ckpt.pt written beside the weights") from None
    if stat.S_ISDIR(mode):
        raise SystemExit(f"--resume {show_path(ckpt)} is a directory, not a checkpoint; give the *.ckpt.pt file "
                         "written beside the weights")
    if not stat.S_ISREG(mode):
        raise SystemExit(f"--resume {show_path(ckpt)} is not a regular file (a device, a pipe or a socket); give the "
                         "*.ckpt.pt file written beside the weights")
    try:
        with open(ckpt, "rb") as f:
            magic = f.read(4)
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
    _check_checkpoint_fields(ckpt, state)
    return state


def _check_checkpoint_fields(ckpt: Path, state: dict) -> None:
    """The types and ranges of a checkpoint's fields (shapes are checked against the model later)."""
    def bad(field: str, why: str) -> SystemExit:
        return SystemExit(f"--resume {show_path(ckpt)}: its field {field} {why}; the checkpoint is damaged, resume "
                          "from another one or start afresh")

    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2 ** 62:
        raise bad("step", f"is {short(step)}, not a step count >= 0")
    if not isinstance(state["weights"], str) or not state["weights"] or "\x00" in state["weights"]:
        raise bad("weights", f"is {short(state['weights'])}, not the path of the weights file")
    if not isinstance(state["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", state["sha256"]):
        raise bad("sha256", f"is {short(state['sha256'])}, not a sha256 in hex")
    log = state["log"]
    if not isinstance(log, dict) or not isinstance(log.get("train"), list) or not isinstance(log.get("val"), list) \
            or not isinstance(log.get("resumed", []), list):
        raise bad("log", "is not a training log (a mapping with the lists train and val)")
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and torch.is_tensor(v)
                                                           and v.is_floating_point() for k, v in model.items()):
        raise bad("model", "is not a mapping of parameter names to tensors")
    if not all(bool(torch.isfinite(v).all()) for v in model.values()):
        raise bad("model", "holds non-finite values (NaN or infinity)")
    opt = state["opt"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list) \
            or len(opt["param_groups"]) != 2 or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                        for g in opt["param_groups"]):
        raise bad("opt", "is not the optimizer state of a training run (two parameter groups)")
    for st in opt["state"].values():
        if not isinstance(st, dict) or not all(not torch.is_tensor(v) or bool(torch.isfinite(v).all())
                                               for v in st.values()):
            raise bad("opt", "holds a malformed or non-finite optimizer state")


def short(value) -> str:
    from ..cmdline import short_repr

    return short_repr(value, 40)


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


def _load_checked(ckpt: Path, path: Path, device) -> EmbeddedDiT:
    """The weights ``path`` whose sha256 the checkpoint ``ckpt`` names (checked by the caller); read
    without the ``.sha256`` sidecar, which an interrupted save may not have renamed yet."""
    st = safetensors_io()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != WEIGHTS_FORMAT or "config" not in meta:
            raise ValueError("not an embedded-model weights file")
        model = EmbeddedDiT(EmbeddedConfig.from_json(meta["config"]))
        model.load_state_dict(st.load_file(str(path)), strict=True)
    except Exception as e:  # noqa: BLE001 - a file with the checkpoint's sha256 should load; say which if not
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise SystemExit(f"--resume {show_path(ckpt)}: its EMA weights {show_path(path)} cannot be read ({why})") from None
    return model.to(device=device).eval()


#: the options that describe the model (and its clip): with --resume / --init, given ones must match it
_MODEL_OPTIONS = ("dim", "depth", "heads", "mlp_ratio", "rope_theta", "rope_split", "frames", "height", "width")


def _check_given(option: str, source, cfg: EmbeddedConfig, args: argparse.Namespace, given, names) -> None:
    for name in names:
        if name not in given:
            continue
        want = getattr(cfg, name)
        have = getattr(args, name)
        if name == "rope_split":
            want, have = list(want), list(have)
        if have != want:
            shown = " ".join(map(str, want)) if isinstance(want, list) else f"{want:g}" if isinstance(want, float) else want
            raise SystemExit(f"--{name.replace('_', '-')} {' '.join(map(str, have)) if isinstance(have, list) else have} "
                             f"differs from the {option} model's ({shown}, {show_path(source)}); drop the option or "
                             f"give --{name.replace('_', '-')} {shown}")


def _resume_weights(ckpt: Path, state: dict) -> Path:
    """The EMA weights saved with the checkpoint: the file it names (or its namesake beside the
    checkpoint), or the temporary of a save interrupted between its renames."""
    named = Path(state["weights"])
    for cand in (named, ckpt.with_name(named.name), ckpt.with_name(f".{named.name}.tmp")):
        try:
            if cand.is_file() and sha256_of(cand) == state["sha256"]:
                return cand
        except (OSError, ValueError):
            continue
    raise SystemExit(f"--resume {show_path(ckpt)}: its EMA weights {show_path(named)} are missing or not the ones "
                     f"saved with it (sha256 {state['sha256'][:16]}...)")


def train(args: argparse.Namespace, start: Optional[float] = None, *,
          clock: Callable[[], float] = time.time, given=()) -> dict:
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

    device = _check_device(args.device)
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
        state = _read_checkpoint(ckpt)
        weights = _resume_weights(ckpt, state)
        ema = _load_checked(ckpt, weights, device)
        _check_given("--resume", ckpt, ema.config, args, given, _MODEL_OPTIONS)
        _check_sizes(ema.config, batch, val_batch)
        if not all(bool(torch.isfinite(p).all()) for p in ema.parameters()):
            raise SystemExit(f"--resume {show_path(ckpt)}: its EMA weights {show_path(weights)} hold non-finite "
                             "values (NaN or infinity); resume from another checkpoint or start afresh")
        model = copy.deepcopy(ema)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in state["model"].items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            raise SystemExit(f"--resume {show_path(ckpt)}: its field model does not match its weights' model "
                             f"({short(diff[:3])}); the checkpoint is damaged, resume from another one")
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
        _log(f"resumed from {ckpt} at step {state['step']} (EMA from {weights})")
    elif args.init:
        model = _load_weights("--init", args.init, device)
        _check_given("--init", args.init, model.config, args, given, _MODEL_OPTIONS[:6])
        # progressive resolution: the same weights, trained on from here at another clip size
        size = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
        if size:
            model.config = _as_options(lambda: dataclasses.replace(model.config, **size))
        _log(f"initialised from {args.init}")
    else:
        model = EmbeddedDiT(model_config(args)).to(device)
    model.train()
    cfg = model.config
    _check_sizes(cfg, batch, val_batch)
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
        sizes = [len(g["params"]) for g in opt.param_groups]
        ids = [g["params"] for g in opt_state["param_groups"]]
        shapes = {i: tuple(p.shape) for i, p in enumerate(decay + no_decay)}
        ok = [len(x) for x in ids] == sizes and sorted(i for x in ids for i in x) == list(range(sum(sizes)))
        for i, st in opt_state["state"].items():
            ok = ok and i in shapes and all(not torch.is_tensor(v) or k == "step" or tuple(v.shape) == shapes[i]
                                            for k, v in st.items())
        if not ok:
            raise SystemExit(f"--resume {show_path(ckpt)}: its field opt does not match the model (parameter groups "
                             "or state shapes); the checkpoint is damaged, resume from another one")
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise SystemExit(f"--resume {show_path(ckpt)}: its field opt cannot be loaded ({short(str(e))}); the "
                             "checkpoint is damaged, resume from another one") from None
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
    if args.max_steps and step >= args.max_steps:
        # nothing to train: a save now would rewrite a finished set with the same weights
        _log(f"--resume {show_path(args.resume)} is at step {step}, already at or past --max-steps "
             f"{args.max_steps}: nothing to train, {out} is left as it is (give a larger --max-steps to go on)")
        return log
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
        finite_or_fail("validation loss (EMA)", val)
        out = {"step": step, "loss": val, "time": clock() - _T0}
        if probe is not None:
            out.update(direction_pct=probe["right_way_pct"], axis_pct=probe["axis_pct"])
        return out

    def val_line(v: dict) -> str:
        line = f"step {v['step']} val loss (EMA) {v['loss']:.4f}"
        if "direction_pct" in v:
            line += f", direction probe {v['direction_pct']:.0f}% right way, {v['axis_pct']:.0f}% on the axis"
        return line

    def finite_or_fail(what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingFailed(f"train: the {what} is {value} at step {step}: training diverged (try a smaller --lr); "
                                 f"nothing of this state is saved, {out} keeps its last complete save")

    def write_weights(path: Path, sum_path: Path, extra: dict) -> str:
        """The EMA weights as :func:`save_embedded` writes them, to ``path`` and its sidecar ``sum_path``."""
        dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in ema.state_dict().items()}
        meta = {"format": WEIGHTS_FORMAT, "config": ema.config.to_json(), "training": json.dumps(extra, sort_keys=True)}
        safetensors_io().save_file(tensors, str(path), metadata=meta)
        digest = sha256_of(path)
        sum_path.write_text(f"{digest}  {out.name}\n")
        for f in (path, sum_path):  # safetensors creates 0600 files; weights are for everyone to read
            os.chmod(f, 0o644)
        return digest

    def save(final: bool) -> None:
        """Write the set (weights, .sha256, log, checkpoint) to temporaries, then rename them into place
        with Ctrl-C / SIGTERM held: the checkpoint first (its weights are then the temporary, which
        --resume also takes), then the weights and their checksum, then the log. Interrupted before the
        renames, the previous set stays whole and the temporaries are removed."""
        t0 = clock()
        if not all(bool(torch.isfinite(p).all()) for p in ema_params):
            raise TrainingFailed(f"train: the EMA weights hold NaN or infinity at step {step}: training diverged "
                                 f"(try a smaller --lr); nothing is saved, {out} keeps its last complete save")
        extra = {"steps": step, "minutes": (clock() - _T0) / 60.0, "device": str(device),
                 "batch_size": batch, "seed": args.seed, "time_shift": args.time_shift,
                 "val_loss": log["val"][-1]["loss"] if log["val"] else None}
        tmp = temp_paths(out)
        side = sidecar_paths(out)
        renaming = False
        try:
            digest = write_weights(tmp["weights"], tmp["sha256"], extra)
            log["sha256"] = digest
            tmp["log"].write_text(json.dumps(log, indent=1, default=str))
            if args.checkpoint:
                dt = torch.bfloat16 if args.ckpt_dtype == "bf16" else torch.float32
                opt_sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never mutate
                opt_sd["state"] = {i: {k: v.detach().to("cpu", dt) if torch.is_tensor(v) and v.is_floating_point()
                                       and k != "step" else v for k, v in st.items()}
                                   for i, st in opt_sd["state"].items()}
                torch.save({"step": step, "weights": str(out), "sha256": digest, "log": log,
                            "model": {k: v.detach().to("cpu", dt) for k, v in model.state_dict().items()},
                            "opt": opt_sd}, tmp["checkpoint"])
            with _DeferSignals():
                renaming = True
                if args.checkpoint:
                    os.replace(tmp["checkpoint"], side["checkpoint"])
                os.replace(tmp["weights"], out)
                os.replace(tmp["sha256"], side["sha256"])
                os.replace(tmp["log"], side["log"])
        finally:
            # an interrupted write leaves no temporaries; an interrupted rename (a failing disk) keeps the
            # weights' temporary, which the renamed checkpoint names by its sha256
            keep = ("weights", "sha256") if renaming and args.checkpoint else ()
            for role, f in tmp.items():
                if role not in keep:
                    try:
                        f.unlink()
                    except FileNotFoundError:
                        pass
                    except OSError:
                        pass
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

    def batch_loss(fn, at: int) -> torch.Tensor:
        """The flow-matching loss of step ``at``'s batch (the same batch however the run is split)."""
        gen, dgen = _step_generators(args.seed, at, device)
        x0, prompts = make_batch(batch, gen, frames, height, width, device=device)
        drop = torch.rand(batch, generator=gen) < args.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        text = model.tokenizer.batch(prompts).to(device)
        t = sample_times(batch, args.time_shift, dgen, device)
        noise = torch.randn(x0.shape, generator=dgen, device=device)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            return flow_matching_loss(fn, x0, text, t, noise)

    if step_fn != model.forward_plain:
        # torch.compile compiles at the first call: pay that here, on the first step's batch, so the
        # budget checks below see the time it took and a compile that fails falls back before any step
        # (the gradients are dropped; the optimizer does not step)
        t_c = clock()
        try:
            batch_loss(step_fn, step).backward()
            _log(f"compiled the training step in {clock() - t_c:.1f} s (counted in --minutes)")
        except Exception as e:
            _log(f"compiled model failed ({type(e).__name__}: {short(str(e))}); training eager")
            step_fn = model.forward_plain
        opt.zero_grad(set_to_none=True)
        if left() < step_cost + reserve():
            raise SystemExit(f"--minutes {args.minutes:g} leaves no time for one training step after compiling "
                             f"({clock() - t_c:.1f} s); give a larger --minutes or leave out --compile")

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
        try:
            loss = batch_loss(step_fn, step)
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
            finite_or_fail("training loss", mean)
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
    if loss_count:
        finite_or_fail("training loss", float(loss_sum) / loss_count)
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


def _given_options(argv: Optional[List[str]]) -> set:
    """The destinations of the options written on the command line (not left at their defaults)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def main(argv: Optional[List[str]] = None, *, clock: Callable[[], float] = time.time) -> int:
    """The command line (``--help``); every bad option ends it with one line before any work.

    ``clock``: the time source the ``--minutes`` budget is measured with (see :func:`train`).

    Raises:
        SystemExit: one line for a bad option (exit status 2 from :func:`cli`); :class:`TrainingFailed`
            when the run diverges (1); :class:`Interrupted` on Ctrl-C / SIGTERM (130).
    """
    start = clock()
    args = build_parser().parse_args(argv)
    given = _given_options(argv)
    _check_options(args)
    _check_device(args.device)
    if args.init and args.resume:
        raise SystemExit("--init and --resume exclude each other (--resume restores the weights too)")
    for name in ("init", "resume"):
        val = getattr(args, name)
        if val is not None and (not val or control_chars(val)):
            raise SystemExit(f"--{name} {show_path(val)}: not a file name (empty or holding control characters)")
    if not (args.init or args.resume):
        cfg = model_config(args)  # a model that cannot be built fails now, not after loading anything
        cpu = _check_device(args.device).type == "cpu"
        _check_sizes(cfg, args.batch_size or (4 if cpu else 32), args.val_batch or (4 if cpu else 16))
    out, package, names = _check_out(args.out)
    if not args.replace_shipped and (out == package or package in out.parents):
        raise SystemExit(f"--out {args.out} is inside the installed package ({package}); write elsewhere "
                         f"(default {DEFAULT_OUT}) or pass --replace-shipped to replace the shipped weights")
    try:
        is_dir = out.is_dir()
    except OSError as e:
        raise SystemExit(f"--out {show_path(args.out)}: {path_problem(e)}") from None
    if is_dir:
        raise SystemExit(f"--out {args.out} is a directory; give a file name, e.g. {Path(args.out) / DEFAULT_OUT.name}")
    _check_existing(args.out, names)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create its folder ({e.strerror}); choose a writable place") from None
    if not os.access(out.parent, os.W_OK):
        raise SystemExit(f"--out {args.out}: its folder {out.parent} is not writable; choose a writable place")
    safetensors_io()  # fail now, not after the time budget, when the weights cannot be written
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, _on_signal)
    try:
        train(args, start=start, clock=clock, given=given)
    except KeyboardInterrupt as e:
        why = str(e) or "SIGINT"
        kept = f"{args.out} keeps its last complete save" + (
            f" (continue with --resume {checkpoint_path(Path(args.out))})" if args.checkpoint else "")
        raise Interrupted(f"train: interrupted ({why}); {kept}") from None
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    """:func:`main` as a process: its one-line refusal on stderr and the exit status (2: a bad option,
    1: the run failed, 130: interrupted), never a traceback."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
            return 130 if isinstance(e, Interrupted) else 1 if isinstance(e, TrainingFailed) else 2
        raise
    except KeyboardInterrupt:  # before the handlers are in place or after they are restored
        print("train: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
