"""The quality / speed evaluation's arithmetic and its rule for the demo sparsity (``benchmarks/quality_speed.py``
drives them): the attention FLOPs of a run relative to dense, the summary table's columns, and the
fixed rule that picks the demo's sparsity from the benchmark's rows."""

from __future__ import annotations

__all__ = ["CHOOSABLE", "SUMMARY_FIELDS", "STEP_KINDS", "attention_flops_share", "choose_demo", "step_kinds",
           "write_sparsity_yaml"]

#: the modes a demo config may be chosen from (the baselines are for comparison only)
CHOOSABLE = ("compact", "adaspa", "compact+adaspa")

#: the columns of the summary table (one row per mode)
SUMMARY_FIELDS = ("mode", "level", "pattern", "clips", "steps", "sparse_step_share", "density_sparse_steps",
                  "attn_flops_vs_dense", "denoise_s_median", "speedup_vs_dense", "psnr_mean_db", "psnr_min_db",
                  "ssim_mean", "motion_follow_pct", "dense_step_ms", "search_step_ms", "sparse_step_ms", "device",
                  "weights_sha256")

#: what a denoising step is, by the attention calls it made (see :func:`step_kinds`)
STEP_KINDS = ("dense", "search", "sparse")


def step_kinds(rows, steps: int):
    """The kind of every step ``0 .. steps - 1`` from the stats rows of one run: ``"search"`` where any
    call searched (fused or cached), ``"sparse"`` where any call ran an index (a near-dense layer of a
    sparse step runs, and is recorded, dense), else ``"dense"`` (also a step that made no recorded call,
    as every step of a dense run)."""
    kinds = ["dense"] * steps
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], set()).add(r["kind"])
    for step, ks in by_step.items():
        if not 0 <= step < steps:
            raise ValueError(f"stats row of step {step} outside a run of {steps} steps")
        if ks & {"fused_search", "cached_search"}:
            kinds[step] = "search"
        elif "sparse" in ks:
            kinds[step] = "sparse"
    return kinds


def attention_flops_share(stats_summary: dict, rows, block_size: int, query_rows) -> float:
    """Attention FLOPs of a run relative to dense: the mean over its attention calls of the computed block
    share (1 for dense calls and fused searches, the index density otherwise), plus half a pass per
    search for the block mass, of the sampled query rows only (``query_rows`` of ``block_size``)."""
    dens = [1.0 if r["kind"] in ("dense", "fused_search") else r["density"] for r in rows]
    dens = [d for d in dens if d is not None]
    if not dens:
        return 1.0
    searches = stats_summary["calls"]["fused_search"] + stats_summary["calls"]["cached_search"]
    sampled = 1.0 if query_rows is None else min(1.0, query_rows / block_size)
    return (sum(dens) + searches * 0.5 * sampled) / len(dens)


def choose_demo(summary, min_psnr: float = 30.0, max_motion_drop: float = 3.0):
    """The demo's sparsity, by a fixed rule over the benchmark's rows: the fastest choosable mode whose
    mean PSNR is >= ``min_psnr`` and whose motion-follow is within ``max_motion_drop`` points of dense;
    if none qualifies, the one with the highest PSNR. Returns its row."""
    dense = next(r for r in summary if r["mode"] == "dense")
    cands = [r for r in summary if r["mode"] in CHOOSABLE and r.get("sparsity")]
    if not cands:
        raise ValueError("no compact / adaspa / compact+adaspa rows to choose a demo sparsity from")
    ok = [r for r in cands if r["psnr_mean_db"] >= min_psnr
          and r["motion_follow_pct"] >= dense["motion_follow_pct"] - max_motion_drop]
    if ok:
        return dict(max(ok, key=lambda r: r["speedup_vs_dense"]), chosen_by="rule")
    return dict(max(cands, key=lambda r: r["psnr_mean_db"]), chosen_by="fallback")


def write_sparsity_yaml(row, path, source: str) -> None:
    """A sparsity config file (``sparsity:`` section) of a summary row, with a comment saying where it came from."""
    import yaml

    keep = {k: v for k, v in row["sparsity"].items() if v is not None}
    for k in ("search_steps", "search_kinds"):
        keep[k] = list(keep[k])
    how = ("# Chosen by benchmarks/quality_speed.py's rule (fastest mode with mean PSNR >= 30 dB and motion-follow\n"
           "# within 3 points of dense)" if row.get("chosen_by", "rule") == "rule" else
           "# No mode met benchmarks/quality_speed.py's rule (mean PSNR >= 30 dB and motion-follow within 3 points\n"
           "# of dense), so this is its fallback, the mode with the highest PSNR,")
    head = (f"{how} from {source}: {row['mode']} {row['level']}, speed-up "
            f"{row['speedup_vs_dense']}x, PSNR {row['psnr_mean_db']} dB, motion {row['motion_follow_pct']}%.\n")
    with open(path, "w") as f:
        f.write(head + yaml.safe_dump({"sparsity": keep}, sort_keys=False))
