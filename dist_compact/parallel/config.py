"""ParallelConfig (the degrees) and ParallelGroups (the explicit process groups built from it).

Rank layout (the same as yunchang's ``set_seq_parallel_pg(..., use_ulysses_low=True)``, which
xDiT/USP use): inside the sequence-parallel group of ``P = ulysses * ring`` ranks,

* Ulysses groups are runs of contiguous ranks ``[i*ulysses, (i+1)*ulysses)``;
* ring groups are strided: ``{u, u + ulysses, u + 2*ulysses, ...}``;
* so sequence-parallel rank ``p = ring_rank * ulysses + ulysses_rank``, and sequence chunk ``p``
  lives on rank ``p``: after the Ulysses all-to-all, a Ulysses group holds the contiguous chunks
  ``[ring_rank*ulysses, (ring_rank+1)*ulysses)`` = ring shard ``ring_rank``.

Groups built by yunchang / xDiT can be handed in with :meth:`ParallelGroups.from_groups`; the
sequence position is always computed from the ranks *inside* the two groups, so both of yunchang's
layouts work. Nothing here is a module-level singleton: groups are values passed as arguments.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from .._util import is_int

__all__ = ["ParallelConfig", "ParallelGroups", "build_groups", "ParallelConfigError"]


class ParallelConfigError(ValueError):
    """A parallel configuration that cannot run (bad degrees, world size, head count or groups)."""


def _is_pos_int(x) -> bool:
    return is_int(x) and x >= 1


@dataclass(frozen=True)
class ParallelConfig:
    """Sequence-parallel degrees.

    Args:
        ulysses: Ulysses degree (all-to-all sequence <-> heads); must divide the head count.
        ring: ring degree (query shards stay, key/value shards travel).

    ``ulysses * ring`` is the number of ranks of the sequence-parallel group (the world size when
    launched with :func:`dist_compact.parallel.launch.init_distributed`).
    """

    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            val = getattr(self, name)
            if not _is_pos_int(val):
                raise ParallelConfigError(f"ParallelConfig.{name} must be a positive int, got {val!r}")

    @property
    def degree(self) -> int:
        """Ranks in the sequence-parallel group: ``ulysses * ring``."""
        return self.ulysses * self.ring

    def check(self, world_size: Optional[int] = None, num_heads: Optional[int] = None) -> "ParallelConfig":
        """Check against a world size and/or head count; raises one :class:`ParallelConfigError`."""
        if world_size is not None:
            if not _is_pos_int(world_size):
                raise ParallelConfigError(f"world size must be a positive int, got {world_size!r}")
            if self.degree != world_size:
                raise ParallelConfigError(
                    f"ulysses x ring = {self.ulysses} x {self.ring} = {self.degree} ranks, but the world "
                    f"size is {world_size}; choose degrees whose product is {world_size}"
                )
        if num_heads is not None:
            if not _is_pos_int(num_heads):
                raise ParallelConfigError(f"head count must be a positive int, got {num_heads!r}")
            if num_heads % self.ulysses:
                raise ParallelConfigError(
                    f"{num_heads} attention heads are not divisible by ulysses={self.ulysses}; use a "
                    f"Ulysses degree that divides {num_heads} (and a larger ring degree)"
                )
        return self

    def __str__(self) -> str:
        return f"ulysses{self.ulysses}xring{self.ring}"


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one sequence-parallel rank, and where it sits in them.

    Attributes:
        config: the degrees.
        ulysses_group / ring_group: groups of ``config.ulysses`` / ``config.ring`` ranks (``None``
            only when that degree is 1 and no group was given).
        ulysses_rank / ring_rank: this rank's position inside them.
        meta_group: a CPU (gloo) group over the ring group's ranks for tiny metadata exchanges
            (which key shards each rank needs) without a GPU synchronisation; ``None`` = use
            ``ring_group``.
        stage_p2p: send the ring's point-to-point traffic through host buffers even when the
            backend could send the tensors directly (it is automatic for CUDA tensors over gloo,
            which cannot send them); True exercises that path on CPUs.
    """

    config: ParallelConfig
    ulysses_group: Optional[dist.ProcessGroup]
    ring_group: Optional[dist.ProcessGroup]
    ulysses_rank: int = 0
    ring_rank: int = 0
    meta_group: Optional[dist.ProcessGroup] = None
    stage_p2p: bool = False

    def __post_init__(self) -> None:
        cfg = self.config
        if not isinstance(cfg, ParallelConfig):
            raise ParallelConfigError(f"ParallelGroups.config must be a ParallelConfig, got {type(cfg).__name__}")
        if not 0 <= self.ulysses_rank < cfg.ulysses or not 0 <= self.ring_rank < cfg.ring:
            raise ParallelConfigError(
                f"rank position (ulysses {self.ulysses_rank}, ring {self.ring_rank}) outside {cfg}"
            )
        for name, deg in (("ulysses_group", cfg.ulysses), ("ring_group", cfg.ring)):
            if getattr(self, name) is None and deg > 1:
                raise ParallelConfigError(f"{cfg} needs a {name}")

    @property
    def sp_rank(self) -> int:
        """Position of this rank's sequence chunk: ``ring_rank * ulysses + ulysses_rank``."""
        return self.ring_rank * self.config.ulysses + self.ulysses_rank

    @classmethod
    def from_groups(cls, config: ParallelConfig, ulysses_group: Optional[dist.ProcessGroup],
                    ring_group: Optional[dist.ProcessGroup],
                    meta_group: Optional[dist.ProcessGroup] = None, *, stage_p2p: bool = False) -> "ParallelGroups":
        """Wrap existing groups, e.g. yunchang's ``PROCESS_GROUP.ULYSSES_PG`` / ``RING_PG``."""
        def size_rank(g, what, deg):
            if g is None:
                if deg > 1:
                    raise ParallelConfigError(f"{config} needs a {what} group, got None")
                return 1, 0
            n = dist.get_world_size(g)
            if n != deg:
                raise ParallelConfigError(f"the {what} group has {n} ranks but {config} needs {deg}")
            return n, dist.get_rank(g)

        _, u = size_rank(ulysses_group, "ulysses", config.ulysses)
        _, r = size_rank(ring_group, "ring", config.ring)
        if meta_group is not None and dist.get_world_size(meta_group) != config.ring:
            raise ParallelConfigError(
                f"meta_group has {dist.get_world_size(meta_group)} ranks but the ring group has {config.ring}"
            )
        return cls(config, ulysses_group, ring_group, u, r, meta_group, stage_p2p)

    def __repr__(self) -> str:
        return (f"ParallelGroups({self.config}, ulysses_rank={self.ulysses_rank}, ring_rank={self.ring_rank}, "
                f"sp_rank={self.sp_rank})")


