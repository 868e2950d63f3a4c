"""Sequence parallelism: ParallelConfig, explicit groups, Ulysses, ring, hybrid, coordinator.

Typical use (see :mod:`dist_compact.parallel.plan` for the model side)::

    sp = init_distributed(ParallelConfig(ulysses=2, ring=2))   # torchrun env; one process works too
    layout = sp.layout_for(layout)
    attn = sp.wrap(SparseAttention(...))

Nothing here imports yunchang, deepspeed or xfuser; groups are passed explicitly (no singletons).
"""

from .config import ParallelConfig, ParallelConfigError, ParallelGroups, build_groups
from .coordinator import Coordinator, ParallelMismatchError
from .launch import init_distributed
from .merge import all_reduce_merge, merge_many, merge_partials
from .plan import ParallelAttention, SequenceParallel
from .ring import RingOps
from .ring_plan import (RingPlan, block_kv_bytes, ring_blocks, ring_bytes, ring_needs, ring_rank_plan, ring_shard_bytes,
                        shard_kv_bytes)
from .ulysses import UlyssesOps, heads_to_seq, seq_to_heads

__all__ = [
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelGroups",
    "build_groups",
    "SequenceParallel",
    "ParallelAttention",
    "UlyssesOps",
    "RingOps",
    "RingPlan",
    "ring_needs",
    "ring_blocks",
    "block_kv_bytes",
    "ring_bytes",
    "ring_shard_bytes",
    "shard_kv_bytes",
    "ring_rank_plan",
    "seq_to_heads",
    "heads_to_seq",
    "merge_partials",
    "merge_many",
    "all_reduce_merge",
    "Coordinator",
    "ParallelMismatchError",
    "init_distributed",
]
