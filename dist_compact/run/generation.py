"""One generation run (what ``generate.py`` calls): :func:`run_generation` picks the job of ``model.kind``.

The jobs (:mod:`dist_compact.run.jobs`): the embedded tiny DiT, a diffusers pipeline from a local
folder, or a published transformer with random weights; every one runs through the skeleton of
:mod:`dist_compact.run.runner`.
"""

from __future__ import annotations

from typing import Callable, Optional

from .jobs.diffusers import DiffusersJob
from .jobs.embedded import EmbeddedJob
from .jobs.random_weights import RandomJob
from .runner import RunResult, run_job

__all__ = ["JOBS", "run_generation"]

#: ``model.kind`` -> its job (``ModelConfig`` checks the kind)
JOBS = {"embedded": EmbeddedJob, "diffusers": DiffusersJob, "random": RandomJob}


def run_generation(cfg, *, attention_factory: Optional[Callable] = None) -> RunResult:
    """One generation run from a :class:`~dist_compact.run.config.RunConfig` (the job of its ``model.kind``).

    Every rank calls it (under torchrun); rank 0 writes ``<output_dir>/<name>/`` atomically.
    ``attention_factory(num_layers, sparsity, compact, sp)`` replaces
    :func:`~dist_compact.sparsity.attention.build_attention`.

    Raises:
        WorldSizeError, NonFiniteLatentsError, WeightsError, ConfigError-like ValueErrors: each
        before anything is left in ``output_dir``.
    """
    return run_job(JOBS[cfg.model.kind](cfg, attention_factory))
