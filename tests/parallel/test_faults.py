"""Faults of a launched job, as real processes: a rank stopped (SIGSTOP) or killed (kill -9) in the
middle of a run, a rank that never comes; and the verdict logic of the heartbeats on one store.

What is asserted: the job ends, rank 0 prints ONE line naming the rank, nothing is left in the output
folder. The only duration asserted is "ends within cluster.timeout_s plus a few seconds", with a wide
margin that stays below torchrun's own 30 s shutdown grace (so it still proves the stopped rank was
ended, not waited for).
"""

from __future__ import annotations

import glob
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import child_env

from dist_compact.parallel.watch import RankFailure, RankWatch, join

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: a loaded 2-core CI machine: generous for process start and the verdict, below torchrun's 30 s grace
MARGIN_S = 20.0

#: the lines asserted below, word for word (docs/errors.md shows them; tests/test_error_messages.py checks)
STOPPED_LINE = ("generate.py: error: rank 1 stopped answering (its process on this host is stopped (SIGSTOP)); the "
                "job ends now (collectives wait at most cluster.timeout_s = 3 s); see its log in the run's logs/ or "
                "the launcher's report")
KILLED_LINE = ("generate.py: error: rank 1 stopped answering (its process on this host is gone: killed or crashed); "
               "the job ends now (collectives wait at most cluster.timeout_s = 60 s); see its log in the run's logs/ "
               "or the launcher's report")
MISSING_LINE = ("generate.py: error: rank 1 did not join the job within cluster.timeout_s = 2 s (not started, "
                "stopped, or crashed at start); launch every rank with the same MASTER_ADDR / MASTER_PORT, or raise "
                "cluster.timeout_s")
DOCUMENTED = [STOPPED_LINE, KILLED_LINE, MISSING_LINE]




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _generate_args(small_weights, out, timeout_s, steps=400):
    """A dense run long enough (many steps of a tiny model) that a fault lands in its collectives."""
    return [str(ROOT / "generate.py"), "--config", str(ROOT / "configs/cluster/cpu-demo.yaml"), "--model-path",
            str(small_weights), "--model.frames", "4", "--model.height", "16", "--model.width", "16",
            "--steps", str(steps),
            "--run.progress", "false", "--run.video", "false", "--sparsity.mode", "dense",
            "--cluster.timeout_s", str(timeout_s), "--output-dir", str(out)]


