"""How sparse attention behaves over a run: :class:`SparsityConfig`, its step schedule and actions.

:class:`SparsityConfig` says *what* a :class:`~dist_compact.sparsity.attention.SparseAttention` layer does at
each denoising step; :meth:`SparsityConfig.action` turns ``(step, num_steps)`` into one of

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
from typing import List, Optional, Tuple

from .._util import control_chars, is_int
from ..cmdline import short_repr
from ..ops import TRITON_DENSE_CROSSOVER

__all__ = [
    "SparsityConfig",
    "MODES",
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

MODES = ("dense", "compact", "adaspa", "compact+adaspa")
SEARCH_KINDS = ("fused", "cached")
HEAD_RULES = ("paper", "recall")
BATCH_INDEX = ("shared", "per_sample")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SparsityConfig:
    """How sparse attention behaves over a run (validated on construction).

    Args:
        mode: ``"dense"`` (no sparsity), ``"compact"`` (static Compact index after the warm-up),
            ``"adaspa"`` (online search), ``"compact+adaspa"`` (union of both indices).
        dense_steps: warm-up steps that run dense (``step < dense_steps``), in reference steps.
        search_steps: steps of the online searches, strictly increasing, in reference steps, none
            before ``dense_steps`` (ignored by the modes without online search). Steps before the
            first search run dense (``"adaspa"``) or with the static index alone
            (``"compact+adaspa"``).
        search_kinds: ``"fused"`` or ``"cached"`` for each search step; the first must be
            ``"fused"`` (a cached search reuses the LSE of the last fused search).
        reference_steps: the run length the step numbers are written for (the scaling rule:
            the module doc).
        sparsity: row-wise top-k target ``s``: each query-block row keeps ``round((1 - s) * N)`` of
            its ``N`` non-empty key blocks (density ``1 - s``). ``None`` for top-p alone.
        top_p: recall target ``p``: each row keeps the smallest set of key blocks whose attention mass
            reaches ``p`` of the row. With ``sparsity`` too, the top-k budget caps the top-p set.
        head_adaptive: give heads different budgets with the same mean (needs ``sparsity``).
        head_rule: ``"paper"`` (AdaSpa: heads with recall above ``head_threshold`` at the target
            get sparsity ``(1+s)/2``, as many lowest-recall heads get ``(3s-1)/2``) or ``"recall"``
            (spend the same total block budget greedily where it buys the most recall).
        head_threshold: the recall above which the paper rule makes a head sparser.
        text_sink: always keep text blocks as rows (full) and as columns (in every row).
        batch_index: ``"shared"`` (one index for the batch, searched on the batch-mean block mass;
            e.g. the two halves of a classifier-free-guidance batch) or ``"per_sample"``.
        compact_config: path of a searched Compact config file (read by the launcher, which hands
            the loaded pattern object to ``SparseAttention``); informational for the library.
        dense_threshold: a head whose density ends above this runs with full rows, and a layer whose
            mean density ends above it runs the dense kernel (faster than block-sparse there).
            ``1.0`` disables both (a full static layer still runs dense). The default is ``ops.TRITON_DENSE_CROSSOVER`` (0.75), where the
            Triton kernel and cuDNN cross on an H100; the device's own crossover is
            ``ops.measured_dense_threshold`` (1.0 for the Hopper warp-specialized kernel: set 1.0 there
            for speed). The default stays 0.75 so the published quality figures stay reproducible.
        mass_query_rows: sample this many query rows per block (a power of two >= 16) when computing
            the block mass of a search: about ``mass_query_rows / block_size`` of the exact cost, an
            unbiased estimate. None = all rows (exact). Needs ``ops.block_mass(..., query_rows=)``.
            The default 32 is exact for blocks of <= 32 tokens; for blocks of 128 it brought the
            added search work of a 50-step Hunyuan-shape schedule from 7.1% to 3.0% of all
            attention time on an H100 (BENCHMARKS.md).
    """

    mode: str = "adaspa"
    dense_steps: int = 10
    search_steps: Tuple[int, ...] = (10, 30)
    search_kinds: Tuple[str, ...] = ("fused", "cached")
    reference_steps: int = 50
    sparsity: Optional[float] = 0.8
    top_p: Optional[float] = None
    head_adaptive: bool = True
    head_rule: str = "paper"
    head_threshold: float = 0.8
    text_sink: bool = True
    batch_index: str = "shared"
    compact_config: Optional[str] = None
    dense_threshold: float = TRITON_DENSE_CROSSOVER
    mass_query_rows: Optional[int] = 32

    def __post_init__(self) -> None:
        def bad(name, msg):
            raise ValueError(f"SparsityConfig.{name} {msg}, got {short_repr(getattr(self, name))}")

        if self.mode not in MODES:
            bad("mode", f"must be one of {MODES}")
        if not is_int(self.reference_steps) or self.reference_steps < 1:
            bad("reference_steps", "must be an int >= 1")
        if not is_int(self.dense_steps) or not 0 <= self.dense_steps <= self.reference_steps:
            bad("dense_steps", f"must be an int in [0, reference_steps={self.reference_steps}]")
        # YAML gives lists: store tuples so the config stays hashable
        for name in ("search_steps", "search_kinds"):
            val = getattr(self, name)
            if isinstance(val, (str, bytes)) or not isinstance(val, (list, tuple)):
                bad(name, "must be a list or tuple")
            object.__setattr__(self, name, tuple(val))
        steps, kinds = self.search_steps, self.search_kinds
        if not all(is_int(s) for s in steps):
            bad("search_steps", "must hold ints")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            bad("search_steps", "must be strictly increasing")
        if self.online and steps and not (self.dense_steps <= steps[0] and steps[-1] < self.reference_steps):
            bad("search_steps", f"must lie in [dense_steps={self.dense_steps}, reference_steps={self.reference_steps})")
        if len(kinds) != len(steps):
            bad("search_kinds", f"must have one entry per search step ({len(steps)})")
        if any(k not in SEARCH_KINDS for k in kinds):
            bad("search_kinds", f"entries must be one of {SEARCH_KINDS}")
        if kinds and kinds[0] != "fused":
            bad("search_kinds", "must start with 'fused' (a cached search reuses a fused search's LSE)")
        if self.online and not steps:
            bad("search_steps", f"must name at least one step for mode {self.mode!r}")
        if self.sparsity is not None and not (_is_number(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            bad("sparsity", "must be None or a number in [0, 1)")
        if self.top_p is not None and not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "must be None or a number in (0, 1]")
        if self.online and self.sparsity is None and self.top_p is None:
            bad("sparsity", f"or top_p must be set for mode {self.mode!r}")
        if not isinstance(self.head_adaptive, bool):
            bad("head_adaptive", "must be a bool")
        if self.online and self.head_adaptive and self.sparsity is None:
            bad("sparsity", "must be set when head_adaptive is on (budgets are shares of it)")
        if self.head_rule not in HEAD_RULES:
            bad("head_rule", f"must be one of {HEAD_RULES}")
        if not (_is_number(self.head_threshold) and 0.0 < self.head_threshold < 1.0):
            bad("head_threshold", "must be a number in (0, 1)")
        if not isinstance(self.text_sink, bool):
            bad("text_sink", "must be a bool")
        if self.batch_index not in BATCH_INDEX:
            bad("batch_index", f"must be one of {BATCH_INDEX}")
        if self.compact_config is not None and (not isinstance(self.compact_config, str) or not self.compact_config):
            bad("compact_config", "must be None or a non-empty path string")
        if isinstance(self.compact_config, str) and control_chars(self.compact_config):
            bad("compact_config", f"must be a path without control characters ({control_chars(self.compact_config)})")
        if not (_is_number(self.dense_threshold) and 0.0 < self.dense_threshold <= 1.0):
            bad("dense_threshold", "must be a number in (0, 1]")
        q = self.mass_query_rows
        if q is not None and not (is_int(q) and q >= 16 and q & (q - 1) == 0):
            bad("mass_query_rows", "must be None or a power of two >= 16")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict) -> SparsityConfig:
        """From a plain mapping (e.g. a YAML section); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"SparsityConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SparsityConfig: unknown keys {short_repr(unknown)}; known: {sorted(names)}")
        return cls(**d)

    # ------------------------------------------------------------------ properties
    @property
    def online(self) -> bool:
        """The mode runs AdaSpa's online search."""
        return self.mode in ("adaspa", "compact+adaspa")

    @property
    def uses_compact(self) -> bool:
        """The mode uses a static Compact index."""
        return self.mode in ("compact", "compact+adaspa")

    @property
    def density(self) -> Optional[float]:
        """Target density ``1 - sparsity`` of the top-k budget (None for top-p alone)."""
        return None if self.sparsity is None else 1.0 - self.sparsity

    # ------------------------------------------------------------------ schedule
    def schedule(self, num_steps: int) -> Schedule:
        """The schedule scaled to a run of ``num_steps`` steps (:func:`scale_schedule`)."""
        return scale_schedule(self, num_steps)

    def action(self, step: int, num_steps: int) -> str:
        """What to do at ``step`` of a ``num_steps`` run: ``DENSE``, ``FUSED``, ``CACHED`` or ``REUSE``."""
        sched = self.schedule(num_steps)
        if not is_int(step) or not 0 <= step < num_steps:
            raise ValueError(f"step must be an int in [0, num_steps={num_steps}), got {step!r}")
        if self.mode == "dense" or step < sched.dense_steps:
            return DENSE
        if not self.online:
            return REUSE
        for s, kind in sched.searches:
            if s == step:
                return FUSED if kind == "fused" else CACHED
        if step < sched.searches[0][0]:
            # before the first search there is no online index: dense, or the static one alone
            return REUSE if self.uses_compact else DENSE
        return REUSE

    def needs_lse_after(self, step: int, num_steps: int) -> bool:
        """Whether a cached search after ``step`` needs the LSE kept at a fused search (so the
        LSE cache can be released once the last cached search has run)."""
        return any(kind == "cached" and s > step for s, kind in self.schedule(num_steps).searches)



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
def scale_schedule(config: SparsityConfig, num_steps: int) -> Schedule:
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


