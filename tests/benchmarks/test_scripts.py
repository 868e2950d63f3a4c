"""The benchmark scripts run as users run them (``python benchmarks/x.py``): their help, their CPU dry runs
and their summaries. Their logic lives in the package and is tested there; here only the drivers.

Every run of this file is an independent process; the module fixture starts them all, as many at a time as
there are cores (each spends most of its time importing torch), and each test checks its own runs."""

import json
import pathlib
import sys

import pytest

from helpers import run_concurrently

ROOT = pathlib.Path(__file__).resolve().parents[2]
HELP = ["benchmarks/scaling_model.py", "benchmarks/ring_traffic.py", "benchmarks/kernel_bench.py",
        "benchmarks/device/share_gpu_check.py"]
KERNEL_BENCH = ROOT / "benchmarks/kernel_bench.py"
SHARE_GPU = ROOT / "benchmarks/device/share_gpu_check.py"
SHARE_ROWS = [dict(layout="ring2", P=2, model="embedded", rel=1e-3, max_abs=2e-3, ok=True, imbalance=1.01,
                   contiguous=1.2, ws_calls=0, seconds=1.0),
              dict(layout="ulysses4", P=4, model="wan", ok=False, error="RuntimeError: boom")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (CompletedProcess, its folder) of every script run below, in cwd = the repository root."""
    tmp = tmp_path_factory.mktemp("scripts")
    one, both = tmp / "share-one", tmp / "share-both"  # the summary of one P, and of two with a failed case
    for folder, rows in ((one, SHARE_ROWS[:1]), (both, SHARE_ROWS)):
        folder.mkdir()
        for row in rows:
            (folder / f"rows-P{row['P']}.json").write_text(json.dumps([row]))
    cmds = {f"help {s}": [ROOT / s, "--help"] for s in HELP}
    cmds.update({
        "scaling imbalance": [ROOT / "benchmarks/scaling_model.py", "--small", "--imbalance-only", "--sources",
                              "compact-0.5,adaspa", "--out", tmp / "sm"],
        "ring traffic": [ROOT / "benchmarks/ring_traffic.py", "--small", "--ring", "2", "--sources", "adaspa"],
        "variants": [KERNEL_BENCH, "--list-variants", "--variants",
                     "ours=auto,t=128:8:4:tma,p=64:4:3,w=ws:3:persistent:pp,tri=triton,o=ws:ov:emu,l=ws:longest"],
        "variants default": [KERNEL_BENCH, "--list-variants"],
        "variant bad 1": [KERNEL_BENCH, "--list-variants", "--variants", "x=ws:fast"],
        "variant bad 2": [KERNEL_BENCH, "--list-variants", "--variants", "x=128:8:3:nofold"],
        "search overhead": [ROOT / "benchmarks/search_overhead.py", "--small", "--batch", "2", "--text", "4",
                            "--query-rows", "16", "--steps", "20", "--csv", tmp / "so.csv", "--dense-threshold", "1"],
        "select ops": [ROOT / "benchmarks/search_overhead.py", "--grid", "16", "32", "32", "--tile", "2", "8", "8",
                       "--text", "12", "--batch", "2", "--heads", "4", "--dense-threshold", "1", "--count-ops"],
        "step profile": [ROOT / "benchmarks/step_profile.py", "--small", "--repeats", "1", "--csv", tmp / "sp.csv",
                         "--kernels", tmp / "sp.txt", "--top", "3", "--orders", "natural,longest"],
        "tile schedule": [ROOT / "benchmarks/tile_schedule.py", "--csv", tmp / "ts.csv"],
        "tile schedule bad": [ROOT / "benchmarks/tile_schedule.py", "--sms", "0"],
        "motion probe": [ROOT / "benchmarks/motion_quality.py", "--direction-probe", "--seeds", "1", "--set",
                         "model.frames=4", "--set", "model.height=16", "--set", "model.width=16", "--probe-colours",
                         "red"],
        "share one": [SHARE_GPU, "--summary", "--out", one],
        "share both": [SHARE_GPU, "--summary", "--out", both],
        "share unknown model": [SHARE_GPU, "--models", "nope", "--summary"],
    })
    done = run_concurrently([[sys.executable, *map(str, args)] for args in cmds.values()], cwd=ROOT)
    return dict(zip(cmds, done)), tmp


def test_search_overhead_dry_run_on_a_guidance_pair(runs):
    proc, tmp = runs[0]["search overhead"], runs[1]
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp / "so.csv")))
    assert [r["query_rows"] for r in rows] == ["16"] and rows[0]["shape"].startswith("B=2 ")
    assert "20-step schedule: 4 dense" in proc.stdout  # the estimate's schedule, scaled to --steps
    # at threshold 1 the selection reads nothing back (a text row fixes the index width), at the GPU model's shape too
    ops = runs[0]["select ops"]
    assert ops.returncode == 0 and "tensor ops, 0 values read back to the host" in ops.stdout, ops.stderr[-2000:]
    assert 0 < float(rows[0]["overhead_share"]) < float(rows[0]["search_share"]) < 1


def test_grid_time_hands_tiles_to_the_first_free_sm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tile_schedule import grid_time

    assert grid_time([3, 1, 1, 1], 2) == 3  # the long tile first: the short ones fill the other SM
    assert grid_time([1, 1, 1, 3], 2) == 4  # last: it runs alone at the end
    assert grid_time([2, 2], 8) == 2 and grid_time([], 4) == 0


def test_tile_schedule_on_the_shipped_gpu_configs(runs):
    proc, tmp = runs[0]["tile schedule"], runs[1]
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp / "ts.csv")))
    assert {r["config"] for r in rows} == {"embedded-gpu-compact-0.9.yaml", "embedded-gpu-compact-0.8.yaml"}
    assert [r["layer"] for r in rows[:7]] == ["0", "1", "2", "3", "4", "5", "all"]
    for r in rows:  # no order beats the bound; on these configs longest first lies between it and natural
        natural, longest, bound = (float(r[k]) for k in ("natural", "longest", "bound"))
        assert bound <= longest <= natural + 1e-9, r
    assert any(float(r["saving"]) > 0 for r in rows)  # the text rows (129 key blocks) started last cost time
    bad = runs[0]["tile schedule bad"]
    assert bad.returncode == 2 and "--sms 0: give a positive count" in bad.stderr


def test_step_profile_dry_run(runs):
    proc, tmp = runs[0]["step profile"], runs[1]
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = {(r["case"], r["step_kind"]): r for r in csv.DictReader(open(tmp / "sp.csv"))}
    # the baselines take the stand-in window's video density (0.438 of this layout's blocks)
    assert set(rows) == {(c, k) for c in ("dense", "no-attention") for k in ["dense"]} | {
        (c, k) for c in ("window 0.5", "window 0.438", "random 0.438", "window 0.5 order=longest")
        for k in ("dense", "sparse")} | {
        ("config adaspa", "dense"), ("config adaspa", "search")}
    assert rows[("dense", "dense")]["steps"] == "4" and rows[("window 0.5", "sparse")]["density_sparse_steps"]
    # another tile order repeats the Compact case: the same blocks
    assert (rows[("window 0.5 order=longest", "sparse")]["density_sparse_steps"]
            == rows[("window 0.5", "sparse")]["density_sparse_steps"])
    for r in rows.values():  # the parts add up to the step
        parts = float(r["attention_ms"]) + float(r["other_forward_ms"]) + float(r["outside_forward_ms"])
        assert abs(parts - float(r["step_ms"])) < 0.01 and float(r["attention_ms"]) >= 0
    text = (tmp / "sp.txt").read_text()
    assert "## dense:" in text and "## no-attention:" in text and "## window 0.5 (all steps sparse):" in text


def test_motion_quality_direction_probe_on_the_tiny_model(runs):
    proc = runs[0]["motion probe"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "direction probe, 4 clips (1 colours x 4 motions x 1 seeds), 4x16x16" in proc.stdout
    row = proc.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
    assert len(row) == 6 and all(0 <= float(x) <= 100 for x in row), proc.stdout


@pytest.mark.parametrize("script", HELP)
def test_help(runs, script):
    proc = runs[0][f"help {script}"]
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]


def test_scaling_model_imbalance_dry_run(runs):
    proc = runs[0]["scaling imbalance"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (runs[1] / "sm" / "imbalance.csv").read_text().splitlines()
    assert text[0].startswith("shape,source,density,P,layout") and len(text) == 1 + 2 * 2 * 5


def test_ring_traffic_dry_run(runs):
    proc = runs[0]["ring traffic"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.strip().splitlines()[1:]
    assert len(rows) == 2 * 2  # contiguous and balanced per small shape
    for row in rows:
        new, old = (float(x) for x in row.split()[5:7])
        assert 0 < new <= old  # key ranges never move more than whole shards


def test_kernel_bench_variant_specs(runs):
    proc = runs[0]["variants"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "ours": None,
        "t": dict(block_n=128, num_warps=8, num_stages=4, use_tma=True, impl="triton"),
        "p": dict(block_n=64, num_warps=4, num_stages=3, use_tma=False, impl="triton"),
        "w": dict(impl="ws", ws_stages=3, ws_persistent=True, ws_pingpong=True),
        "tri": dict(impl="triton"),
        "o": dict(impl="ws", ws_overlap=True, ws_exp_emu=True),
        "l": dict(impl="ws", ws_order="longest"),
    }
    assert json.loads(runs[0]["variants default"].stdout) == {"ours": None}
    for bad in ("variant bad 1", "variant bad 2"):
        proc = runs[0][bad]
        assert proc.returncode == 2 and "variant x" in proc.stderr


def test_share_gpu_summary(runs):
    assert runs[0]["share one"].returncode == 0
    proc = runs[0]["share both"]
    assert proc.returncode == 1  # a failed case fails the check
    assert "1/2 ok" in proc.stdout and "ring2" in proc.stdout
    assert (runs[1] / "share-both" / "share_gpu_check.csv").read_text().count("\n") == 3
    proc = runs[0]["share unknown model"]
    assert proc.returncode == 2 and "unknown models" in proc.stderr


def test_step_profile_kernel_kinds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks/step_profile.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    assert sp.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert sp.kernel_kind("_block_sparse_ws_kernel") == "attention"
    assert sp.kernel_kind("lse_combine") == "attention" and sp.kernel_kind("merge_lse_kernel") == "attention"
    # "false" in a template argument is not an LSE
    assert sp.kernel_kind("void at::native::_scatter_gather_elementwise_kernel<128, 8, at::native::_cuda_scatter_"
                          "gather_internal_kernel<false>") == "copy / layout"
    assert sp.kernel_kind("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(int)") \
        == "elementwise / reduce"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="host synchronisations exist on a GPU only")
def test_step_profile_counts_host_syncs():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks/step_profile.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    x = torch.ones(4, device="cuda")

    def two_reads():
        x.sum().item()
        bool((x > 0).all())
        return x * 2  # no read

    lines = sp.sync_report("case", 2, two_reads, True)
    assert lines[0].endswith("case: 2 synchronisations, 1.0 per step"), lines
    # one line per source line that read, each naming it
    assert len(lines) == 3 and all("tests/benchmarks/test_scripts.py:" in ln and ln.endswith(" two_reads")
                                   for ln in lines[1:]), lines
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
