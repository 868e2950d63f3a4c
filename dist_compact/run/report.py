"""Run outputs: the run folder (written atomically), videos, images, report.json, PSNR / SSIM.

``outputs/<run>/`` holds

* ``video.mp4`` (imageio-ffmpeg, H.264) and ``video.gif`` - the generated clip (nearest-neighbour
  upscaled so a 48x48 clip is watchable); with ``compare_dense`` also ``dense.mp4`` / ``dense.gif``;
* ``latents.pt`` - the final latents ``[1, C, F, H, W]`` float32 (``dense_latents.pt`` too);
* ``frames.png`` - a grid of all frames (``dense_frames.png`` too); ``density.png`` /
  ``recall.png`` - labelled heatmaps of the per (layer, head) density and recall (rows = layers,
  columns = heads, colour bar 0-1; white = no value; :func:`heatmap`);
* ``report.json`` - config, seed, the schedule in this run's steps, per-step timings, attention
  statistics (calls, density and recall per layer and head, search overhead), the speed-up vs dense
  and what it means at this shape (:func:`speed_section`) and, with ``compare_dense``, PSNR / SSIM of
  sparse vs dense; every field is explained in docs/report.md;
* ``logs/rank<r>.log`` - one log per process.

Atomicity (:class:`RunFolder`): the run claims ``<output_dir>/<name>`` at its start by creating it
empty (``mkdir`` is atomic: of two runs started in the same second, one gets ``<name>``, the other
``<name>-2``), writes everything under ``<output_dir>/.tmp-<name>-<host>-<pid>``, and renames that
over its empty claim only when complete. A failed run removes both, so no half-written run folder is
ever left; finished outputs are never discarded (if the claim was written into meanwhile, they go to
the next free name). While it runs, the run holds an exclusive lock (``flock``) on
``.tmp-<name>-<host>-<pid>.lock`` beside its temporary folder; the operating system releases it when
the process ends, however it ends. Folders left by killed runs (their lock free) are removed at the
next start in the same ``output_dir``; a run's pid is never the test, since runs in other containers
or PID namespaces with the same host name reuse pids. Folders without a lock file (a file system
without locks) are removed only when their pid of this host is gone. A write that fails (full disk, read-only file system, a
name too long) is one :class:`OutputError` line naming the file and the reason; nothing retries.

Video layout for the helpers here: ``[C, F, H, W]`` (or ``[1, C, F, H, W]``) float in ``[-1, 1]``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import math
import os
import re
import shutil
import socket
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cmdline import NAME_MAX

__all__ = [
    "RunFolder",
    "OutputError",
    "check_output_dir",
    "remove_stale",
    "writing",
    "save_tensor",
    "check_writers",
    "psnr",
    "ssim",
    "to_uint8_frames",
    "frame_grid",
    "per_layer_head",
    "heatmap",
    "write_video",
    "build_report",
    "speed_section",
    "write_outputs",
    "REAL_SPEEDUP_COMMAND",
    "SMALL_SHAPE_TOKENS",
]

#: The command that shows the real speed-up: one HunyuanVideo 720p transformer forward (33x45x80 =
#: 118,800 video tokens, random weights from the published config) on one GPU, our dense path vs
#: 3D windows and an AdaSpa reuse step. Needs the [diffusers] extra. BENCHMARKS.md: 2.52x at window
#: density 0.2 on an H100 ("Full transformer forward").
REAL_SPEEDUP_COMMAND = ("python benchmarks/model_forward.py --model hunyuan_video --layers 6 --reps 2 --mass-rows 32 "
                        "--cases dense,window@0.4,window@0.2,window@0.12,adaspa_reuse@0.2")
_REAL_SPEEDUP = (f"for the real speed-up run on a GPU: {REAL_SPEEDUP_COMMAND} (HunyuanVideo 720p, 118,800 tokens, "
                 "random weights; 2.52x at density 0.2 on an H100, BENCHMARKS.md)")
#: Below this many tokens per attention call the report says the shape is too small for sparse
#: attention to pay. Why this number: the speed-ups measured so far (BENCHMARKS.md) are at 32,760
#: (Wan 480p) and 118,800 tokens (HunyuanVideo 720p); at the embedded demo's 2,316 tokens the
#: per-call costs (index building, searches, launches, a first run's compilation) are the larger part.
SMALL_SHAPE_TOKENS = 16384


# ---------------------------------------------------------------------------------------------- folder
def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "run"


class OutputError(RuntimeError):
    """The run folder cannot be made or written (one line: the path, the reason, what to do)."""


#: how often :meth:`RunFolder.discard` retries a step an interrupt cut short
_DISCARD_TRIES = 4
_TMP = re.compile(r"^\.tmp-(?P<name>.+)-(?P<host>[^-]+)-(?P<pid>\d+)$")
#: the suffix of a running run's lock file, beside its temporary folder
_LOCK = ".lock"


def _host() -> str:
    # one DNS label, without '-' so the temporary name parses back
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname().split(".")[0])[:40] or "host"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _lock(path: str, create: bool) -> Optional[int]:
    """An fd holding an exclusive ``flock`` on ``path`` (created when ``create``), or None when another
    process holds it, the file is missing, or the file system takes no locks."""
    try:
        import fcntl
    except ImportError:  # no flock here: the pid rule alone
        return None
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(path: str, fd: Optional[int]) -> None:
    """Remove the lock file ``path`` (while still holding it), then release ``fd``."""
    if fd is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def check_output_dir(output_dir: str, name: Optional[str] = None, create: bool = False) -> None:
    """``output_dir`` is a writable folder or can be made one (``create``: make it), and ``name`` fits
    in it; one :class:`OutputError` line otherwise. Called before any compute, without ``create``: a
    run that fails before its run folder is claimed leaves no folder behind, not even the parent."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"run.output_dir {output_dir} is not a folder; choose a folder (it is created if missing)")
    cannot = f"run.output_dir {output_dir}: cannot create it ({{}}); choose a writable place"
    if not os.path.isdir(output_dir):
        if any(len(part.encode()) > NAME_MAX for part in output_dir.split(os.sep)):
            raise OutputError(cannot.format(os.strerror(errno.ENAMETOOLONG)))
        if create:
            try:
                os.makedirs(output_dir, exist_ok=True)
            except OSError as e:
                raise OutputError(cannot.format(_reason(e))) from None
        else:  # the nearest folder that exists must take the new ones
            parent = os.path.dirname(os.path.abspath(output_dir))
            while not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise OutputError(cannot.format(os.strerror(errno.ENOTDIR)))
            if not os.access(parent, os.W_OK | os.X_OK):
                why = "read-only file system" if _read_only(parent) else f"{parent} is not writable"
                raise OutputError(cannot.format(why))
            _check_name(name)
            return
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OutputError(f"run.output_dir {output_dir} is not writable"
                          f"{' (read-only file system)' if _read_only(output_dir) else ''}; choose a writable place")
    _check_name(name)


