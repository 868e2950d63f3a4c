"""The training script: a short CPU run learns and saves; it honours its wall-time budget with the
default model and batch on the CPU (the training budget test); a resumed run equals an uninterrupted one."""

import json

import pytest
import torch

from dist_compact.models.embedded import load_embedded
from dist_compact.models.train import checkpoint_path, main, sample_times

TINY = ["--batch-size", "4", "--dim", "64", "--depth", "2", "--heads", "2", "--frames", "4", "--height", "16",
        "--width", "16", "--device", "cpu"]


def test_short_training_run_learns_and_saves(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    rc = main(["--minutes", "2", "--max-steps", "40", *TINY, "--lr", "3e-3", "--warmup", "5", "--ema", "0.9",
               "--log-every", "10", "--val-every", "20", "--val-batch", "8", "--direction-probe", "--out", str(out)])
    assert rc == 0
    log = json.loads((tmp_path / "tiny.train.json").read_text())
    val = [v["loss"] for v in log["val"]]
    # the direction probe at every validation (asked for: on a CPU it is off by default)
    assert all(0 <= v["direction_pct"] <= v["axis_pct"] <= 100 for v in log["val"]), log["val"]
    assert len(val) >= 3 and val[-1] < 0.8 * val[0], val
    assert log["train"][-1]["step"] == 40 and log["val"][0]["step"] == 0
    model = load_embedded(out)  # checksum verified
    assert (model.config.dim, model.config.frames, model.config.height) == (64, 4, 16)
    assert (tmp_path / "tiny.preview.png").read_bytes()[:4] == b"\x89PNG"
    assert checkpoint_path(out).is_file()
    text = capsys.readouterr().out
    assert "final save" in text and "% right way, " in text


class WorkClock:
    """A clock that moves only when the model works: ``per_sample`` seconds per clip of a forward, and
    12 times that with gradients (a training step: forward + backward, what a CPU was seen to take).
    The budget logic then sees the same costs on any machine, however loaded, and the test checks it
    against this clock, not the wall."""

    def __init__(self, per_sample: float):
        self.now, self.per_sample = 1000.0, per_sample

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch):
        from dist_compact.models.embedded import EmbeddedDiT

        for name in ("forward", "forward_plain"):
            real = getattr(EmbeddedDiT, name)

            def timed(model, x, *a, _real=real, **k):
                self.now += self.per_sample * x.shape[0] * (12 if torch.is_grad_enabled() else 1)
                return _real(model, x, *a, **k)

            monkeypatch.setattr(EmbeddedDiT, name, timed)


@pytest.mark.parametrize("extra,per_sample,preview", [([], 0.5, False), ([*TINY, "--max-steps", "1"], 0.25, True)],
                         ids=["defaults", "tiny-preview-fits"])
def test_the_training_budget_test(tmp_path, capsys, monkeypatch, extra, per_sample, preview):
    """The default model width / depth and the CPU-sized default batch (4 frames to keep the test short):
    the whole command, preview included, ends within --minutes of its clock and still trains and saves.
    After one step of a tiny model the preview fits, shortened to the time left (the default is 20 steps)."""
    clock = WorkClock(per_sample)
    clock.install(monkeypatch)
    out = tmp_path / "b.safetensors"
    start, budget = clock.now, 36.0
    assert main(["--minutes", "0.6", "--device", "cpu", "--frames", "4", *extra, "--out", str(out)], clock=clock) == 0
    text = capsys.readouterr().out
    assert clock.now - start <= budget, (clock.now - start, text)
    assert "batch 4;" in text  # the CPU default, not the GPU's 32 (TINY gives 4 too)
    assert "done: 1 steps" in text, text
    load_embedded(out)
    if preview:
        n = int(text.split("preview of 4 prompts, ")[1].split(" steps")[0])
        assert 4 <= n < 20 and clock.now - start > budget - 5, text  # it used the time there was
    else:
        assert "preview skipped" in text, text


def test_a_budget_without_room_for_one_step_writes_nothing(tmp_path, monkeypatch):
    clock = WorkClock(1.0)  # a step is 48 s of a 36 s budget
    clock.install(monkeypatch)
    out = tmp_path / "b.safetensors"
    with pytest.raises(SystemExit, match=r"^--minutes 0.6 leaves no time for one training step .* give a larger "
                                         r"--minutes$"):
        main(["--minutes", "0.6", "--device", "cpu", "--frames", "4", "--out", str(out)], clock=clock)
    assert list(tmp_path.iterdir()) == []


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
    assert "direction_pct" not in log["val"][-1]  # the probe is off on a CPU unless asked for
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


