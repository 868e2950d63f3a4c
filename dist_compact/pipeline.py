"""The denoising loop and one generation run (what ``generate.py`` calls).

* :func:`build_attention` is THE factory of a model's attention callables (dense, or
  :class:`~dist_compact.attention.SparseAttention` following a :class:`SparsityConfig`, wrapped by the
  sequence-parallel plan when there is one). Everything that runs a model gets its layers here.
* :func:`sample` is the flow-matching Euler sampler with optional classifier-free guidance: it
  builds one :class:`~dist_compact.context.AttentionContext` per forward (step, num_steps, layout,
  ops, stats), times every step, and stops with :class:`NonFiniteLatentsError` naming the step as
  soon as the latents hold a NaN / Inf.
* :func:`run_generation` is a whole run from a :class:`~dist_compact.config.RunConfig`: processes
  and devices, model, sparse run (and dense run from the same noise with ``compare_dense``), and
  the outputs through :mod:`dist_compact.report` (written to a temporary folder, renamed when
  complete). tqdm progress on rank 0 only; one log file per rank.

Latent layout: ``[batch, channels, frames, height, width]`` float32; for the embedded model the
latents are RGB pixels in ``[-1, 1]``. Time runs from ``t = 1`` (noise) to ``t = 0`` (data);
the model predicts the velocity ``dx/dt`` (rectified flow, as Wan / HunyuanVideo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .context import AttentionContext, DenseAttention
from .executor import AttentionOps
from .layout import VideoLayout
from .schedule import SparsityConfig

__all__ = [
    "NonFiniteLatentsError",
    "WorldSizeError",
    "SampleResult",
    "RunResult",
    "flow_timesteps",
    "step_kinds",
    "describe_schedule",
    "build_attention",
    "load_compact",
    "sample",
    "run_generation",
]

log = logging.getLogger("dist_compact.run")


class NonFiniteLatentsError(FloatingPointError):
    """The latents became NaN / Inf during denoising (the message names the step)."""


class WorldSizeError(RuntimeError):
    """The number of launched processes does not match the config's parallel degrees."""


# ---------------------------------------------------------------------------------------------- pieces
def flow_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """float32 ``[steps + 1]`` times from 1 to 0; ``shift > 1`` spends more steps near the noise.

    ``t' = shift * t / (1 + (shift - 1) * t)`` on a uniform grid (the SD3 / Wan time shift).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=torch.float32)


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
    scaled to the run (:mod:`dist_compact.schedule`); this is what the run does after scaling.
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


def _sparsity_line(sparsity: SparsityConfig, num_steps: int) -> str:
    """The log line of a run's sparsity: the schedule in this run's steps, then the other settings."""
    if sparsity.mode == "dense":
        return f"mode dense, {num_steps} steps: {describe_schedule(sparsity, num_steps)}"
    schedule_keys = ("dense_steps", "search_steps", "search_kinds", "reference_steps")
    rest = ", ".join(f"{f.name}={getattr(sparsity, f.name)!r}" for f in dataclasses.fields(sparsity)
                     if f.name not in schedule_keys + ("mode",))
    scaled = "" if sparsity.reference_steps == num_steps else (
        f" (the config's step numbers are written for reference_steps={sparsity.reference_steps} and scaled)")
    return f"mode {sparsity.mode}, {num_steps} steps: {describe_schedule(sparsity, num_steps)}{scaled}; {rest}"


def build_attention(num_layers: int, sparsity: SparsityConfig, compact=None, sp=None) -> List[Callable]:
    """One attention callable ``attn(q, k, v, ctx)`` per layer for ``sparsity``.

    ``mode == "dense"`` gives :class:`DenseAttention`; other modes give
    :class:`~dist_compact.attention.SparseAttention` (``compact`` is the static pattern object of
    the Compact modes, see :func:`load_compact`). With a sequence-parallel plan ``sp`` every layer is
    ``sp.wrap``-ped.
    """
    if not isinstance(sparsity, SparsityConfig):
        raise TypeError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    if sparsity.mode == "dense":
        layers: List[Callable] = [DenseAttention(i) for i in range(num_layers)]
    else:
        from .attention import SparseAttention

        layers = [SparseAttention(i, sparsity, compact) for i in range(num_layers)]
    if sp is not None:
        layers = [sp.wrap(a) for a in layers]
    return layers


def load_compact(sparsity: SparsityConfig, *, model: Optional[str] = None, num_layers: Optional[int] = None,
                 num_heads: Optional[int] = None):
    """The static Compact pattern object for ``sparsity`` (None when its mode uses none).

    Reads ``sparsity.compact_config`` (a searched config file, see
    :mod:`dist_compact.search.config_file`) and checks it was searched for this model / layer and
    head count. A relative path is taken from the working directory, else from the folder of the
    embedded model's shipped files (``dist_compact/models/weights/``), so shipped configs resolve
    wherever the package is installed.
    """
    if not sparsity.uses_compact:
        return None
    if not sparsity.compact_config:
        raise ValueError(f"sparsity mode {sparsity.mode!r} needs sparsity.compact_config (a searched config file)")
    from .models.embedded import DEFAULT_WEIGHTS
    from .search.config_file import load_config

    path = sparsity.compact_config
    shipped = os.path.join(str(DEFAULT_WEIGHTS.parent), path)
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(shipped):
        path = shipped
    return load_config(path, model=model, num_layers=num_layers, num_heads=num_heads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    Attributes:
        latents: float32 ``[B, C, F, H, W]`` at ``t = 0``.
        step_seconds: wall time of every step (device synchronised).
    """

    latents: torch.Tensor
    step_seconds: List[float] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.step_seconds))


