"""The run's typed sections: cluster, model, sparsity, run -> one frozen :class:`RunConfig`.

Each section is a frozen dataclass checked in ``__post_init__`` (the sparsity section is
:class:`~dist_compact.sparsity.config.SparsityConfig`). :func:`build_section` builds one section from a
plain mapping, checking every value against the type of the field it lands in (an int field takes
``3``, not ``"3"`` or ``3.5``); :mod:`dist_compact.run.loader` uses it for YAML files and
``--section.key value`` overrides, :meth:`RunConfig.replace` for updates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple

from .._util import control_chars, is_int
from ..cmdline import short_repr
from ..layout import SUPPORTED_BLOCK_SIZES
from ..parallel.config import ParallelConfig, ParallelConfigError
from ..parallel.watch import DEFAULT_TIMEOUT_S
from ..sparsity.config import SparsityConfig

__all__ = [
    "ConfigError",
    "SECTIONS",
    "ClusterConfig",
    "ModelConfig",
    "RunOptions",
    "RunConfig",
    "DEMO_SPARSITY",
    "RANDOM_MODELS",
    "field_type",
    "coerce",
    "build_section",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file (or command line) and the key."""


def _choice(obj, name: str, choices: Sequence[str]) -> None:
    val = getattr(obj, name)
    if val not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {short_repr(val)}")


def _pos_int(obj, name: str, minimum: int = 1) -> None:
    val = getattr(obj, name)
    if not is_int(val) or val < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {minimum}, got {short_repr(val)}")


