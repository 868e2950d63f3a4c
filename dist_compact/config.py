"""Run configuration: YAML files + command-line overrides -> frozen, typed, validated dataclasses.

A config file is a mapping of sections (every section and key optional; what is left out keeps
its default)::

    include: [../models/embedded.yaml]     # optional: files merged first (paths relative to this one)
    cluster: {nproc: 2, ulysses: 2, ring: 1, device: cpu, backend: gloo}
    model:   {name: embedded, frames: 16, height: 48, width: 48, tile: [1, 4, 4]}
    sparsity: {mode: adaspa, sparsity: 0.75}   # SparsityConfig (below)
    run:     {prompt: "a red square moving left", seed: 0, steps: 20, guidance: 4.0}

Several files are merged in order (later keys win), then ``--section.key value`` overrides. Every
value is type-checked against the dataclass field it lands in (an int field takes ``3``, not
``"3"`` or ``3.5``); unknown sections/keys and bad types are a :class:`ConfigError` that names the
file (or "command line") and the key; value checks run in each dataclass's ``__post_init__``.

Only launchers and ``generate.py`` read files (:func:`load_run_config`, :func:`parse_generate_args`);
library functions take the dataclasses or plain arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._util import is_int
from .layout import SUPPORTED_BLOCK_SIZES
from .ops import TRITON_DENSE_CROSSOVER
from .step_schedule import CACHED, DENSE, FUSED, REUSE, Schedule, scale_schedule

__all__ = [
    "ConfigError",
    "SparsityConfig",
    "MODES",
    "ClusterConfig",
    "ModelConfig",
    "RunOptions",
    "RunConfig",
    "DEMO_SPARSITY",
    "RANDOM_MODELS",
    "load_yaml",
    "load_run_config",
    "parse_override",
    "parse_generate_args",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file (or command line) and the key."""


def _choice(obj, name: str, choices: Sequence[str]) -> None:
    val = getattr(obj, name)
    if val not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {val!r}")


def _pos_int(obj, name: str, minimum: int = 1) -> None:
    val = getattr(obj, name)
    if not is_int(val) or val < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {minimum}, got {val!r}")


#: ``model.name`` values of ``model.kind: random`` -> their key in dist_compact.integrations.published.
RANDOM_MODELS = {"hunyuanvideo": "hunyuan", "wan2.1-t2v-14b": "wan"}


