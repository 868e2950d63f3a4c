"""The one run skeleton that the embedded, diffusers and random-weight jobs follow.

:func:`run_job` is the order of every run, whatever the model::

    process   start_process: world / rank from the launcher, world size vs the config, device, dtype,
              the video writers checked on rank 0 (a missing extra fails before any compute)
    model     job.load: the model, its layer / head counts and what every rank must agree on
    parallel  make_parallel: the sequence-parallel plan (collective when the world size is > 1)
    agreement agree: the same config (and weights) on every rank; the Compact config read on rank 0
    run folder  run_folder: rank 0's temporary folder, one log file per rank
    runs      job.one_run with the config's sparsity, and a dense run with ``run.compare_dense``: each a
              typed :class:`RunOutput`
    report    job.report
    write     job.write into the temporary folder, renamed to its final name once every rank is done
              (removed when anything raises: nothing half-written is left in ``run.output_dir``)

A job is a :class:`Job`: the model-specific parts only. The jobs are in :mod:`dist_compact.run.jobs`
(:mod:`~.jobs.embedded`, :mod:`~.jobs.diffusers`, :mod:`~.jobs.random_weights`);
:func:`dist_compact.run.generation.run_generation` picks one by ``model.kind``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from . import report as rpt
from ..layout import VideoLayout
from ..models.embedded import WEIGHTS_DIR
from ..parallel import Coordinator, ParallelConfig, init_distributed
from ..parallel.launch import launched_world
from ..parallel.watch import RankWatch, job_endpoint
from ..search.config_file import load_compact
from ..sparsity.config import SparsityConfig
from ..stats import AttentionStats
from .config import ConfigError
from .sampler import SampleResult

__all__ = ["WorldSizeError", "Process", "LoadedModel", "RunOutput", "RunResult", "Job", "start_process",
           "check_world", "check_run", "make_parallel", "agree", "run_folder", "run_job", "watched", "log"]

#: the run's logger (also the sampler's, by name): every rank's log file is attached to it
log = logging.getLogger("dist_compact.run")


class WorldSizeError(RuntimeError):
    """The number of launched processes does not match the config's parallel degrees."""


@dataclass(frozen=True)
class Process:
    """This process: ``world`` / ``rank`` / ``local_rank`` as launched, its device and compute dtype."""

    world: int
    rank: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype


@dataclass
class LoadedModel:
    """What :meth:`Job.load` tells the skeleton about the model.

    Attributes:
        num_layers, num_heads: the attention layers and heads (the Compact config is checked against them).
        weights: ``(what, digest)`` every rank must hold the same of, or None (the same folder by config).
    """

    num_layers: int
    num_heads: int
    weights: Optional[Tuple[str, str]] = None


@dataclass
class RunOutput:
    """One denoising run of a job (what :meth:`Job.one_run` returns).

    Attributes:
        sample: what the report shows and ``latents.pt`` / ``frames.png`` hold: the final latents
            (or the decoded video, or a latent preview; see ``model_latents``) and the step times.
        stats: the run's :class:`~dist_compact.stats.AttentionStats`.
        layout: the global layout the run's attention used, or None (the job's own).
        model_latents: the model's latents when ``sample`` holds something else (a decoded video, a
            preview), else None.
        extra: job-specific fields of the run's report section (``report["sparse"]`` / ``["dense"]``).
    """

    sample: SampleResult
    stats: Optional[AttentionStats] = None
    layout: Optional[VideoLayout] = None
    model_latents: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run produced (``folder`` is None on ranks other than 0)."""

    folder: Optional[str]
    latents: torch.Tensor
    report: dict


def check_world(cluster, world: int) -> None:
    """Raises :class:`WorldSizeError` when ``world`` launched processes are not ``cluster``'s degrees."""
    if world != cluster.world_size:
        hint = (f"launch it with: torchrun --nproc-per-node {cluster.nproc} --nnodes {cluster.nnodes} generate.py ..." if world == 1 else
                f"set --cluster.nproc {world} and ulysses x ring = {world} (e.g. --cluster.ulysses {world})")
        raise WorldSizeError(
            f"the config asks for {cluster.world_size} processes (nproc {cluster.nproc} x nnodes "
            f"{cluster.nnodes}; ulysses {cluster.ulysses} x ring {cluster.ring}) but {world} were launched; {hint}"
        )


