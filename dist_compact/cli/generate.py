"""Generate a video with block-sparse attention: the ``dist-compact-generate`` command (and ``generate.py``).

    dist-compact-generate                                  # embedded tiny DiT, default prompt and sparsity
    dist-compact-generate --prompt "a blue circle bouncing" --seed 3 --compare-dense
    torchrun --nproc-per-node 2 generate.py --config configs/cluster/cpu-demo.yaml
    dist-compact-generate --config configs/cluster/1gpu.yaml --run.steps 30 --sparsity.sparsity 0.8

Writes outputs/<run>/ (video.mp4, video.gif, latents.pt, frames.png, density/recall heatmaps,
report.json, logs/); see :mod:`dist_compact.run.report`. Any config key can be set with
``--section.key value`` (:mod:`dist_compact.run.loader`).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from ..run.config import ConfigError, RunConfig
from ..run.loader import load_run_config, to_yaml
from ..cmdline import OneLineParser, short_repr

__all__ = ["PROG", "SHORTCUTS", "build_parser", "parse_generate_args", "main", "console", "summary_lines"]

#: the name errors are printed under (the script users run from a checkout)
PROG = "generate.py"

#: shortcut flags of generate.py -> the config key they set
SHORTCUTS = {
    "prompt": "run.prompt",
    "seed": "run.seed",
    "steps": "run.steps",
    "guidance": "run.guidance",
    "name": "run.name",
    "output_dir": "run.output_dir",
    "model_path": "model.path",
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description="Generate a video with sparse attention (default: the embedded tiny DiT).",
        epilog="Any config key can be set with --section.key value, e.g. --run.steps 10 "
               "--sparsity.mode dense --cluster.device cpu (sections: cluster, model, sparsity, run).",
    )
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file (repeatable; later files win)")
    p.add_argument("--prompt", help="text prompt (run.prompt)")
    p.add_argument("--seed", help="noise seed (run.seed)")
    p.add_argument("--steps", help="denoising steps (run.steps)")
    p.add_argument("--guidance", help="classifier-free guidance scale (run.guidance)")
    p.add_argument("--name", help="run folder name (run.name)")
    p.add_argument("--output-dir", help="parent folder of run folders (run.output_dir)")
    p.add_argument("--model-path", help="model weights file / folder (model.path)")
    p.add_argument("--compare-dense", action="store_true",
                   help="also run dense attention from the same noise; report PSNR / SSIM")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def parse_generate_args(argv: Sequence[str], prog: str = PROG) -> Tuple[RunConfig, argparse.Namespace]:
    """The command line -> (:class:`RunConfig`, the parsed flags); ``prog`` names the command in its help."""
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(list(argv))
    overrides: List[Tuple[str, str]] = []
    for flag, key in SHORTCUTS.items():
        val = getattr(args, flag)
        if val is not None:
            overrides.append((key, val))
    if args.compare_dense:
        overrides.append(("run.compare_dense", "true"))
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            raise ConfigError(f"command line: unexpected argument {short_repr(tok)} (options: see --help; "
                              "config keys: --section.key value)")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"command line: {tok} needs a value")
            key, raw = tok[2:], rest[i + 1]
            i += 2
        overrides.append((key, raw))
    return load_run_config(args.config, overrides), args


def _keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the OS (Linux / CPU runs).

    Why: PyTorch's CPU allocator uses malloc, and glibc serves blocks above its mmap threshold
    (at most 32 MB) with a fresh mmap that is unmapped on free, so every attention call of the CPU
    block-sparse path (temporaries of ~70 MB for the demo) zero-faults its pages again: on the demo
    that was half of the CPU time, as system time. Raising the thresholds keeps them in the heap.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def _launched_rank() -> int:
    """This process's rank as launched (0 without a launcher or when RANK is not a number)."""
    raw = os.environ.get("RANK", "0").strip()
    return int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else 0


