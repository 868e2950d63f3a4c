"""Start torch.distributed from the torchrun environment and build the sequence-parallel plan.

The whole API for a launcher such as generate.py::

    sp = init_distributed(ParallelConfig(ulysses=2, ring=2))   # or init_distributed() on one process
    device = local_device()
    ...
    shutdown()

One process (no torchrun, or WORLD_SIZE=1) needs no process group: ``init_distributed`` returns a
plan whose shard/gather/wrap are identities. NCCL on GPUs, gloo on CPUs.

Ranks sharing GPUs (:func:`select_backend`): with more ranks on a node than GPUs, rank ``i`` uses
``cuda:(i % GPUs)`` and the backend is gloo with CUDA tensors, since NCCL refuses two ranks on one
GPU ("invalid usage"). Measured on an H200: gloo's all_reduce, all_gather and all_to_all_single
take CUDA tensors, its point-to-point does not ("Bad address"), so the ring stages those through
pinned host memory (:class:`~dist_compact.parallel.ring.RingOps`). This proves the multi-process
code paths with the GPU kernels on one GPU; its timings are not those of a multi-GPU machine.
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .config import ParallelConfig, ParallelConfigError, build_groups
from .plan import SequenceParallel
from .watch import DEFAULT_TIMEOUT_S, job_endpoint, job_store, join

__all__ = ["init_distributed", "launched_world", "local_device", "select_backend", "shutdown", "DEFAULT_TIMEOUT_S"]


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def select_backend(backend: Optional[str], *, device_type: str, local_world_size: int, device_count: int,
                   share_gpus: Optional[bool] = None, warn: bool = True) -> Tuple[str, bool]:
    """``(backend, sharing)`` for this node: NCCL on GPUs, gloo on CPUs, gloo when ranks share GPUs.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (choose).
        device_type: ``"cuda"`` or ``"cpu"``: where this rank's tensors live.
        local_world_size: ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``).
        device_count: GPUs on this node.
        share_gpus: True = share (gloo), False = never (too few GPUs is an error), None = share
            only when there are more ranks than GPUs, with a one-line warning (if ``warn``: local
            rank 0 only, so a node prints it once).

    Raises:
        ParallelConfigError: sharing asked on CPUs, sharing with NCCL, or too few GPUs without it.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ParallelConfigError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if device_type != "cuda":
        if share_gpus:
            raise ParallelConfigError("share_gpus needs CUDA devices; CPU ranks need no sharing (use gloo)")
        if backend == "nccl":
            raise ParallelConfigError("the nccl backend needs CUDA devices; use gloo on CPUs")
        return "gloo", False
    over = local_world_size > device_count
    if over and share_gpus is False:
        raise ParallelConfigError(
            f"{local_world_size} ranks on this node but {device_count} GPU(s), and share_gpus is false: NCCL "
            "refuses two ranks on one GPU; launch one rank per GPU or set cluster.share_gpus: true (gloo)"
        )
    if not (share_gpus or (share_gpus is None and over)):
        return backend or "nccl", False
    if backend == "nccl":
        raise ParallelConfigError(
            f"{local_world_size} ranks share {device_count} GPU(s): NCCL refuses two ranks on one GPU ('invalid "
            "usage'); use backend gloo (or auto) with share_gpus"
        )
    if share_gpus is None and warn:
        warnings.warn(f"dist_compact: {local_world_size} ranks share {device_count} GPU(s): gloo with CUDA tensors, "
                      "ring transfers staged through host memory (correctness runs, not multi-GPU timings)",
                      stacklevel=3)
    return "gloo", True