# ---------------------------------------------------------------------------------------------- sparsity
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
            :mod:`dist_compact.step_schedule`).
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
            ``1.0`` disables both. The default is ``ops.TRITON_DENSE_CROSSOVER`` (0.75), where the
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
            raise ValueError(f"SparsityConfig.{name} {msg}, got {getattr(self, name)!r}")

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
        if not (_is_number(self.dense_threshold) and 0.0 < self.dense_threshold <= 1.0):
            bad("dense_threshold", "must be a number in (0, 1]")
        q = self.mass_query_rows
        if q is not None and not (is_int(q) and q >= 16 and q & (q - 1) == 0):
            bad("mass_query_rows", "must be None or a power of two >= 16")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        """From a plain mapping (e.g. a YAML section); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"SparsityConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SparsityConfig: unknown keys {unknown}; known: {sorted(names)}")
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
        """The schedule scaled to a run of ``num_steps`` steps (:func:`~dist_compact.step_schedule.scale_schedule`)."""
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


# ---------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ClusterConfig:
    """Where and how many processes run.

    Attributes:
        nproc: processes per node (one per GPU; CPU processes with ``device: cpu``).
        nnodes: nodes; the world size is ``nproc * nnodes``.
        ulysses, ring: sequence-parallel degrees; ``ulysses * ring`` must equal the world size.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        backend: torch.distributed backend: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"gloo"``, ``"nccl"``.
        master_addr, master_port: rendezvous endpoint for multi-node launches (launchers use them).
        share_gpus: several ranks per GPU (``cuda:(local_rank % GPUs)``, gloo with CUDA tensors, the
            ring's point-to-point staged through pinned host memory; NCCL refuses two ranks on one
            GPU): ``true`` always, ``false`` never (more ranks than GPUs is then an error), ``null``
            (default) when a node has more ranks than GPUs, with a one-line warning.
    """

    nproc: int = 1
    nnodes: int = 1
    ulysses: int = 1
    ring: int = 1
    device: str = "auto"
    backend: str = "auto"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    share_gpus: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("nproc", "nnodes", "ulysses", "ring"):
            _pos_int(self, name)
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "backend", ("auto", "gloo", "nccl"))
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("ClusterConfig.backend 'nccl' needs CUDA devices; use gloo with device: cpu")
        if self.share_gpus not in (None, True, False):
            raise ValueError(f"ClusterConfig.share_gpus must be true, false or null, got {self.share_gpus!r}")
        if self.share_gpus and (self.device == "cpu" or self.backend == "nccl"):
            raise ValueError("ClusterConfig.share_gpus: true runs gloo on CUDA devices (NCCL refuses two ranks on one "
                             f"GPU); it cannot go with device: {self.device}, backend: {self.backend}")
        if not isinstance(self.master_addr, str) or not self.master_addr:
            raise ValueError(f"ClusterConfig.master_addr must be a non-empty string, got {self.master_addr!r}")
        if not is_int(self.master_port) or not 1 <= self.master_port <= 65535:
            raise ValueError(f"ClusterConfig.master_port must be an int in [1, 65535], got {self.master_port!r}")
        if self.ulysses * self.ring != self.world_size:
            raise ValueError(
                f"ClusterConfig: ulysses x ring = {self.ulysses} x {self.ring} = {self.ulysses * self.ring} "
                f"must equal the world size nproc x nnodes = {self.nproc} x {self.nnodes} = {self.world_size}"
            )

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class ModelConfig:
    """Which DiT runs, at which video size.

    Attributes:
        name: model name (``"embedded"`` for the shipped tiny DiT; e.g. ``"wan2.1-t2v-14b"``). With
            ``kind: random`` one of :data:`RANDOM_MODELS` (the published transformer config it builds).
        kind: ``"embedded"``, ``"diffusers"`` (a diffusers pipeline from a local folder) or
            ``"random"`` (the published transformer of ``name`` with RANDOM weights, no text encoder
            and no VAE: for speed runs, see :mod:`dist_compact.integrations.random_transformer`).
        path: weights: for ``embedded`` a ``.safetensors`` file (None = the shipped weights); for
            ``diffusers`` the local model folder (required); unused by ``random``.
        pipeline: diffusers pipeline class name (``"WanPipeline"``, ``"HunyuanVideoPipeline"``).
        frames, height, width: video size in pixels / frames. ``random`` models take what their VAE
            takes: ``frames = 4k + 1`` (latent frames ``(frames - 1) / 4 + 1``), ``height`` and
            ``width`` multiples of 16 (VAE factor 8 x patch 2).
        tile: kernel tile ``(t, h, w)`` in latent tokens; ``t*h*w`` is the block size (16..128).
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        size: ``random`` only: ``"full"`` (the published widths and depths) or ``"small"`` (the tiny
            stand-ins of :data:`dist_compact.integrations.published.SMALL`: 2 heads of 32, for CPU tests).
        layers: ``random`` only: build this many transformer blocks instead of the config's (None =
            all; Wan: ``min(layers, num_layers)``; HunyuanVideo: ``round(layers / 3)`` dual-stream
            blocks, the rest single-stream), e.g. for a quick check of a full-size run.
        heads: ``random`` only: attention heads instead of the config's (the head size stays; None =
            the config's), e.g. ``8`` for the small stand-ins under ``ulysses: 8`` on a CPU.
    """

    name: str = "embedded"
    kind: str = "embedded"
    path: Optional[str] = None
    pipeline: Optional[str] = None
    frames: int = 16
    height: int = 48
    width: int = 48
    tile: Tuple[int, int, int] = (1, 4, 4)
    dtype: str = "auto"
    size: str = "full"
    layers: Optional[int] = None
    heads: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelConfig.name must be a non-empty string, got {self.name!r}")
        _choice(self, "kind", ("embedded", "diffusers", "random"))
        for name in ("frames", "height", "width"):
            _pos_int(self, name)
        object.__setattr__(self, "tile", tuple(self.tile))
        if len(self.tile) != 3 or not all(is_int(t) and t >= 1 for t in self.tile):
            raise ValueError(f"ModelConfig.tile must be three positive ints (t, h, w), got {self.tile!r}")
        vol = self.tile[0] * self.tile[1] * self.tile[2]
        if vol not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"ModelConfig.tile {self.tile} has {vol} tokens; the block size must be one of "
                             f"{SUPPORTED_BLOCK_SIZES}")
        _choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        # a diffusers model's path is checked when the model loads (configs/models/*.yaml leave it to
        # --model-path, and launchers read those files without one)
        if self.kind == "diffusers" and not self.pipeline:
            raise ValueError("ModelConfig.pipeline is required for diffusers models (e.g. WanPipeline)")
        _choice(self, "size", ("full", "small"))
        for name in ("layers", "heads"):
            if getattr(self, name) is not None:
                _pos_int(self, name)
        if self.kind != "random":
            if self.size != "full" or self.layers is not None or self.heads is not None:
                raise ValueError("ModelConfig.size / layers / heads apply to kind 'random' only "
                                 f"(kind is {self.kind!r})")
            return
        if self.name not in RANDOM_MODELS:
            raise ValueError(f"ModelConfig.name {self.name!r} is not a random-weight model; known: "
                             f"{', '.join(RANDOM_MODELS)}")
        # the published models' VAEs: 4x in time (4k + 1 frames), 8x in space, then a (1, 2, 2) patch
        problems = []
        if (self.frames - 1) % 4:
            k = (self.frames - 1) // 4
            problems.append(f"frames {self.frames} is not 4k + 1 (the VAE's time factor 4; e.g. {4 * k + 1} or "
                            f"{4 * k + 5})")
        for name in ("height", "width"):
            val = getattr(self, name)
            if val % 16:
                problems.append(f"{name} {val} is not a multiple of 16 (VAE factor 8 x patch 2; e.g. "
                                f"{max(16, val // 16 * 16)} or {val // 16 * 16 + 16})")
        if problems:
            raise ValueError(f"ModelConfig: the video size does not fit {self.name}'s VAE and patching: "
                             + "; ".join(problems))


@dataclass(frozen=True)
class RunOptions:
    """What to generate and where the outputs go.

    Attributes:
        prompt: the text prompt (the embedded model knows a small vocabulary; see its tokenizer).
        seed: seed of the initial noise.
        steps: denoising steps (flow-matching Euler).
        guidance: classifier-free guidance scale (1.0 = no guidance, one forward per step).
        shift: timestep shift of the sampler (``t' = shift t / (1 + (shift - 1) t)``, as SD3 / Wan).
        output_dir: parent folder of the run folders.
        name: run folder name (default: time, prompt and seed); an existing folder is an error.
        compare_dense: also run dense attention from the same noise and report PSNR / SSIM.
        attn_backend: attention kernels: ``"auto"`` (Triton on CUDA), ``"triton"``, ``"torch"``.
        fps: frames per second of the written videos.
        progress: show a tqdm bar (rank 0 only).
        video: write the clips as mp4 + gif (needs imageio-ffmpeg); ``False`` writes every other
            output (latents, frame grids, heatmaps, report) and needs no video writer.
    """

    prompt: str = "a red square moving left"
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    shift: float = 3.0
    output_dir: str = "outputs"
    name: Optional[str] = None
    compare_dense: bool = False
    attn_backend: str = "auto"
    fps: int = 8
    progress: bool = True
    video: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"RunOptions.prompt must be a string, got {self.prompt!r}")
        _pos_int(self, "seed", minimum=0)
        _pos_int(self, "steps")
        _pos_int(self, "fps")
        for name, lo in (("guidance", 0.0), ("shift", 0.0)):
            val = getattr(self, name)
            if not math.isfinite(val) or val <= lo:
                raise ValueError(f"RunOptions.{name} must be a finite number > {lo}, got {val!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"RunOptions.output_dir must be a non-empty path, got {self.output_dir!r}")
        if self.name is not None:
            bad = set(self.name) & set('/\\:*?"<>|') or self.name in ("", ".", "..") or self.name.startswith(".")
            if bad:
                raise ValueError(f"RunOptions.name must be a plain folder name (no / \\ : * ? \" < > |, no leading dot), got {self.name!r}")
        _choice(self, "attn_backend", ("auto", "triton", "torch"))


#: The embedded demo's sparsity (configs/sparsity/demo.yaml): AdaSpa's online search, 23% of the key blocks of
#: every row (sparsity 0.77, equal head budgets), 12 of 20 steps dense, a fused search every other step
#: after (the measurements behind this choice: BENCHMARKS.md, 2026-12-02, sixth session).
DEMO_SPARSITY = SparsityConfig(mode="adaspa", dense_steps=30,
                               search_steps=(30, 35, 40, 45), search_kinds=("fused", "fused", "fused", "fused"),
                               reference_steps=50, sparsity=0.77, head_adaptive=False)


@dataclass(frozen=True)
class RunConfig:
    """The whole run: four sections (each a frozen dataclass checked on construction).

    Attributes:
        cluster: :class:`ClusterConfig`; model: :class:`ModelConfig`;
        sparsity: :class:`SparsityConfig`; run: :class:`RunOptions`;
        sources: the files (and "command line") this config came from, for messages and reports.
    """

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=lambda: DEMO_SPARSITY)
    run: RunOptions = field(default_factory=RunOptions)
    sources: Tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Plain, YAML/JSON-ready dict of the four sections (tuples as lists)."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in fields(getattr(self, name))}
                for name in _SECTIONS}

    def replace(self, **sections) -> "RunConfig":
        """A copy with whole sections replaced, or ``section={"key": value}`` updates applied."""
        new = {}
        for name, val in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"RunConfig has no section {name!r}; sections: {list(_SECTIONS)}")
            if isinstance(val, dict):
                val = _build_section(name, {**dataclasses.asdict(getattr(self, name)), **val}, {}, "replace()")
            new[name] = val
        return dataclasses.replace(self, **new)


_SECTIONS = {"cluster": ClusterConfig, "model": ModelConfig, "sparsity": SparsityConfig, "run": RunOptions}


# ---------------------------------------------------------------------------------------------- typing
def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0]) if len(set(args)) == 1 else 'values'}"
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, where: str):
    """``value`` checked against the type ``hint``; returns it normalised (tuples, floats)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a, where)
                except ConfigError:
                    pass
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(hint)}, got {len(value)} values {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = is_int(value)
    elif hint is float:
        ok = is_int(value) or isinstance(value, float)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in {f.name for f in fields(cls) if f.init}}