def test_shipped_weights_are_replaced_only_explicitly(tmp_path, monkeypatch):
    """The default --out is under outputs/, never the package; naming the shipped file needs --replace-shipped."""
    import dist_compact.models.train as tr
    from dist_compact.models.embedded import DEFAULT_WEIGHTS

    assert tr.build_parser().parse_args([]).out == str(tr.DEFAULT_OUT)
    assert not tr.DEFAULT_OUT.is_absolute() and tr.DEFAULT_OUT.parts[0] == "outputs"
    before = DEFAULT_WEIGHTS.with_name(DEFAULT_WEIGHTS.name + ".sha256").read_text()
    ran = []
    monkeypatch.setattr(tr, "train", lambda args, **kw: ran.append(args.out))
    for out in (DEFAULT_WEIGHTS, DEFAULT_WEIGHTS.parent / "other.safetensors"):
        with pytest.raises(SystemExit, match=r"inside the installed package .* pass --replace-shipped"):
            main(["--out", str(out)])
    assert ran == []
    assert main(["--out", str(DEFAULT_WEIGHTS), "--replace-shipped"]) == 0 and ran == [str(DEFAULT_WEIGHTS)]
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0 and ran[-1] == str(tr.DEFAULT_OUT)
    assert DEFAULT_WEIGHTS.with_name(DEFAULT_WEIGHTS.name + ".sha256").read_text() == before


@pytest.mark.parametrize("case", ["resume-text", "resume-dict", "heads-5", "out-dir", "init-text", "minutes-nan"])
def test_bad_training_options_are_one_line_before_any_work(tmp_path, case):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    plain = tmp_path / "plain.pt"
    torch.save({"step": 3}, plain)
    argv, want = {
        "resume-text": (["--resume", str(text)], rf"^--resume {text}: not a training checkpoint \(.*\); give the "
                                                  r"\*\.ckpt\.pt written beside the weights$"),
        "resume-dict": (["--resume", str(plain)], r"^--resume .*: not a training checkpoint \(it lacks weights, "
                                                  r"sha256, log, model, opt\)"),
        "heads-5": (["--heads", "5"], r"^--heads 5 with --dim 192: the head size dim / heads must be 16, 32, 64 or 128 "
                                      r"\(the kernels' sizes\); use --heads 3 or 6 or 12$"),
        "out-dir": (["--out", str(tmp_path)], rf"^--out {tmp_path} is a directory; give a file name, e.g. "),
        "init-text": (["--init", str(text)], rf"^--init {text}: checksum file missing"),
        "minutes-nan": (["--minutes", "nan"], r"^--minutes must be a finite number > 0, got nan$"),
    }[case]
    with pytest.raises(SystemExit, match=want) as e:
        main([*argv, *([] if case == "out-dir" else ["--out", str(tmp_path / "w.safetensors")]), "--device", "cpu"])
    assert "\n" not in str(e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "plain.pt"]  # nothing written


def test_bad_training_option_as_a_process_prints_one_line(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    out = subprocess.run([sys.executable, "-m", "dist_compact.models.train", "--heads", "5"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.startswith("--heads 5 with --dim 192")
    assert len(out.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def _fake_compile(monkeypatch, first_call):
    """torch.compile as train.py sees it: a wrapper that runs ``first_call()`` at its first call."""
    import dist_compact.models.train as tr

    def compile_(fn, **_):
        calls = []

        def wrapped(*a, **k):
            if not calls:
                calls.append(1)
                first_call()
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tr.torch, "compile", compile_)


def test_compile_time_counts_in_the_budget(tmp_path, monkeypatch):
    clock = WorkClock(0.01)
    clock.install(monkeypatch)

    def slow_compile():
        clock.now += 40.0  # more than the 36 s budget

    _fake_compile(monkeypatch, slow_compile)
    out = tmp_path / "b.safetensors"
    with pytest.raises(SystemExit, match=r"^--minutes 0.6 leaves no time for one training step after compiling "
                                         r"\(40\.\d s\); give a larger --minutes or leave out --compile$"):
        main([*TINY, "--minutes", "0.6", "--compile", "--out", str(out)], clock=clock)
    assert list(tmp_path.iterdir()) == []


def test_a_compile_that_fails_trains_eager(tmp_path, monkeypatch, capsys):
    def broken():
        raise RuntimeError("no compiler here")

    _fake_compile(monkeypatch, broken)
    out = tmp_path / "b.safetensors"
    assert main([*TINY, "--compile", "--max-steps", "2", "--no-preview", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compiled model failed (RuntimeError: 'no compiler here'); training eager" in text
    assert "done: 2 steps" in text
    load_embedded(out)
