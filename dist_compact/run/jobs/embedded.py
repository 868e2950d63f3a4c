"""The embedded tiny DiT's job (``model.kind: embedded``): its weights, prompt tokens and the sampler.

The skeleton is :mod:`dist_compact.run.runner`; the sampler :mod:`dist_compact.run.sampler`; the
attention layers come from :func:`dist_compact.sparsity.attention.build_attention`; the outputs go
through :mod:`dist_compact.run.report`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from .. import report as rpt
from ...sparsity.attention import build_attention
from ...sparsity.config import SparsityConfig, sparsity_line, step_kinds
from ..runner import Job, LoadedModel, RunOutput, log
from ..sampler import sample
from ...stats import AttentionStats
from ...integrations.core import DenoisingState
from ...integrations.diffusers import sparsify

__all__ = ["EmbeddedJob", "CPU_MAX_VIDEO_TOKENS", "COMPILE_MIN_VIDEO_TOKENS"]

#: the largest embedded-model video a CPU run takes (the GPU model's 16,384 tokens would take hours)
CPU_MAX_VIDEO_TOKENS = 8192
#: from this many video tokens a GPU run compiles each block's per-token work
#: (:meth:`EmbeddedDiT.compile_pointwise`): there it is as slow as attention eager; below, the
#: compile time outweighs what it saves
COMPILE_MIN_VIDEO_TOKENS = 8192


class EmbeddedJob(Job):
    """The embedded tiny DiT (``model.kind: embedded``): its weights file, prompt tokens, the sampler of
    :mod:`dist_compact.run.sampler`; the report is built on every rank (rank 0 writes it)."""

    def __init__(self, cfg, attention_factory: Optional[Callable] = None):
        super().__init__(cfg)
        self.factory = attention_factory or build_attention

    def load(self, proc) -> LoadedModel:
        from ...models.embedded import load_embedded, sha256_of, shipped_weights

        mc = self.cfg.model
        path = mc.path or str(shipped_weights(mc.name))
        model = self.model = load_embedded(path, device=proc.device, dtype=proc.dtype)
        self.info = {"name": mc.name, "weights": os.path.abspath(path), "sha256": sha256_of(path),
                     "params": sum(p.numel() for p in model.parameters()),
                     "config": dataclasses.asdict(model.config)}
        # unknown words: an error before any output
        self.text = model.tokenizer.encode(self.cfg.run.prompt).unsqueeze(0).to(proc.device)
        return LoadedModel(num_layers=model.config.depth, num_heads=model.config.heads,
                           weights=("model weights", self.info["sha256"]))

    def prepare(self, sp, compact) -> None:
        mc, mcfg = self.cfg.model, self.model.config
        self.sp, self.compact = sp, compact
        self.layout = sp.layout_for(self.model.video_layout(mc.frames, mc.height, mc.width, mc.tile))
        tokens = self.layout.video_tokens
        if self.proc.device.type == "cpu" and tokens > CPU_MAX_VIDEO_TOKENS:
            raise ValueError(
                f"model {mc.name!r} at {mc.frames} x {mc.height} x {mc.width} px is {tokens:,} video tokens: a GPU "
                f"job (hours on a CPU); on this machine run the CPU default, `python generate.py` (the tiny "
                f"embedded model, 2,304 tokens), or a smaller video (--model.height / --model.width)")
        if self.proc.device.type == "cuda" and tokens >= COMPILE_MIN_VIDEO_TOKENS:
            self.model.compile_pointwise()
        gen = torch.Generator().manual_seed(self.cfg.run.seed)  # CPU generator: the same noise on every rank and device
        self.noise = torch.randn((1, mcfg.in_channels, mc.frames, mc.height, mc.width),
                                 generator=gen).to(self.proc.device)

    def begin(self) -> None:
        p = self.proc
        log.info("world %d rank %d device %s dtype %s layout %s", p.world, p.rank, p.device, p.dtype, self.layout)
        log.info("model %s (%d params, sha256 %s)", self.info["weights"], self.info["params"], self.info["sha256"])
        self.balance = {}  # the sequence-parallel plan's per-rank work, of the first run's layers
        if p.device.type == "cuda" and self.cfg.run.compare_dense:
            # the timed runs are compared: run the schedule once untimed first, so torch.compile, the Triton
            # autotuner and cuDNN's plans are not billed to whichever run comes first (on the GPU model
            # that was 2.1 s of a 0.3 s run)
            run = self.cfg.run
            state = self._install(self.cfg.sparsity, AttentionStats())
            sample(self.model, self.text, self.noise, steps=run.steps, guidance=run.guidance, shift=run.shift,
                   state=state)
            log.info("warm-up run done (untimed)")

    def _install(self, sparsity: SparsityConfig, stats: AttentionStats) -> DenoisingState:
        """Our attention on the model for one run (the plan's shards, the config's tile); its step state."""
        state = DenoisingState()
        sparsify(self.model, sparsity, compact=self.compact if sparsity.uses_compact else None,
                 sequence_parallel=self.sp, tile=self.cfg.model.tile, state=state, stats=stats,
                 backend=self.cfg.run.attn_backend, attention_factory=self.factory)
        return state

    def one_run(self, sparsity: SparsityConfig, label: str) -> RunOutput:
        run, sp, model = self.cfg.run, self.sp, self.model
        stats = AttentionStats()
        state = self._install(sparsity, stats)
        log.info("%s run: %s", label, sparsity_line(sparsity, run.steps))
        res = sample(model, self.text, self.noise, steps=run.steps, guidance=run.guidance, shift=run.shift,
                     state=state, progress=run.progress and self.proc.rank == 0,
                     step_labels=step_kinds(sparsity, run.steps))
        log.info("%s run: %.3f s total", label, res.total_seconds)
        if sp.enabled and not self.balance:
            self.balance.update(sp.balance_report(self.layout))
        return RunOutput(sample=res, stats=stats, layout=self.layout)

    def report(self, folder, sparse: RunOutput, dense: Optional[RunOutput]) -> dict:
        p, mcfg = self.proc, self.model.config
        report = rpt.build_report(self.cfg, model_info=self.info, layout=self.layout, world=p.world, device=p.device,
                                  dtype=p.dtype, sparse=sparse, dense=dense, num_layers=mcfg.depth,
                                  num_heads=mcfg.heads)
        report["parallel_balance"] = self.balance or None  # imbalance = max / mean computed blocks per rank
        return report
