"""Start torch.distributed from the torchrun environment and build the sequence-parallel plan.

The whole API for a launcher such as generate.py::

    sp = init_distributed(ParallelConfig(ulysses=2, ring=2))   # or init_distributed() on one process
    device = local_device()
    ...
    shutdown()

One process (no torchrun, or WORLD_SIZE=1) needs no process group: ``init_distributed`` returns a
plan whose shard/gather/wrap are identities. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from .config import ParallelConfig, ParallelConfigError, build_groups
from .plan import SequenceParallel

__all__ = ["init_distributed", "local_device", "shutdown"]


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(config: Optional[ParallelConfig] = None, *, backend: Optional[str] = None,
                     timeout_s: Optional[float] = None, shard_unit: str = "block",
                     use_ulysses_low: bool = True) -> SequenceParallel:
    """Initialise the default process group from the torchrun env (if needed) and build the groups.

    Args:
        config: degrees; default: a ring over every rank (valid for any head count).
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout.
        shard_unit, use_ulysses_low: see :class:`SequenceParallel` and :func:`build_groups`.

    Returns:
        this rank's :class:`SequenceParallel`.
    """
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            cfg = config or ParallelConfig()
            if cfg.degree != 1:
                raise ParallelConfigError(
                    f"{cfg} needs {cfg.degree} processes but this is one process; launch with "
                    f"`torchrun --nproc-per-node {cfg.degree} ...`"
                )
            return SequenceParallel(cfg, shard_unit=shard_unit)
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, init_method="env://", **kw)
    world = dist.get_world_size()
    cfg = config or ParallelConfig(ulysses=1, ring=world)
    cfg.check(world_size=world)
    if cfg.degree == 1:
        return SequenceParallel(cfg, shard_unit=shard_unit)
    return SequenceParallel(cfg, build_groups(cfg, use_ulysses_low=use_ulysses_low), shard_unit=shard_unit)


def shutdown() -> None:
    """Destroy the default process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