def _check_name(name: Optional[str]) -> None:
    if name is not None:
        longest = NAME_MAX - len(f".tmp--{_host()}-{2 ** 22}{_LOCK}".encode())
        if len(name.encode()) > longest:
            raise OutputError(f"run.name has {len(name.encode())} bytes; a folder name takes at most {longest} here "
                              "(file systems allow 255 with the temporary suffix); choose a shorter --name")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def remove_stale(output_dir: str) -> List[str]:
    """Remove what killed runs left in ``output_dir`` (their temporary folder, empty claim and lock
    file), recognised by a lock file no process holds (the module doc); returns the removed paths."""
    removed = []
    try:
        entries = os.listdir(output_dir)
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TMP.match(entry)
        if not m:
            continue
        path = os.path.join(output_dir, entry)
        lock_path = path + _LOCK
        if os.path.exists(lock_path):
            fd = _lock(lock_path, create=False)
            if fd is None:  # held: its run is alive (or this file system cannot tell: keep it)
                continue
        elif m["host"] == host and _pid_gone(int(m["pid"])):
            fd = None  # a run without a lock file: the pid rule
        else:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        claim = os.path.join(output_dir, m["name"])
        try:
            os.rmdir(claim)  # only if empty: a finished run's folder is never touched
            removed.append(claim)
        except OSError:
            pass
        _unlock(lock_path, fd)
    return removed


