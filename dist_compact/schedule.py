"""Alias of the import path README and docs/usage.md gave before 0.2 (``from dist_compact.schedule
import SparsityConfig``), kept for scripts written against it. :class:`SparsityConfig` lives in
:mod:`dist_compact.config`, the step schedule in :mod:`dist_compact.step_schedule`."""

from .config import SparsityConfig
from .step_schedule import ACTIONS, CACHED, DENSE, FUSED, REUSE, Schedule

__all__ = ["SparsityConfig", "Schedule", "DENSE", "FUSED", "CACHED", "REUSE", "ACTIONS"]
