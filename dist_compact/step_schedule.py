"""The per-step schedule of sparse attention (the step actions, their scaling to a run, their words).

:class:`~dist_compact.config.SparsityConfig` says *what* a
:class:`~dist_compact.attention.SparseAttention` layer does at each denoising step;
:meth:`~dist_compact.config.SparsityConfig.action` turns ``(step, num_steps)`` into one of

* ``DENSE``   - dense attention (warm-up steps, or ``mode="dense"``);
* ``FUSED``   - AdaSpa "fused online search": a dense pass that keeps each row's LSE, then the block
  attention mass with that LSE, then the selection; the step's output is the exact dense output;
* ``CACHED``  - AdaSpa "LSE-cached search": the block mass with the LSE kept at the last fused search
  (the LSE barely changes between steps), the selection, then sparse attention with the new index;
* ``REUSE``   - sparse attention with the cached index (or the static Compact index).

The AdaSpa paper's schedule (50 steps): steps 0-9 dense, a fused search at step 10, an LSE-cached
search at step 30, the index reused in between and after.

Schedule scaling (runs with ``num_steps != reference_steps``): every step number of the config
(``dense_steps`` and each search step) is written for ``reference_steps`` steps and maps to

    s' = floor(s * num_steps / reference_steps + 1/2)

so the schedule keeps its shape as a fraction of the run (50 -> 25 steps: dense 0-4, searches at 5
and 15; 50 -> 100 steps: dense 0-19, searches at 20 and 60). A search that lands on or after
``num_steps`` moves to the last step; searches that land on the same step collapse to the first of
them (so a fused search is never replaced by a cached one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, List, Tuple

from ._util import is_int

if TYPE_CHECKING:  # the config module imports this one
    from .config import SparsityConfig

__all__ = [
    "Schedule",
    "scale_schedule",
    "DENSE",
    "FUSED",
    "CACHED",
    "REUSE",
    "ACTIONS",
    "step_kinds",
    "describe_schedule",
    "sparsity_line",
]

DENSE = "dense"
FUSED = "fused_search"
CACHED = "cached_search"
REUSE = "reuse"
ACTIONS = (DENSE, FUSED, CACHED, REUSE)


@dataclass(frozen=True)
class Schedule:
    """A :class:`SparsityConfig`'s schedule scaled to one run length.

    Attributes:
        num_steps: steps of the run.
        dense_steps: steps ``< dense_steps`` run dense.
        searches: ``((step, "fused" | "cached"), ...)`` in increasing step order (empty when the
            mode has no online search).
    """

    num_steps: int
    dense_steps: int
    searches: Tuple[Tuple[int, str], ...]


@lru_cache(maxsize=64)
def scale_schedule(config: "SparsityConfig", num_steps: int) -> Schedule:
    """``config``'s schedule scaled to a run of ``num_steps`` steps (the rule in the module doc; cached)."""
    if not is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    ref = config.reference_steps

    def scale(s: int) -> int:
        return int(math.floor(s * num_steps / ref + 0.5))

    dense = min(scale(config.dense_steps), num_steps)
    searches = []
    if config.online:
        seen = set()
        for s, kind in zip(config.search_steps, config.search_kinds):
            t = min(max(scale(s), dense), num_steps - 1)
            if t not in seen:  # the first search mapped to a step wins (the fused one comes first)
                seen.add(t)
                searches.append((t, kind))
    dense = min(dense, searches[0][0]) if searches else dense
    return Schedule(num_steps=num_steps, dense_steps=dense, searches=tuple(searches))


#: what each :meth:`SparsityConfig.action` does, in the words of the log and the progress bar
_STEP_WORDS = {"dense": "dense", "fused_search": "fused search", "cached_search": "cached search",
               "reuse": "sparse"}


def step_kinds(sparsity: "SparsityConfig", num_steps: int) -> List[str]:
    """What each step of a ``num_steps`` run does: "dense", "fused search", "cached search" or "sparse".

    From :meth:`SparsityConfig.action`, i.e. the schedule scaled to this run (a "sparse" step uses
    the cached online index, or the static Compact index before the first search).
    """
    return [_STEP_WORDS[sparsity.action(i, num_steps)] for i in range(num_steps)]


def describe_schedule(sparsity: "SparsityConfig", num_steps: int) -> str:
    """The schedule of this run in its own step numbers, e.g. for the demo's 20 steps
    ``"steps 0-7 dense, 8 fused search, 9-11 sparse, 12 fused search, 13-15 sparse, 16 fused search,
    17-19 sparse"``.

    The config's ``dense_steps`` / ``search_steps`` are written for ``reference_steps`` steps and
    scaled to the run (the module doc); this is what the run does after scaling.
    """
    kinds = step_kinds(sparsity, num_steps)
    runs: List[str] = []
    start = 0
    for i in range(1, num_steps + 1):
        if i == num_steps or kinds[i] != kinds[start] or kinds[start].endswith("search"):
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{span} {kinds[start]}")
            start = i
    return "steps " + ", ".join(runs)


def sparsity_line(sparsity: "SparsityConfig", num_steps: int) -> str:
    """The log line of a run's sparsity: the schedule in this run's steps, then the other settings."""
    if sparsity.mode == "dense":
        return f"mode dense, {num_steps} steps: {describe_schedule(sparsity, num_steps)}"
    schedule_keys = ("dense_steps", "search_steps", "search_kinds", "reference_steps")
    rest = ", ".join(f"{f.name}={getattr(sparsity, f.name)!r}" for f in fields(sparsity)
                     if f.name not in schedule_keys + ("mode",))
    scaled = "" if sparsity.reference_steps == num_steps else (
        f" (the config's step numbers are written for reference_steps={sparsity.reference_steps} and scaled)")
    return f"mode {sparsity.mode}, {num_steps} steps: {describe_schedule(sparsity, num_steps)}{scaled}; {rest}"
