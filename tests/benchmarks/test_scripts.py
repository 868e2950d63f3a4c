"""The benchmark scripts run as users run them (``python benchmarks/x.py``): their help, their CPU dry runs
and their summaries. Their logic lives in the package and is tested there; here only the drivers."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", ["benchmarks/scaling_model.py", "benchmarks/ring_traffic.py",
                                    "benchmarks/kernel_bench.py", "benchmarks/device/share_gpu_check.py"])
def test_help(script):
    proc = _run(ROOT / script, "--help")
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]


def test_scaling_model_imbalance_dry_run(tmp_path):
    out = tmp_path / "sm"
    proc = _run(ROOT / "benchmarks/scaling_model.py", "--small", "--imbalance-only", "--sources", "compact-0.5,adaspa",
                "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "imbalance.csv").read_text().splitlines()
    assert text[0].startswith("shape,source,density,P,layout") and len(text) == 1 + 2 * 2 * 5


def test_ring_traffic_dry_run():
    proc = _run(ROOT / "benchmarks/ring_traffic.py", "--small", "--ring", "2", "--sources", "adaspa")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.strip().splitlines()[1:]
    assert len(rows) == 2 * 2  # contiguous and balanced per small shape
    for row in rows:
        new, old = (float(x) for x in row.split()[5:7])
        assert 0 < new <= old  # key ranges never move more than whole shards


def test_kernel_bench_variant_specs():
    proc = _run(ROOT / "benchmarks/kernel_bench.py", "--list-variants", "--variants",
                "ours=auto,t=128:8:4:tma,p=64:4:3,w=ws:3:persistent:pp,tri=triton,o=ws:ov:emu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "ours": None,
        "t": dict(block_n=128, num_warps=8, num_stages=4, use_tma=True, impl="triton"),
        "p": dict(block_n=64, num_warps=4, num_stages=3, use_tma=False, impl="triton"),
        "w": dict(impl="ws", ws_stages=3, ws_persistent=True, ws_pingpong=True),
        "tri": dict(impl="triton"),
        "o": dict(impl="ws", ws_overlap=True, ws_exp_emu=True),
    }
    assert json.loads(_run(ROOT / "benchmarks/kernel_bench.py", "--list-variants").stdout) == {"ours": None}
    for bad in ("x=ws:fast", "x=128:8:3:nofold"):
        proc = _run(ROOT / "benchmarks/kernel_bench.py", "--list-variants", "--variants", bad)
        assert proc.returncode == 2 and "variant x" in proc.stderr


def test_share_gpu_summary(tmp_path):
    rows = [dict(layout="ring2", P=2, model="embedded", rel=1e-3, max_abs=2e-3, ok=True, imbalance=1.01,
                 contiguous=1.2, ws_calls=0, seconds=1.0),
            dict(layout="ulysses4", P=4, model="wan", ok=False, error="RuntimeError: boom")]
    script = ROOT / "benchmarks/device/share_gpu_check.py"
    (tmp_path / "rows-P2.json").write_text(json.dumps(rows[:1]))
    assert _run(script, "--summary", "--out", tmp_path).returncode == 0
    (tmp_path / "rows-P4.json").write_text(json.dumps(rows[1:]))
    proc = _run(script, "--summary", "--out", tmp_path)
    assert proc.returncode == 1  # a failed case fails the check
    assert "1/2 ok" in proc.stdout and "ring2" in proc.stdout
    assert (tmp_path / "share_gpu_check.csv").read_text().count("\n") == 3
    proc = _run(script, "--models", "nope", "--summary")
    assert proc.returncode == 2 and "unknown models" in proc.stderr
