"""The training command's inputs and its saved set: every bad option, --out or --resume checkpoint is
one line before any work; an interrupted or diverging run keeps the last complete save."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_compact.models.train as tr
from dist_compact.models.embedded import WeightsError, load_embedded, sha256_of
from dist_compact.models.train import Interrupted, TrainingFailed, checkpoint_path, main

TINY = ["--device", "cpu", "--dim", "32", "--heads", "2", "--depth", "1", "--frames", "2", "--height", "16",
        "--width", "16", "--batch-size", "1", "--val-batch", "1", "--no-preview", "--minutes", "1",
        "--save-margin", "0", "--max-steps", "2"]


def _set(out: Path) -> dict:
    """name -> bytes of every file beside ``out`` (the saved set and any leftover)."""
    return {p.name: p.read_bytes() for p in sorted(out.parent.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished tiny run: its folder and its saved set."""
    d = tmp_path_factory.mktemp("good")
    out = d / "w.safetensors"
    assert main([*TINY, "--out", str(out)]) == 0
    return out, _set(out)


def _copy(good_run, tmp_path) -> Path:
    out, files = good_run
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path / out.name


def _refused(argv, match, capsys=None):
    with pytest.raises(SystemExit, match=match) as e:
        main(argv)
    assert type(e.value) is SystemExit and isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


# files that are not regular ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["", ".sha256", "ckpt", "json"])
def test_out_or_a_sidecar_that_is_a_fifo_is_refused(tmp_path, which):
    out = tmp_path / "w.safetensors"
    target = {"": out, ".sha256": tmp_path / "w.safetensors.sha256", "ckpt": checkpoint_path(out),
              "json": tmp_path / "w.train.json"}[which]
    os.mkfifo(target)
    reader = os.open(target, os.O_RDONLY | os.O_NONBLOCK)  # a writer to the pipe never blocks the test
    try:
        _refused([*TINY, "--out", str(out)], r"^--out .*: .* exists and is not a regular file \(a device, a pipe or "
                                             r"a socket\), which a run never replaces; give another --out$")
    finally:
        os.close(reader)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.is_fifo()


# the saved set under interrupts -----------------------------------------------------------------------------
def _resumes(out: Path, steps: int = 3) -> None:
    assert main([*TINY, "--max-steps", str(steps), "--resume", str(checkpoint_path(out)), "--out", str(out)]) == 0
    assert load_embedded(out) is not None


def test_interrupt_while_writing_the_set_keeps_the_previous_one(good_run, tmp_path, monkeypatch, capsys):
    out = _copy(good_run, tmp_path)
    before = _set(out)
    real_save = torch.save

    def interrupted_save(obj, f, *a, **k):  # half a checkpoint written, then Ctrl-C
        Path(f).write_bytes(b"PK\x03\x04 half")
        signal.raise_signal(signal.SIGINT)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(Interrupted, match=r"^train: interrupted \(SIGINT\); .* keeps its last complete save "
                                          r"\(continue with --resume .*w\.ckpt\.pt\)$"):
        main([*TINY, "--max-steps", "4", "--save-every", "1e-9", "--resume", str(checkpoint_path(out)),
              "--out", str(out)])
    monkeypatch.setattr(torch, "save", real_save)
    assert _set(out) == before  # the same set, no temporaries left
    _resumes(out)


def test_signal_while_renaming_the_set_waits_for_the_whole_set(good_run, tmp_path, monkeypatch):
    out = _copy(good_run, tmp_path)
    real_replace = os.replace
    calls = []

    def replace(a, b):
        calls.append(Path(b).name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)  # held until the set is complete
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted, match=r"^train: interrupted \(SIGTERM\)"):
        main([*TINY, "--max-steps", "4", "--save-every", "1e-9", "--resume", str(checkpoint_path(out)),
              "--out", str(out)])
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[:4] == ["w.ckpt.pt", "w.safetensors", "w.safetensors.sha256", "w.train.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    state = torch.load(checkpoint_path(out), weights_only=True)
    assert state["step"] == 3 and state["sha256"] == sha256_of(out)
    _resumes(out, 4)


def _save_cut_at(name: str, out: Path, monkeypatch) -> None:
    """Resume ``out`` for one step whose save ends (as if the process died) at the rename onto ``name``."""
    real_replace = os.replace

    def replace(a, b):
        if Path(b).name == name:
            raise KeyboardInterrupt  # as if the process ended here
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted):
        main([*TINY, "--max-steps", "3", "--resume", str(checkpoint_path(out)), "--out", str(out)])
    monkeypatch.setattr(os, "replace", real_replace)