def _rank_pid(parent: int, rank: int, deadline: float) -> int:
    """The pid of the torchrun worker with ``RANK=rank`` (read from its environment)."""
    while time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        for kid in kids:
            try:
                env = pathlib.Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(kid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def _fault_in_run(small_weights, tmp_path, sig, timeout_s):
    """torchrun 2 ranks; once the run folder exists (every rank is in the run), send ``sig`` to rank 1.
    Returns (stderr, seconds from the fault to the job's end, the faulted pid, the output folder)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           *_generate_args(small_weights, out, timeout_s)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pid = None
    try:
        deadline = time.monotonic() + 240
        while not glob.glob(str(out / ".tmp-*" / "logs" / "rank1.log")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        pid = _rank_pid(proc.pid, 1, deadline)
        os.kill(pid, sig)
        t_fault = time.monotonic()
        _, err = proc.communicate(timeout=240)
        return err, time.monotonic() - t_fault, pid, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid is not None and sig == signal.SIGSTOP:
            try:  # never leave a stopped process of ours behind, whatever the test found
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _ours(stderr: str):
    return [ln for ln in stderr.splitlines() if ln.startswith("generate.py")]


@pytest.mark.slow
def test_stopped_rank_ends_the_job_with_one_line(small_weights, tmp_path):
    timeout_s = 3
    err, took, pid, out = _fault_in_run(small_weights, tmp_path, signal.SIGSTOP, timeout_s)
    lines = _ours(err)
    assert lines == [STOPPED_LINE], err[-3000:]
    assert took < timeout_s + MARGIN_S, (took, err[-2000:])
    assert not pathlib.Path(f"/proc/{pid}").exists() or "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()
    assert not out.exists() or os.listdir(out) == []  # the temporary run folder was removed


@pytest.mark.slow
def test_killed_rank_ends_the_job_with_one_line(small_weights, tmp_path):
    err, took, _, out = _fault_in_run(small_weights, tmp_path, signal.SIGKILL, 60)
    assert _ours(err) == [KILLED_LINE], err[-3000:]
    assert took < MARGIN_S, took  # a dead peer is seen at once, not after the timeout
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.slow
def test_missing_rank_is_named_within_the_timeout(small_weights, tmp_path):
    """Rank 0 of two launched alone (rank 1 never starts): it waits cluster.timeout_s, then one line."""
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="2")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, *_generate_args(small_weights, tmp_path / "out", 2)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 1 and res.stderr.splitlines() == [MISSING_LINE]
    assert time.monotonic() - t0 < 2 + MARGIN_S + 15  # + one process start with torch imports
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------- verdicts
def _store(tmp_path):
    return torch.distributed.FileStore(str(tmp_path / "store"), 3)


def test_verdict_names_the_rank_whose_heartbeat_stopped(tmp_path):
    """Three ranks on one store: 0 and 1 beat, 2 joined and then went silent (never beats again)."""
    store = _store(tmp_path)
    watches = [RankWatch(r, 3, 7, interval=0.05, store=store) for r in range(3)]
    for w in watches[:2]:
        w.start()
    store.add("beat/2", 1)
    try:
        gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv")
        failure = watches[0].explain(gloo_timeout)
        assert isinstance(failure, RankFailure) and failure.silent == (2,) and failure.printer == 0
        assert str(failure).startswith("rank 2 stopped answering; the job ends now (collectives wait at most "
                                       "cluster.timeout_s = 7 s)")
        assert watches[1].explain(ValueError("own error")) is None  # not a failed collective
    finally:
        for w in watches:
            w.stop()


def test_verdict_when_rank_0_is_gone_is_printed_by_the_next_rank(tmp_path):
    store = _store(tmp_path)
    watches = [RankWatch(r, 3, 5, interval=0.05, store=store) for r in (1, 2)]
    for w in watches:
        w.start()
    try:
        failure = watches[1].explain(RuntimeError("Connection reset by peer"))
        assert failure.silent == (0,) and failure.printer == 1
    finally:
        for w in watches:
            w.stop()


def test_verdict_names_the_rank_that_failed_with_its_message(tmp_path):
    store = _store(tmp_path)
    watches = [RankWatch(r, 3, 5, interval=0.05, store=store) for r in range(3)]
    for w in watches:
        w.start()
    try:
        watches[2].record_error(FileNotFoundError("weights.safetensors: no such file\nsecond line"))
        for w in watches[:2]:
            f = w.explain(SystemExit(143))  # the launcher stopped this rank because rank 2 ended
            assert str(f) == "rank 2 failed: weights.safetensors: no such file" and f.printer == 0 and f.failed == 2
    finally:
        for w in watches:
            w.stop()


def test_every_rank_alive_but_a_collective_timed_out(tmp_path):
    store = _store(tmp_path)
    watches = [RankWatch(r, 2, 4, interval=0.05, store=store) for r in range(2)]
    for w in watches:
        w.start()
    try:
        f = watches[0].explain(RuntimeError("[gloo/pair.cc] Timed out waiting 4000ms for recv operation"))
        assert f.silent == () and str(f).startswith("a collective did not complete within cluster.timeout_s = 4 s "
                                                    "although every rank is alive")
        assert watches[0].explain(SystemExit(143)) is None  # stopped by the launcher for no reason we can see
    finally:
        for w in watches:
            w.stop()


def test_join_names_missing_and_failed_ranks(tmp_path):
    """The roll call on a clock the test moves: no sleeping for the timeout."""
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    store = _store(tmp_path)
    store.set("joined/1", "{}")
    store.add("joined", 1)
    with pytest.raises(RankFailure, match=r"^rank 2 did not join the job within cluster.timeout_s = 5 s") as e:
        join(store, 0, 3, 5, clock=clock, poll_s=0)
    assert e.value.silent == (2,) and e.value.printer == 0
    store2 = torch.distributed.FileStore(str(tmp_path / "store2"), 2)
    RankWatch(1, 2, 5, store=store2).record_error(ValueError("bad config on node 2"))
    with pytest.raises(RankFailure, match=r"^rank 1 failed before joining the job: bad config on node 2$"):
        join(store2, 0, 2, 5, clock=clock, poll_s=0)


def test_a_joined_rank_proceeds(tmp_path):
    store = _store(tmp_path)
    done = []
    threads = [threading.Thread(target=lambda r=r: done.append(join(store, r, 3, 60, poll_s=0.01) or r))
               for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(done) == [0, 1, 2]


def test_an_unreachable_store_is_one_line_without_the_clients_retry_noise(monkeypatch, capfd):
    """A host name that does not resolve, and a port where nothing listens: one RankFailure each, and
    none of the store client's C++ warnings and stacks (it prints one per retry)."""
    from dist_compact.parallel.watch import job_store

    monkeypatch.setenv("MASTER_ADDR", "no.such.host.invalid")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(RankFailure, match=r"MASTER_ADDR='no\.such\.host\.invalid' does not resolve to an address"):
        job_store(0, 2, 1.0)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    port = _free_port()  # free: nothing listens there
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(RankFailure, match=rf"rank 1 could not reach the job's store at 127\.0\.0\.1:{port} within "
                                          r"cluster\.timeout_s = 1 s \(.*\); check MASTER_ADDR / MASTER_PORT") as e:
        job_store(1, 2, 1.0)
    assert e.value.printer == 1
    assert "c10d" not in capfd.readouterr().err
