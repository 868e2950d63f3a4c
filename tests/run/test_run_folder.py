"""The run folder: claimed atomically at the start (two identical runs in the same second get two
folders), finished outputs never discarded, what killed runs left removed at the next start, the output
folder checked before any compute, and a failed write one line naming the file and the reason (a tiny
file system where this machine lets a process mount one, else an injected failing writer)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import child_env

from dist_compact.run import report as rpt
from dist_compact.run.report import OutputError, RunFolder

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXED = 1_900_000_000.0  # one second for every run of a test
#: asserted word for word below (docs/errors.md shows it)
FULL_DISK_LINE = ("generate.py: error: cannot write {final}/{file}: No space left on device; free space there or choose "
                  "another run.output_dir (the unfinished run folder was removed)")






def _generate(small_weights, out, *extra):
    return [sys.executable, str(ROOT / "generate.py"), "--model-path", str(small_weights), "--model.frames", "4",
            "--model.height", "16", "--model.width", "16", "--steps", "2", "--run.progress", "false",
            "--run.video", "false", "--sparsity.mode", "dense", "--output-dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------- claims
def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    a = RunFolder(str(tmp_path), prompt="a cat", seed=1, clock=lambda: FIXED)
    b = RunFolder(str(tmp_path), prompt="a cat", seed=1, clock=lambda: FIXED)
    assert b.name == a.name + "-2" and os.path.isdir(a.final) and os.listdir(a.final) == []  # claimed, empty
    for f in (b, a):  # the later claim finishes first
        pathlib.Path(f.tmp, "report.json").write_text(f.name)
        f.commit()
    for f in (a, b):
        assert pathlib.Path(f.final, "report.json").read_text() == f.name
    assert sorted(os.listdir(tmp_path)) == [a.name, b.name]


def test_finished_outputs_are_kept_when_the_claim_was_written_into(tmp_path):
    f = RunFolder(str(tmp_path), "run")
    pathlib.Path(f.tmp, "latents.pt").write_bytes(b"mine")
    pathlib.Path(f.final, "stranger.txt").write_text("someone wrote here")
    assert f.commit() == str(tmp_path / "run-2")
    assert (tmp_path / "run-2" / "latents.pt").read_bytes() == b"mine"
    assert (tmp_path / "run" / "stranger.txt").exists()


def test_a_given_name_that_exists_is_refused_and_a_failed_run_leaves_nothing(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists; choose another --name"):
        RunFolder(str(tmp_path), "taken")
    f = RunFolder(str(tmp_path), "fresh")
    f.discard()
    assert os.listdir(tmp_path) == ["taken"]


@pytest.mark.parametrize("where", ["rmtree", "unclaim"])
def test_an_interrupt_during_the_removal_does_not_leave_a_half_removed_run(tmp_path, monkeypatch, where):
    """The launcher's SIGTERM (SystemExit here) landing while a failed run is removed: the removal
    finishes, then the interrupt goes on."""
    f = RunFolder(str(tmp_path), "failed")
    (pathlib.Path(f.tmp) / "logs").mkdir()
    pathlib.Path(f.tmp, "logs", "rank0.log").write_text("x")
    real_rmtree, real_rmdir = shutil.rmtree, os.rmdir
    hits = []

    def rmtree(path, *a, **k):
        if where == "rmtree" and not hits:  # cut short after removing a part, as a signal would
            real_rmtree(os.path.join(path, "logs"))
            hits.append(path)
            raise SystemExit(143)
        return real_rmtree(path, *a, **k)

    def rmdir(path, *a, **k):
        if where == "unclaim" and not hits:
            hits.append(path)
            raise SystemExit(143)
        return real_rmdir(path, *a, **k)

    monkeypatch.setattr(rpt.shutil, "rmtree", rmtree)
    monkeypatch.setattr(rpt.os, "rmdir", rmdir)
    with pytest.raises(SystemExit) as e:
        f.discard()
    assert e.value.code == 143 and hits
    assert os.listdir(tmp_path) == []


def test_an_interrupt_while_a_failed_run_closes_its_log_still_leaves_nothing(tmp_path, monkeypatch):
    """run_folder's way out of a failed body: the launcher's SIGTERM landing while the log is closed
    does not skip the removal."""
    import dataclasses
    import logging

    from dist_compact.run import runner
    from dist_compact.run.config import RunConfig

    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path), name="failed"))
    real_close = logging.FileHandler.close
    closes = []

    def close(self):
        real_close(self)
        if not closes:
            closes.append(self.baseFilename)
            raise SystemExit(143)

    monkeypatch.setattr(runner._RankLog, "close", close)
    with pytest.raises(SystemExit):
        with runner.run_folder(cfg, 0):
            raise RuntimeError("a peer's collective failed")
    assert closes and os.listdir(tmp_path) == []


def test_what_killed_runs_left_is_removed_at_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)  # a pid that has ended (reused by then is possible but would only keep the folder)
    host = rpt._host()
    stale = tmp_path / f".tmp-old-run-{host}-{pid}"
    (stale / "logs").mkdir(parents=True)
    (tmp_path / "old-run").mkdir()  # its empty claim
    live = tmp_path / f".tmp-running-{host}-{os.getpid()}"
    live.mkdir()
    other_host = tmp_path / f".tmp-elsewhere-otherhost-{pid}"
    other_host.mkdir()
    done = tmp_path / "finished"
    done.mkdir()
    (done / "report.json").write_text("{}")
    RunFolder(str(tmp_path), "new")
    left = set(os.listdir(tmp_path))
    assert stale.name not in left and "old-run" not in left
    assert {live.name, other_host.name, "finished", "new"} <= left


def test_a_live_run_is_known_by_its_lock_not_its_pid(tmp_path):
    """Runs in other containers or PID namespaces with the same host name reuse pids: a run whose pid
    looks gone here but whose lock is held is alive, and its folder stays; once the lock is free it goes."""
    import fcntl

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    other = tmp_path / f".tmp-elsewhere-{rpt._host()}-{int(dead.stdout)}"
    (other / "logs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()  # its claim
    lock = os.open(str(other) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held, as by the live process in the other namespace
    try:
        RunFolder(str(tmp_path), "mine").discard()
        assert sorted(os.listdir(tmp_path)) == sorted([other.name, other.name + ".lock", "elsewhere"])
    finally:
        os.close(lock)  # that run ends: its lock is free
    RunFolder(str(tmp_path), "next").discard()
    assert os.listdir(tmp_path) == []


def test_a_run_holds_its_lock_until_it_ends(tmp_path):
    f = RunFolder(str(tmp_path), "run")
    lock = f.tmp + ".lock"
    assert os.path.exists(lock) and rpt._lock(lock, create=False) is None  # held
    pathlib.Path(f.tmp, "report.json").write_text("{}")
    f.commit()
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(tmp_path / "run") == ["report.json"]


@pytest.mark.slow
def test_two_identical_processes_in_the_same_second(tmp_path):
    """Two processes claim with the same clock second at once, then both finish: two complete folders."""
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from dist_compact.run.report import RunFolder
        f = RunFolder(sys.argv[1], prompt="same", seed=0, clock=lambda: {FIXED})
        pathlib.Path(sys.argv[2], f.name).touch()
        while len(list(pathlib.Path(sys.argv[2]).iterdir())) < 2:  # both have claimed
            time.sleep(0.01)
        pathlib.Path(f.tmp, "report.json").write_text(f.name)
        print(f.commit())
    """)
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(flags)], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    finals = sorted(r[0].strip() for r in results)
    assert finals[1] == finals[0] + "-2"
    for final in finals:
        assert pathlib.Path(final, "report.json").read_text() == os.path.basename(final)
    assert sorted(os.listdir(out)) == [os.path.basename(f) for f in finals]


