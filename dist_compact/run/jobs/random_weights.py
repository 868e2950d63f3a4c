"""The main job for ``model.kind: random``: a real-shaped video transformer with RANDOM weights.

For speed runs where no weights can be downloaded (speed does not depend on the weights' values):
every rank builds the same published transformer (``model.name``: ``"hunyuanvideo"`` or
``"wan2.1-t2v-14b"``, :mod:`dist_compact.models.published`) with random weights (seed
:data:`WEIGHT_SEED` on every rank; bfloat16 on GPUs, float32 on the CPU with ``model.dtype: auto``),
installs our attention with :func:`~dist_compact.integrations.diffusers.sparsify` exactly as the
diffusers runner does (the run's :class:`~dist_compact.parallel.SequenceParallel` plan, the config's
tile, a shared :class:`~dist_compact.integrations.core.DenoisingState`), and denoises:

* no text encoder and no VAE: the prompt embeddings are random (seeded by ``run.seed``) in the
  pipelines' shapes (HunyuanVideo: 256 tokens of 4096, all valid, and a pooled 768 vector; Wan: 512
  tokens of 4096); the initial latents ``[1, 16, (F - 1) / 4 + 1, H / 8, W / 8]`` come from a CPU
  generator seeded by ``run.seed`` (the same on every rank and device);
* the flow-matching Euler sampler of :func:`dist_compact.run.sampler.sample` (``run.steps``,
  ``run.shift``; per-step synchronised wall times, a NaN / Inf check after every step, tqdm on rank
  0) with NO classifier-free guidance: one transformer forward per step. HunyuanVideo gets its
  distilled guidance embedding ``run.guidance * 1000`` (as diffusers' pipeline passes it); Wan
  ignores ``run.guidance``. Timesteps are ``1000 t`` as diffusers' flow-matching schedulers give;
* the sparsity schedule follows the steps: the step of every forward goes into the
  :class:`DenoisingState` (dense warm-up, searches, reuse as ``sparsity`` says).

Outputs (rank 0, through :mod:`dist_compact.run.report`'s run folder): ``latents.pt`` (the final latents
``[1, 16, T, h, w]`` float32), ``report.json`` and a LATENT PREVIEW as ``frames.png`` (and
``video.mp4`` / ``video.gif`` with ``run.video``): latent channels 0-2, each normalised with the
sparse run's mean and 3 standard deviations to [-1, 1] - not decoded video (there is no VAE). The
report's ``quality`` (PSNR / SSIM with ``--compare-dense``) is computed on these previews; the raw
latents' difference is in ``latent_quality``. With random weights neither measures a real model.

report.json adds to :func:`dist_compact.run.report.build_report`'s payload:

* ``random_model``: what was built (published name, size, layers, heads, head size, weight seed,
  text tokens, forwards per step, guidance embedding) and a note on the preview;
* per run (``sparse`` and ``dense``): ``timing`` (mean, median, mean without the first step),
  ``parallel`` (``ulysses``, ``ring``, ``ring_bytes_sent_per_rank`` - the K/V bytes each rank sent
  point-to-point, gathered to rank 0 - their sum ``ring_bytes_sent``, ``dense_ring_bytes_per_rank``
  / ``dense_ring_bytes`` - what a dense ring sends for the same attention calls and layout:
  ``calls x (ring - 1) x 2 x batch x Vr x block_size x heads / ulysses x head_dim x element size``
  per rank, ``Vr`` = video blocks per ring shard, the formula of ``RingOps`` and
  ``benchmarks/parallel_layer.py`` - ``ring_vs_dense``, ``ring_bytes_per_step``) and
  ``peak_memory_bytes_per_rank`` (``torch.cuda.max_memory_allocated`` of each rank during the run;
  null on CPU). The sparse run's bytes include its searches' extra key-only ring passes
  (``RingOps.block_mass``), so they can exceed the dense figure when the index skips no shard.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Callable, Dict, List, Optional

import torch

from .. import report as rpt
from ...sparsity.attention import build_attention
from ..config import RANDOM_MODELS
from ...sparsity.config import SparsityConfig, sparsity_line, step_kinds
from ...layout import VideoLayout
from ...parallel import Coordinator, ParallelAttention, ParallelConfig, RingOps, ring_shard_bytes
from ..runner import Job, LoadedModel, RunOutput, RunResult, log, run_job
from ..sampler import SampleResult, sample
from ...stats import AttentionStats
from ...integrations.core import DenoisingState, installed
from ...integrations.diffusers import sparsify
from ...models.adapters import adapter_for

__all__ = ["MODELS", "WEIGHT_SEED", "published_config", "latent_shape", "build_random_transformer",
           "weights_fingerprint", "random_text_inputs", "latent_preview", "RandomJob", "run_random_generation"]

#: ``model.name`` -> the key of :mod:`dist_compact.models.published` (``"hunyuan_video"`` / ``"wan"``).
MODELS = RANDOM_MODELS
#: Seed of the random weights (the same on every rank and in every run, whatever ``run.seed``).
WEIGHT_SEED = 0
#: VAE compression of both published models: time, space.
VAE_T, VAE_S = 4, 8

_PREVIEW_NOTE = ("frames.png / video.* / quality are a LATENT PREVIEW (latent channels 0-2 normalised per "
                 "channel with the sparse run's mean and 3 std to [-1, 1]), not decoded video: no VAE runs. "
                 "The weights are random, so the values (and PSNR / SSIM) do not measure a real model; "
                 "the timings, densities and ring bytes have the published model's shapes.")


def _key(name: str) -> str:
    key = MODELS.get(name)
    if key is None:
        raise ValueError(f"model.name {name!r} is not a random-weight model; known: {', '.join(MODELS)}")
    return key


def published_config(name: str, size: str = "full", heads: Optional[int] = None):
    """``(key, transformer config dict, text tokens)`` of ``name`` (``size``: ``"full"`` or ``"small"``;
    ``heads``: another head count, the head size kept)."""
    from ...models.published import HUNYUAN_VIDEO, SHAPES, SMALL, WAN_14B

    key = _key(name)
    if size == "full":
        cfg, text = dict({"hunyuan_video": HUNYUAN_VIDEO, "wan": WAN_14B}[key]), SHAPES[key][1]
    elif size == "small":
        small, (_, text) = SMALL[key]
        cfg = dict(small)
    else:
        raise ValueError(f"model.size must be 'full' or 'small', got {size!r}")
    if heads is not None:
        cfg["num_attention_heads"] = heads
    return key, cfg, text


def latent_shape(frames: int, height: int, width: int) -> tuple:
    """``(16, T, h, w)`` latents of a ``frames x height x width`` video (VAE 4x time, 8x space); the
    size is one :class:`~dist_compact.run.config.ModelConfig` accepts for ``kind: random`` (4k + 1 frames,
    height and width multiples of 16)."""
    return (16, (frames - 1) // VAE_T + 1, height // VAE_S, width // VAE_S)


def build_random_transformer(name: str, size: str = "full", layers: Optional[int] = None, *,
                             heads: Optional[int] = None, device="cpu", dtype: torch.dtype = torch.float32,
                             seed: int = WEIGHT_SEED):
    """The transformer of ``name`` with random weights (seeded: the same on every rank), on ``device``.

    Returns ``(model, key, config dict as built, text tokens)``.
    """
    from ...models.published import build_transformer

    key, cfg, text_tokens = published_config(name, size, heads)
    torch.manual_seed(seed)  # CPU and every CUDA device: the same weights on every rank
    model, built = build_transformer(key, cfg, device, dtype, layers)
    return model.requires_grad_(False), key, built, text_tokens


def weights_fingerprint(model) -> str:
    """A cheap digest of the weights (per-tensor float32 sums), compared across ranks."""
    with torch.no_grad():
        sums = torch.stack([p.float().sum() for p in model.parameters()]).double().cpu()
    return f"{len(sums)}:{sums.sum().item():.10e}:{sums.abs().sum().item():.10e}"


def random_text_inputs(key: str, cfg: dict, text_tokens: int, gen: torch.Generator, device, dtype,
                       guidance: float) -> Dict[str, torch.Tensor]:
    """The transformer's non-latent inputs: random prompt embeddings of the pipeline's shapes.

    HunyuanVideo: ``encoder_hidden_states [1, L, text_embed_dim]``, ``encoder_attention_mask`` (all
    ``L`` tokens valid), ``pooled_projections [1, pooled_projection_dim]`` and the guidance embedding
    ``guidance * 1000``; Wan: ``encoder_hidden_states [1, L, text_dim]``.
    """
    if key == "wan":
        enc = torch.randn(1, text_tokens, cfg["text_dim"], generator=gen) * 0.1
        return {"encoder_hidden_states": enc.to(device, dtype)}
    enc = torch.randn(1, text_tokens, cfg["text_embed_dim"], generator=gen) * 0.1
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=gen)
    return {"encoder_hidden_states": enc.to(device, dtype),
            "encoder_attention_mask": torch.ones(1, text_tokens, device=device, dtype=dtype),
            "pooled_projections": pooled.to(device, dtype),
            "guidance": torch.tensor([guidance * 1000.0], device=device, dtype=dtype)}


class _Forward:
    """``model(x, t, text) -> velocity`` for :func:`dist_compact.run.sampler.sample` (the prompt is the
    random embeddings of ``inputs``; ``text`` is not used)."""

    def __init__(self, model, inputs: Dict[str, torch.Tensor], dtype: torch.dtype):
        self.model, self.inputs, self.dtype = model, inputs, dtype

    def __call__(self, x, t, text):
        ts = (t.float() * 1000.0).to(x.device)  # diffusers' flow-matching timesteps: 1000 * sigma
        return self.model(hidden_states=x.to(self.dtype), timestep=ts, return_dict=False, **self.inputs)[0]


def latent_preview(latents: torch.Tensor, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[1, 3, T, h, w]`` in [-1, 1]: channels 0-2 of ``latents``, each as ``(x - mean) / (3 std)`` with
    the mean / std of ``ref`` (default ``latents``), clamped. Not decoded video."""
    ref = latents if ref is None else ref
    x, r = latents[:, :3].detach().float().cpu(), ref[:, :3].detach().float().cpu()
    dims = (0, 2, 3, 4)
    mean = r.mean(dims, keepdim=True)
    std = r.std(dims, keepdim=True).clamp(min=1e-6)
    return ((x - mean) / (3 * std)).clamp(-1, 1)


