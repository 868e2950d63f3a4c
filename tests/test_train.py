"""The training script: a short CPU run learns and saves; it honours its wall-time budget with the
default model and batch on the CPU (the training budget test); a resumed run equals an uninterrupted one."""

import json
import time

import pytest
import torch

from dist_compact.models.embedded import load_embedded
from dist_compact.models.train import checkpoint_path, main, sample_times

TINY = ["--batch-size", "4", "--dim", "64", "--depth", "2", "--heads", "2", "--frames", "4", "--height", "16",
        "--width", "16", "--device", "cpu"]


def test_short_training_run_learns_and_saves(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    rc = main(["--minutes", "2", "--max-steps", "40", *TINY, "--lr", "3e-3", "--warmup", "5", "--ema", "0.9",
               "--log-every", "10", "--val-every", "20", "--val-batch", "8", "--out", str(out)])
    assert rc == 0
    log = json.loads((tmp_path / "tiny.train.json").read_text())
    val = [v["loss"] for v in log["val"]]
    assert len(val) >= 3 and val[-1] < 0.8 * val[0], val
    assert log["train"][-1]["step"] == 40 and log["val"][0]["step"] == 0
    model = load_embedded(out)  # checksum verified
    assert (model.config.dim, model.config.frames, model.config.height) == (64, 4, 16)
    assert (tmp_path / "tiny.preview.png").read_bytes()[:4] == b"\x89PNG"
    assert checkpoint_path(out).is_file()
    assert "final save" in capsys.readouterr().out


def test_the_training_budget_test(tmp_path, capsys):
    """The default model width / depth and the CPU-sized default batch (4 frames to keep the test short):
    the whole command, preview included, ends within --minutes and still trains and saves."""
    out = tmp_path / "b.safetensors"
    budget = 0.6 * 60
    t0 = time.time()
    assert main(["--minutes", "0.6", "--device", "cpu", "--frames", "4", "--out", str(out)]) == 0
    elapsed = time.time() - t0
    text = capsys.readouterr().out
    assert elapsed <= budget + 1.0, (elapsed, text)
    assert "batch 4;" in text  # the CPU default, not the GPU's 32
    steps = int(text.split("done: ")[1].split(" steps")[0])
    assert steps >= 1, text
    load_embedded(out)
    assert "preview of" in text or "preview skipped" in text


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    args = ["--minutes", "2", "--max-steps", "12", *TINY, "--warmup", "3", "--lr", "2e-3", "--no-preview",
            "--val-batch", "2"]
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    assert main([*args, "--out", str(whole)]) == 0
    assert main([*args, "--stop-after", "7", "--out", str(part)]) == 0
    first = load_embedded(part)
    assert main([*args, "--resume", str(checkpoint_path(part)), "--out", str(part)]) == 0
    a, b = load_embedded(whole).state_dict(), load_embedded(part).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first.state_dict()[k], b[k]) for k in a)  # the resumed run did train
    log = json.loads((tmp_path / "part.train.json").read_text())
    assert log["resumed"][0]["step"] == 7 and log["val"][-1]["step"] == 12
    # a bf16 checkpoint saved every step (as on the GPU) leaves the live optimizer state alone and resumes
    half = tmp_path / "half.safetensors"
    assert main([*args, "--stop-after", "3", "--ckpt-dtype", "bf16", "--save-every", "1e-6", "--out", str(half)]) == 0
    state = torch.load(checkpoint_path(half), weights_only=True)
    assert state["step"] == 3 and all(v.dtype == torch.bfloat16 for v in state["model"].values())
    assert main([*args, "--resume", str(checkpoint_path(half)), "--out", str(half)]) == 0
    assert json.loads((tmp_path / "half.train.json").read_text())["val"][-1]["step"] == 12
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main([*args, "--resume", str(tmp_path / "nope.ckpt.pt"), "--out", str(part)])
    with pytest.raises(SystemExit, match="exclude each other"):
        main([*args, "--resume", str(checkpoint_path(part)), "--init", str(whole), "--out", str(part)])


def test_training_times_are_shifted_toward_the_noise():
    g = torch.Generator().manual_seed(0)
    plain = sample_times(20000, 1.0, g, "cpu")
    g = torch.Generator().manual_seed(0)
    shifted = sample_times(20000, 3.0, g, "cpu")
    assert ((shifted > 0) & (shifted < 1)).all()
    assert 0.005 < float((plain > 0.9).float().mean()) < 0.03
    assert 0.1 < float((shifted > 0.9).float().mean()) < 0.2