#: ``model.name`` values of ``model.kind: random`` -> their key in dist_compact.models.published.
RANDOM_MODELS = {"hunyuanvideo": "hunyuan_video", "wan2.1-t2v-14b": "wan"}


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
        timeout_s: the longest wait, in seconds, for every rank to join and for any collective
            (gloo and NCCL, every group). A rank that is stopped, hung or dead ends the job within
            about this plus a few seconds, rank 0 naming it in one line. Default 300
            (:data:`~dist_compact.parallel.watch.DEFAULT_TIMEOUT_S`); at most 86400.
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
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("nproc", "nnodes", "ulysses", "ring"):
            _pos_int(self, name)
        t = self.timeout_s
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= 86400):
            raise ValueError(f"ClusterConfig.timeout_s must be a number of seconds in (0, 86400], got {short_repr(t)}")
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "backend", ("auto", "gloo", "nccl"))
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("ClusterConfig.backend 'nccl' needs CUDA devices; use gloo with device: cpu")
        if self.share_gpus not in (None, True, False):
            raise ValueError("ClusterConfig.share_gpus must be true, false or null, got "
                             f"{short_repr(self.share_gpus)}")
        if self.share_gpus and (self.device == "cpu" or self.backend == "nccl"):
            raise ValueError("ClusterConfig.share_gpus: true runs gloo on CUDA devices (NCCL refuses two ranks on one "
                             f"GPU); it cannot go with device: {self.device}, backend: {self.backend}")
        if not isinstance(self.master_addr, str) or not self.master_addr:
            raise ValueError("ClusterConfig.master_addr must be a non-empty string, got "
                             f"{short_repr(self.master_addr)}")
        if not is_int(self.master_port) or not 1 <= self.master_port <= 65535:
            raise ValueError("ClusterConfig.master_port must be an int in [1, 65535], got "
                             f"{short_repr(self.master_port)}")
        try:  # the world-size rule lives in ParallelConfig.check alone
            self.parallel.check(world_size=self.world_size)
        except ParallelConfigError as e:
            raise ValueError(f"ClusterConfig: {e} (world size = nproc x nnodes = {self.nproc} x {self.nnodes} = {self.world_size})") from None

    @property
    def parallel(self) -> ParallelConfig:
        """The sequence-parallel degrees."""
        return ParallelConfig(ulysses=self.ulysses, ring=self.ring)

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
            and no VAE: for speed runs, see :mod:`dist_compact.run.jobs.random_weights`).
        path: weights: for ``embedded`` a ``.safetensors`` file (None = the shipped weights); for
            ``diffusers`` the local model folder (required); unused by ``random``.
        pipeline: diffusers pipeline class name (``"WanPipeline"``, ``"HunyuanVideoPipeline"``).
        frames, height, width: video size in pixels / frames. ``random`` models take what their VAE
            takes: ``frames = 4k + 1`` (latent frames ``(frames - 1) / 4 + 1``), ``height`` and
            ``width`` multiples of 16 (VAE factor 8 x patch 2).
        tile: kernel tile ``(t, h, w)`` in latent tokens; ``t*h*w`` is the block size (16..128).
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        size: ``random`` only: ``"full"`` (the published widths and depths) or ``"small"`` (the tiny
            stand-ins of :data:`dist_compact.models.published.SMALL`: 2 heads of 32, for CPU tests).
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
            raise ValueError(f"ModelConfig.name must be a non-empty string, got {short_repr(self.name)}")
        _choice(self, "kind", ("embedded", "diffusers", "random"))
        for name, most in (("frames", MAX_FRAMES), ("height", MAX_PIXELS), ("width", MAX_PIXELS)):
            val = getattr(self, name)
            if not is_int(val) or not 1 <= val <= most:
                raise ValueError(f"ModelConfig.{name} must be an int in [1, {most}], got {short_repr(val)}")
        object.__setattr__(self, "tile", tuple(self.tile))
        if len(self.tile) != 3 or not all(is_int(t) and t >= 1 for t in self.tile):
            raise ValueError(f"ModelConfig.tile must be three positive ints (t, h, w), got {short_repr(self.tile)}")
        vol = self.tile[0] * self.tile[1] * self.tile[2]
        if vol not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"ModelConfig.tile {self.tile} has {vol} tokens; the block size must be one of "
                             f"{SUPPORTED_BLOCK_SIZES}")
        _choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        if isinstance(self.path, str) and control_chars(self.path):
            raise ValueError(f"ModelConfig.path must be a path without control characters ({control_chars(self.path)}), "
                             f"got {short_repr(self.path)}")
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
                                 f"(kind is {short_repr(self.kind)})")
            return
        if self.name not in RANDOM_MODELS:
            raise ValueError(f"ModelConfig.name {short_repr(self.name)} is not a random-weight model; known: "
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
            raise ValueError(f"RunOptions.prompt must be a string, got {short_repr(self.prompt)}")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError("RunOptions.seed must be an int in [0, 2**63 - 1] (a generator seed), got "
                             f"{short_repr(self.seed)}")
        if not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"RunOptions.steps must be an int in [1, {MAX_STEPS}] (50 is typical), got "
                             f"{short_repr(self.steps)}")
        _pos_int(self, "fps")
        for name, lo in (("guidance", 0.0), ("shift", 0.0)):
            val = getattr(self, name)
            if not math.isfinite(val) or val <= lo:
                raise ValueError(f"RunOptions.{name} must be a finite number > {lo}, got {short_repr(val)}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"RunOptions.output_dir must be a non-empty path, got {short_repr(self.output_dir)}")
        if control_chars(self.output_dir):
            raise ValueError(f"RunOptions.output_dir must be a path without control characters "
                             f"({control_chars(self.output_dir)}), got {short_repr(self.output_dir)}")
        if self.name is not None:
            bad = set(self.name) & set('/\\:*?"<>|') or not self.name.strip() or self.name.startswith(".")
            if bad or control_chars(self.name) or self.name != self.name.strip():
                raise ValueError("RunOptions.name must be a plain folder name (no / \\ : * ? \" < > |, no control "
                                 f"characters, no leading dot or space), got {short_repr(self.name)}")
            if len(self.name.encode()) > MAX_NAME_BYTES:
                raise ValueError(f"RunOptions.name has {len(self.name.encode())} bytes; a run folder name takes at "
                                 f"most {MAX_NAME_BYTES} (choose a shorter --name)")
        _choice(self, "attn_backend", ("auto", "triton", "torch"))


#: the largest ``run.seed``: what every generator takes
MAX_SEED = 2 ** 63 - 1
#: the most denoising steps of a run (samplers of this kind converge in tens of steps)
MAX_STEPS = 10000
#: the longest ``run.name`` in bytes (file systems take 255, less the temporary folder's suffix)
MAX_NAME_BYTES = 200
#: the largest ``model.frames`` and ``model.height`` / ``model.width`` (far beyond any published model:
#: a typo, such as an extra zero, is an error before anything is allocated)
MAX_FRAMES, MAX_PIXELS = 4096, 16384


#: The embedded demo's sparsity (configs/sparsity/demo.yaml): AdaSpa's online search, 23% of the key blocks of
#: every row (sparsity 0.77, equal head budgets), 12 of 20 steps dense, a fused search every other step
#: after (the measurements behind this choice: BENCHMARKS.md, "Embedded demo model").
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
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Plain, YAML/JSON-ready dict of the four sections (tuples as lists)."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in fields(getattr(self, name))}
                for name in SECTIONS}

    def replace(self, **sections) -> "RunConfig":
        """A copy with whole sections replaced, or ``section={"key": value}`` updates applied."""
        new = {}
        for name, val in sections.items():
            if name not in SECTIONS:
                raise ConfigError(f"RunConfig has no section {short_repr(name)}; sections: {list(SECTIONS)}")
            if isinstance(val, dict):
                val = build_section(name, {**dataclasses.asdict(getattr(self, name)), **val}, {}, "replace()")
            new[name] = val
        return dataclasses.replace(self, **new)


