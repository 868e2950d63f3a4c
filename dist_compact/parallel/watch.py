"""Which ranks of a launched job are still there: the join roll call, heartbeats, and the one-line verdict.

A job launched by torchrun (or any launcher that sets ``MASTER_ADDR`` / ``MASTER_PORT``) has one
key-value store every rank reaches: torchrun's agent hosts it, else rank 0 does. Through it:

* :func:`join`: every rank writes who it is (host, pid) and waits until every rank has, for at most
  ``timeout_s``; a rank that does not come is named (:class:`RankFailure`), and a rank that failed
  before joining and said why (:meth:`RankWatch.record_error`) is named with its reason.
* :class:`RankWatch`: a thread that adds 1 to this rank's counter every ``interval`` seconds. It
  runs while the main thread computes or waits in a collective (both release the GIL), so a counter
  that stops moving means the process is stopped (SIGSTOP), hung in the kernel, or gone; a rank that
  is merely slow keeps counting.
* :meth:`RankWatch.explain`: when a collective fails (a timeout, a peer that reset the connection) or
  the launcher stops this rank, the cause in one line: the rank that failed and its message, the
  ranks whose counters stopped, or, when every rank is alive, that a collective outlasted
  ``timeout_s``. The rank that prints it is :attr:`RankFailure.printer` (rank 0 unless rank 0 is the
  one gone), so the line appears once.

A stopped process cannot take the launcher's SIGTERM; torchrun waits its shutdown grace (30 s)
before it sends SIGKILL. :meth:`RankFailure.end_silent` sends SIGKILL at once to the silent ranks on
this host whose process is still the one that joined (same pid and start time), so the job ends
within ``timeout_s`` plus a few seconds.

Nothing here is global: the store clients and the thread belong to the objects that made them.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "RankFailure", "RankWatch", "job_endpoint", "job_store", "join", "is_comm_error",
           "describe_ranks"]


#: ``cluster.timeout_s``'s default: the longest wait for a rank to join or for a collective. Why 300:
#: the slowest collective of a run waits for the slowest rank's work between two collectives (a
#: whole transformer forward at most, seconds even at 720p), and five minutes still ends a job with a
#: hung rank long before anyone would give up on it.
DEFAULT_TIMEOUT_S = 300.0


class RankFailure(RuntimeError):
    """One or more ranks failed, stopped answering or never joined; the message is one line.

    Attributes:
        silent: ranks that stopped answering (or never joined).
        failed: the rank whose own error caused this, or None.
        printer: the rank that should print the line (the lowest rank that is alive and did not
            print an error of its own).
    """

    def __init__(self, message: str, *, silent: Sequence[int] = (), failed: Optional[int] = None,
                 printer: int = 0, end: Optional[Callable[[], None]] = None):
        super().__init__(message)
        self.silent = tuple(silent)
        self.failed = failed
        self.printer = printer
        self._end = end

    def end_silent(self) -> None:
        """SIGKILL the silent ranks on this host that are still the processes that joined (a stopped
        process takes no SIGTERM, so the launcher would wait its shutdown grace). Call it after
        printing: the launcher may stop this rank as soon as a peer is gone."""
        if self._end is not None:
            self._end()


def describe_ranks(ranks: Sequence[int]) -> str:
    """``[1]`` -> ``"rank 1"``, ``[1, 3]`` -> ``"ranks 1, 3"``."""
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def job_endpoint() -> Optional[Tuple[str, int]]:
    """``(MASTER_ADDR, MASTER_PORT)`` of a launched job, or None when the launcher set none."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return addr, int(port)


def _namespace() -> str:
    # torchrun's store outlives a restart of the workers: keys of an earlier attempt must not count
    run = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    return f"dist_compact/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def job_store(rank: int, world: int, timeout_s: float, *, host: Optional[bool] = None) -> dist.Store:
    """A client of the job's store (``MASTER_ADDR:MASTER_PORT``), the server too on rank 0 when no
    torchrun agent hosts one (``host=None``: decide so; ``False``: always a client), within
    ``timeout_s``.

    Raises:
        RankFailure: no store answers at the endpoint within ``timeout_s``.
    """
    endpoint = job_endpoint()
    if endpoint is None:
        raise RankFailure("MASTER_ADDR / MASTER_PORT are not set: launch with torchrun (or set both) for more than "
                          "one process")
    if host is None:
        host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    addr, port = endpoint
    _await_endpoint(rank, addr, port, timeout_s, listen=host)
    try:
        store = dist.TCPStore(addr, port, world_size=world, is_master=host, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), multi_tenant=host)
    except Exception as e:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError by version
        raise RankFailure(f"rank {rank} could not reach the job's store at {addr}:{port} within cluster.timeout_s = "
                          f"{timeout_s:g} s ({_first_line(e, 160)}); check MASTER_ADDR / MASTER_PORT and that rank 0 "
                          "is running", silent=[0] if rank else [], printer=rank) from None
    return dist.PrefixStore(_namespace(), store)


