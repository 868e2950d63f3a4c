"""How the commands fail: one line, once. Ctrl-C is one line and exit 130; under torchrun an error every
rank meets is printed by rank 0 alone (outside torchrun by every process, since a stale RANK may have no rank
0); generate's main() leaves no signal handler behind; argparse
errors are one line; the search and capture commands name the option and the fix."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: asserted word for word below (docs/errors.md shows it)
CTRL_C_LINE = "generate.py: interrupted (Ctrl-C); nothing was written to run.output_dir"


def _run_args(weights, out, *extra):
    return ["--model-path", str(weights), "--model.frames", "4", "--model.height", "16", "--model.width", "16",
            "--run.progress", "false", "--run.video", "false", "--sparsity.mode", "dense", "--output-dir", str(out),
            *extra]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(small_weights, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *_run_args(small_weights, out, "--steps", "2000")],
                            cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that started pytest in the background hands on SIGINT ignored: undo that,
                            # as a terminal's Ctrl-C reaches a foreground command
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and any(p.name.startswith(".tmp-") for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err == CTRL_C_LINE + "\n"
    assert os.listdir(out) == []


def test_main_leaves_no_signal_handler_behind(small_weights, tmp_path, capsys):
    from dist_compact.cli.generate import main

    def mine(*_):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    sigint = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN under a background shell
    try:
        assert main(_run_args(small_weights, tmp_path / "a", "--steps", "1", "--name", "x")) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert main(_run_args(small_weights, tmp_path / "a", "--steps", "1", "--name", "x")) == 1  # exists
        assert signal.getsignal(signal.SIGTERM) is mine
        assert main(["--steps", "0"]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "already exists" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_error_every_rank_meets_is_printed_once_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "generate.py"), "--config", str(ROOT / "configs/cluster/cpu-demo.yaml"), "--run.steps", "0"]
    res = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=240)
    ours = [ln for ln in res.stderr.splitlines() if "generate.py:" in ln and "FAILED" not in ln]
    assert res.returncode != 0 and ours == [  # the source that set the key, not every file of the section
        "generate.py: config error: command line: [run] RunOptions.steps must be an int in [1, 10000] (50 is "
        "typical), got 0"], res.stderr[-3000:]


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_stale_rank_outside_torchrun_still_prints_its_error(monkeypatch, capsys, torchrun):
    """RANK=1 left in a shell: one process, no rank 0 to print; under torchrun rank 0 prints instead."""
    from dist_compact.cli.generate import main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert main(["--seed", "-1", "--print-config"]) == 2
    err = capsys.readouterr().err
    if torchrun:
        assert err == ""
    else:
        assert err.splitlines() == ["generate.py: config error: command line: [run] RunOptions.seed must be an int "
                                    "in [0, 2**63 - 1] (a generator seed), got -1"]


# ---------------------------------------------------------------------------------------------- commands
def _search(*argv, capsys):
    from dist_compact.cli.search import main

    with pytest.raises(SystemExit) as e:
        rc = main(list(argv))
        raise SystemExit(rc)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def mass_file(tmp_path_factory):
    from dist_compact.layout import VideoLayout
    from dist_compact.search.capture import MassStore

    store = MassStore.for_layout(VideoLayout(2, 8, 8, tile=(1, 4, 4), text_tokens=4), 1, 2, model="tiny")
    path = tmp_path_factory.mktemp("mass") / "mass.pt"
    store.save(str(path))
    return path


def test_search_refuses_a_missing_out_folder_before_searching(tmp_path, mass_file, capsys, monkeypatch):
    import dist_compact.cli.search as cli

    monkeypatch.setattr(cli, "_load_stores", lambda paths: pytest.fail("searched before checking --out"))
    out = tmp_path / "missing" / "c.yaml"
    code, err = _search("search", str(mass_file), "--out", str(out), "--device", "cpu", capsys=capsys)
    assert code == 2 and err == (f"error: --out {out}: its folder {out.parent} does not exist; create it or choose "
                                 "another path\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_search_device_cuda_without_a_gpu(tmp_path, mass_file, capsys):
    code, err = _search("search", str(mass_file), "--out", str(tmp_path / "c.yaml"), "--device", "cuda", capsys=capsys)
    assert code == 2 and err == "error: --device cuda: this machine has no CUDA device; use --device cpu (or auto)\n"


def test_capture_steps_that_are_not_numbers_name_the_option(tmp_path, capsys):
    code, err = _search("capture", "--out-dir", str(tmp_path), "--prompt", "a cat", "--capture-steps", "a,b",
                        capsys=capsys)
    assert code == 2 and err == ("dist-compact-search capture: error: argument --capture-steps: 'a,b' is "
                                 "not a list of step numbers; use e.g. 4,8,12 (see --help)\n")


def test_argparse_errors_are_one_line(capsys):
    from dist_compact.cli.generate import main
    from dist_compact.models.train import main as train_main

    with pytest.raises(SystemExit) as e:
        main(["--steps"])
    assert e.value.code == 2 and capsys.readouterr().err == ("generate.py: error: argument --steps: expected one "
                                                             "argument (see --help)\n")
    with pytest.raises(SystemExit) as e:
        train_main(["--heads", "five"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "python -m dist_compact.models.train: error: argument --heads: invalid int value: 'five' (see --help)\n")
    res = subprocess.run([sys.executable, "-m", "launchers", "--config"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == ("python -m launchers: error: argument --config: expected one "
                                                  "argument (see --help)\n")