def sample(model, text: torch.Tensor, noise: torch.Tensor, *, steps: int, layout: VideoLayout,
           guidance: float = 1.0, shift: float = 1.0, ops: Optional[AttentionOps] = None, stats=None,
           sp=None, progress: bool = False, null_text: Optional[torch.Tensor] = None,
           on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
           step_labels: Optional[Sequence[str]] = None) -> SampleResult:
    """Flow-matching Euler sampling from ``noise`` (``t = 1``) to data (``t = 0``).

    Args:
        model: ``model(x, t, text, ctx, sp) -> velocity`` (e.g. :class:`EmbeddedDiT`), attention
            layers already installed.
        text: int64 ``[B, L]`` prompt token ids; ``null_text`` the unconditional ids (default: zeros,
            the empty prompt).
        noise: float32 ``[B, C, F, H, W]`` initial latents.
        steps, shift: number of Euler steps and the time shift (:func:`flow_timesteps`).
        layout: the GLOBAL layout of the forward (``sp.layout_for(...)`` already applied).
        guidance: classifier-free guidance scale; ``!= 1`` runs the conditional and unconditional
            inputs as one batch of ``2B`` and uses ``v_u + guidance * (v_c - v_u)``.
        ops, stats, sp: this rank's :class:`AttentionOps`, a stats recorder, the parallel plan.
        progress: show a tqdm bar (callers pass True on rank 0 only).
        on_step: called as ``on_step(step, latents)`` after every step (tests, previews).
        step_labels: what each step does (:func:`step_kinds`), shown beside the progress bar while
            the step runs, so a slow search step is seen as one.

    Raises:
        NonFiniteLatentsError: the latents hold NaN / Inf after a step (the message names it).
    """
    ops = ops if ops is not None else AttentionOps()
    device = noise.device
    ts_cpu = flow_timesteps(steps, shift)
    ts = ts_cpu.to(device)
    t_host = ts_cpu.tolist()  # for messages: no device read per step
    x = noise.float()
    B = x.shape[0]
    cfg_on = guidance != 1.0
    if cfg_on:
        null = torch.zeros_like(text) if null_text is None else null_text
        text_in = torch.cat([text, null], 0)
    else:
        text_in = text
    bar = None
    if progress:
        from tqdm import tqdm

        # smoothing=0: the rate (and so the ETA) is the mean over all steps so far; tqdm's default
        # moving average made the ETA jump several-fold at every search step (~8x a sparse step on
        # the demo) and fall back after it
        bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True, smoothing=0)
    result = SampleResult(latents=x)
    try:
        with torch.no_grad():
            for i in range(steps):
                if bar is not None and step_labels is not None:
                    bar.set_postfix_str(f"step {i}: {step_labels[i]}")
                _sync(device)
                t0 = time.perf_counter()
                ctx = AttentionContext(layout=layout, step=i, num_steps=steps, ops=ops, stats=stats)
                t = ts[i].expand(B)
                if cfg_on:
                    v = model(torch.cat([x, x], 0), torch.cat([t, t], 0), text_in, ctx, sp).float()
                    v_c, v_u = v.chunk(2, 0)
                    v = v_u + guidance * (v_c - v_u)
                else:
                    v = model(x, t, text_in, ctx, sp).float()
                x = x + (ts[i + 1] - ts[i]) * v
                bad = ~torch.isfinite(x)
                if bool(bad.any()):
                    raise NonFiniteLatentsError(
                        f"step {i} of {steps} (t={t_host[i]:.4f}): the latents contain "
                        f"{int(bad.sum())} NaN/Inf values of {x.numel()}; stopping the run"
                    )
                _sync(device)
                result.step_seconds.append(time.perf_counter() - t0)
                log.info("step %d/%d t=%.4f: %.4f s", i, steps, t_host[i], result.step_seconds[-1])
                if on_step is not None:
                    on_step(i, x)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.latents = x
    return result


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class RunResult:
    """What :func:`run_generation` produced (``folder`` is None on ranks other than 0)."""

    folder: Optional[str]
    latents: torch.Tensor
    report: dict


