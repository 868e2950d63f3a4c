"""benchmarks/model_forward.py on 2 torchrun ranks: 2 CPU processes (gloo), ulysses 2 and ring 2, tiny models.

The ranks get torchrun's environment and store and run the script as ``__main__``
(parallel_helpers.run_like_torchrun), forked from a server that has torch and diffusers imported: a fresh
interpreter per rank spends about 10 s on these imports on a 2-core machine.

Every case's output under the plan equals the one-process forward (``--check``, fp32), the ring
traffic is counted and never exceeds the dense ring (the searches' K-only block-mass ring aside),
and a world size that does not match ``--parallel`` is one clear error.
"""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "model_forward.py"
CASES = ["dense", "window@0.4", "window@0.2", "window@0.12", "search_fused", "search_cached", "adaspa_reuse@0.2"]


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # --small runs on the CPU anyway
    return env


@pytest.mark.timeout(300)
def test_two_processes_ulysses_and_ring_equal_one_process(tmp_path):
    out = tmp_path / "forward2.csv"
    from parallel_helpers import run_like_torchrun

    args = ["--small", "--model", "hunyuan_video,wan", "--parallel", "2x1,1x2", "--check", "--reps", "1",
            "--warmup", "0", "--csv", str(out)]
    proc = run_like_torchrun(SCRIPT, args, 2, tmp_path, cwd=tmp_path, env=_env(), timeout=280)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # rank 0 alone prints the table; stock is skipped (and said so) under a plan
    assert proc.stdout.count("# diffusers") == 1
    assert "stock (diffusers' own processors) skipped" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    got = sorted((r["model"], r["case"], r["parallel"]) for r in rows)
    want = sorted((m, c, p) for m in ("hunyuan_video", "wan") for c in CASES for p in ("2x1", "1x2"))
    assert got == want  # one row per (model, case, layout); no stock row
    for r in rows:
        key = (r["model"], r["case"], r["parallel"])
        assert r["world"] == "2" and (r["ulysses"], r["ring"]) == (("2", "1") if r["parallel"] == "2x1" else ("1", "2"))
        assert r["finite"] == "True", key
        assert float(r["check_max_abs"]) <= 1e-4 and float(r["check_rel"]) <= 1e-4, key
        assert float(r["ms_forward"]) > 0 and 0 < float(r["attn_ms"]) <= float(r["ms_forward"]) * 1.05, key
        assert len(r["peak_gib_ranks"].split(";")) == 2, key
        sent, dense = float(r["ring_bytes"]), float(r["dense_ring_bytes"])
        if r["parallel"] == "2x1":  # no ring
            assert sent == 0 and dense == 0, key
            continue
        # K and V of one ring shard: 2 x 12 video blocks x 16 tokens x 2 heads x 32 x fp32, both ways
        assert dense == 2 * (2 * 12 * 16 * 2 * 32 * 4), key
        if r["case"].startswith("search_"):  # + the block mass's K-only ring
            assert 0 < sent <= 1.5 * dense, key
        else:
            assert 0 <= sent <= dense, key
        if r["case"] in ("dense", "search_fused"):  # every shard moves
            assert sent == dense * (1.5 if r["case"] == "search_fused" else 1), key
    for model in ("hunyuan_video", "wan"):
        ring = {r["case"]: float(r["ring_bytes"]) for r in rows if r["model"] == model and r["parallel"] == "1x2"}
        # windows that stay inside a shard's slabs skip the exchange (shard skipping is visible)
        assert min(ring[c] for c in CASES if c.startswith("window@")) < ring["dense"], (model, ring)
        assert ring["window@0.4"] > 0, (model, ring)


def test_world_size_mismatch_is_one_clear_error(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--small", "--model", "hunyuan_video", "--parallel", "2x1", "--reps", "1",
           "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "--parallel 2x1 needs ulysses x ring = 2 processes but 1 was launched" in lines[0]
    assert "torchrun" in lines[0] and "Traceback" not in proc.stderr and not proc.stdout.strip()
