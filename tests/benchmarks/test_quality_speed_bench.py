"""benchmarks/quality_speed.py: its CPU smoke run writes every output with the columns the table needs,
its FLOP share and its demo-choice rule are the documented ones."""

import csv
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_speed", os.path.join(ROOT, "benchmarks", "quality_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_run_writes_every_output(bench, tmp_path):
    out = {k: str(tmp_path / f"s.{k}") for k in ("csv", "json", "png")}
    clips = str(tmp_path / "clips.csv")
    rc = bench.main(["--small", "--limit", "1", "--steps", "3", "--modes", "compact,adaspa,random",
                     "--csv", out["csv"], "--clips-csv", clips, "--json", out["json"], "--png", out["png"]])
    assert rc == 0
    rows = list(csv.DictReader(open(out["csv"])))
    assert [(r["mode"], r["level"]) for r in rows] == [
        ("dense", "-"), ("compact", "high"), ("compact", "low"), ("adaspa", "0.25"), ("adaspa", "0.15"),
        ("random", "0.25"), ("random", "0.15")]
    assert set(bench.SUMMARY_FIELDS) == set(rows[0])
    facts = json.load(open(out["json"]))
    assert facts["modes_done"] == facts["modes"] == 7 and facts["clips"] == 1
    for r in facts["summary"][1:]:
        assert r["psnr_mean_db"] is not None and 0 < r["attn_flops_vs_dense"] < 1.5
        assert 0 < r["sparse_step_share"] < 1  # 3 steps: the warm-up and (AdaSpa) the fused search are dense
    adaspa = [r for r in facts["summary"] if r["mode"] == "adaspa"]
    assert adaspa[0]["density_sparse_steps"] > adaspa[1]["density_sparse_steps"]
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
    assert len(list(csv.DictReader(open(clips)))) == 7


def test_flop_share_counts_blocks_and_search_passes(bench):
    rows = [{"kind": "dense", "density": None}, {"kind": "fused_search", "density": 0.3},
            {"kind": "sparse", "density": 0.2}, {"kind": "cached_search", "density": 0.4}]
    summary = {"calls": {"fused_search": 1, "cached_search": 1}}
    # (1 + 1 + 0.2 + 0.4 + 2 searches x half a pass x 32/128 of the rows) / 4 calls
    assert bench.attention_flops_share(summary, rows, 128, 32) == pytest.approx((2.6 + 2 * 0.5 * 0.25) / 4)
    assert bench.attention_flops_share(summary, rows, 128, None) == pytest.approx((2.6 + 1.0) / 4)


def test_demo_choice_rule(bench, tmp_path):
    def row(mode, level, speed, psnr, motion):
        return {"mode": mode, "level": level, "speedup_vs_dense": speed, "psnr_mean_db": psnr,
                "motion_follow_pct": motion, "sparsity": None if mode in ("dense", "window") else {
                    "mode": mode, "search_steps": (10, 30), "search_kinds": ("fused", "cached"), "sparsity": 0.8}}

    rows = [row("dense", "-", 1.0, None, 95.0), row("compact", "a", 2.5, 29.0, 95.0),
            row("adaspa", "b", 2.1, 31.0, 93.0), row("adaspa", "c", 1.8, 33.0, 95.0),
            row("compact+adaspa", "d", 2.3, 30.5, 91.0), row("window", "e", 3.0, 35.0, 95.0)]
    assert bench.choose_demo(rows)["level"] == "b"  # d drops 4 motion points, a misses 30 dB, window not choosable
    assert bench.choose_demo([rows[0], rows[1]])["level"] == "a"  # none qualifies: the highest PSNR
    path = tmp_path / "demo.yaml"
    bench.write_sparsity_yaml(bench.choose_demo(rows), path, "run.json")
    import yaml

    assert yaml.safe_load(path.read_text())["sparsity"]["search_steps"] == [10, 30]