def _device_for(cluster, local_rank: int) -> torch.device:
    want = cluster.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("cluster.device is 'cuda' but this machine has no CUDA device; use --cluster.device cpu "
                              "(or auto)")
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _dtype_for(model_cfg, device: torch.device) -> torch.dtype:
    name = model_cfg.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for this run on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: float32 copies of the video a run holds at once at the least (noise, latents, the model's input
#: and its velocity, the guidance batch of two): a floor, what the model itself needs comes on top
VIDEO_COPIES = 8


def check_run(cfg, device: torch.device) -> None:
    """What can be told before loading anything: the model's path for its kind, the attention
    backend on this device, the video against this device's memory. One line each.

    Raises:
        ConfigError: naming the key and the fix.
    """
    mc, run = cfg.model, cfg.run
    if mc.kind == "diffusers" and not mc.path:
        raise ConfigError("model.kind 'diffusers' needs model.path, the local diffusers pipeline folder: give "
                          "--model-path DIR (a folder with model_index.json)")
    if run.attn_backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"run.attn_backend 'triton' needs a CUDA device (this run is on {device.type}); use "
                          "--run.attn_backend torch (or auto)")
    need = VIDEO_COPIES * 4 * 3 * mc.frames * mc.height * mc.width
    have = _available_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"model.frames x height x width = {mc.frames} x {mc.height} x {mc.width} needs at least "
                          f"{need / 2 ** 30:.1f} GiB on {device} for the video alone, but {have / 2 ** 30:.1f} GiB are "
                          "free; choose a smaller video (--model.frames / --model.height / --model.width)")


def start_process(cfg) -> Process:
    """This process (see the module doc's ``process`` step).

    Raises:
        WorldSizeError: the launched world size differs from ``cfg.cluster``'s degrees.
        ConfigError: :func:`check_run`, or ``cluster.device: cuda`` without a CUDA device.
        OutputError: ``run.output_dir`` cannot take the run (rank 0).
    """
    world, rank, local_rank = launched_world()
    check_world(cfg.cluster, world)
    device = _device_for(cfg.cluster, local_rank)
    check_run(cfg, device)
    if rank == 0:
        rpt.check_output_dir(cfg.run.output_dir, cfg.run.name)  # before any compute
    if rank == 0 and cfg.run.video:
        rpt.check_writers()
    return Process(world, rank, local_rank, device, _dtype_for(cfg.model, device))


def make_parallel(cluster, device: torch.device, num_heads: int):
    """The sequence-parallel plan for this process (collective when the world size is > 1).

    Raises:
        WorldSizeError: the launched world size differs from ``cluster``'s degrees, or ``num_heads``
            is not divisible by its Ulysses degree.
    """
    check_world(cluster, launched_world()[0])
    if num_heads % cluster.ulysses:
        raise WorldSizeError(f"the model has {num_heads} heads, not divisible by cluster.ulysses={cluster.ulysses}")
    # the backend follows the device, and is gloo when ranks share GPUs (parallel.launch.select_backend)
    return init_distributed(ParallelConfig(ulysses=cluster.ulysses, ring=cluster.ring),
                            backend=None if cluster.backend == "auto" else cluster.backend,
                            share_gpus=cluster.share_gpus, device_type=device.type, timeout_s=cluster.timeout_s)


def agree(cfg, weights: Optional[tuple], *, num_layers: int, num_heads: int):
    """Every rank runs the same config on the same weights (``weights``: ``(what, digest)`` or None), or
    the shards would disagree: one clear error on every rank otherwise. Returns the Compact config
    (None when the mode uses none), read on rank 0 and broadcast. On one process: just the load."""
    coord = Coordinator()
    if coord.world_size > 1:
        coord.check_config(cfg.to_dict(), "run config")
        if weights is not None:
            coord.check_same(*weights)
    # read on rank 0 only; every rank gets rank 0's object, so it needs no agreement check of its own
    return coord.broadcast_object(load=lambda: load_compact(cfg.sparsity, model=cfg.model.name, shipped_dir=WEIGHTS_DIR,
                                                            num_layers=num_layers, num_heads=num_heads))


class _RankLog(logging.FileHandler):
    """A rank's log file that keeps its first write error (a full disk) for the run to report as one
    line, instead of logging's traceback on stderr for every record."""

    failed: Optional[BaseException] = None

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        if self.failed is None:
            import sys

            self.failed = sys.exc_info()[1]