def _world() -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _device_for(cluster, local_rank: int) -> torch.device:
    want = cluster.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device is 'cuda' but no CUDA device is available; use --cluster.device cpu")
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _dtype_for(model_cfg, device: torch.device) -> torch.dtype:
    name = model_cfg.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_parallel(cluster, device: torch.device, num_heads: int):
    """The sequence-parallel plan for this process (collective when the world size is > 1).

    Raises:
        WorldSizeError: the launched world size differs from ``cluster``'s degrees.
    """
    world, rank, _ = _world()
    if world != cluster.world_size:
        hint = (f"launch it with: torchrun --nproc-per-node {cluster.nproc} --nnodes {cluster.nnodes} generate.py ..." if world == 1 else
                f"set --cluster.nproc {world} and ulysses x ring = {world} (e.g. --cluster.ulysses {world})")
        raise WorldSizeError(
            f"the config asks for {cluster.world_size} processes (nproc {cluster.nproc} x nnodes "
            f"{cluster.nnodes}; ulysses {cluster.ulysses} x ring {cluster.ring}) but {world} were launched; {hint}"
        )
    if num_heads % cluster.ulysses:
        raise WorldSizeError(f"the model has {num_heads} heads, not divisible by cluster.ulysses={cluster.ulysses}")
    from .parallel import ParallelConfig, init_distributed

    # the backend follows the device, and is gloo when ranks share GPUs (parallel.launch.select_backend)
    return init_distributed(ParallelConfig(ulysses=cluster.ulysses, ring=cluster.ring),
                            backend=None if cluster.backend == "auto" else cluster.backend,
                            share_gpus=cluster.share_gpus, device_type=device.type)


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _broadcast_obj(obj, src: int = 0):
    if not _is_dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _barrier() -> None:
    if _is_dist():
        torch.distributed.barrier()


def _rank_logger(log_dir: str, rank: int) -> logging.Handler:
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _process(cfg) -> tuple:
    """``(world, rank, device, dtype)`` of this process; rank 0 checks the video writers first, so a
    missing [video] extra fails before any compute."""
    from . import report as rpt

    world, rank, local_rank = _world()
    if rank == 0 and cfg.run.video:
        rpt.check_writers()
    device = _device_for(cfg.cluster, local_rank)
    return world, rank, device, _dtype_for(cfg.model, device)


@contextlib.contextmanager
def _run_folder(cfg, rank: int):
    """Rank 0's :class:`~dist_compact.report.RunFolder` (None on other ranks), every rank logging into
    its ``logs/``: renamed to its final name when the body completes (once every rank has closed its
    log), removed when the body raises."""
    from . import report as rpt

    run = cfg.run
    folder = rpt.RunFolder(run.output_dir, run.name, prompt=run.prompt, seed=run.seed) if rank == 0 else None
    handler = _rank_logger(os.path.join(_broadcast_obj(folder.tmp if folder else None), "logs"), rank)

    def close_log() -> None:
        log.removeHandler(handler)
        handler.close()

    try:
        log.info("config sources: %s", ", ".join(cfg.sources) or "defaults")
        yield folder
        close_log()
        _barrier()  # every rank has closed its log before the folder is renamed
        if folder is not None:
            folder.commit()
    except BaseException:
        close_log()
        if folder is not None:
            folder.discard()
        raise


def _sparse_and_dense(cfg, one_run: Callable):
    """``one_run(sparsity, label)`` with the config's sparsity, and with ``run.compare_dense`` once more
    dense from the same noise (else None)."""
    sparse = one_run(cfg.sparsity, "sparse" if cfg.sparsity.mode != "dense" else "dense")
    dense = one_run(dataclasses.replace(cfg.sparsity, mode="dense"), "dense") if cfg.run.compare_dense else None
    return sparse, dense


def _write_run(folder, report: dict, sparse, dense, fps: int, video: bool = True) -> None:
    """The output files of ``(SampleResult, stats, ...)`` runs into rank 0's temporary run folder."""
    from . import report as rpt

    rpt.write_outputs(folder.tmp, report, sparse[0].latents, dense[0].latents if dense is not None else None,
                      fps=fps, video=video)
    log.info("outputs written to %s", folder.final)


