"""Searched Compact configs as shareable YAML / JSON files.

Schema (version 1), the same in YAML and JSON::

    schema: dist_compact.compact_config
    version: 1
    model: wan2.1-14b                  # the model searched; loading for another model is refused
    num_layers: 30
    num_heads: 24
    searched_for: {grid: [21, 30, 52], tile: [1, 8, 8]}   # latent grid and tile; null = use as written
    search: {tau: 0.9, lam: null}
    patterns:                          # num_layers lists of num_heads head patterns
      - ["0: 1x2; 1-3: 0x* + 2x0; 4+: -", ...]

A head pattern lists frame-distance groups ``lo[-hi|+]: windows``; distances are slab distances
``|slab_q - slab_k|`` (a slab is ``tile[0]`` latent frames), windows are ``RxC`` half-extents in tiles
around the query tile (``*`` = the whole axis), up to two joined by ``+``, ``-`` for none. On another
latent grid the windows are rescaled as documented in :mod:`dist_compact.patterns.compact`.

Only launchers / the CLI read files (the library takes :class:`CompactConfig` objects).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Union

import yaml

from .._util import is_int
from ..cmdline import A_DIRECTORY, YamlInputError, file_problem, load_yaml_text, short_repr, show_path
from ..sparsity.config import SparsityConfig
from ..patterns.compact import CompactConfig, HeadPattern

__all__ = ["SCHEMA", "SCHEMA_VERSION", "config_format", "config_to_dict", "config_from_dict", "save_config",
           "load_config", "load_compact"]

SCHEMA = "dist_compact.compact_config"
SCHEMA_VERSION = 1
#: the largest Compact config file read (a model of 60 layers x 48 heads writes well under 1 MiB)
MAX_COMPACT_BYTES = 16 << 20

_HEADER = (
    "# dist_compact Compact Attention config. Per head: 'lo[-hi|+]: RxC [+ RxC]; ...' = for slab distances\n"
    "# lo..hi (one slab = tile[0] latent frames) keep the union of windows of half-extent R tile rows x C tile\n"
    "# cols around the query tile ('*' = whole axis, '-' = nothing). Text rows/columns are always kept.\n"
)


def config_to_dict(config: CompactConfig) -> dict:
    """The file form of ``config`` (plain types only)."""
    if not isinstance(config, CompactConfig):
        raise TypeError(f"expected a CompactConfig, got {type(config).__name__}")
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "model": config.model,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "searched_for": None if config.grid is None else {"grid": list(config.grid), "tile": list(config.tile)},
        "search": {"tau": config.tau, "lam": config.lam},
        "patterns": [[str(p) for p in layer] for layer in config.patterns],
    }


#: the keys of a Compact config file, each with what it takes (for messages)
_KEYS = {
    "schema": f"{SCHEMA!r}",
    "version": f"{SCHEMA_VERSION}",
    "model": "a model name or null",
    "num_layers": "an int >= 1",
    "num_heads": "an int >= 1",
    "searched_for": "null or {grid: [T, H, W], tile: [t, h, w]}",
    "search": "null or {tau: number or null, lam: number or null}",
    "patterns": "num_layers lists of num_heads head pattern strings",
}


def _ints3(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(is_int(v) and v >= 1 for v in value)


def _number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)


def config_from_dict(d: dict, source: str = "<dict>") -> CompactConfig:
    """Inverse of :func:`config_to_dict`; ``source`` names the file in error messages.

    Every key is checked for its type before any is used: a wrong one is one ``ValueError`` naming
    ``source``, the key and what it takes. Top-level keys that start with a dot are skipped (they hold
    what YAML anchors name for merge keys).
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a Compact config must be a mapping, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if not (isinstance(k, str) and k.startswith("."))}  # anchors for merge keys
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{source}: not a dist_compact Compact config (schema {short_repr(d.get('schema'))}, "
                         f"expected {SCHEMA!r})")
    version = d.get("version")
    if not is_int(version) or version != SCHEMA_VERSION:
        raise ValueError(f"{source}: config schema version {short_repr(version)} is not supported "
                         f"(this dist_compact reads version {SCHEMA_VERSION})")
    for key in d:
        if key not in _KEYS:
            raise ValueError(f"{source}: unknown key {short_repr(key, 40)}; a Compact config has {', '.join(_KEYS)}")
    for key in ("model", "num_layers", "num_heads", "patterns"):
        if key not in d:
            raise ValueError(f"{source}: missing key {key!r} ({_KEYS[key]})")

    def wrong(key, what=None):
        value = d[key]
        raise ValueError(f"{source}: {key} must be {what or _KEYS[key]}, got {short_repr(value)} "
                         f"({type(value).__name__})")

    if d["model"] is not None and not isinstance(d["model"], str):
        wrong("model")
    for key in ("num_layers", "num_heads"):
        if not is_int(d[key]) or d[key] < 1:
            wrong(key)
    num_layers, num_heads, pats = d["num_layers"], d["num_heads"], d["patterns"]
    if not isinstance(pats, list) or not all(isinstance(layer, list) for layer in pats):
        raise ValueError(f"{source}: 'patterns' must be a list (layers) of lists (heads) of strings")
    if len(pats) != num_layers or any(len(layer) != num_heads for layer in pats):
        got = next((f"layer {i} has {len(layer)} heads" for i, layer in enumerate(pats) if len(layer) != num_heads),
                   f"it has {len(pats)} layers")
        raise ValueError(f"{source}: 'patterns' is not num_layers={num_layers} x num_heads={num_heads} ({got})")
    layers = []
    for li, layer in enumerate(pats):
        row = []
        for h, text in enumerate(layer):
            if not isinstance(text, str):
                raise ValueError(f"{source}: layer {li} head {h}: a head pattern must be a string like "
                                 f"'0: 2x2; 1+: 0x0', got {short_repr(text)} ({type(text).__name__})")
            try:
                row.append(HeadPattern.parse(text))
            except ValueError as e:
                raise ValueError(f"{source}: layer {li} head {h}: {e}") from None
        layers.append(tuple(row))
    sf = d.get("searched_for")
    grid = tile = None
    if sf is not None:
        if not isinstance(sf, dict) or set(sf) != {"grid", "tile"}:
            wrong("searched_for")
        for key in ("grid", "tile"):
            if not _ints3(sf[key]):
                raise ValueError(f"{source}: searched_for.{key} must be three ints >= 1, got {short_repr(sf[key])} "
                                 f"({type(sf[key]).__name__})")
        grid, tile = tuple(sf["grid"]), tuple(sf["tile"])
    search = d.get("search")
    if search is None:
        search = {}
    if not isinstance(search, dict) or not set(search) <= {"tau", "lam"}:
        wrong("search")
    for key in ("tau", "lam"):
        if not _number(search.get(key)):
            raise ValueError(f"{source}: search.{key} must be a number >= 0 or null, got "
                             f"{short_repr(search[key])} ({type(search[key]).__name__})")
    try:
        return CompactConfig(tuple(layers), model=d["model"] or "", grid=grid, tile=tile,
                             tau=search.get("tau"), lam=search.get("lam"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_format(path: Union[str, pathlib.Path]) -> str:
    """``"yaml"`` or ``"json"`` by the file suffix; another suffix is a ValueError naming the file."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ValueError(f"{show_path(path)}: config files must end in .yaml, .yml or .json")


def save_config(config: CompactConfig, path: Union[str, pathlib.Path]) -> None:
    """Write ``config`` as YAML or JSON (by the file suffix)."""
    path = pathlib.Path(path)
    d = config_to_dict(config)
    if config_format(path) == "json":
        text = json.dumps(d, indent=1) + "\n"
    else:
        text = _HEADER + yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=1 << 16)
    path.write_text(text)


def load_config(path: Union[str, pathlib.Path], *, model: Optional[str] = None, num_layers: Optional[int] = None,
                num_heads: Optional[int] = None) -> CompactConfig:
    """Read a config file and check that it fits the model (refused with a clear error otherwise).

    Args:
        model: the model name it must have been searched for (a config without a name fits any).
        num_layers, num_heads: the model's attention layers and heads per layer.
    """
    path = pathlib.Path(os.path.expanduser(str(path)))
    fmt = config_format(path)
    name = show_path(path)
    written = "(.yaml / .json) written by `dist-compact-search search`"
    problem = file_problem(path)
    if problem == A_DIRECTORY:
        raise ValueError(f"{name} is a directory; sparsity.compact_config takes a Compact config file {written}")
    if problem is not None:
        raise ValueError(f"{name}: {problem}{'' if ';' in problem else f'; give a Compact config {written}'}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_COMPACT_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{name}: cannot read the Compact config ({e.strerror})") from None
    if len(raw) > MAX_COMPACT_BYTES:
        raise ValueError(f"{name}: larger than {MAX_COMPACT_BYTES >> 20} MiB, not a Compact config; give one {written}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not a text file (byte {e.start} is not UTF-8); give a Compact config "
                         f"{written}") from None
    try:
        d = json.loads(text) if fmt == "json" else load_yaml_text(text)
    except YamlInputError as e:
        raise ValueError(f"{name}: not valid YAML: {e}" if e.position else f"{name}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{name}: lists and objects nest too deep to read (a Compact config nests 3 levels); give a "
                         f"Compact config {written}") from None
    except ValueError as e:  # an int of more digits than Python reads
        raise ValueError(f"{name}: not valid JSON: {str(e).split(';')[0]}") from None
    config = config_from_dict(d, source=name)
    try:
        config.check_compatible(model=model, num_layers=num_layers, num_heads=num_heads)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return config


def load_compact(sparsity: SparsityConfig, *, model: Optional[str] = None, num_layers: Optional[int] = None,
                 num_heads: Optional[int] = None, shipped_dir=None):
    """The static Compact pattern object for ``sparsity`` (None when its mode uses none).

    Reads ``sparsity.compact_config`` (a searched config file, :func:`load_config`) and checks it
    was searched for this model / layer and head count. A relative path is taken from the working
    directory, else from ``shipped_dir`` (the callers pass the folder of the embedded model's shipped
    files, ``dist_compact.models.embedded.WEIGHTS_DIR``, so shipped configs resolve wherever the
    package is installed).
    """
    if not sparsity.uses_compact:
        return None
    if not sparsity.compact_config:
        raise ValueError(f"sparsity mode {sparsity.mode!r} needs sparsity.compact_config (a searched config file)")
    path = sparsity.compact_config
    if shipped_dir is not None and not os.path.isabs(path) and not os.path.exists(path):
        shipped = os.path.join(str(shipped_dir), path)
        if os.path.exists(shipped):
            path = shipped
    return load_config(path, model=model, num_layers=num_layers, num_heads=num_heads)