def build_groups(config: ParallelConfig, world_group: Optional[dist.ProcessGroup] = None, *,
                 use_ulysses_low: bool = True, meta_backend: Optional[str] = "gloo",
                 stage_p2p: bool = False, timeout_s: Optional[float] = None) -> ParallelGroups:
    """Create the Ulysses and ring groups.

    Collective: without ``world_group`` every rank of the world calls it; with one, every rank of
    that group calls it (several disjoint world groups, e.g. data-parallel replicas, may each do so).

    Args:
        config: degrees; ``config.degree`` must equal the size of ``world_group``.
        world_group: the ranks to use (default: the whole world), in their group order.
        use_ulysses_low: yunchang's layout switch: True (its default) puts Ulysses groups on
            contiguous ranks (fast intra-node all-to-all) and ring groups strided.
        meta_backend: backend of the CPU metadata group over each ring group when the default
            backend is not gloo (``None`` = no extra group; metadata then go through the ring group).
        stage_p2p: see :class:`ParallelGroups`.
        timeout_s: the longest wait of a collective in these groups (``cluster.timeout_s``; torch's
            ``new_group`` does not inherit the default group's timeout). None: torch's default.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelConfigError("build_groups needs torch.distributed to be initialized (see launch.init_distributed)")
    ranks: List[int] = (dist.get_process_group_ranks(world_group) if world_group is not None
                        else list(range(dist.get_world_size())))
    config.check(world_size=len(ranks))
    me = dist.get_rank()
    if me not in ranks:
        raise ParallelConfigError(f"rank {me} is not in the world group {ranks}")
    U, R = config.ulysses, config.ring
    if use_ulysses_low:
        uly_sets = [[ranks[i * U + u] for u in range(U)] for i in range(R)]
        ring_sets = [[ranks[u + U * i] for i in range(R)] for u in range(U)]
    else:
        ring_sets = [[ranks[u * R + i] for i in range(R)] for u in range(U)]
        uly_sets = [[ranks[i + R * u] for u in range(U)] for i in range(R)]
    want_meta = meta_backend is not None and dist.get_backend() != "gloo" and R > 1
    local = world_group is not None

    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None

    def make(s, backend=None):
        # Without a world_group, new_group is collective over the whole world: every rank creates
        # every group in one order. With one (e.g. one sequence-parallel replica of several), only
        # the members create a group (use_local_synchronization), so replicas do not interlock.
        if local:
            return (dist.new_group(s, backend=backend, timeout=timeout, use_local_synchronization=True)
                    if me in s else None)
        return dist.new_group(s, backend=backend, timeout=timeout)

    uly_g = ring_g = meta_g = None
    for s in uly_sets:
        g = make(s)
        if me in s:
            uly_g = g
    for s in ring_sets:
        g = make(s)
        if me in s:
            ring_g = g
        if want_meta:
            mg = make(s, meta_backend)
            if me in s:
                meta_g = mg
    return ParallelGroups.from_groups(config, uly_g, ring_g, meta_g, stage_p2p=stage_p2p)