def _agree(cfg, weights: Optional[tuple], *, num_layers: int, num_heads: int):
    """Every rank runs the same config on the same weights (``weights``: ``(what, digest)`` or None), or
    the shards would disagree: one clear error on every rank otherwise. Returns the Compact config
    (None when the mode uses none), read on rank 0 and broadcast. On one process: just the load."""
    from .parallel import Coordinator

    coord = Coordinator()
    if coord.world_size > 1:
        coord.check_config(cfg.to_dict(), "run config")
        if weights is not None:
            coord.check_same(*weights)
    # read on rank 0 only; every rank gets rank 0's object, so it needs no agreement check of its own
    return coord.broadcast_object(load=lambda: load_compact(cfg.sparsity, model=cfg.model.name,
                                                            num_layers=num_layers, num_heads=num_heads))


def _load_model(model_cfg, device: torch.device, dtype: torch.dtype):
    from .models.embedded import DEFAULT_WEIGHTS, load_embedded, sha256_of

    path = model_cfg.path or str(DEFAULT_WEIGHTS)
    model = load_embedded(path, device=device, dtype=dtype)
    info = {"name": model_cfg.name, "weights": os.path.abspath(path), "sha256": sha256_of(path),
            "params": sum(p.numel() for p in model.parameters()),
            "config": dataclasses.asdict(model.config)}
    return model, info


def run_generation(cfg, *, attention_factory: Optional[Callable] = None) -> RunResult:
    """One generation run from a :class:`~dist_compact.config.RunConfig` (see the module doc).

    Every rank calls it (under torchrun); rank 0 writes ``<output_dir>/<name>/`` atomically.
    ``attention_factory(num_layers, sparsity, compact, sp)`` replaces :func:`build_attention`.

    Raises:
        WorldSizeError, NonFiniteLatentsError, WeightsError, ConfigError-like ValueErrors: each
        before anything is left in ``output_dir``.
    """
    if cfg.model.kind == "diffusers":
        from .integrations.diffusers_pipeline import run_diffusers_generation

        return run_diffusers_generation(cfg, attention_factory=attention_factory)
    if cfg.model.kind == "random":
        from .integrations.random_transformer import run_random_generation

        return run_random_generation(cfg, attention_factory=attention_factory)
    from . import report as rpt
    from .stats import AttentionStats

    factory = attention_factory or build_attention
    world, rank, device, dtype = _process(cfg)
    run = cfg.run
    model, model_info = _load_model(cfg.model, device, dtype)
    mcfg = model.config
    text = model.tokenizer.encode(run.prompt).unsqueeze(0).to(device)  # unknown words: error before any output
    sp = make_parallel(cfg.cluster, device, mcfg.heads)
    compact = _agree(cfg, ("model weights", model_info["sha256"]), num_layers=mcfg.depth, num_heads=mcfg.heads)
    layout = sp.layout_for(model.video_layout(cfg.model.frames, cfg.model.height, cfg.model.width, cfg.model.tile))
    gen = torch.Generator().manual_seed(run.seed)  # CPU generator: the same noise on every rank and device
    noise = torch.randn((1, mcfg.in_channels, cfg.model.frames, cfg.model.height, cfg.model.width),
                        generator=gen).to(device)

    with _run_folder(cfg, rank) as folder:
        log.info("world %d rank %d device %s dtype %s layout %s", world, rank, device, dtype, layout)
        log.info("model %s (%d params, sha256 %s)", model_info["weights"], model_info["params"], model_info["sha256"])
        ops = AttentionOps(run.attn_backend)
        balance = {}  # the sequence-parallel plan's per-rank work, of the first run's layers

        def one_run(sparsity: SparsityConfig, label: str):
            stats = AttentionStats()
            model.set_attention(factory(mcfg.depth, sparsity, compact if sparsity.uses_compact else None, sp))
            log.info("%s run: %s", label, _sparsity_line(sparsity, run.steps))
            res = sample(model, text, noise, steps=run.steps, layout=layout, guidance=run.guidance,
                         shift=run.shift, ops=ops, stats=stats, sp=sp, progress=run.progress and rank == 0,
                         step_labels=step_kinds(sparsity, run.steps))
            log.info("%s run: %.3f s total", label, res.total_seconds)
            if sp.enabled and not balance:
                balance.update(sp.balance_report(layout))
            return res, stats

        sparse, dense = _sparse_and_dense(cfg, one_run)
        report = rpt.build_report(cfg, model_info=model_info, layout=layout, world=world, device=device,
                                  dtype=dtype, sparse=sparse, dense=dense, num_layers=mcfg.depth, num_heads=mcfg.heads)
        report["parallel_balance"] = balance or None  # imbalance = max / mean computed blocks per rank
        if folder is not None:
            _write_run(folder, report, sparse, dense, run.fps, run.video)
    return RunResult(folder=folder.final if folder else None, latents=sparse[0].latents.cpu(), report=report)