def _error(text: str, code: int, printer: Optional[int] = None, prog: str = PROG) -> int:
    """Print ``prog: text`` once per job and return ``code``. ``printer``: the rank that prints (a rank
    failure's verdict). None: an error every rank meets, printed by rank 0 under torchrun and by every
    process otherwise (a hand-made or stale environment, e.g. RANK left set in a shell, may have no
    rank 0)."""
    if printer is None and "TORCHELASTIC_RUN_ID" not in os.environ:
        printer = _launched_rank()
    if _launched_rank() == (printer or 0):
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return code


def main(argv=None, prog: str = PROG) -> int:
    """The command (see the module doc): 0, or the exit code after ONE line on stderr (printed by one
    rank under torchrun): 2 for a bad command line or config, 1 for a failed run, 130 for Ctrl-C.
    Leaves no signal handler behind when called as a function. ``prog`` names the command in its help
    and its error lines."""
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:
        return _error("interrupted (Ctrl-C); nothing was written to run.output_dir", 130, prog=prog)


def _main(argv, prog: str) -> int:
    try:
        cfg, args = parse_generate_args(sys.argv[1:] if argv is None else argv, prog)
    except ConfigError as e:
        return _error(f"config error: {e}", 2, prog=prog)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.cluster.device == "cpu" or (cfg.cluster.device == "auto" and not _cuda()):
        _keep_freed_memory()
    # imported here: --help and --print-config do not load the models and the parallel layer
    from ..models.embedded import WeightsError
    from ..parallel import ParallelConfigError, ParallelMismatchError
    from ..parallel.coordinator import ParallelLoadError
    from ..parallel.launch import shutdown
    from ..parallel.watch import RankFailure
    from ..run.generation import run_generation
    from ..run.report import OutputError
    from ..run.runner import WorldSizeError
    from ..run.sampler import NonFiniteLatentsError

    # torchrun stops the other ranks with SIGTERM when one fails: an exception here, so the temporary
    # run folder is removed on the way out and the rank that failed can be named; restored on return
    previous = _set_handler(signal.SIGTERM, _terminated)
    try:
        result = run_generation(cfg)
    except RankFailure as e:
        # a rank failed, stopped answering or never joined: one line, from one rank, printed before
        # the silent ranks are ended (the launcher stops this rank as soon as one of them is gone)
        _set_handler(signal.SIGTERM, signal.SIG_IGN)
        code = _error(f"error: {e}", 1, printer=e.printer, prog=prog)
        e.end_silent()
        return code
    except (ConfigError, WeightsError, NonFiniteLatentsError, WorldSizeError, ParallelConfigError,
            ParallelMismatchError, ParallelLoadError, OutputError, FileExistsError, ImportError, ValueError) as e:
        # expected failures (bad input, corrupt weights, NaN, wrong world size): one line, no traceback
        return _error(f"error: {e}", 1, prog=prog)
    finally:
        _set_handler(signal.SIGTERM, previous)
        shutdown()
    if result.folder:
        print(summary_lines(result.folder, result.report))
    return 0


def console() -> int:
    """The ``dist-compact-generate`` console script."""
    return main(prog="dist-compact-generate")


def _terminated(*_) -> None:
    """SIGTERM (torchrun stopping this rank): an exception once; a second SIGTERM while the first is
    handled must not cut the report of which rank failed short."""
    _set_handler(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def _set_handler(signum, handler):
    """Install ``handler`` for ``signum`` and return the previous one (None, and nothing changed, off
    the main thread or for a None handler, where Python cannot set one)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


def summary_lines(folder: str, report: dict) -> str:
    """What a finished run prints: the folder, the schedule it ran, and the speed-up and what it means
    (the same sentences as report.json's ``schedule.summary`` and ``speed.summary``)."""
    q = report.get("quality")
    extra = f"; sparse vs dense PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}" if q else ""
    return "\n".join([f"wrote {folder} ({report['sparse']['total_seconds']:.1f} s denoising{extra})",
                      f"schedule: {report['schedule']['summary']}",
                      f"speed: {report['speed']['summary']}"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
