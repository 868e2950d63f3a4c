"""model.kind: random - the published HunyuanVideo / Wan transformers with random weights, end to end on CPU.

The tiny stand-ins (model.size: small, 2 heads of 32) at 13 x 128 x 192 pixels = latents 16 x 4 x 16 x 24
(4 x 8 x 12 tokens, tiles of 1 x 4 x 4 = 24 video blocks): one process (dense vs AdaSpa), 2 ranks
launched as torchrun launches them (Ulysses 2, ring 2) equal to one process, ring bytes, and the bad inputs.
"""

import importlib.util
import json
import math
import os
import pathlib

import pytest
import torch
import yaml

from dist_compact.run.config import ConfigError
from dist_compact.run.loader import load_run_config
from dist_compact.parallel import ParallelConfigError
from dist_compact.run.generation import run_generation
from dist_compact.run.runner import WorldSizeError
from helpers import cli_flags

diffusers = pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
HUNYUAN_VIDEO = ROOT / "configs/models/hunyuanvideo-random.yaml"
WAN = ROOT / "configs/models/wan2.1-t2v-14b-random.yaml"

#: the small stand-ins on the CPU (what docs/usage.md tells users for a CPU check)
SMALL = [("model.size", "small"), ("model.frames", "13"), ("model.height", "128"), ("model.width", "192"),
         ("model.tile", "1,4,4"), ("cluster.device", "cpu"), ("cluster.backend", "gloo"),
         ("run.attn_backend", "torch"), ("run.progress", "false")]
#: AdaSpa over 3 steps: step 0 dense, a fused search at 1, the index reused at 2
ADASPA = [("sparsity.mode", "adaspa"), ("sparsity.dense_steps", "1"), ("sparsity.search_steps", "[1]"),
          ("sparsity.search_kinds", "[fused]"), ("sparsity.reference_steps", "3"), ("sparsity.sparsity", "0.75"),
          ("run.steps", "3")]