def test_a_save_cut_between_its_renames_still_resumes(good_run, tmp_path, monkeypatch):
    """The checkpoint was renamed, the weights not (the process died): resume takes the weights'
    temporary that the checkpoint names by its sha256."""
    out = _copy(good_run, tmp_path)
    _save_cut_at("w.safetensors", out, monkeypatch)
    assert torch.load(checkpoint_path(out), weights_only=True)["sha256"] != sha256_of(out)
    _resumes(out, 4)
    assert torch.load(checkpoint_path(out), weights_only=True)["sha256"] == sha256_of(out)


def test_weights_renamed_without_their_checksum_say_how_to_finish(good_run, tmp_path, monkeypatch):
    """Killed between the weights' rename and their checksum's: loading names the pending checksum and the
    one command that finishes the save; resuming works as well."""
    out = _copy(good_run, tmp_path)
    _save_cut_at("w.safetensors.sha256", out, monkeypatch)
    pending = tmp_path / ".w.safetensors.sha256.tmp"
    with pytest.raises(WeightsError, match=r"^checksum mismatch for .*w\.safetensors: a training save stopped between "
                                           r"renaming the weights and their checksum, which is still "
                                           r"\.w\.safetensors\.sha256\.tmp; finish it: mv .*\.w\.safetensors\.sha256\.tmp "
                                           r".*w\.safetensors\.sha256 \(or continue the training with --resume\)$"):
        load_embedded(out)
    os.replace(pending, tmp_path / "w.safetensors.sha256")
    assert load_embedded(out) is not None and torch.load(checkpoint_path(out), weights_only=True)["step"] == 3
    _resumes(out, 4)


