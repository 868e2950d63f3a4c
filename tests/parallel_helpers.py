"""Run a function on N gloo processes from inside pytest, with a hard timeout (never hangs CI).

``run_workers(fn, world, tmp_path, *args)`` spawns ``world`` processes; each initialises a gloo
process group through a FileStore under ``tmp_path`` (no port races), calls
``fn(rank, world, *args)`` and returns its result (picklable). Any failure, in any rank, fails the
test with that rank's traceback; past ``timeout`` seconds every process is killed and the test
fails. ``fn`` must be a module-level function of an importable module (the spawn start method).
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


def _entry(fn, rank, world, store, args, out_q, timeout):
    import faulthandler
    import sys

    # a hung rank prints where it is stuck (to the test's captured stderr) before the parent kills it
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


def run_workers(fn, world, tmp_path, *args, timeout=150.0):
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    store = os.path.join(str(tmp_path), f"store_{fn.__name__}_{world}_{time.monotonic_ns()}")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, store, args, out_q, timeout), daemon=True) for r in range(world)]
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
                    + "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
                )
            try:
                kind, rank, payload = out_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(i not in results and i not in errors for i in dead):
                    time.sleep(1.0)  # let a crashing rank's message arrive first
                    if out_q.empty():
                        raise AssertionError(f"{fn.__name__}: ranks {dead} died without a report "
                                             f"(exit codes {[procs[i].exitcode for i in dead]})")
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
        raise AssertionError(f"{fn.__name__} failed on rank {r} of {world}:\n{e}")
    return [results[r] for r in range(world)]


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
