"""The quality / speed evaluation's arithmetic and its demo-choice rule (dist_compact/run/evaluation.py)."""

import pytest

from dist_compact.run.evaluation import attention_flops_share, choose_demo, step_kinds, write_sparsity_yaml


def test_flop_share_counts_blocks_and_search_passes():
    rows = [{"kind": "dense", "density": None}, {"kind": "fused_search", "density": 0.3},
            {"kind": "sparse", "density": 0.2}, {"kind": "cached_search", "density": 0.4}]
    summary = {"calls": {"fused_search": 1, "cached_search": 1}}
    # (1 + 1 + 0.2 + 0.4 + 2 searches x half a pass x 32/128 of the rows) / 4 calls
    assert attention_flops_share(summary, rows, 128, 32) == pytest.approx((2.6 + 2 * 0.5 * 0.25) / 4)
    assert attention_flops_share(summary, rows, 128, None) == pytest.approx((2.6 + 1.0) / 4)


def test_step_kinds_by_the_calls_of_each_step():
    def r(layer, step, kind):
        return {"layer": layer, "step": step, "kind": kind}

    rows = [r(0, 0, "dense"), r(1, 0, "dense"), r(0, 1, "fused_search"), r(1, 1, "sparse"), r(0, 2, "sparse"),
            r(1, 2, "sparse"), r(0, 3, "sparse"), r(1, 3, "cached_search"), r(0, 4, "sparse"), r(1, 4, "dense")]
    # step 4: one layer sparse, one near-dense layer run dense - a sparse step of the schedule
    assert step_kinds(rows, 6) == ["dense", "search", "sparse", "search", "sparse", "dense"]
    assert step_kinds([], 2) == ["dense", "dense"]  # a dense run records no calls
    with pytest.raises(ValueError, match="step 7 outside a run of 6 steps"):
        step_kinds([r(0, 7, "sparse")], 6)


def test_demo_choice_rule(tmp_path):
    def row(mode, level, speed, psnr, motion):
        return {"mode": mode, "level": level, "speedup_vs_dense": speed, "psnr_mean_db": psnr,
                "motion_follow_pct": motion, "sparsity": None if mode in ("dense", "window") else {
                    "mode": mode, "search_steps": (10, 30), "search_kinds": ("fused", "cached"), "sparsity": 0.8}}

    rows = [row("dense", "-", 1.0, None, 95.0), row("compact", "a", 2.5, 29.0, 95.0),
            row("adaspa", "b", 2.1, 31.0, 93.0), row("adaspa", "c", 1.8, 33.0, 95.0),
            row("compact+adaspa", "d", 2.3, 30.5, 91.0), row("window", "e", 3.0, 35.0, 95.0)]
    assert choose_demo(rows)["level"] == "b"  # d drops 4 motion points, a misses 30 dB, window not choosable
    assert choose_demo([rows[0], rows[1]])["level"] == "a"  # none qualifies: the highest PSNR
    path = tmp_path / "demo.yaml"
    write_sparsity_yaml(choose_demo(rows), path, "run.json")
    import yaml

    assert yaml.safe_load(path.read_text())["sparsity"]["search_steps"] == [10, 30]
    assert path.read_text().startswith("# Chosen by benchmarks/quality_speed.py's rule")
    write_sparsity_yaml(choose_demo([rows[0], rows[1]]), path, "run.json")  # the fallback says it is one
    assert path.read_text().startswith("# No mode met benchmarks/quality_speed.py's rule")