class _Recorder:
    """The attention callables a run builds (through ``attention_factory``), for their ring counters."""

    def __init__(self, factory: Callable):
        self.factory = factory
        self.layers: List = []

    def __call__(self, num_layers, sparsity, compact, sp):
        layers = list(self.factory(num_layers, sparsity, compact, sp))
        self.layers.extend(layers)
        return layers

    def ring_ops(self) -> list:
        return [a.ops for a in self.layers if isinstance(a, ParallelAttention) and isinstance(a.ops, RingOps)]

    def counters(self) -> tuple:
        """``(bytes sent, ring attention calls)`` of this rank so far."""
        ops = self.ring_ops()
        return sum(o.bytes_sent for o in ops), sum(o.calls for o in ops)


def _timing(secs: List[float]) -> dict:
    rest = secs[1:]
    return {"mean_step_seconds": sum(secs) / len(secs) if secs else None,
            "median_step_seconds": statistics.median(secs) if secs else None,
            "mean_step_seconds_after_first": sum(rest) / len(rest) if rest else None,
            "total_seconds": sum(secs)}


# ---------------------------------------------------------------------------------------------- main job
class RandomJob(Job):
    """The runner of ``model.kind: random`` (see :func:`run_random_generation`)."""

    def __init__(self, cfg, attention_factory: Optional[Callable] = None):
        super().__init__(cfg)
        self.attention_factory = attention_factory
        mcfg, cl = cfg.model, cfg.cluster
        # cheap checks first (ModelConfig checked the name and video size): heads vs Ulysses, before any
        # process group or model
        _, tcfg, _ = published_config(mcfg.name, mcfg.size, mcfg.heads)
        self.lat = latent_shape(mcfg.frames, mcfg.height, mcfg.width)
        ParallelConfig(ulysses=cl.ulysses, ring=cl.ring).check(num_heads=tcfg["num_attention_heads"])

    def load(self, proc) -> LoadedModel:
        mcfg = self.cfg.model
        model, self.key, self.built, self.text_tokens = build_random_transformer(
            mcfg.name, mcfg.size, mcfg.layers, heads=mcfg.heads, device=proc.device, dtype=proc.dtype)
        self.model, built = model, self.built
        self.num_heads, self.head_dim = built["num_attention_heads"], built["attention_head_dim"]
        self.num_layers = built["num_layers"] + built.get("num_single_layers", 0)
        self.weights_fp = weights_fingerprint(model)
        return LoadedModel(num_layers=self.num_layers, num_heads=self.num_heads,
                           weights=("random model weights", self.weights_fp))

    def prepare(self, sp, compact) -> None:
        mcfg, run, proc, model, key = self.cfg.model, self.cfg.run, self.proc, self.model, self.key
        self.sp, self.compact = sp, compact
        self.coord = Coordinator()
        gen = torch.Generator().manual_seed(run.seed)  # CPU generator: the same on every rank and device
        self.noise = torch.randn((1, *self.lat), generator=gen).to(proc.device)
        self.inputs = random_text_inputs(key, self.built, self.text_tokens, gen, proc.device, proc.dtype, run.guidance)
        # the layout sparsify will build (for the log and sample's context; the attention reads the handle's)
        grid = adapter_for(model, "random model").grid(self.noise, "random model")
        layout = sp.layout_for(VideoLayout(*grid, tile=tuple(mcfg.tile)))
        if key == "hunyuan_video":
            layout = layout.with_(text_tokens=self.text_tokens, text_position="after")
        self.layout = layout
        self.model_info = {
            "name": mcfg.name, "kind": "random", "published": key, "size": mcfg.size,
            "transformer": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
            "weight_seed": WEIGHT_SEED, "weights_fingerprint": self.weights_fp,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.built.items()}}
        self.cuda = proc.device.type == "cuda"
        if self.cuda:
            self.model_info["weights_memory_bytes"] = torch.cuda.memory_allocated(proc.device)

    def begin(self) -> None:
        p, mcfg = self.proc, self.cfg.model
        log.info("world %d rank %d device %s dtype %s: random %s (%s, %d layers x %d heads, %d params), "
                 "latents %s, layout %s", p.world, p.rank, p.device, p.dtype, mcfg.name, mcfg.size, self.num_layers,
                 self.num_heads, self.model_info["params"], self.lat, self.layout)

    def one_run(self, sparsity: SparsityConfig, label: str) -> RunOutput:
        run, cl, mcfg, proc, model = self.cfg.run, self.cfg.cluster, self.cfg.model, self.proc, self.model
        device, cuda = proc.device, self.cuda
        stats = AttentionStats()
        state = DenoisingState()
        rec = _Recorder(self.attention_factory or build_attention)
        sparsify(model, sparsity, compact=self.compact if sparsity.uses_compact else None, sequence_parallel=self.sp,
                 tile=tuple(mcfg.tile), state=state, stats=stats, backend=run.attn_backend,
                 attention_factory=rec)
        log.info("%s run: %s", label, sparsity_line(sparsity, run.steps))
        per_step: List[int] = []
        calls_per_step: List[int] = []
        last = [0, 0]

        def on_step(i, x):
            sent, calls = rec.counters()
            per_step.append(sent - last[0])
            calls_per_step.append(calls - last[1])
            last[:] = [sent, calls]

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        res = sample(_Forward(model, self.inputs, proc.dtype), torch.zeros(1, 0, dtype=torch.long), self.noise,
                     steps=run.steps, guidance=1.0, shift=run.shift, state=state, progress=run.progress and proc.rank == 0, on_step=on_step,
                     step_labels=step_kinds(sparsity, run.steps))
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        used = installed(model).layout
        sent, calls = rec.counters()
        ring = cl.ring
        shard = ring_shard_bytes(used, ring, batch=self.noise.shape[0], heads=self.num_heads // cl.ulysses,
                                 head_dim=self.head_dim, element_size=proc.dtype.itemsize)
        dense_pred = calls * (ring - 1) * shard
        rows = self.coord.gather_object({"sent": sent, "dense": dense_pred, "peak": peak, "per_step": per_step,
                                         "dense_per_step": [c * (ring - 1) * shard for c in calls_per_step]})
        tot, tot_dense = sum(r["sent"] for r in rows), sum(r["dense"] for r in rows)
        extra = {
            "timing": _timing(res.step_seconds),
            "parallel": {
                "ulysses": cl.ulysses, "ring": ring, "world_size": proc.world,
                "ring_bytes_sent_per_rank": [r["sent"] for r in rows], "ring_bytes_sent": tot,
                "dense_ring_bytes_per_rank": [r["dense"] for r in rows], "dense_ring_bytes": tot_dense,
                "ring_vs_dense": tot / tot_dense if tot_dense else None,
                "ring_bytes_per_step": [sum(v) for v in zip(*(r["per_step"] for r in rows))],
                "dense_ring_bytes_per_step": [sum(v) for v in zip(*(r["dense_per_step"] for r in rows))],
                "ring_attention_calls_per_rank": calls,
            },
            "peak_memory_bytes_per_rank": [r["peak"] for r in rows],
            "layout": repr(used),
            # imbalance = max / mean computed blocks per rank (the layers' static indices; docs/report.md)
            "parallel_balance": self.sp.balance_report(used) if self.sp.enabled else None,
        }
        log.info("%s run: %.3f s total, ring bytes sent %d (dense ring %d), peak memory %s", label,
                 res.total_seconds, sent, dense_pred, peak)
        return RunOutput(sample=res, stats=stats, layout=used, extra=extra)

    def report(self, folder, sparse: RunOutput, dense: Optional[RunOutput]) -> dict:
        if folder is None:
            return {}
        p, run = self.proc, self.cfg.run
        ref = sparse.sample.latents

        def preview(out: RunOutput) -> RunOutput:
            """The run with a latent preview to show, its raw latents kept as the model's."""
            shown = SampleResult(latents=latent_preview(out.sample.latents, ref), step_seconds=out.sample.step_seconds)
            return dataclasses.replace(out, sample=shown, model_latents=out.sample.latents)

        self.previews = preview(sparse), (preview(dense) if dense is not None else None)
        report = rpt.build_report(self.cfg, model_info=self.model_info, layout=sparse.layout,
                                  world=p.world, device=p.device, dtype=p.dtype, sparse=self.previews[0],
                                  dense=self.previews[1], num_layers=self.num_layers, num_heads=self.num_heads)
        report["random_model"] = {
            "note": _PREVIEW_NOTE, "latents": list(self.lat), "text_tokens": self.text_tokens,
            "forwards_per_step": 1, "classifier_free_guidance": False,
            "guidance_embedding": run.guidance * 1000.0 if self.key == "hunyuan_video" else None,
            "timesteps": "1000 * t, t from flow_timesteps(steps, shift)",
        }
        if dense is not None:
            a, b = sparse.sample.latents.float(), dense.sample.latents.float()
            report["latent_quality"] = {"max_abs_diff": float((a - b).abs().max()),
                                        "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-30))}
        return report

    def write(self, folder, report: dict, sparse: RunOutput, dense: Optional[RunOutput]) -> None:
        super().write(folder, report, *self.previews)
        # latents.pt / dense_latents.pt: the raw latents (write_outputs saved the previews there)
        for prefix, out in (("", self.previews[0]), ("dense_", self.previews[1])):
            if out is not None:
                rpt.save_tensor(out.model_latents.detach().float().cpu(), os.path.join(folder.tmp, prefix + "latents.pt"),
                                folder.final)


def run_random_generation(cfg, *, attention_factory: Optional[Callable] = None) -> RunResult:
    """The main job for ``cfg.model.kind == "random"`` (every rank calls it, as under torchrun), through the
    run skeleton of :mod:`dist_compact.run.runner`.

    See the module doc. Raises (before anything is left in ``output_dir``):
    :class:`~dist_compact.parallel.ParallelConfigError` (heads not divisible by ``cluster.ulysses``),
    :class:`~dist_compact.run.runner.WorldSizeError`, ``ValueError`` (unknown model name, a video size the
    model cannot take), :class:`~dist_compact.run.sampler.NonFiniteLatentsError` (NaN / Inf latents).
    """
    return run_job(RandomJob(cfg, attention_factory))