def _await_endpoint(rank: int, addr: str, port: int, timeout_s: float, listen: bool) -> None:
    """Resolve ``addr``, and unless this process serves the store, wait (quietly, within ``timeout_s``)
    until something accepts connections at ``addr:port``: the store client's own retries print a
    C++ warning and stack for every attempt."""
    fail = dict(silent=[0] if rank else [], printer=rank)
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise RankFailure(f"MASTER_ADDR={addr[:80]!r} does not resolve to an address ({_first_line(e, 120)}); give "
                          "the host name or address of rank 0's machine", **fail) from None
    if listen:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.05, min(1.0, left))):
                return
        except OSError as e:
            if left <= 0:
                raise RankFailure(f"rank {rank} could not reach the job's store at {addr}:{port} within "
                                  f"cluster.timeout_s = {timeout_s:g} s ({_first_line(e, 120)}); check MASTER_ADDR / "
                                  "MASTER_PORT and that rank 0 is running", **fail) from None
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _start_ticks(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere or if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _identity() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid())})


def _errors(store: dist.Store, world: int) -> Dict[int, str]:
    """The errors ranks recorded (:meth:`RankWatch.record_error`), by rank."""
    out = {}
    if int(store.add("errors", 0)) == 0:
        return out
    for r in range(world):
        key = f"error/{r}"
        if store.check([key]):
            out[r] = store.get(key).decode(errors="replace")
    return out


def join(store: dist.Store, rank: int, world: int, timeout_s: float, *,
         clock: Callable[[], float] = time.monotonic, poll_s: float = 0.05) -> None:
    """The roll call before the process group is made: every rank says it is here and waits for all.

    Raises:
        RankFailure: a rank recorded an error before joining (named, with its message), or some
            ranks did not join within ``timeout_s`` (named).
    """
    store.set(f"joined/{rank}", _identity())
    store.add("joined", 1)
    deadline = clock() + timeout_s
    while True:
        errors = _errors(store, world)
        if errors:
            r = min(errors)
            raise RankFailure(f"rank {r} failed before joining the job: {errors[r]}", failed=r,
                              printer=min(set(range(world)) - {r}))
        if int(store.add("joined", 0)) >= world:
            return
        if clock() > deadline:
            missing = [r for r in range(world) if not store.check([f"joined/{r}"])]
            raise RankFailure(f"{describe_ranks(missing)} did not join the job within cluster.timeout_s = "
                              f"{timeout_s:g} s "
                              "(not started, stopped, or crashed at start); launch every rank with the same "
                              "MASTER_ADDR / MASTER_PORT, or raise cluster.timeout_s", silent=missing,
                              printer=min(set(range(world)) - set(missing)))
        time.sleep(poll_s)