# bad options and numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,match", [
    (["--save-margin", "nan"], r"^--save-margin must be a finite number >= 0, got nan$"),
    (["--save-margin", "-1"], r"^--save-margin must be a finite number >= 0"),
    (["--save-margin", "inf"], r"^--save-margin must be a finite number >= 0, got inf$"),
    (["--save-margin", "1e9"], r"^--save-margin 1e\+09 s must be less than the --minutes budget"),
    (["--warmup", "-1"], r"^--warmup -1 must be >= 0"),
    (["--weight-decay", "-0.1"], r"^--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], r"^--weight-decay must be a finite number"),
    (["--lr", "1e300"], r"^--lr must be a finite number > 0 and <= 1, got 1e\+300$"),
    (["--seed", "99999999999999999999"], r"^--seed 99999999999999999999 must be an integer in \[0, "),
    (["--time-shift", "inf"], r"^--time-shift must be a finite number > 0"),
    (["--height", "8"], r"^--height 8 must be in \[16, "),
    (["--width", "12"], r"^--width 12 must be in \[16, "),
    (["--frames", "100000", "--height", "100000", "--width", "100000"], r"^--frames 100000 must be in \[1, "),
    (["--frames", "1000", "--height", "4000", "--width", "4000"], r"^--frames 1000 --height 4000 --width 4000: a clip "
                                                                  r"of .* is too large"),
    (["--batch-size", "4000", "--frames", "64", "--height", "128", "--width", "128"], r"one batch of clips takes "),
    (["--device", "banana"], r"^--device banana is not a device to train on; give auto, cpu, cuda or cuda:N$"),
    (["--device", "meta"], r"^--device meta is not a device to train on"),
    (["--device", "cuda:99"], r"^--device cuda:99: "),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_numbers_sizes_and_devices_are_one_line(tmp_path, extra, match):
    _refused([*TINY, *extra, "--out", str(tmp_path / "w.safetensors")], match)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused([*TINY, "--device", "cuda", "--out", str(tmp_path / "w.safetensors")],
             r"^--device cuda: CUDA is not available on this machine; give --device cpu \(or auto\)$")
    assert list(tmp_path.iterdir()) == []


# diverging runs ---------------------------------------------------------------------------------------------
def test_a_diverging_run_fails_and_keeps_the_good_weights(good_run, tmp_path, monkeypatch):
    out = _copy(good_run, tmp_path)
    before = _set(out)
    real = tr.flow_matching_loss

    def nan_when_training(*a, **k):
        loss = real(*a, **k)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(tr, "flow_matching_loss", nan_when_training)
    with pytest.raises(TrainingFailed, match=r"^train: the .* is nan at step 2: training diverged .* keeps its last "
                                             r"complete save$"):
        main([*TINY, "--out", str(out)])
    assert _set(out) == before


# names of --out ---------------------------------------------------------------------------------------------
def test_out_names_too_long_or_with_control_characters(tmp_path):
    long = tmp_path / ("w" * 240 + ".safetensors")
    _refused([*TINY, "--out", str(long)], r"^--out .*: the file name is too long: the run also writes .* \(264 bytes, at most "
                                          r"255\); give a name of at most \d+ bytes$")
    folder = tmp_path / ("d" * 300) / "w.safetensors"
    _refused([*TINY, "--out", str(folder)], r"^--out .*: a name in the path is longer than 255 bytes; choose a "
                                            r"shorter name$")
    for bad in ("w\n.safetensors", "w\x1b[2J.safetensors", "w\t.safetensors"):
        _refused([*TINY, "--out", str(tmp_path / bad)], r"^--out .*: the name holds control characters")
    assert list(tmp_path.iterdir()) == []


# malformed checkpoints --------------------------------------------------------------------------------------
def _bad_weights_shape(s):
    k = next(iter(s["model"]))
    s["model"][k] = torch.zeros(3, 3)


def _nan_weights(s):
    next(iter(s["model"].values())).fill_(float("nan"))


@pytest.mark.parametrize("field,change", [
    ("weights", lambda s: s.update(weights=5)),
    ("sha256", lambda s: s.update(sha256=None)),
    ("step", lambda s: s.update(step="abc")),
    ("step", lambda s: s.update(step=-100)),
    ("model", _bad_weights_shape),
    ("model holds non-finite values", _nan_weights),
    ("opt", lambda s: s["opt"].update(param_groups=[])),
    ("log", lambda s: s.update(log={})),
], ids=["weights-5", "sha256-none", "step-abc", "step-negative", "model-shape", "model-nan", "opt-no-groups",
        "log-empty"])
def test_malformed_checkpoints_are_one_line_naming_the_field(good_run, tmp_path, field, change):
    out = _copy(good_run, tmp_path)
    state = torch.load(checkpoint_path(out), weights_only=True)
    change(state)
    torch.save(state, checkpoint_path(out))
    before = _set(out)
    _refused([*TINY, "--resume", str(checkpoint_path(out)), "--out", str(out)],
             rf"^--resume .*w\.ckpt\.pt: its field {field} ")
    assert _set(out) == before


def test_resume_of_a_directory_says_so(tmp_path):
    _refused([*TINY, "--resume", str(tmp_path), "--out", str(tmp_path / "w.safetensors")],
             r"^--resume .* is a directory, not a checkpoint; give the \*\.ckpt\.pt file")


# resume -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value,have", [("--frames", "4", "2"), ("--dim", "64", "32"), ("--heads", "1", "2")])
def test_resume_refuses_model_options_that_differ(good_run, tmp_path, option, value, have):
    out = _copy(good_run, tmp_path)
    before = _set(out)
    i = TINY.index(option)
    argv = TINY[:i] + [option, value] + TINY[i + 2:]
    if option == "--dim":
        argv[argv.index("--heads") + 1] = "1"  # a buildable model, still not the checkpoint's
    _refused([*argv, "--resume", str(checkpoint_path(out)), "--out", str(out)],
             rf"^{option} {value} differs from the --resume model's \({have}, .*\); drop the option or give "
             rf"{option} {have}$")
    assert _set(out) == before


# the process: one line on stderr, exit status 2 -----------------------------------------------------------
def test_bad_option_as_a_process_exits_2_with_one_line(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    res = subprocess.run([sys.executable, "-m", "dist_compact.models.train", *TINY, "--out", str(fifo)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "", res
    assert len(res.stderr.splitlines()) == 1 and "not a regular file" in res.stderr
    assert fifo.is_fifo()


def test_resume_at_max_steps_trains_nothing_and_leaves_the_set(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    before = _set(out)
    for steps in ("2", "1"):  # the finished run's --max-steps, and one below it
        assert main([*TINY, "--max-steps", steps, "--resume", str(checkpoint_path(out)), "--out", str(out)]) == 0
        assert _set(out) == before
        assert "nothing to train" in capsys.readouterr().out