@pytest.mark.slow
def test_two_identical_generate_runs_at_once_keep_both(small_weights, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_generate(small_weights, out), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    folders = sorted(os.listdir(out))
    assert len(folders) == 2 and not any(f.startswith(".tmp-") for f in folders)
    for f in folders:
        assert json.loads((out / f / "report.json").read_text())["steps"] == 2 and (out / f / "latents.pt").exists()


# ---------------------------------------------------------------------------------------------- checks
def test_output_dir_checked_before_any_compute(tmp_path, small_weights, monkeypatch):
    from dist_compact.run.loader import load_run_config
    from dist_compact.run.generation import run_generation
    import dist_compact.models.embedded as emb

    loads = []
    monkeypatch.setattr(emb, "load_embedded", lambda *a, **k: loads.append(1))  # never reached
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = [("model.path", str(small_weights)), ("run.video", "false")]
    with pytest.raises(OutputError, match=rf"^run.output_dir {a_file} is not a folder; choose a folder"):
        run_generation(load_run_config([], base + [("run.output_dir", str(a_file))]))
    with pytest.raises(OutputError, match=rf"^run.output_dir {a_file / 'sub'}: cannot create it \(Not a directory\)"):
        run_generation(load_run_config([], base + [("run.output_dir", str(a_file / "sub"))]))
    assert loads == []
    # a run that fails before its folder is claimed leaves nothing, not even the output folder's parents
    from dist_compact.models.embedded import WeightsError

    def refuse(*a, **k):
        raise WeightsError("refused")

    monkeypatch.setattr(emb, "load_embedded", refuse)
    with pytest.raises(WeightsError):
        run_generation(load_run_config([], base + [("run.output_dir", str(tmp_path / "new" / "runs"))]))
    assert not (tmp_path / "new").exists()
    with pytest.raises(OutputError, match=r"cannot create it \(File name too long\)"):
        rpt.check_output_dir(str(tmp_path / ("x" * 300) / "runs"))
    # the config takes names of up to 200 bytes; the folder check also counts this host's suffix
    with pytest.raises(OutputError, match=r"^run.name has 240 bytes; a folder name takes at most \d+ here"):
        rpt.check_output_dir(str(tmp_path / "o"), "n" * 240)


def _mount_works(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$0"', str(tmp_path)],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("fs,want", [
    ("size=4k", re.escape(FULL_DISK_LINE.format(final="{final}", file="latents.pt")[len("generate.py: error: "):])),
    ("ro", r"run.output_dir {out} is not writable \(read-only file system\); choose a writable place"),
], ids=["full", "read-only"])
def test_write_failure_on_a_tiny_file_system_is_one_line(small_weights, tmp_path, fs, want):
    """generate.py in a private mount namespace, its output folder a tmpfs of one page (or read-only):
    one line naming the file and the reason, nothing left behind, no retry."""
    out = tmp_path / "out"
    out.mkdir()
    if not _mount_works(tmp_path / "out"):
        pytest.skip("no private mount namespace here; test_write_failure_injected covers the same path")
    wrapper = 'mount -t tmpfs -o "$1" tmpfs "$0" || exit 97; shift; "$@"; rc=$?; echo "left: $(ls -A "$0")"; exit $rc'
    cmd = ["unshare", "-rm", "sh", "-c", wrapper, str(out), fs, *_generate(small_weights, out, "--name", "r")]
    res = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    pattern = "^generate.py: error: " + want.replace(re.escape("{final}"), "{final}").format(
        final=re.escape(str(out / "r")), out=re.escape(str(out))) + "$"
    assert len(res.stderr.splitlines()) == 1 and re.match(pattern, res.stderr.strip()), res.stderr
    assert res.stdout.strip().splitlines()[-1] == "left:"  # no claim, no temporary folder


def test_write_failure_injected(small_weights, tmp_path, monkeypatch, capsys):
    """The same path without a mount: the PNG writer fails as a full disk does."""
    import dist_compact.png as png
    from dist_compact.cli.generate import main

    calls = []

    def full(path, image):
        calls.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(png, "write_png", full)
    out = tmp_path / "out"
    rc = main(_generate(small_weights, out, "--name", "r")[2:])
    err = capsys.readouterr().err
    assert rc == 1 and err == FULL_DISK_LINE.format(final=out / "r", file="frames.png") + "\n"
    assert len(calls) == 1 and os.listdir(out) == []  # one attempt, nothing left