def step_kinds(sparsity: SparsityConfig, num_steps: int) -> List[str]:
    """What each step of a ``num_steps`` run does: "dense", "fused search", "cached search" or "sparse".

    From :meth:`SparsityConfig.action`, i.e. the schedule scaled to this run (a "sparse" step uses
    the cached online index, or the static Compact index before the first search).
    """
    return [_STEP_WORDS[sparsity.action(i, num_steps)] for i in range(num_steps)]


def describe_schedule(sparsity: SparsityConfig, num_steps: int) -> str:
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


def sparsity_line(sparsity: SparsityConfig, num_steps: int) -> str:
    """The log line of a run's sparsity: the schedule in this run's steps, then the other settings."""
    if sparsity.mode == "dense":
        return f"mode dense, {num_steps} steps: {describe_schedule(sparsity, num_steps)}"
    schedule_keys = ("dense_steps", "search_steps", "search_kinds", "reference_steps")
    rest = ", ".join(f"{f.name}={getattr(sparsity, f.name)!r}" for f in fields(sparsity)
                     if f.name not in schedule_keys + ("mode",))
    scaled = "" if sparsity.reference_steps == num_steps else (
        f" (the config's step numbers are written for reference_steps={sparsity.reference_steps} and scaled)")
    return f"mode {sparsity.mode}, {num_steps} steps: {describe_schedule(sparsity, num_steps)}{scaled}; {rest}"
