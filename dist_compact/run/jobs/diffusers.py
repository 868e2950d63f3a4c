"""Run a diffusers video pipeline (WanPipeline, HunyuanVideoPipeline) with our sparsity and parallelism.

Three layers, each usable alone:

* :func:`load_pipeline` - a pipeline from a LOCAL weights folder (``save_pretrained`` layout:
  ``model_index.json`` + one folder per component); nothing is downloaded.
* :func:`generate` - one video: :func:`~dist_compact.integrations.diffusers.sparsify` on the
  pipeline's transformer(s) with a shared :class:`~dist_compact.integrations.core.DenoisingState`
  (``begin(num_steps)``, then updated by ``callback_on_step_end``), per-step wall times, the final
  latents captured from the callback; returns a :class:`DiffusersSample`.
* :func:`run_diffusers_generation` - the main job for a :class:`~dist_compact.run.config.RunConfig` whose
  ``model.kind`` is ``"diffusers"``: processes and devices, the sparse run (and a dense run from the
  same noise with ``run.compare_dense``), and the run folder through :mod:`dist_compact.run.report`
  (written by rank 0 under a temporary name, renamed when complete).

Sequence parallelism: every rank runs the whole pipeline (text encoder, sampler, VAE) on the same
inputs and seeds; only the transformer is sharded (its hooks shard the video tokens and gather the
output, so every rank holds the same latents). Ranks other than 0 skip the VAE decode.

Video layout returned: ``[B, 3, F, H, W]`` float32 in ``[-1, 1]`` (the report writer's layout);
latents: ``[B, C, T, h, w]`` float32 as the sampler left them (before the VAE's de-normalisation).
Noise comes from a CPU generator seeded with ``seed`` (identical on every rank and device).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .. import report as rpt
from ...sparsity.config import SparsityConfig, sparsity_line
from ..runner import Job, LoadedModel, RunOutput, RunResult, log, run_job
from ..sampler import SampleResult, sync
from ...stats import AttentionStats
from ...extras import require
from ...integrations.core import DenoisingState, installed
from ...integrations.diffusers import sparsify

__all__ = ["PIPELINES", "DiffusersSample", "DiffusersJob", "load_pipeline", "set_flow_shift", "generate",
           "run_diffusers_generation"]

#: Pipeline classes this runner knows; their ``__call__`` take the same core arguments.
PIPELINES = ("WanPipeline", "HunyuanVideoPipeline")


@dataclass
class DiffusersSample:
    """One generated video.

    Attributes:
        video: float32 ``[B, 3, F, H, W]`` in ``[-1, 1]``, or None when not decoded (``decode=False``).
        latents: float32 ``[B, C, T, h, w]``, the sampler's final latents.
        step_seconds: wall time of every denoising step (device synchronised).
        layout: the global :class:`~dist_compact.layout.VideoLayout` of the last transformer forward.
        stats: the :class:`~dist_compact.stats.AttentionStats` of the run.
    """

    video: Optional[torch.Tensor]
    latents: torch.Tensor
    step_seconds: List[float] = field(default_factory=list)
    layout: object = None
    stats: object = None

    @property
    def total_seconds(self) -> float:
        return float(sum(self.step_seconds))


def load_pipeline(model_path, pipeline: str = "WanPipeline", *, device="cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder, on ``device`` in ``dtype`` (the VAE stays float32).

    Raises:
        ValueError: unknown pipeline class, or ``model_path`` is not a local pipeline folder.
        ImportError: diffusers (the ``[diffusers]`` extra) is missing.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown diffusers pipeline {pipeline!r}; supported: {', '.join(PIPELINES)}")
    path = Path(model_path)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"--model-path {model_path}: not a local diffusers pipeline folder (no model_index.json); "
            "download the weights first (e.g. hf download Wan-AI/Wan2.1-T2V-14B-Diffusers "
            "--local-dir <folder>) and pass that folder"
        )
    cls = getattr(require("diffusers", "diffusers", "the diffusers runner"), pipeline)
    # diffusers' advice for both models: the VAE in float32 (bf16 decoding shows banding)
    dtypes = {"default": dtype, "vae": torch.float32}
    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype to dtype; torch_dtype works in every version we support
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = cls.from_pretrained(str(path), torch_dtype=dtypes, local_files_only=True)
    return pipe.to(device)


def set_flow_shift(pipe, shift: float) -> None:
    """Rebuild ``pipe.scheduler`` with flow shift ``shift`` (its ``flow_shift`` or ``shift`` key)."""
    sched = pipe.scheduler
    key = next((k for k in ("flow_shift", "shift") if k in sched.config), None)
    if key is None:
        raise ValueError(f"{type(sched).__name__} has no flow shift setting (flow_shift / shift); use run.shift 1.0")
    pipe.scheduler = type(sched).from_config(sched.config, **{key: float(shift)})


def _transformers(pipe) -> List[torch.nn.Module]:
    mods = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    return [m for m in mods if m is not None]


def generate(pipe, *, prompt: Optional[str], num_steps: int, frames: int, height: int, width: int, seed: int = 0,
             guidance: Optional[float] = None, sparsity: Optional[SparsityConfig] = None, compact=None, sp=None,
             tile=None, backend: str = "auto", stats=None, decode: bool = True, progress: bool = False,
             negative_prompt: Optional[str] = None, call_kwargs: Optional[Dict] = None,
             attention_factory: Optional[Callable] = None) -> DiffusersSample:
    """Generate one video with ``pipe`` under dist_compact attention.

    Args:
        pipe: a loaded WanPipeline / HunyuanVideoPipeline (:func:`load_pipeline`).
        prompt: the text prompt (None when ``call_kwargs`` carries ``prompt_embeds``).
        num_steps, frames, height, width, seed: sampler steps, video size in frames / pixels, noise seed.
        guidance: the pipeline's ``guidance_scale`` (Wan: classifier-free guidance; HunyuanVideo: the
            distilled guidance embedding); None keeps the pipeline's default.
        sparsity, compact, sp, tile, backend, stats, attention_factory: passed to
            :func:`~dist_compact.integrations.diffusers.sparsify` (``sparsity`` None = dense).
        decode: run the VAE (``video``); False returns the latents only.
        progress: diffusers' progress bar.
        negative_prompt: the pipeline's negative prompt (None: its default).
        call_kwargs: more keyword arguments for ``pipe(...)`` (e.g. ``prompt_embeds``,
            ``max_sequence_length``).
    """
    mods = _transformers(pipe)
    if not mods:
        raise ValueError(f"{type(pipe).__name__} has no transformer to sparsify")
    sparsity = sparsity if sparsity is not None else SparsityConfig(mode="dense")
    stats = stats if stats is not None else AttentionStats()
    state = DenoisingState().begin(num_steps)
    for m in mods:
        sparsify(m, sparsity, compact=compact, sequence_parallel=sp, tile=tile, state=state, stats=stats,
                 backend=backend, attention_factory=attention_factory)
    device = pipe.device
    times: List[float] = []
    final: Dict[str, torch.Tensor] = {}
    clock = [0.0]

    def on_step_end(p, i, t, kwargs):
        sync(device)
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now
        final["latents"] = kwargs["latents"]  # the sampler makes a new tensor every step
        return state.on_step_end(p, i, t, kwargs)

    pipe.set_progress_bar_config(disable=not progress)
    args = dict(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=num_steps,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pt" if decode else "latent",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    if guidance is not None:
        args["guidance_scale"] = guidance
    if negative_prompt is not None:
        args["negative_prompt"] = negative_prompt
    args.update(call_kwargs or {})
    sync(device)
    clock[0] = time.perf_counter()
    with torch.no_grad():
        out = pipe(**args)
    frames_out = out.frames if hasattr(out, "frames") else out[0]
    if decode:
        # postprocess_video(output_type="pt"): [B, F, 3, H, W] in [0, 1]
        video = frames_out.detach().float().permute(0, 2, 1, 3, 4).mul(2).sub(1).cpu()
        latents = final.get("latents")
        latents = None if latents is None else latents.detach().float()
    else:
        video, latents = None, frames_out.detach().float()
    if latents is None:
        raise RuntimeError("the pipeline never called callback_on_step_end; cannot read its final latents")
    return DiffusersSample(video=video, latents=latents.cpu(), step_seconds=times,
                           layout=installed(mods[0]).layout, stats=stats)


# ---------------------------------------------------------------------------------------------- main job
class DiffusersJob(Job):
    """The runner of ``model.kind: diffusers`` (see :func:`run_diffusers_generation`)."""

    def __init__(self, cfg, attention_factory: Optional[Callable] = None):
        super().__init__(cfg)
        self.attention_factory = attention_factory

    def load(self, proc) -> LoadedModel:
        run, mcfg = self.cfg.run, self.cfg.model
        pipe = self.pipe = load_pipeline(mcfg.path, mcfg.pipeline, device=proc.device, dtype=proc.dtype)
        if run.shift != 1.0:
            set_flow_shift(pipe, run.shift)
        tcfg = pipe.transformer.config
        num_heads = tcfg.num_attention_heads
        num_layers = tcfg.num_layers + getattr(tcfg, "num_single_layers", 0)
        self.model_info = {"name": mcfg.name, "path": os.path.abspath(mcfg.path), "pipeline": mcfg.pipeline,
                           "transformer": type(pipe.transformer).__name__,
                           "params": sum(p.numel() for p in pipe.transformer.parameters()),
                           "num_layers": num_layers, "num_heads": num_heads}
        # the same config on every rank (weights: the same folder by config); the Compact file read on rank 0
        return LoadedModel(num_layers=num_layers, num_heads=num_heads, weights=None)

    def prepare(self, sp, compact) -> None:
        self.sp, self.compact = sp, compact

    def begin(self) -> None:
        p, mcfg = self.proc, self.cfg.model
        log.info("world %d rank %d device %s dtype %s pipeline %s from %s", p.world, p.rank, p.device, p.dtype,
                 mcfg.pipeline, mcfg.path)

    def one_run(self, sparsity: SparsityConfig, label: str) -> RunOutput:
        run, mcfg, rank = self.cfg.run, self.cfg.model, self.proc.rank
        log.info("%s run: %s", label, sparsity_line(sparsity, run.steps))
        stats = AttentionStats()
        s = generate(self.pipe, prompt=run.prompt, num_steps=run.steps, frames=mcfg.frames, height=mcfg.height,
                     width=mcfg.width, seed=run.seed, guidance=run.guidance, sparsity=sparsity,
                     compact=self.compact if sparsity.uses_compact else None, sp=self.sp, tile=mcfg.tile,
                     backend=run.attn_backend, stats=stats, decode=rank == 0,
                     progress=run.progress and rank == 0, attention_factory=self.attention_factory)
        for i, sec in enumerate(s.step_seconds):
            log.info("%s step %d: %.4f s", label, i, sec)
        log.info("%s run: %.3f s total, layout %s", label, s.total_seconds, s.layout)
        # the report's "latents" are the decoded video on rank 0 (what its writers show)
        video = s.video[:1] if s.video is not None else s.latents[:1]
        return RunOutput(sample=SampleResult(latents=video, step_seconds=s.step_seconds), stats=stats,
                         layout=s.layout, model_latents=s.latents)

    def report(self, folder, sparse: RunOutput, dense: Optional[RunOutput]) -> dict:
        if folder is None:
            return {}
        p, info = self.proc, self.model_info
        return rpt.build_report(self.cfg, model_info=info, layout=sparse.layout, world=p.world,
                                device=p.device, dtype=p.dtype, sparse=sparse, dense=dense,
                                num_layers=info["num_layers"], num_heads=info["num_heads"])

    def write(self, folder, report: dict, sparse: RunOutput, dense: Optional[RunOutput]) -> None:
        rpt.save_tensor(sparse.model_latents, os.path.join(folder.tmp, "model_latents.pt"), folder.final)
        super().write(folder, report, sparse, dense)


def run_diffusers_generation(cfg, *, attention_factory: Optional[Callable] = None) -> RunResult:
    """The main job for ``cfg.model.kind == "diffusers"`` (every rank calls it, as under torchrun).

    Loads ``cfg.model.pipeline`` from ``cfg.model.path``, runs ``cfg.run.steps`` steps at
    ``cfg.model.frames x height x width`` pixels with ``cfg.sparsity`` (and a dense run with
    ``run.compare_dense``), and writes the run folder (see :mod:`dist_compact.run.report`) on rank 0,
    through the run skeleton of :mod:`dist_compact.run.runner`.
    ``run.shift`` (when not 1.0) replaces the flow shift of the pipeline's scheduler
    (``flow_shift`` of UniPC, ``shift`` of FlowMatchEuler); 1.0 keeps the weights folder's setting.

    Returns:
        :class:`~dist_compact.run.runner.RunResult` (``latents``: the video ``[1, 3, F, H, W]`` in
        [-1, 1] on rank 0, the sampler's latents elsewhere).
    """
    return run_job(DiffusersJob(cfg, attention_factory))
