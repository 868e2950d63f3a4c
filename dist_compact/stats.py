"""Recorder of what sparse attention did over a run: kinds of calls, densities, recalls, wall times.

Point ``AttentionContext.stats`` at an :class:`AttentionStats` and every
:class:`~dist_compact.sparsity.attention.SparseAttention` call records one :class:`CallRecord` per
(layer, step): the kind of call (``"dense"``, ``"fused_search"``, ``"cached_search"``,
``"sparse"``), the per-head density and, at searches, the per-head recall (the kept share of the
attention mass), and its wall time. :meth:`AttentionStats.summary` adds them up for the run report:
time in searches vs sparse attention vs dense steps, and the search overhead.

Densities and recalls are recorded as the device tensors the search produced (:class:`PerHead`) and
read back to the host only when first asked for: a read waits for the device's queue, so a search in
the middle of a forward would otherwise leave the GPU idle while the host launches what follows.

Timing costs nothing when no recorder is set. With one: on CUDA each timed span records a pair of
CUDA events (no synchronisation in the loop; :meth:`summary` synchronises once and reads them); on
CPU it uses ``time.perf_counter``. ``AttentionStats(timing=False)`` records kinds and densities only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

__all__ = ["AttentionStats", "CallRecord", "PerHead", "CALL_KINDS", "PHASES"]

#: kinds of attention calls (one per call)
CALL_KINDS = ("dense", "fused_search", "cached_search", "sparse")
#: phases timed inside calls: the attention that produces the output, and the search work on top
PHASES = ("dense", "dense_lse", "block_mass", "select", "sparse")


class _Timer:
    """One timed span: CUDA events on a CUDA device, perf_counter otherwise."""

    __slots__ = ("_start", "_end", "_t0", "_seconds")

    def __init__(self, device: Optional[torch.device]):
        self._start = self._end = None
        self._t0 = 0.0
        self._seconds: Optional[float] = None
        if device is not None and torch.device(device).type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._end is not None:
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1000.0
        return self._seconds


class PerHead:
    """Per-head figures held as a 1-D tensor until first read, then as a list of floats (read once).

    Recording keeps the tensor on its device; :meth:`values` reads it back (on a GPU that waits for
    the device's queue, which is why it is left to whoever reads the statistics). ``order``: the
    tensor's positions in the order to report (``values()[i] = tensor[order[i]]``), e.g. model head
    order for figures held in a balanced plan's order; None keeps the tensor's order."""

    __slots__ = ("_tensor", "_order", "_values")

    def __init__(self, tensor: torch.Tensor, order: Optional[Sequence[int]] = None):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
            raise ValueError(f"PerHead: needs a 1-D tensor of per-head values, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
        if order is not None and sorted(int(i) for i in order) != list(range(tensor.shape[0])):
            raise ValueError(f"PerHead: order must be a permutation of the {tensor.shape[0]} heads, got {list(order)}")
        self._tensor: Optional[torch.Tensor] = tensor.detach()
        self._order = None if order is None else [int(i) for i in order]
        self._values: Optional[List[float]] = None

    def values(self) -> List[float]:
        if self._values is None:
            raw = [float(x) for x in self._tensor.tolist()]
            self._values = raw if self._order is None else [raw[i] for i in self._order]
            self._tensor = None
        return self._values


def _per_head_field(name: str, doc: str) -> property:
    """A property over the attribute ``name`` that holds a list, None or a :class:`PerHead` (read when got)."""

    def get(self) -> Optional[List[float]]:
        v = getattr(self, name)
        return v.values() if isinstance(v, PerHead) else v

    return property(get, lambda self, value: setattr(self, name, value), doc=doc)


@dataclass
class CallRecord:
    """One attention call of one layer at one step.

    Attributes:
        layer, step: where it happened.
        kind: one of ``CALL_KINDS``.
        density: per-head density (all heads) of the index the call found (searches) or used
            (sparse); None for dense calls. A fused search computes its output densely.
        recall: per-head kept mass share (searches, and reuse of a searched index: the share at
            the search), or None.
        phases: timed phases of the call (name -> timer); ``seconds`` gives the call's total.

    ``density`` and ``recall`` are set as lists or as :class:`PerHead` (read when first got).
    """

    layer: int
    step: int
    kind: str
    _density: Union[None, List[float], PerHead] = field(default=None, repr=False)
    _recall: Union[None, List[float], PerHead] = field(default=None, repr=False)
    _timer: Optional[_Timer] = field(default=None, repr=False)
    _phases: Dict[str, List[_Timer]] = field(default_factory=dict, repr=False)

    density = _per_head_field("_density", "per-head density (a list of floats), or None")
    recall = _per_head_field("_recall", "per-head recall (a list of floats), or None")

    @property
    def seconds(self) -> Optional[float]:
        return None if self._timer is None else self._timer.seconds

    def phase_seconds(self) -> Dict[str, float]:
        return {name: sum(t.seconds for t in ts) for name, ts in self._phases.items()}

    def mean_density(self) -> Optional[float]:
        return None if not self.density else sum(self.density) / len(self.density)


class AttentionStats:
    """Per-run recorder that ``ctx.stats`` points to.

    Args:
        timing: measure wall time (CUDA events on CUDA). False records kinds/densities only.
    """

    def __init__(self, timing: bool = True):
        if not isinstance(timing, bool):
            raise TypeError(f"AttentionStats.timing must be a bool, got {timing!r}")
        self.timing = timing
        self.records: List[CallRecord] = []
        self._open: Optional[CallRecord] = None

    # ------------------------------------------------------------------ recording
    @contextmanager
    def call(self, layer: int, step: int, kind: str, device=None) -> Iterator[CallRecord]:
        """Time one attention call; set ``density`` / ``recall`` on the yielded record."""
        if kind not in CALL_KINDS:
            raise ValueError(f"call kind must be one of {CALL_KINDS}, got {kind!r}")
        rec = CallRecord(layer=int(layer), step=int(step), kind=kind)
        if self.timing:
            rec._timer = _Timer(device)
        self._open = rec
        try:
            yield rec
        finally:
            if rec._timer is not None:
                rec._timer.stop()
            self._open = None
            self.records.append(rec)

    @contextmanager
    def phase(self, name: str, device=None) -> Iterator[None]:
        """Time a phase inside the open call (no-op outside a call or without timing)."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        rec = self._open
        if rec is None or not self.timing:
            yield
            return
        t = _Timer(device)
        try:
            yield
        finally:
            t.stop()
            rec._phases.setdefault(name, []).append(t)

    def reset(self) -> None:
        self.records.clear()
        self._open = None

    # ------------------------------------------------------------------ reading
    def rows(self) -> List[dict]:
        """One plain dict per call (layer, step, kind, mean density, mean recall, seconds)."""
        out = []
        for r in self.records:
            out.append({
                "layer": r.layer,
                "step": r.step,
                "kind": r.kind,
                "density": r.mean_density(),
                "recall": None if not r.recall else sum(r.recall) / len(r.recall),
                "seconds": r.seconds,
            })
        return out

    def summary(self) -> dict:
        """Run totals for the report (JSON-serialisable).

        Keys: ``calls`` and ``time_s`` per kind; ``attention_time_s`` (all calls);
        ``search_time_s`` (whole search calls, which also produce their step's output) and
        ``search_share`` of the attention time; ``search_overhead_s`` (block mass + selection: the
        work a search adds beyond computing its output) and ``search_overhead_share``;
        ``phase_time_s`` per phase; ``mean_density``: computed share of blocks over all calls (dense
        calls and fused searches count 1) and ``mean_density_sparse`` over the other calls;
        ``layers``: per layer the per-head density and recall of its last search.
        """
        calls = {k: 0 for k in CALL_KINDS}
        times = {k: 0.0 for k in CALL_KINDS}
        phases = {p: 0.0 for p in PHASES}
        dens_all: List[float] = []
        dens_sparse: List[float] = []
        layers: Dict[str, dict] = {}
        for r in self.records:
            calls[r.kind] += 1
            if r.seconds is not None:
                times[r.kind] += r.seconds
            for name, s in r.phase_seconds().items():
                phases[name] += s
            # compute density: dense calls and fused searches compute every block
            d = 1.0 if r.kind in ("dense", "fused_search") else r.mean_density()
            if d is not None:
                dens_all.append(d)
                if r.kind in ("sparse", "cached_search"):
                    dens_sparse.append(d)
            if r.kind in ("fused_search", "cached_search"):
                layers[str(r.layer)] = {"step": r.step, "kind": r.kind, "density": r.density, "recall": r.recall}
        total = sum(times.values())
        search = times["fused_search"] + times["cached_search"]
        overhead = phases["block_mass"] + phases["select"]

        def share(x: float) -> Optional[float]:
            return x / total if self.timing and total > 0 else None

        return {
            "timing": self.timing,
            "calls": calls,
            "steps": len({r.step for r in self.records}),
            "time_s": times if self.timing else None,
            "attention_time_s": total if self.timing else None,
            "search_time_s": search if self.timing else None,
            "search_share": share(search),
            "search_overhead_s": overhead if self.timing else None,
            "search_overhead_share": share(overhead),
            "phase_time_s": phases if self.timing else None,
            "mean_density": sum(dens_all) / len(dens_all) if dens_all else None,
            "mean_density_sparse": sum(dens_sparse) / len(dens_sparse) if dens_sparse else None,
            "layers": layers,
        }

    def __repr__(self) -> str:
        return f"AttentionStats(calls={len(self.records)}, timing={self.timing})"