def _rank_logger(log_dir: str, rank: int) -> _RankLog:
    path = os.path.join(log_dir, f"rank{rank}.log")
    with rpt.writing(path):
        os.makedirs(log_dir, exist_ok=True)
        handler = _RankLog(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def run_folder(cfg, rank: int):
    """Rank 0's :class:`~dist_compact.run.report.RunFolder` (None on other ranks), every rank logging into
    its ``logs/``: renamed to its final name when the body completes (once every rank has closed its
    log), removed when the body raises."""
    run = cfg.run
    coord = Coordinator()
    claimed: list = []

    def claim() -> str:  # on rank 0; its error fails every rank (broadcast_object)
        claimed.append(rpt.RunFolder(run.output_dir, run.name, prompt=run.prompt, seed=run.seed))
        return claimed[0].tmp

    tmp = coord.broadcast_object(load=claim)
    folder = claimed[0] if claimed else None
    try:
        handler = _rank_logger(os.path.join(tmp, "logs"), rank)
    except BaseException:
        if folder is not None:
            folder.discard()
        raise

    def close_log() -> None:
        log.removeHandler(handler)
        handler.close()
        if handler.failed is not None:
            with rpt.writing(handler.baseFilename, folder.final if folder else None):
                raise handler.failed

    try:
        log.info("config sources: %s", ", ".join(cfg.sources) or "defaults")
        yield folder
        close_log()
        coord.barrier()  # every rank has closed its log before the folder is renamed
        if folder is not None:
            folder.commit()
    except BaseException:
        try:
            close_log()
        except rpt.OutputError:
            pass  # the error already on its way out is the one to report
        finally:  # also when the launcher's SIGTERM lands here: a failed run leaves nothing
            if folder is not None:
                folder.discard()
        raise


class Job:
    """The model-specific parts of a run; :func:`run_job` calls them in the skeleton's order."""

    def __init__(self, cfg):
        self.cfg = cfg

    def load(self, proc: Process) -> LoadedModel:
        """Load (or build) the model on ``proc.device``; errors here leave nothing behind."""
        raise NotImplementedError

    def prepare(self, sp, compact) -> None:
        """After the agreement: the plan ``sp`` and the Compact config (None if the mode uses none)."""

    def begin(self) -> None:
        """Inside the run folder, before the runs (the log lines of the run)."""

    def one_run(self, sparsity: SparsityConfig, label: str) -> RunOutput:
        """One denoising run with ``sparsity``; ``label`` is ``"sparse"`` or ``"dense"``."""
        raise NotImplementedError

    def report(self, folder, sparse: RunOutput, dense: Optional[RunOutput]) -> dict:
        """The report (``folder`` is None on ranks other than 0)."""
        raise NotImplementedError

    def write(self, folder, report: dict, sparse: RunOutput, dense: Optional[RunOutput]) -> None:
        """The output files into rank 0's temporary ``folder.tmp`` (see :mod:`dist_compact.run.report`)."""
        run = self.cfg.run
        rpt.write_outputs(folder.tmp, report, sparse.sample.latents,
                          dense.sample.latents if dense is not None else None, fps=run.fps, video=run.video,
                          final=folder.final)
        log.info("outputs written to %s", folder.final)


def run_job(job: Job) -> RunResult:
    """One run of ``job`` in the skeleton's order (the module doc); every rank calls it.

    Raises:
        WorldSizeError, NonFiniteLatentsError, and the job's load / config errors: each before
        anything is left in ``run.output_dir``.
    """
    cfg = job.cfg
    proc = job.proc = start_process(cfg)
    model = job.load(proc)
    sp = make_parallel(cfg.cluster, proc.device, model.num_heads)
    with watched(cfg.cluster, proc):
        compact = agree(cfg, model.weights, num_layers=model.num_layers, num_heads=model.num_heads)
        job.prepare(sp, compact)
        with run_folder(cfg, proc.rank) as folder:
            job.begin()
            sparse = job.one_run(cfg.sparsity, "sparse" if cfg.sparsity.mode != "dense" else "dense")
            dense = (job.one_run(dataclasses.replace(cfg.sparsity, mode="dense"), "dense") if cfg.run.compare_dense
                     else None)
            report = job.report(folder, sparse, dense)
            if folder is not None:
                job.write(folder, report, sparse, dense)
    return RunResult(folder=folder.final if folder else None, latents=sparse.sample.latents.cpu(), report=report)


@contextlib.contextmanager
def watched(cluster, proc: Process):
    """The ranks' heartbeats for the body (:class:`~dist_compact.parallel.watch.RankWatch`; nothing on
    one process or without a launcher's store). A failed collective, or this rank stopped by the
    launcher, becomes a :class:`~dist_compact.parallel.watch.RankFailure` naming the rank that failed
    or stopped answering; this rank's own error is left in the store for the others to name."""
    if proc.world == 1 or job_endpoint() is None:
        yield None
        return
    watch = RankWatch(proc.rank, proc.world, cluster.timeout_s).start()
    try:
        yield watch
    except BaseException as e:
        try:
            failure = watch.explain(e)
        except SystemExit:  # the launcher's SIGTERM while looking (a peer is gone): look once more
            failure = watch.explain(e)
        if failure is not None:
            raise failure from None
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            watch.record_error(e)
        raise
    finally:
        watch.stop()
