"""benchmarks/quality_speed.py, run as users run it: its CPU smoke run writes every output with the columns
the table needs (its arithmetic and demo-choice rule: tests/run/test_evaluation.py)."""

import csv
import json
import os
import subprocess
import sys

from dist_compact.run.evaluation import SUMMARY_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_small_run_writes_every_output(tmp_path):
    out = {k: str(tmp_path / f"s.{k}") for k in ("csv", "json", "png")}
    clips = str(tmp_path / "clips.csv")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality_speed.py"), "--small", "--limit",
                           "1", "--steps", "3", "--modes", "compact,adaspa,random", "--csv", out["csv"], "--clips-csv",
                           clips, "--json", out["json"], "--png", out["png"]], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out["csv"])))
    assert [(r["mode"], r["level"]) for r in rows] == [
        ("dense", "-"), ("compact", "high"), ("compact", "low"), ("adaspa", "0.25"), ("adaspa", "0.15"),
        ("random", "0.25"), ("random", "0.15")]
    assert set(SUMMARY_FIELDS) == set(rows[0])
    facts = json.load(open(out["json"]))
    assert facts["modes_done"] == facts["modes"] == 7 and facts["clips"] == 1
    for r in facts["summary"][1:]:
        assert r["psnr_mean_db"] is not None and 0 < r["attn_flops_vs_dense"] < 1.5
        assert 0 < r["sparse_step_share"] < 1  # 3 steps: the warm-up and (AdaSpa) the fused search are dense
    dense = facts["summary"][0]
    assert dense["dense_step_ms"] > 0 and dense["search_step_ms"] is None and dense["sparse_step_ms"] is None
    assert all(r["search_step_ms"] > 0 for r in facts["summary"] if r["mode"] == "adaspa")  # its fused search
    adaspa = [r for r in facts["summary"] if r["mode"] == "adaspa"]
    assert adaspa[0]["density_sparse_steps"] > adaspa[1]["density_sparse_steps"]
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
    assert len(list(csv.DictReader(open(clips)))) == 7