#: section name -> its dataclass, in file order
SECTIONS = {"cluster": ClusterConfig, "model": ModelConfig, "sparsity": SparsityConfig, "run": RunOptions}


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


def coerce(value, hint, where: str):
    """``value`` checked against the type ``hint``; returns it normalised (tuples, floats)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return coerce(value, a, where)
                except ConfigError:
                    pass
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {short_repr(value)} ({type(value).__name__})")
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(hint)}, got {short_repr(value)} ({type(value).__name__})"
                              + _list_hint(value, args))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(hint)}, got {len(value)} values "
                              f"{short_repr(list(value))}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
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
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {short_repr(value)} ({type(value).__name__})")
    return value


def _list_hint(value, args) -> str:
    """How to write one number or word as the list a field takes (``[1000]``), when that is a fix."""
    one = len(args) == 2 and args[1] is Ellipsis
    if not one or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return ""
    text = str(value)
    if not text or len(text) > 40 or not text.isprintable() or any(c in text for c in ",[]{}:#'\""):
        return ""
    return f"; a list is written in brackets: [{text}] (several: [{text}, ...])"


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in {f.name for f in fields(cls) if f.init}}


def field_type(section: str, key: str, where: str):
    """The type of ``section.key``; an unknown key is a :class:`ConfigError` listing the known ones."""
    hints = _hints(SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"{where}: unknown key; {section} keys are: {', '.join(sorted(hints))}")
    return hints[key]


def build_section(name: str, data: Dict[str, Any], origin: Dict[str, str], default_source: str):
    """Build section ``name`` from ``data`` (each value checked against its field's type)."""
    cls = SECTIONS[name]
    kwargs = {}
    for key, value in data.items():
        where = f"{origin.get(key, default_source)}: {name}.{key}"
        kwargs[key] = coerce(value, field_type(name, key, where), where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ names the field first ("RunOptions.seed must be ..."): the source that set it;
        # else (a rule of several fields) every source that set a key of this section
        m = re.match(rf"{cls.__name__}\.(\w+)", str(e))
        if m and m.group(1) in origin:
            srcs = [origin[m.group(1)]]
        else:
            srcs = sorted(set(origin.values())) or [default_source]
        raise ConfigError(f"{', '.join(srcs)}: [{name}] {e}") from e