def launched_world() -> Tuple[int, int, int]:
    """``(world, rank, local_rank)`` from torchrun's environment (``(1, 0, 0)`` without it), before
    any process group exists.

    Raises:
        ParallelConfigError: a variable that is not a whole number, a rank outside the world, or (for
            more than one process) a MASTER_PORT that is not a port number (one line naming the
            variable; torchrun sets them, a hand-made environment may not).
    """
    vals = []
    for name, default, lo in (("WORLD_SIZE", "1", 1), ("RANK", "0", 0), ("LOCAL_RANK", "0", 0)):
        raw = os.environ.get(name, default)
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", raw) or int(raw) < lo:
            raise ParallelConfigError(f"{name}={raw[:40]!r} is not a whole number >= {lo}; torchrun sets it (unset "
                                      "WORLD_SIZE, RANK and LOCAL_RANK to run one process)")
        vals.append(int(raw))
    world, rank, local = vals
    if rank >= world:
        raise ParallelConfigError(f"RANK={rank} is outside the world of WORLD_SIZE={world} processes (0..{world - 1})")
    port = os.environ.get("MASTER_PORT")
    if world > 1 and port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
        raise ParallelConfigError(f"MASTER_PORT={port[:40]!r} is not a port number (1-65535); torchrun sets it "
                                  "(--master-port), a hand-made launch must give every rank the same one")
    return world, rank, local


def init_distributed(config: Optional[ParallelConfig] = None, *, backend: Optional[str] = None,
                     timeout_s: Optional[float] = None, shard_unit: str = "block",
                     use_ulysses_low: bool = True, share_gpus: Optional[bool] = None,
                     device_type: Optional[str] = None, balance: bool = True) -> SequenceParallel:
    """Initialise the default process group from the torchrun env (if needed) and build the groups.

    Args:
        config: degrees; default: a ring over every rank (valid for any head count).
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when CUDA is available, else gloo, and gloo
            when ranks share GPUs (:func:`select_backend`).
        timeout_s: the longest wait for joining and for every collective (default
            :data:`DEFAULT_TIMEOUT_S`), in the default group and the groups built here. Launched
            with ``MASTER_ADDR`` / ``MASTER_PORT`` (torchrun), the ranks first meet in the job's store
            (:func:`dist_compact.parallel.watch.join`): a rank that does not come within it is named.
        shard_unit, use_ulysses_low: see :class:`SequenceParallel` and :func:`build_groups`.
        share_gpus: see :func:`select_backend` (None: automatic).
        device_type: ``"cuda"`` / ``"cpu"``: where this rank computes (default: CUDA when available).
        balance: cost-balanced shards (:class:`SequenceParallel`).

    Returns:
        this rank's :class:`SequenceParallel`.
    """
    if not dist.is_initialized():
        world = launched_world()[0]
        if world == 1:
            cfg = config or ParallelConfig()
            if cfg.degree != 1:
                raise ParallelConfigError(
                    f"{cfg} needs {cfg.degree} processes but this is one process; launch with "
                    f"`torchrun --nproc-per-node {cfg.degree} ...`"
                )
            return SequenceParallel(cfg, shard_unit=shard_unit, balance=balance)
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        dev = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        backend, _ = select_backend(
            backend, device_type=dev, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            device_count=torch.cuda.device_count() if dev == "cuda" else 0, share_gpus=share_gpus,
            warn=os.environ.get("LOCAL_RANK", "0") == "0")
        if dev == "cuda":
            torch.cuda.set_device(local_device())
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        if job_endpoint() is not None:
            rank = launched_world()[1]
            store = job_store(rank, world, timeout_s)
            join(store, rank, world, timeout_s)
            dist.init_process_group(backend=backend, store=dist.PrefixStore("pg/", store), rank=rank, world_size=world,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    world = dist.get_world_size()
    cfg = config or ParallelConfig(ulysses=1, ring=world)
    cfg.check(world_size=world)
    if cfg.degree == 1:
        return SequenceParallel(cfg, shard_unit=shard_unit, balance=balance)
    return SequenceParallel(cfg, build_groups(cfg, use_ulysses_low=use_ulysses_low, timeout_s=timeout_s),
                            shard_unit=shard_unit, balance=balance)


def shutdown() -> None:
    """Destroy the default process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