def _hint(section: str, key: str, where: str):
    """The type of ``section.key``; an unknown key is a :class:`ConfigError` listing the known ones."""
    hints = _hints(_SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"{where}: unknown key; {section} keys are: {', '.join(sorted(hints))}")
    return hints[key]


def _build_section(name: str, data: Dict[str, Any], origin: Dict[str, str], default_source: str):
    """Build section ``name`` from ``data`` (each value checked against its field's type)."""
    cls = _SECTIONS[name]
    kwargs = {}
    for key, value in data.items():
        where = f"{origin.get(key, default_source)}: {name}.{key}"
        kwargs[key] = _coerce(value, _hint(name, key, where), where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ names the field; say which file(s) set this section
        srcs = sorted(set(origin.values())) or [default_source]
        raise ConfigError(f"{', '.join(srcs)}: [{name}] {e}") from e


# ---------------------------------------------------------------------------------------------- files
def load_yaml(path, _stack: Tuple[Path, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """Read a config file and its ``include`` files: ``[(source, {section: {key: value}})]`` in merge order."""
    import yaml

    p = Path(path)
    if p.resolve() in _stack:
        chain = " -> ".join(str(s) for s in (*_stack, p.resolve()))
        raise ConfigError(f"{p}: include cycle: {chain}")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of sections, got {type(data).__name__}")
    out: List[Tuple[str, Dict[str, Any]]] = []
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{p}: include: expected a path or a list of paths, got {includes!r}")
    for inc in includes:
        out.extend(load_yaml(p.parent / inc, _stack + (p.resolve(),)))
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{p}: unknown section {section!r}; sections are: include, {', '.join(_SECTIONS)}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{p}: {section}: expected a mapping of keys, got {body!r}")
    out.append((str(p), data))
    return out


def parse_override(key: str, raw: str) -> Tuple[str, str, Any]:
    """``("run.steps", "10")`` -> ``("run", "steps", 10)``, the value typed by the field it sets.

    Values are read as YAML scalars / flow lists (``10``, ``0.5``, ``true``, ``null``, ``[1, 8, 8]``,
    or ``1,8,8``) except for string fields, which take the text as is.
    """
    import yaml

    where = f"command line: --{key}"
    if key.count(".") != 1:
        raise ConfigError(f"{where}: overrides are --section.key value (sections: {', '.join(_SECTIONS)})")
    section, name = key.split(".")
    name = name.replace("-", "_")
    if section not in _SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; sections are: {', '.join(_SECTIONS)}")
    hint = _hint(section, name, where)
    str_ok = hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint))
    if str_ok and raw.strip().lower() not in ("null", "none", "~"):
        return section, name, raw
    text = raw.strip()
    if typing.get_origin(hint) in (tuple, list) or (
        typing.get_origin(hint) is typing.Union
        and any(typing.get_origin(a) in (tuple, list) for a in typing.get_args(hint))
    ):
        if "," in text and not text.startswith("["):
            text = f"[{text}]"
    if text.lower() in ("none",):
        text = "null"
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot read value {raw!r}: {e}") from e
    return section, name, _coerce(value, hint, where)


def load_run_config(paths: Sequence = (), overrides: Sequence[Tuple[str, str]] = ()) -> RunConfig:
    """Merge config files (in order) and ``--section.key value`` overrides into a :class:`RunConfig`.

    Args:
        paths: YAML files, later ones win key by key.
        overrides: ``(dotted_key, raw_value)`` pairs from the command line, applied last.
    Raises:
        ConfigError: naming the file (or "command line") and the key.
    """
    merged: Dict[str, Dict[str, Any]] = {name: {} for name in _SECTIONS}
    origin: Dict[str, Dict[str, str]] = {name: {} for name in _SECTIONS}
    sources: List[str] = []
    for path in paths:
        for src, data in load_yaml(path):
            sources.append(src)
            for section, body in data.items():
                for key, value in (body or {}).items():
                    where = f"{src}: {section}.{key}"
                    merged[section][key] = _coerce(value, _hint(section, key, where), where)
                    origin[section][key] = src
    for key, raw in overrides:
        section, name, value = parse_override(key, raw)
        merged[section][name] = value
        origin[section][name] = "command line"
        if "command line" not in sources:
            sources.append("command line")
    built = {}
    for name in _SECTIONS:
        base = dataclasses.asdict(DEMO_SPARSITY) if name == "sparsity" else {}  # the sparsity default
        built[name] = _build_section(name, {**base, **merged[name]}, origin[name], "defaults")
    return RunConfig(sources=tuple(sources), **built)


# ---------------------------------------------------------------------------------------------- CLI
#: shortcut flags of generate.py -> the config key they set
SHORTCUTS = {
    "prompt": "run.prompt",
    "seed": "run.seed",
    "steps": "run.steps",
    "guidance": "run.guidance",
    "name": "run.name",
    "output_dir": "run.output_dir",
    "model_path": "model.path",
}


def build_parser(prog: str = "generate.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generate a video with sparse attention (default: the embedded tiny DiT).",
        epilog="Any config key can be set with --section.key value, e.g. --run.steps 10 "
               "--sparsity.mode dense --cluster.device cpu (sections: cluster, model, sparsity, run).",
    )
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file (repeatable; later files win)")
    p.add_argument("--prompt", help="text prompt (run.prompt)")
    p.add_argument("--seed", help="noise seed (run.seed)")
    p.add_argument("--steps", help="denoising steps (run.steps)")
    p.add_argument("--guidance", help="classifier-free guidance scale (run.guidance)")
    p.add_argument("--name", help="run folder name (run.name)")
    p.add_argument("--output-dir", help="parent folder of run folders (run.output_dir)")
    p.add_argument("--model-path", help="model weights file / folder (model.path)")
    p.add_argument("--compare-dense", action="store_true",
                   help="also run dense attention from the same noise; report PSNR / SSIM")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def parse_generate_args(argv: Sequence[str]) -> Tuple[RunConfig, argparse.Namespace]:
    """generate.py's command line -> (:class:`RunConfig`, the parsed flags)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    overrides: List[Tuple[str, str]] = []
    for flag, key in SHORTCUTS.items():
        val = getattr(args, flag)
        if val is not None:
            overrides.append((key, val))
    if args.compare_dense:
        overrides.append(("run.compare_dense", "true"))
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            raise ConfigError(f"command line: unexpected argument {tok!r} (options: see --help; "
                              "config keys: --section.key value)")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"command line: {tok} needs a value")
            key, raw = tok[2:], rest[i + 1]
            i += 2
        overrides.append((key, raw))
    return load_run_config(args.config, overrides), args


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
