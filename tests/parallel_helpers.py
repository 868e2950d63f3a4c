"""Run code on N gloo processes from inside pytest, with a hard timeout (never hangs CI).

``run_workers(fn, world, tmp_path, *args)`` starts ``world`` processes; each initialises a gloo
process group through a FileStore under ``tmp_path`` (no port races), calls
``fn(rank, world, *args)`` and returns its result (picklable). Any failure, in any rank, fails the
test with that rank's traceback (and what the ranks printed); past ``timeout`` seconds every process
is killed and the test fails. ``fn`` must be a module-level function of an importable module.

``run_like_torchrun(script, args, nproc, tmp_path)`` runs a script (``generate.py``, a benchmark, an
example) on ``nproc`` ranks as ``torchrun --nproc-per-node nproc script args`` does for its workers:
the same environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT,
TORCHELASTIC_*, OMP_NUM_THREADS=1), the store hosted by the launcher (here this process, as
torchrun's agent does), the script run as ``__main__`` with its own ``sys.argv``; returns the exit
code and what the ranks printed. Tests of torchrun itself (its launch, its shutdown of a failed job)
run the real ``torchrun`` (tests/run/test_generate.py, tests/parallel/test_faults.py,
tests/cli/test_cli_failures.py).

The processes are forked from one fork server per test session that has imported torch, the package
and (where a test module loaded them already) diffusers / transformers once: a fresh interpreter per
rank spent several seconds on these imports alone (about 10 s a rank with diffusers on a 2-core
machine). Each rank is still a new process: no state of an earlier test, no process group, the
parent's environment and working directory applied before anything runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback


class _ByValue:
    """A tensor carried in the pickle itself. torch's own pickling of a tensor hands the parent a file
    descriptor that it must fetch from the worker, which may have exited by then (a rank that ends
    right after reporting): the parent then fails with FileNotFoundError."""

    def __init__(self, t):
        import io

        import torch

        buf = io.BytesIO()
        torch.save(t.detach().cpu(), buf)
        self.data = buf.getvalue()

    def load(self):
        import io

        import torch

        return torch.load(io.BytesIO(self.data))


def _by_value(obj):
    """``obj`` with every tensor inside tuples / lists / dicts wrapped in :class:`_ByValue`."""
    import torch

    if isinstance(obj, torch.Tensor):
        return _ByValue(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_by_value(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    return obj


def _unwrap(obj):
    if isinstance(obj, _ByValue):
        return obj.load()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unwrap(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


#: imported once by the fork server (what every rank needs); the optional ones only where the
#: test session has them loaded already (a test module of that integration was collected)
_PRELOAD = ["torch", "torch.distributed", "dist_compact", "dist_compact.parallel", "dist_compact.run.generation",
            "dist_compact.integrations", "dist_compact.cli.generate"]
_PRELOAD_IF_LOADED = ["transformers", "diffusers", "diffusers.models.transformers.transformer_wan",
                      "diffusers.models.transformers.transformer_hunyuan_video",
                      "diffusers.models.attention_dispatch"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        import sys

        ctx = mp.get_context("forkserver")
        loaded = [m for m in _PRELOAD_IF_LOADED if m.split(".")[0] in sys.modules]
        ctx.set_forkserver_preload(_PRELOAD + loaded)
        _CTX = ctx
    return _CTX


def _start(env, cwd, out_log, err_log=None):
    """In a new rank: the parent's environment and directory (not the fork server's at its start), and
    stdout to ``out_log``, stderr to ``err_log`` (default: the same file), which the parent reads."""
    import sys

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for std in (sys.stdout, sys.stderr):
        std.flush()
    for target, path in ((1, out_log), (2, err_log or out_log)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # what a fresh interpreter takes from the environment
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def _entry(fn, rank, world, store, args, out_q, timeout, env, cwd, log):
    import faulthandler
    import sys

    _start(env, cwd, log)
    # a hung rank prints where it is stuck (to its log, shown by the parent) before the parent kills it
    faulthandler.dump_traceback_later(max(timeout - 5.0, 1.0), exit=False, file=sys.stderr)
    # all ranks are on this machine: loopback works even where the hostname does not resolve
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            res = fn(rank, world, *args)
            out_q.put(("ok", rank, _by_value(res)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out_q.put(("err", rank, traceback.format_exc()))


def _logs(paths, limit=3000):
    out = []
    for r, path in enumerate(paths):
        try:
            text = open(path, errors="replace").read()
        except OSError:
            continue
        if text.strip():
            out.append(f"\n--- rank {r} printed ---\n{text[-limit:]}")
    return "".join(out)


def run_workers(fn, world, tmp_path, *args, timeout=150.0):
    ctx = _context()
    out_q = ctx.Queue()
    store = os.path.join(str(tmp_path), f"store_{fn.__name__}_{world}_{time.monotonic_ns()}")
    env, cwd = dict(os.environ), os.getcwd()
    logs = [f"{store}.rank{r}.log" for r in range(world)]
    procs = [ctx.Process(target=_entry, args=(fn, r, world, store, args, out_q, timeout, env, cwd, logs[r]),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{fn.__name__} on {world} processes timed out after {timeout:.0f}s; "
                    f"finished ranks {sorted(results)}, failed {sorted(errors)}"
                    + "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items())) + _logs(logs)
                )
            try:
                kind, rank, payload = out_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(i not in results and i not in errors for i in dead):
                    time.sleep(1.0)  # let a crashing rank's message arrive first
                    if out_q.empty():
                        raise AssertionError(f"{fn.__name__}: ranks {dead} died without a report "
                                             f"(exit codes {[procs[i].exitcode for i in dead]})" + _logs(logs))
                continue
            if kind == "ok":
                results[rank] = _unwrap(payload)
            else:
                errors[rank] = payload
                break  # the others may block on the failed rank: stop now
    finally:
        for p in procs:
            p.join(timeout=2.0 if errors or len(results) < world else 10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        r, e = sorted(errors.items())[0]
        raise AssertionError(f"{fn.__name__} failed on rank {r} of {world}:\n{e}" + _logs(logs))
    return [results[r] for r in range(world)]


def _script_entry(script, args, env, cwd, out_log, err_log):
    """One rank of :func:`run_like_torchrun`: ``python script args`` in this process."""
    import runpy
    import sys

    _start(env, cwd, out_log, err_log)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    runpy.run_path(script, run_name="__main__")  # SystemExit(code) ends the process with that code


class RanksResult:
    """What :func:`run_like_torchrun` gives back, like a ``subprocess.CompletedProcess``: ``returncode``
    (0 when every rank exited 0, else the code of the rank that failed first), ``stdout`` and
    ``stderr`` (every rank's, in rank order: torchrun forwards them to its own), ``codes`` (per rank;
    a rank ended because another failed has -9)."""

    def __init__(self, returncode, codes, stdout, stderr):
        self.returncode, self.codes, self.stdout, self.stderr = returncode, codes, stdout, stderr


def run_like_torchrun(script, args, nproc, tmp_path, *, cwd=None, env=None, timeout=240.0):
    """``torchrun --nproc-per-node nproc script args`` (static rendezvous on this host), its workers
    forked from the fork server; see the module doc. ``env``: the launcher's environment (default:
    this process's), launcher variables of an outer job removed. A rank that fails ends the others,
    as torchrun does; past ``timeout`` seconds every rank is killed and the test fails."""
    import datetime
    from multiprocessing.connection import wait

    import torch.distributed as dist

    ctx = _context()
    base = {k: v for k, v in (os.environ if env is None else env).items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                         "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            and not k.startswith("TORCHELASTIC_")}
    if nproc > 1:
        base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for more than one process per node
    # the launcher's store, as torchrun's agent hosts it: every rank is a client
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    stamp = time.monotonic_ns()
    name = os.path.join(str(tmp_path), f"torchrun_{os.path.basename(str(script))}_{stamp}")
    outs = [f"{name}.rank{r}.out" for r in range(nproc)]
    logs = [f"{name}.rank{r}.err" for r in range(nproc)]
    procs = []
    for r in range(nproc):
        env_r = dict(base, RANK=str(r), LOCAL_RANK=str(r), GROUP_RANK="0", ROLE_RANK=str(r), ROLE_NAME="default",
                     LOCAL_WORLD_SIZE=str(nproc), WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1",
                     ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                     TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="none",
                     TORCHELASTIC_USE_AGENT_STORE="True",
                     TORCH_NCCL_ASYNC_ERROR_HANDLING=base.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"))
        procs.append(ctx.Process(target=_script_entry, args=(str(script), [str(a) for a in args], env_r,
                                                             str(cwd or os.getcwd()), outs[r], logs[r])))
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    first_failed = None
    try:
        while first_failed is None and any(p.exitcode is None for p in procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{script} on {nproc} ranks timed out after {timeout:.0f}s" + _logs(outs)
                                     + _logs(logs))
            wait([p.sentinel for p in procs if p.exitcode is None], timeout=min(left, 1.0))
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            first_failed = failed[0] if failed else None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    def read(paths):
        text = []
        for path in paths:
            try:
                text.append(open(path, errors="replace").read())
            except OSError:
                pass
        return "".join(text)

    return RanksResult(first_failed or 0, [p.exitcode for p in procs], read(outs), read(logs))


def expected_ring_blocks(index, layout, bounds):
    """Plain reference of the ring's traffic: ``blocks[i][j]`` = key blocks of shard j that ring rank
    i fetches = (last - first + 1) over the keys of shard j that its video rows use, not counting
    blocks without a valid token (padding). Built from the dense mask, independent of RingOps."""
    import torch

    mask = index.to_dense().any(0).any(0).cpu()  # [NB, NB]: some (batch, head) uses (q, k)
    real = layout.block_valid()[: layout.num_video_blocks] > 0
    R = len(bounds) - 1
    out = [[0] * R for _ in range(R)]
    for i in range(R):
        rows = mask[bounds[i]:bounds[i + 1]].any(0)
        for j in range(R):
            if i == j:
                continue
            used = (rows[bounds[j]:bounds[j + 1]] & real[bounds[j]:bounds[j + 1]]).nonzero().flatten()
            if used.numel():
                out[i][j] = int(used[-1] - used[0]) + 1
    return torch.tensor(out, dtype=torch.int64)
