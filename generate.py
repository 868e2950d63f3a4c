"""Generate a video with block-sparse attention.

    python generate.py                                   # embedded tiny DiT, default prompt and sparsity
    python generate.py --prompt "a blue circle bouncing" --seed 3 --compare-dense
    torchrun --nproc-per-node 2 generate.py --config configs/cluster/cpu-demo.yaml
    python generate.py --config configs/cluster/1gpu.yaml --run.steps 30 --sparsity.sparsity 0.8

Writes outputs/<run>/ (video.mp4, video.gif, latents.pt, frames.png, density/recall heatmaps,
report.json, logs/); see dist_compact/report.py. All the work is in dist_compact.pipeline.
"""

import signal
import sys


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


def main(argv=None) -> int:
    from dist_compact.config import ConfigError, parse_generate_args, to_yaml

    try:
        cfg, args = parse_generate_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"generate.py: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    # torchrun stops the other ranks with SIGTERM when one fails: turn it into an exception so the
    # temporary run folder is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if cfg.cluster.device == "cpu" or (cfg.cluster.device == "auto" and not _cuda()):
        _keep_freed_memory()
    from dist_compact.models.embedded import WeightsError
    from dist_compact.pipeline import run_generation
    from dist_compact.runner import WorldSizeError
    from dist_compact.sampler import NonFiniteLatentsError

    from dist_compact.parallel import ParallelConfigError, ParallelMismatchError
    from dist_compact.parallel.launch import shutdown

    try:
        result = run_generation(cfg)
    except (ConfigError, WeightsError, NonFiniteLatentsError, WorldSizeError, ParallelConfigError,
            ParallelMismatchError, FileExistsError, ImportError, ValueError) as e:
        # expected failures (bad input, corrupt weights, NaN, wrong world size): one line, no traceback
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if result.folder:
        print(summary_lines(result.folder, result.report))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
