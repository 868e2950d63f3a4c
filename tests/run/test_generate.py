"""generate.py end to end on CPU: outputs written atomically, and each bad input one clear error with no outputs."""

import dataclasses

import importlib.util
import json
import math
import os
import pathlib

import pytest
import torch

from dist_compact.sparsity.attention import build_attention
from dist_compact.sparsity.context import DenseAttention
from dist_compact.run.loader import load_run_config
from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT, WeightsError, save_embedded
from dist_compact.run.generation import run_generation
from dist_compact.run.report import psnr, ssim
from dist_compact.run.runner import WorldSizeError
from dist_compact.run.sampler import NonFiniteLatentsError
from helpers import cli_flags, video_writers_installed

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random-weight embedded model (fast on CPU; the pipeline does not care)."""
    torch.manual_seed(0)
    m = EmbeddedDiT(EmbeddedConfig(dim=64, depth=2, heads=2, frames=4, height=16, width=16))
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("w") / "small.safetensors"
    save_embedded(m, path)
    return path


#: the small test models (2 layers, 2 heads) cannot use the demo's Compact config (searched for the
#: shipped 8 x 6 model): these tests run AdaSpa alone, one fused and one cached search
ADASPA = [("sparsity.mode", "adaspa"), ("sparsity.compact_config", "null"), ("sparsity.dense_steps", "10"),
          ("sparsity.search_steps", "10,30"), ("sparsity.search_kinds", "fused,cached"), ("sparsity.sparsity", "0.75")]
ADASPA_ARGS = cli_flags(ADASPA)

#: the video files need the [video] extra (the README's test install has it); where it is missing (a
#: bare GPU image) the runs below skip the video and check every other output
VIDEO = video_writers_installed()
NO_VIDEO = [] if VIDEO else [("run.video", "false")]
NO_VIDEO_ARGS = cli_flags(NO_VIDEO)


def _cfg(out, weights, *extra):
    over = ADASPA + [("model.path", str(weights)), ("model.frames", "4"), ("model.height", "16"), ("model.width", "24"),
            ("run.steps", "3"), ("run.output_dir", str(out)), ("run.attn_backend", "torch"),
            ("run.progress", "false"), ("run.guidance", "2.0"), ("cluster.device", "cpu"), *NO_VIDEO]
    return load_run_config([], over + list(extra))


def _generate_module():
    spec = importlib.util.spec_from_file_location("generate_main", ROOT / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_run_writes_all_outputs(tmp_path, weights):
    out = tmp_path / "outputs"
    res = run_generation(_cfg(out, weights, ("run.name", "demo"), ("run.compare_dense", "true")))
    folder = out / "demo"
    assert res.folder == str(folder) and sorted(os.listdir(out)) == ["demo"]  # no temporary folder left
    names = set(os.listdir(folder))
    assert {"latents.pt", "frames.png", "report.json", "logs", "density.png", "recall.png", "dense_latents.pt",
            "dense_frames.png"} <= names
    assert {"video.mp4", "video.gif", "dense.mp4"} <= names if VIDEO else not names & {"video.mp4", "video.gif"}
    assert os.listdir(folder / "logs") == ["rank0.log"]
    log = (folder / "logs" / "rank0.log").read_text()
    # the schedule as this 3-step run does it (the config's 10 / 30 of 50 steps scaled), not the config's numbers
    assert ("sparse run: mode adaspa, 3 steps: steps 0 dense, 1 fused search, 2 cached search (the config's step "
            "numbers are written for reference_steps=50 and scaled); sparsity=0.75,") in log
    assert "dense run: mode dense, 3 steps: steps 0-2 dense\n" in log and "search_steps" not in log
    assert not VIDEO or (folder / "video.mp4").stat().st_size > 0
    assert (folder / "frames.png").read_bytes()[:4] == b"\x89PNG"
    lat = torch.load(folder / "latents.pt")
    assert lat.shape == (1, 3, 4, 16, 24) and torch.equal(lat, res.latents)
    rep = json.loads((folder / "report.json").read_text())
    assert rep["seed"] == 0 and rep["config"]["run"]["steps"] == 3 and len(rep["sparse"]["step_seconds"]) == 3
    assert rep["config"]["sparsity"]["mode"] == "adaspa"
    calls = rep["sparse"]["attention"]["calls"]
    assert calls["fused_search"] == 2 and calls["cached_search"] == 2  # 3 steps: dense, fused, cached
    dens = rep["sparse"]["density_per_layer_head"]
    assert len(dens) == 2 and all(len(row) == 2 and all(0 < d <= 1 for d in row) for row in dens)
    q = rep["quality"]
    assert q["psnr_db"] is None or q["psnr_db"] > 10
    # the speed-up is reported (a finite number), never bounded: its size depends on the machine's load
    assert -1 <= q["ssim"] <= 1 and math.isfinite(rep["speedup_vs_dense"])
    dense = torch.load(folder / "dense_latents.pt")
    if q["psnr_db"] is not None:
        assert abs(q["psnr_db"] - psnr(lat, dense)) < 1e-9


def test_video_false_needs_no_video_writer(tmp_path, weights, monkeypatch):
    """run.video false: no writer check, no mp4/gif, every other output written."""
    import dist_compact.run.report as rpt

    def missing(*a, **k):
        raise ImportError("no imageio-ffmpeg here")

    monkeypatch.setattr(rpt, "check_writers", missing)
    with pytest.raises(ImportError, match="imageio-ffmpeg"):
        run_generation(_cfg(tmp_path / "a", weights, ("run.name", "v")))
    assert not (tmp_path / "a").exists() or os.listdir(tmp_path / "a") == []
    res = run_generation(_cfg(tmp_path / "b", weights, ("run.name", "v"), ("run.video", "false")))
    names = set(os.listdir(res.folder))
    assert {"latents.pt", "frames.png", "report.json"} <= names and not names & {"video.mp4", "video.gif"}
    assert sorted(json.loads((tmp_path / "b" / "v" / "report.json").read_text())["files"]) == sorted(
        n for n in names if n != "logs")


def test_same_seed_same_latents_and_dense_mode(tmp_path, weights):
    a = run_generation(_cfg(tmp_path / "a", weights, ("sparsity.mode", "dense")))
    b = run_generation(_cfg(tmp_path / "b", weights, ("sparsity.mode", "dense")))
    assert torch.equal(a.latents, b.latents)
    assert len(a.report["sparse"]["step_seconds"]) == 3
    assert a.report["sparse"]["attention"]["calls"]["sparse"] == 0


def test_nan_latents_clear_error_and_no_run_folder(tmp_path, weights):
    out = tmp_path / "outputs"

    class NaNAt(DenseAttention):
        def __call__(self, q, k, v, ctx):
            o = super().__call__(q, k, v, ctx)
            return o * float("nan") if ctx.step == 1 else o

    def factory(n, sparsity, compact, sp):
        return [NaNAt(i) for i in range(n)]

    with pytest.raises(NonFiniteLatentsError, match=r"step 1 of 3"):
        run_generation(_cfg(out, weights), attention_factory=factory)
    assert not out.exists() or os.listdir(out) == []


def test_corrupt_weights_clear_error(tmp_path, weights, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    (tmp_path / "bad.safetensors.sha256").write_text((weights.parent / (weights.name + ".sha256")).read_text())
    out = tmp_path / "outputs"
    with pytest.raises(WeightsError, match="checksum mismatch"):
        run_generation(_cfg(out, bad))
    assert not out.exists() or os.listdir(out) == []
    gen = _generate_module()
    rc = gen.main(["--model-path", str(bad), "--output-dir", str(out), "--steps", "2", *ADASPA_ARGS, *NO_VIDEO_ARGS])
    err = capsys.readouterr().err
    assert rc == 1 and "checksum mismatch" in err and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_world_size_mismatch_clear_error(tmp_path, weights, capsys):
    out = tmp_path / "outputs"
    with pytest.raises(WorldSizeError, match=r"asks for 2 processes.*1 were launched.*torchrun --nproc-per-node 2"):
        run_generation(_cfg(out, weights, ("cluster.nproc", "2"), ("cluster.ulysses", "2")))
    assert not out.exists() or os.listdir(out) == []
    gen = _generate_module()
    rc = gen.main(["--config", str(ROOT / "configs/cluster/cpu-demo.yaml"), "--output-dir", str(out)])
    assert rc == 1 and "1 were launched" in capsys.readouterr().err


def test_unknown_prompt_word_and_existing_name(tmp_path, weights):
    out = tmp_path / "outputs"
    with pytest.raises(ValueError, match="does not know the word"):
        run_generation(_cfg(out, weights, ("run.prompt", "a purple elephant")))
    assert not out.exists() or os.listdir(out) == []
    (out / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already exists"):
        run_generation(_cfg(out, weights, ("run.name", "taken")))
    assert os.listdir(out) == ["taken"]


def test_cli_end_to_end(tmp_path, weights, capsys):
    out = tmp_path / "outputs"
    gen = _generate_module()
    rc = gen.main(["--model-path", str(weights), "--output-dir", str(out), "--steps", "2", "--name", "cli",
                   "--model.frames", "4", "--model.height", "16", "--model.width", "16",
                   "--run.attn_backend", "torch", "--run.progress", "false", "--seed", "7", "--cluster.device", "cpu",
                   *ADASPA_ARGS, *NO_VIDEO_ARGS])
    lines = capsys.readouterr().out.splitlines()
    rep = json.loads((out / "cli" / "report.json").read_text())
    assert rep["seed"] == 7 and rep["steps"] == 2
    # what it printed: the folder, the schedule of these 2 steps, and what the speed figure means here
    assert rc == 0 and lines == [
        f"wrote {out / 'cli'} ({rep['sparse']['total_seconds']:.1f} s denoising)",
        "schedule: steps 0 fused search, 1 cached search",
        "speed: speed-up vs dense not measured (add --compare-dense for a dense run from the same noise); on a CPU "
        "the sparse path is PyTorch SDPA with the index as a mask (every block is still computed) plus the searches, "
        "so it cannot beat dense there; for the real speed-up run on a GPU: python benchmarks/model_forward.py "
        "--model hunyuan_video --layers 6 --reps 2 --mass-rows 32 --cases dense,window@0.4,window@0.2,window@0.12,"
        "adaspa_reuse@0.2 (HunyuanVideo 720p, 118,800 tokens, random weights; 2.52x at density 0.2 on an H100, "
        "BENCHMARKS.md)"]
    assert rep["speed"]["summary"] == lines[2][len("speed: "):] and rep["schedule"]["summary"] == lines[1][10:]


def test_attention_factory_modes():
    from dist_compact.sparsity.attention import SparseAttention
    from dist_compact.run.config import DEMO_SPARSITY

    dense = build_attention(3, load_run_config([], [("sparsity.mode", "dense")]).sparsity)
    assert [type(a) for a in dense] == [DenseAttention] * 3
    from dist_compact.models.embedded import WEIGHTS_DIR
    from dist_compact.search.config_file import load_compact

    union = dataclasses.replace(DEMO_SPARSITY, mode="compact+adaspa", compact_config="embedded-compact-0.5.yaml")
    with pytest.raises(ValueError, match="compact"):
        build_attention(2, union)  # compact+adaspa without its Compact pattern
    compact = load_compact(union, model="embedded", num_layers=8, num_heads=6, shipped_dir=WEIGHTS_DIR)
    sparse = build_attention(8, union, compact)
    assert all(isinstance(a, SparseAttention) for a in sparse) and [a.layer for a in sparse] == list(range(8))
    sparse = build_attention(8, DEMO_SPARSITY)  # the demo: AdaSpa alone needs no pattern
    assert all(isinstance(a, SparseAttention) for a in sparse) and [a.layer for a in sparse] == list(range(8))


def test_psnr_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 32, 32, generator=g) * 1.6 - 0.8
    assert psnr(x, x) == float("inf") and abs(ssim(x, x) - 1) < 1e-12
    # a shift of 0.2 on [-1, 1] is 0.1 on [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert abs(psnr(x, x + 0.2) - 20.0) < 1e-5
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    noisier = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert 1 > ssim(x, noisy) > ssim(x, noisier) > -1
    assert abs(ssim(x, noisy) - ssim(noisy, x)) < 1e-12
    # SSIM ignores a constant luminance offset less than PSNR does: structure term stays 1
    assert ssim(x, x + 0.02) > 0.99
    # the separable filter equals the 11 x 11 Gaussian window of the definition, computed directly
    a, b = ((x.double() + 1) / 2).permute(1, 0, 2, 3), ((noisy.double() + 1) / 2).permute(1, 0, 2, 3)
    r = torch.arange(11, dtype=torch.float64) - 5
    g1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    win = (g1[:, None] * g1[None, :]) / (g1.sum() ** 2)
    pos = [(i, j) for i in range(32 - 10) for j in range(32 - 10)]

    def mean_w(t):  # [F, C, H, W] -> [F, C, positions]: the window-weighted mean at each valid position
        return torch.stack([(t[..., i:i + 11, j:j + 11] * win).sum((-1, -2)) for i, j in pos], -1)

    mx, my = mean_w(a), mean_w(b)
    sxx, syy, sxy = mean_w(a * a) - mx ** 2, mean_w(b * b) - my ** 2, mean_w(a * b) - mx * my
    ref = ((2 * mx * my + 1e-4) * (2 * sxy + 9e-4)) / ((mx ** 2 + my ** 2 + 1e-4) * (sxx + syy + 9e-4))
    assert abs(ssim(x, noisy) - float(ref.mean())) < 1e-10


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path, weights):
    """torchrun --nproc 2 generate.py --config configs/cluster/cpu-demo.yaml == one process (fp32, <= 1e-4)."""
    import subprocess
    import sys

    common = ["--config", str(ROOT / "configs/cluster/cpu-demo.yaml"), "--model-path", str(weights),
              "--model.frames", "4", "--model.height", "16", "--model.width", "24", "--steps", "3",
              "--run.progress", "false", "--seed", "5", "--output-dir", str(tmp_path / "out"), *ADASPA_ARGS,
              *NO_VIDEO_ARGS]
    one = run_generation(load_run_config(
        [ROOT / "configs/cluster/cpu-demo.yaml"],
        [("model.path", str(weights)), ("model.frames", "4"), ("model.height", "16"), ("model.width", "24"),
         ("run.steps", "3"), ("run.progress", "false"), ("run.seed", "5"), ("run.output_dir", str(tmp_path / "out")),
         ("run.name", "one"), ("cluster.nproc", "1"), ("cluster.ulysses", "1"), *ADASPA, *NO_VIDEO]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "generate.py"), *common, "--name", "two"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "out" / "two"
    assert sorted(os.listdir(two / "logs")) == ["rank0.log", "rank1.log"]
    lat2 = torch.load(two / "latents.pt")
    assert (lat2 - one.latents).abs().max().item() <= 1e-4
    rep = json.loads((two / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["sparse"]["attention"]["calls"]["fused_search"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_eight_processes_equal_one_process(tmp_path):
    """The three 1x8 cluster layouts (ulysses 8; 4 x ring 2; 2 x ring 4) of generate.py on 8 CPU processes
    (gloo): the same latents as one process (fp32, <= 1e-4), AdaSpa searches included. The ranks get
    torchrun's environment and store (parallel_helpers.run_like_torchrun: forked, not 8 fresh interpreters
    importing torch on a 2-core machine); torchrun itself runs generate.py in the 2-process test above."""
    from parallel_helpers import run_like_torchrun

    torch.manual_seed(1)
    m = EmbeddedDiT(EmbeddedConfig(dim=128, depth=2, heads=8, rope_split=(4, 6, 6), frames=4, height=16, width=16))
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    weights = tmp_path / "heads8.safetensors"
    save_embedded(m, weights)
    over = [("model.path", str(weights)), ("model.frames", "8"), ("model.height", "16"), ("model.width", "16"),
            ("run.steps", "3"), ("run.progress", "false"), ("run.seed", "2"), ("run.video", "false"),
            ("run.attn_backend", "torch"), ("cluster.device", "cpu"), ("run.output_dir", str(tmp_path / "out")), *ADASPA]
    one = run_generation(load_run_config([], over + [("run.name", "one")]))
    for name in ("1x8-ulysses", "1x8-hybrid", "1x8-ring4"):
        args = ["--config", str(ROOT / f"configs/cluster/{name}.yaml"), "--cluster.device", "cpu",
                "--cluster.backend", "gloo", "--name", name, *cli_flags(over)]
        proc = run_like_torchrun(ROOT / "generate.py", args, 8, tmp_path, cwd=tmp_path, timeout=240)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        lat = torch.load(tmp_path / "out" / name / "latents.pt")
        assert (lat - one.latents).abs().max().item() <= 1e-4, name
        rep = json.loads((tmp_path / "out" / name / "report.json").read_text())
        assert rep["world_size"] == 8 and rep["sparse"]["attention"]["calls"]["fused_search"] == 2


def test_compact_and_online_modes_from_a_config_file(tmp_path, weights):
    from dist_compact.patterns import CompactConfig, HeadPattern
    from dist_compact.search.config_file import save_config

    cc = CompactConfig.uniform(2, 2, HeadPattern.window(1, 1, max_distance=1), model="embedded")
    path = tmp_path / "searched.yaml"
    save_config(cc, path)
    for mode in ("compact", "compact+adaspa"):
        res = run_generation(_cfg(tmp_path / mode.replace("+", "-"), weights, ("sparsity.mode", mode),
                                  ("sparsity.compact_config", str(path)), ("model.frames", "8")))
        calls = res.report["sparse"]["attention"]["calls"]
        assert calls["sparse"] + calls["cached_search"] > 0, (mode, calls)
    wrong = CompactConfig.uniform(3, 2, HeadPattern.window(1, 1), model="embedded")
    save_config(wrong, tmp_path / "wrong.yaml")
    out = tmp_path / "wrong-out"
    with pytest.raises(ValueError, match="wrong.yaml"):
        run_generation(_cfg(out, weights, ("sparsity.mode", "compact"),
                            ("sparsity.compact_config", str(tmp_path / "wrong.yaml"))))
    assert not out.exists() or os.listdir(out) == []


def test_sampler_and_loss_agree_on_the_flow_convention():
    """With the exact velocity of one data point, training loss is 0 and Euler sampling lands on it."""
    from dist_compact.models.train import flow_matching_loss
    from dist_compact.run.sampler import sample

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 2, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)

    def oracle(x, t, text):
        return (x - x0) / t.view(-1, 1, 1, 1, 1)  # v = noise - x0 on the straight path x_t = (1-t) x0 + t noise

    t = torch.tensor([0.3])
    assert flow_matching_loss(oracle, x0, torch.zeros(1, 12, dtype=torch.long), t, noise).item() < 1e-10
    for guidance, shift in ((1.0, 1.0), (3.0, 2.0)):
        res = sample(oracle, torch.zeros(1, 12, dtype=torch.long), noise, steps=5, guidance=guidance, shift=shift)
        assert (res.latents - x0).abs().max().item() < 1e-5 and len(res.step_seconds) == 5