class RunFolder:
    """A run folder claimed at the start and filled atomically (see the module doc).

    Args:
        output_dir: parent folder (created if missing).
        name: run folder name; None = ``<YYYYmmdd-HHMMSS>-<prompt slug>-s<seed>`` (``-2``, ``-3``, ...
            when taken, also by a run started in the same second).
        clock: the time the default name is made of (``time.time``; tests give their own).
    Raises:
        FileExistsError: ``name`` is given and ``<output_dir>/<name>`` already exists.
        OutputError: ``output_dir`` is not a writable folder, or the name does not fit.
    """

    def __init__(self, output_dir: str, name: Optional[str] = None, *, prompt: str = "", seed: int = 0,
                 clock: Callable[[], float] = time.time):
        check_output_dir(output_dir, name, create=True)
        remove_stale(output_dir)
        self.output_dir = output_dir
        if name is not None:
            self.final = self._claim(name)
            if self.final is None:
                raise FileExistsError(f"run folder {os.path.join(output_dir, name)} already exists; choose another "
                                      "--name")
        else:
            base = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(clock()))}-{_slug(prompt)}-s{seed}"
            n = 1
            while (final := self._claim(base if n == 1 else f"{base}-{n}")) is None:
                n += 1
            self.final = final
        self.name = os.path.basename(self.final)
        self.tmp = os.path.join(output_dir, f".tmp-{self.name}-{_host()}-{os.getpid()}")
        # locked before the folder exists: a temporary folder with a lock file is never unlocked while its run lives
        self._lock_path = self.tmp + _LOCK
        self._lock_fd = _lock(self._lock_path, create=True)
        if self._lock_fd is None:  # a file system without locks: the folder falls back on the pid rule
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
        try:
            os.mkdir(self.tmp)
        except OSError as e:
            self._release()
            self._unclaim()
            raise OutputError(f"cannot create {self.tmp} ({_reason(e)}); choose another run.output_dir") from None
        self.done = False

    def _claim(self, name: str) -> Optional[str]:
        """``<output_dir>/<name>`` made empty for this run, or None when it exists (atomic)."""
        path = os.path.join(self.output_dir, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            return None
        except OSError as e:
            raise OutputError(f"cannot create the run folder {path} ({_reason(e)}); choose another run.output_dir or "
                              "--name") from None
        return path

    def _unclaim(self) -> None:
        try:
            os.rmdir(self.final)
        except OSError:
            pass

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        _unlock(self._lock_path, fd)

    def commit(self) -> str:
        """Rename the temporary folder over the empty claim (atomic on one file system). If something
        wrote into the claim meanwhile, the outputs go to the next free name instead: never lost."""
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            base, n = self.final, 2
            while True:
                other = self._claim(f"{os.path.basename(base)}-{n}")
                if other is not None:
                    break
                n += 1
            try:
                os.rename(self.tmp, other)
            except OSError as e:
                raise OutputError(f"cannot move the finished run to {other} ({_reason(e)}); its files are in "
                                  f"{self.tmp}") from None
            self.final, self.name = other, os.path.basename(other)
        self.done = True
        self._release()
        return self.final

    def discard(self) -> None:
        """Remove the temporary folder and the empty claim (a failed run leaves nothing).

        An interrupt that lands meanwhile (the launcher's SIGTERM, raised as SystemExit, while a peer's
        failure is being cleaned up; Ctrl-C) does not cut the removal short: it finishes, then the
        first interrupt is raised again."""
        if self.done:
            return
        pending: Optional[BaseException] = None
        for step in (lambda: shutil.rmtree(self.tmp, ignore_errors=True), self._unclaim, self._release):
            for _ in range(_DISCARD_TRIES):
                try:
                    step()
                    break
                except BaseException as e:  # noqa: BLE001 - re-raised below, once the folder is gone
                    pending = pending or e
        if pending is not None:
            raise pending

    def __repr__(self) -> str:
        return f"RunFolder({self.final!r}, done={self.done})"


def save_tensor(tensor: torch.Tensor, path: str, final: Optional[str] = None) -> None:
    """``torch.save`` of ``tensor`` to ``path``, a failure being one :class:`OutputError` (:func:`writing`).

    Serialised in memory first: torch's file writer reports a full disk without its errno."""
    buf = io.BytesIO()
    torch.save(tensor, buf)
    with writing(path, final), open(path, "wb") as f:
        f.write(buf.getvalue())


@contextlib.contextmanager
def writing(path: str, final: Optional[str] = None):
    """Any failure while writing ``path`` becomes one :class:`OutputError` naming it (as it will be
    named in the run folder ``final``) and the reason; nothing retries (a full disk stays full)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, and the writers' own errors around one
        shown = os.path.join(final, os.path.basename(path)) if final else path
        raise OutputError(f"cannot write {shown}: {_reason(e)}; free space there or choose another run.output_dir "
                          "(the unfinished run folder was removed)") from None


def check_writers() -> None:
    """Raise one clear ImportError naming the [video] extra when imageio / imageio-ffmpeg is missing."""
    from ..extras import require

    for mod in ("imageio", "imageio_ffmpeg"):
        require(mod, "video", "writing the video (run.video true)")


# ---------------------------------------------------------------------------------------------- quality
def _as_unit(x: torch.Tensor) -> torch.Tensor:
    """``[1, C, F, H, W]`` / ``[C, F, H, W]`` in [-1, 1] -> ``[F, C, H, W]`` float64 in [0, 1]."""
    if x.dim() == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected one video [1, C, F, H, W], got {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 4:
        raise ValueError(f"expected a video [C, F, H, W], got {tuple(x.shape)}")
    return ((x.detach().double().cpu() + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos ``[C, F, H, W]`` in [-1, 1], on the [0, 1] scale (inf if equal)."""
    x, y = _as_unit(a), _as_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gauss(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two videos ``[C, F, H, W]`` in [-1, 1] (Wang et al. 2004, per frame and channel).

    Gaussian window ``window x window`` with ``sigma``, ``C1 = (0.01)^2``, ``C2 = (0.03)^2`` on the
    [0, 1] scale, valid region only (no padding); the mean over frames, channels and positions.
    """
    x, y = _as_unit(a), _as_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    n, c, h, w = x.shape
    win = min(window, h, w)
    g = _gauss(win, sigma)
    # the 2D Gaussian is the outer product of two 1D ones: filter rows, then columns (same valid region)
    kh = g.view(1, 1, win, 1).expand(c, 1, win, 1).contiguous()
    kw = g.view(1, 1, 1, win).expand(c, 1, 1, win).contiguous()

    def filt(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------------------------- images
def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[C, F, H, W]`` in [-1, 1] -> uint8 ``[F, H*scale, W*scale, 3]`` (nearest-neighbour upscale)."""
    x = _as_unit(video)  # [F, C, H, W]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"frames must have 1 or 3 channels, got {x.shape[1]}")
    arr = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.ascontiguousarray(arr)


def frame_grid(frames: np.ndarray, cols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> one image with the frames in rows of ``cols`` (white gaps)."""
    n, h, w, _ = frames.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = frames[i]
    return out


def per_layer_head(stats, num_layers: int, num_heads: int, what: str = "density") -> List[List[Optional[float]]]:
    """``[layers][heads]`` of the last recorded per-head ``what`` ("density" / "recall"), None if none."""
    out: List[List[Optional[float]]] = [[None] * num_heads for _ in range(num_layers)]
    if what not in ("density", "recall"):
        raise ValueError(f"per_layer_head: what must be 'density' or 'recall', got {what!r}")
    for rec in stats.records if stats is not None else []:
        vals = rec.density if what == "density" else rec.recall
        if vals is None or not 0 <= rec.layer < num_layers or len(vals) != num_heads:
            continue
        out[rec.layer] = [float(v) for v in vals]
    return out


#: title and colour-bar caption of each heatmap (docs/report.md explains the two measures)
HEATMAPS = {
    "density": ("density per layer and head: share of key blocks computed", "density"),
    "recall": ("recall per layer and head: share of attention mass kept", "recall"),
}


def heatmap(matrix: Sequence[Sequence[Optional[float]]], what: str = "density") -> np.ndarray:
    """uint8 RGB figure of a ``[layers][heads]`` matrix of ``what`` ("density" / "recall") in [0, 1].

    Title, layer rows and head columns numbered from 0, a colour bar on the fixed scale 0-1 (so
    runs compare), and a subtitle with the values' min / mean / max; white = no value (a layer
    whose sparse calls recorded none, e.g. it ran dense). See :func:`dist_compact.png.heatmap_figure`.
    """
    from ..png import heatmap_figure

    if what not in HEATMAPS:
        raise ValueError(f"heatmap: what must be one of {sorted(HEATMAPS)}, got {what!r}")
    title, bar = HEATMAPS[what]
    vals = [v for row in matrix for v in row if v is not None]
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    stats = (f"min {min(vals):.2f}, mean {sum(vals) / len(vals):.2f}, max {max(vals):.2f} ({len(vals)} of "
             f"{rows * cols} heads)" if vals else "no values")
    subtitle = ["sparse run, the last call of each layer", f"{stats}; white: no value"]
    return heatmap_figure(matrix, title=title, subtitle=subtitle, vmin=0.0, vmax=1.0, bar_label=bar)


def write_video(stem: str, frames: np.ndarray, fps: int) -> List[str]:
    """Write ``stem.mp4`` (H.264 through imageio-ffmpeg) and ``stem.gif``; returns the paths."""
    check_writers()
    import imageio

    mp4, gif = stem + ".mp4", stem + ".gif"
    # yuv420p needs even sizes; 16-pixel macro blocks avoid ffmpeg's resize warning
    imageio.mimwrite(mp4, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=16,
                     pixelformat="yuv420p", ffmpeg_log_level="error")
    try:
        imageio.mimwrite(gif, list(frames), duration=1000.0 / fps, loop=0)
    except Exception:  # older imageio / pillow plugins take seconds per frame
        imageio.mimwrite(gif, list(frames), duration=1.0 / fps)
    return [mp4, gif]


# ---------------------------------------------------------------------------------------------- report
def _finite(obj):
    """JSON-safe copy: non-finite floats -> None (report.json stays valid JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite(obj.tolist())
    return obj


def _run_section(out, num_layers: int, num_heads: int) -> dict:
    stats = out.stats
    summary = stats.summary() if stats is not None else None
    secs = list(out.sample.step_seconds)
    return {
        "step_seconds": secs,
        "total_seconds": sum(secs),
        "mean_step_seconds": sum(secs) / len(secs) if secs else None,
        "attention": summary,
        "density_per_layer_head": per_layer_head(stats, num_layers, num_heads, "density"),
        "recall_per_layer_head": per_layer_head(stats, num_layers, num_heads, "recall"),
        "search_overhead_s": None if summary is None else summary.get("search_overhead_s"),
        "mean_density": None if summary is None else summary.get("mean_density"),
        "mean_density_sparse": None if summary is None else summary.get("mean_density_sparse"),
        **out.extra,
    }


def speed_section(tokens: int, device, sparse_seconds: float, dense_seconds: Optional[float]) -> dict:
    """The report's ``speed``: the speed-up vs dense of the whole denoising loop and what it means.

    ``speedup_vs_dense`` is the dense run's denoising time over the sparse run's (both from the same
    noise, every step, the sparse run's dense warm-up steps and searches included); None without a
    dense run (``--compare-dense``). ``summary`` is the sentence ``generate.py`` prints: the figure,
    and when it cannot show a real speed-up (a CPU, or fewer than :data:`SMALL_SHAPE_TOKENS`
    tokens) why not and the command that does.
    """
    dev = torch.device(device).type
    speedup = dense_seconds / sparse_seconds if dense_seconds is not None and sparse_seconds > 0 else None
    small = tokens < SMALL_SHAPE_TOKENS
    if speedup is None:
        head = "speed-up vs dense not measured (add --compare-dense for a dense run from the same noise)"
    else:
        head = (f"speed-up vs dense {speedup:.2f}x (sparse {sparse_seconds:.1f} s, dense {dense_seconds:.1f} s "
                f"of denoising) at {tokens:,} tokens")
    if dev == "cpu":
        why = ("on a CPU the sparse path is PyTorch SDPA with the index as a mask (every block is still "
               "computed) plus the searches, so it cannot beat dense there")
    elif small:
        why = (f"at {tokens:,} tokens the shape is too small for sparse attention to pay (index building, "
               "searches, kernel launches and the first run's Triton compilation outweigh the skipped blocks)")
    else:
        why = None
    if why is None:
        summary = head if speedup is None else head + " (the whole loop: dense warm-up steps and searches included)"
    else:
        summary = f"{head}; {why}; {_REAL_SPEEDUP}"
    return {"speedup_vs_dense": speedup, "sparse_seconds": sparse_seconds, "dense_seconds": dense_seconds,
            "tokens": tokens, "device": dev, "small_shape": small, "summary": summary,
            "real_speedup_command": REAL_SPEEDUP_COMMAND}


def _schedule_section(sparsity, steps: int) -> dict:
    """The report's ``schedule``: the sparsity schedule scaled to this run's steps."""
    from ..sparsity.config import describe_schedule, step_kinds

    sched = sparsity.schedule(steps)
    return {"num_steps": steps, "summary": describe_schedule(sparsity, steps), "step_kinds": step_kinds(sparsity, steps),
            "dense_steps": sched.dense_steps, "searches": [list(s) for s in sched.searches],
            "reference_steps": sparsity.reference_steps}


def build_report(cfg, *, model_info: dict, layout, world: int, device, dtype, sparse, dense=None,
                 num_layers: int, num_heads: int) -> dict:
    """The report.json payload (see the module doc); ``sparse`` / ``dense`` are the runs'
    :class:`~dist_compact.run.runner.RunOutput` (``sample``, ``stats``, ``extra``)."""
    from .._version import __version__

    rep = {
        "dist_compact_version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "prompt": cfg.run.prompt,
        "seed": cfg.run.seed,
        "steps": cfg.run.steps,
        "config": cfg.to_dict(),
        "config_sources": list(cfg.sources),
        "world_size": world,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_version": torch.__version__,
        "model": model_info,
        "layout": {"repr": repr(layout), "tokens": layout.seq_len, "padded": layout.padded_len,
                   "blocks": layout.num_blocks, "block_size": layout.block_size, "tile": list(layout.tile)},
        "schedule": _schedule_section(cfg.sparsity, cfg.run.steps),
        "sparse": _run_section(sparse, num_layers, num_heads),
    }
    if dense is not None:
        rep["dense"] = _run_section(dense, num_layers, num_heads)
        a, b = sparse.sample.latents, dense.sample.latents
        rep["quality"] = {"psnr_db": psnr(a, b), "ssim": ssim(a, b),
                          "max_abs_diff": float((a.float() - b.float()).abs().max())}
    rep["speed"] = speed_section(layout.seq_len, device, rep["sparse"]["total_seconds"],
                                 rep["dense"]["total_seconds"] if dense is not None else None)
    if dense is not None:
        rep["speedup_vs_dense"] = rep["speed"]["speedup_vs_dense"]
    return rep


def write_outputs(folder: str, report: dict, latents: torch.Tensor, dense_latents: Optional[torch.Tensor] = None,
                  *, fps: int = 8, scale: Optional[int] = None, video: bool = True,
                  final: Optional[str] = None) -> List[str]:
    """Write every output file of a run into ``folder`` (the temporary run folder); returns the names.

    A failed write is one :class:`OutputError` naming the file (under ``final``, the run folder's
    name when given) and the reason.

    The heatmaps come from ``report["sparse"]``'s per (layer, head) matrices, when they hold a value.
    ``video=False``: no mp4 / gif (no video writer needed).
    """
    from ..png import write_png

    def at(name: str):
        return writing(os.path.join(folder, name), final)

    scale = scale or max(1, int(round(192 / latents.shape[-2])))
    files: List[str] = ["report.json"]
    # the generated clip, then the dense one of compare_dense (prefix "dense_", videos "dense.*")
    for prefix, stem, clip in (("", "video", latents), ("dense_", "dense", dense_latents)):
        if clip is None:
            continue
        clip = clip.detach().float().cpu()
        save_tensor(clip, os.path.join(folder, prefix + "latents.pt"), final)
        paths = []
        if video:
            with at(stem + ".mp4"):
                paths = write_video(os.path.join(folder, stem), to_uint8_frames(clip, scale), fps)
        with at(prefix + "frames.png"):
            write_png(os.path.join(folder, prefix + "frames.png"),
                      frame_grid(to_uint8_frames(clip, max(1, scale // 2))))
        files += [prefix + "latents.pt", *(os.path.basename(p) for p in paths), prefix + "frames.png"]
    for what in ("density", "recall"):
        m = report["sparse"][f"{what}_per_layer_head"]
        if any(v is not None for row in m for v in row):
            with at(f"{what}.png"):
                write_png(os.path.join(folder, f"{what}.png"), heatmap(m, what))
            files.append(f"{what}.png")
    report = dict(report, files=sorted(files))
    text = json.dumps(_finite(report), indent=1, allow_nan=False)
    with at("report.json"), open(os.path.join(folder, "report.json"), "w") as f:
        f.write(text)
    return report["files"]