def is_comm_error(e: BaseException) -> bool:
    """``e`` came from a collective or the store: a timeout, a peer that closed its connection."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo/" in text or "NCCL" in text or "Connection reset" in text
                                            or "Connection closed" in text or "Timed out" in text)


class RankWatch:
    """Heartbeats of this rank and the verdict on the others (see the module doc).

    Args:
        rank, world: this rank and the world size.
        timeout_s: ``cluster.timeout_s`` (named in the verdicts).
        interval: seconds between beats; a rank is silent when its counter does not move over
            ``3 * interval``.
        store: a store client for this watch alone (default: a new connection to the job's store,
            so a long wait of the main thread on its own client never delays a beat).
    """

    def __init__(self, rank: int, world: int, timeout_s: float, *, interval: float = 0.5,
                 store: Optional[dist.Store] = None):
        self.rank, self.world, self.timeout_s, self.interval = rank, world, timeout_s, interval
        self.store = store if store is not None else job_store(rank, world, timeout_s, host=False)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ heartbeat
    def start(self) -> "RankWatch":
        self.store.add(f"beat/{self.rank}", 1)
        self._thread = threading.Thread(target=self._beat, name=f"dist_compact-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval)
            self._thread = None

    def __enter__(self) -> "RankWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ verdicts
    def silent(self) -> List[int]:
        """The other ranks whose counter did not move over ``3 * interval`` (stopped, hung or gone)."""
        before = [int(self.store.add(f"beat/{r}", 0)) for r in range(self.world)]
        time.sleep(3 * self.interval)
        after = [int(self.store.add(f"beat/{r}", 0)) for r in range(self.world)]
        return [r for r in range(self.world) if r != self.rank and after[r] == before[r]]

    def record_error(self, e: BaseException) -> None:
        """Leave this rank's error (one line) where the others' verdicts find it; best effort."""
        try:
            self.store.set(f"error/{self.rank}", _first_line(e))
            self.store.add("errors", 1)
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass

    def _whereabouts(self, r: int) -> Optional[Tuple[int, Optional[int], str]]:
        """``(pid, start, state)`` of rank ``r`` when it runs on this host, else None."""
        key = f"joined/{r}"
        try:  # get() of a missing key would wait for it
            who = json.loads(self.store.get(key)) if self.store.check([key]) else {}
        except Exception:  # noqa: BLE001
            return None
        if who.get("host") != socket.gethostname() or not isinstance(who.get("pid"), int):
            return None
        pid, start = who["pid"], who.get("start")
        alive = start is not None and _start_ticks(pid) == start
        return pid, start, (_state(pid) or "?") if alive else "gone"

    def whereabouts(self, ranks: Sequence[int]) -> Dict[int, str]:
        """What is seen of the given ranks' processes on this host: ``{rank: description}``."""
        found = {}
        for r in ranks:
            where = self._whereabouts(r)
            if where is not None:
                found[r] = {"gone": "its process on this host is gone: killed or crashed",
                            "T": "its process on this host is stopped (SIGSTOP)",
                            "t": "its process on this host is stopped (traced)"}.get(
                    where[2], "its process on this host is hung")
        return found

    def end_silent(self, ranks: Sequence[int]) -> None:
        """SIGKILL the given ranks' processes on this host that are still the processes that joined."""
        for r in ranks:
            where = self._whereabouts(r)
            if where is not None and where[2] != "gone":
                try:
                    os.kill(where[0], signal.SIGKILL)
                except OSError:
                    pass

    def explain(self, e: BaseException) -> Optional[RankFailure]:
        """The one-line cause of ``e`` (a failed collective, or this rank stopped by the launcher), or
        None when ``e`` is this rank's own error (then record it with :meth:`record_error`)."""
        if not (is_comm_error(e) or isinstance(e, SystemExit)):
            return None  # this rank's own error, or Ctrl-C (the user knows why)
        try:
            errors = {r: m for r, m in _errors(self.store, self.world).items() if r != self.rank}
            if errors:
                # rank 0 prints: its own error, or the line naming the rank that failed
                r = min(errors)
                return RankFailure(f"rank {r} failed: {errors[r]}", failed=r, printer=0)
            silent = self.silent()
        except Exception:  # noqa: BLE001 - the store went away with rank 0 (it hosts it)
            silent = [0] if self.rank else []
            if not silent:
                return None
            return RankFailure("rank 0 stopped answering (the job's store went with it); the job is stopped",
                               silent=silent, printer=min(set(range(self.world)) - set(silent)))
        printer = min(set(range(self.world)) - set(silent))
        if silent:
            found = self.whereabouts(silent)
            how = "; ".join(what if len(silent) == 1 else f"rank {r}: {what}" for r, what in sorted(found.items()))
            return RankFailure(f"{describe_ranks(silent)} stopped answering{' (' + how + ')' if how else ''}; the job "
                               f"ends now (collectives wait at most cluster.timeout_s = {self.timeout_s:g} s); see "
                               f"{'their' if len(silent) > 1 else 'its'} log in the run's logs/ or the launcher's "
                               "report", silent=silent, printer=printer, end=lambda: self.end_silent(silent))
        if is_comm_error(e) and "Timed out" in str(e):
            return RankFailure(f"a collective did not complete within cluster.timeout_s = {self.timeout_s:g} s "
                               "although "
                               "every rank is alive: one is slower than that (raise cluster.timeout_s) or the ranks "
                               "took different paths", printer=printer)
        return None