def _is_reported(x) -> bool:
    """A reported timing figure: a finite number (its size depends on the machine and is never checked)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _cfg(model, out, *extra):
    return load_run_config([model], SMALL + [("run.output_dir", str(out))] + list(extra))


def _torchrun(tmp_path, model, pairs):
    """generate.py on 2 ranks with torchrun's environment and store (forked from a server that has torch and
    diffusers imported: a fresh interpreter per rank spends about 10 s importing them on a 2-core machine);
    torchrun itself runs generate.py in tests/run/test_generate.py."""
    from parallel_helpers import run_like_torchrun

    proc = run_like_torchrun(ROOT / "generate.py", ["--config", str(model), *cli_flags(pairs)], 2, tmp_path,
                             cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _window_config(path, layers=6, heads=2) -> str:
    """A Compact config keeping only the query's own latent frame (slab distance 0) in every head: with
    ring 2 over 4 frames, no ring rank needs the other's key shard once the dense warm-up is over."""
    d = {"schema": "dist_compact.compact_config", "version": 1, "model": "hunyuanvideo", "num_layers": layers,
         "num_heads": heads, "searched_for": None, "search": {"tau": None, "lam": None},
         "patterns": [["0: *x*"] * heads for _ in range(layers)]}
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_one_process_dense_vs_adaspa_writes_run_folder(tmp_path):
    out = tmp_path / "out"
    res = run_generation(_cfg(HUNYUAN_VIDEO, out, *ADASPA, ("run.name", "hy"), ("run.compare_dense", "true")))
    folder = out / "hy"
    assert res.folder == str(folder) and sorted(os.listdir(out)) == ["hy"]
    names = set(os.listdir(folder))
    assert {"latents.pt", "dense_latents.pt", "frames.png", "dense_frames.png", "report.json", "logs"} <= names
    assert not any(n.endswith((".mp4", ".gif")) for n in names)  # run.video false in the model config
    lat = torch.load(folder / "latents.pt")
    assert lat.shape == (1, 16, 4, 16, 24) and torch.equal(lat, res.latents) and torch.isfinite(lat).all()
    dense = torch.load(folder / "dense_latents.pt")
    assert dense.shape == lat.shape and not torch.equal(dense, lat)
    rep = json.loads((folder / "report.json").read_text())
    assert rep["model"]["kind"] == "random" and rep["model"]["num_layers"] == 6 and rep["model"]["num_heads"] == 2
    assert "LATENT PREVIEW" in rep["random_model"]["note"] and rep["random_model"]["guidance_embedding"] == 6000.0
    assert rep["random_model"]["latents"] == [16, 4, 16, 24] and rep["random_model"]["forwards_per_step"] == 1
    sp = rep["sparse"]
    # timings are reported (present, one per step, finite numbers), never compared or bounded: speed lives in
    # the benchmarks
    assert len(sp["step_seconds"]) == 3 and _is_reported(sp["timing"]["mean_step_seconds"])
    assert sp["attention"]["calls"]["fused_search"] == 6 and 0 < sp["mean_density_sparse"] < 1
    assert sp["peak_memory_bytes_per_rank"] == [None] and sp["parallel"]["ring_bytes_sent"] == 0
    assert len(rep["dense"]["step_seconds"]) == 3 and _is_reported(rep["speedup_vs_dense"])
    assert rep["latent_quality"]["max_abs_diff"] == pytest.approx(float((lat - dense).abs().max()))

    # Wan through generate.py's command line (the dense baseline alone: sparsity dense)
    spec = importlib.util.spec_from_file_location("generate_main", ROOT / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rc = gen.main(["--config", str(WAN), *cli_flags(SMALL), "--steps", "2", "--output-dir", str(out), "--name", "wan",
                   "--sparsity.mode", "dense"])
    assert rc == 0
    rep = json.loads((out / "wan" / "report.json").read_text())
    assert rep["model"]["published"] == "wan" and rep["model"]["num_layers"] == 4
    assert len(rep["sparse"]["step_seconds"]) == 2
    assert rep["random_model"]["guidance_embedding"] is None
    assert torch.load(out / "wan" / "latents.pt").shape == (1, 16, 4, 16, 24)


@pytest.mark.slow
def test_torchrun_ulysses2_equals_one_process(tmp_path):
    out = tmp_path / "out"
    one = run_generation(_cfg(HUNYUAN_VIDEO, out, *ADASPA, ("run.name", "one")))
    _torchrun(tmp_path, HUNYUAN_VIDEO, SMALL + ADASPA + [("run.output_dir", str(out)), ("run.name", "two"),
                                                    ("cluster.nproc", "2"), ("cluster.ulysses", "2")])
    two = out / "two"
    assert sorted(os.listdir(two / "logs")) == ["rank0.log", "rank1.log"]
    assert (torch.load(two / "latents.pt") - one.latents).abs().max().item() <= 1e-4
    rep = json.loads((two / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["sparse"]["parallel"]["ulysses"] == 2
    assert rep["sparse"]["attention"]["calls"]["fused_search"] == 6


@pytest.mark.slow
def test_torchrun_ring2_equals_one_process_and_skips_shards(tmp_path):
    out = tmp_path / "out"
    compact = [("sparsity.mode", "compact"), ("sparsity.compact_config", _window_config(tmp_path / "win.yaml")),
               ("sparsity.dense_steps", "1"), ("sparsity.reference_steps", "2"), ("sparsity.search_steps", "[]"),
               ("sparsity.search_kinds", "[]"), ("run.steps", "2"), ("run.compare_dense", "true")]
    one = run_generation(_cfg(HUNYUAN_VIDEO, out, *compact, ("run.name", "one")))
    _torchrun(tmp_path, HUNYUAN_VIDEO, SMALL + compact + [("run.output_dir", str(out)), ("run.name", "two"),
                                                     ("cluster.nproc", "2"), ("cluster.ring", "2")])
    two = out / "two"
    assert (torch.load(two / "latents.pt") - one.latents).abs().max().item() <= 1e-4
    assert (torch.load(two / "dense_latents.pt") - torch.load(out / "one" / "dense_latents.pt")).abs().max() <= 1e-4
    rep = json.loads((two / "report.json").read_text())
    par, dpar = rep["sparse"]["parallel"], rep["dense"]["parallel"]
    assert par["ring"] == 2 and len(par["ring_bytes_sent_per_rank"]) == 2
    # the dense run sends exactly what the dense-ring formula predicts
    assert dpar["ring_bytes_sent"] == dpar["dense_ring_bytes"] > 0
    assert par["dense_ring_bytes"] == dpar["dense_ring_bytes"]
    # sparse: the dense warm-up step moves K/V, the frame-local pattern nothing afterwards
    assert 0 < par["ring_bytes_sent"] <= par["dense_ring_bytes"]
    assert par["ring_bytes_per_step"][0] > 0 and par["ring_bytes_per_step"][1] == 0
    assert rep["sparse"]["peak_memory_bytes_per_rank"] == [None, None]
    bal = rep["sparse"]["parallel_balance"]  # the Compact layers' computed blocks per rank
    assert bal["ring"] == 2 and len(bal["ring_bounds"]) == 3 and bal["static_layers"] >= 1
    assert 1.0 <= bal["imbalance"] <= bal["imbalance_contiguous"] + 1e-9 and len(bal["computed_blocks_per_rank"]) == 2


def test_bad_inputs_one_clear_error_no_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    known = r"known: hunyuanvideo, wan2\.1-t2v-14b"
    with pytest.raises(ConfigError, match=r"'hunyuan' is not a random-weight model; " + known):
        _cfg(HUNYUAN_VIDEO, out, ("model.name", "hunyuan"))
    with pytest.raises(ConfigError, match=r"frames 12 is not 4k \+ 1"):
        _cfg(HUNYUAN_VIDEO, out, ("model.frames", "12"))
    with pytest.raises(ConfigError, match=r"width 200 is not a multiple of 16"):
        _cfg(WAN, out, ("model.width", "200"))
    with pytest.raises(ConfigError, match=r"size / layers / heads apply to kind 'random' only"):
        load_run_config([], [("model.size", "small")])
    with pytest.raises(ConfigError, match=r"ModelConfig.size must be one of"):
        _cfg(HUNYUAN_VIDEO, out, ("model.size", "tiny"))
    # 2 heads (the small stand-in) on Ulysses 4
    with pytest.raises(ParallelConfigError, match=r"2 attention heads are not divisible by ulysses=4"):
        run_generation(_cfg(HUNYUAN_VIDEO, out, ("cluster.nproc", "4"), ("cluster.ulysses", "4")))
    with pytest.raises(ParallelConfigError, match=r"6 attention heads are not divisible by ulysses=4"):
        run_generation(_cfg(WAN, out, ("model.heads", "6"), ("cluster.nproc", "4"), ("cluster.ulysses", "4")))
    with pytest.raises(WorldSizeError, match=r"asks for 2 processes.*1 were launched"):
        run_generation(_cfg(WAN, out, ("cluster.nproc", "2"), ("cluster.ring", "2")))
    assert not out.exists() or os.listdir(out) == []
    spec = importlib.util.spec_from_file_location("generate_main", ROOT / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--config", str(HUNYUAN_VIDEO), "--model.name", "hunyuan-video"]) == 2
    assert "known: hunyuanvideo, wan2.1-t2v-14b" in capsys.readouterr().err
