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

from ..sparsity.config import SparsityConfig
from ..patterns.compact import CompactConfig, HeadPattern

__all__ = ["SCHEMA", "SCHEMA_VERSION", "config_format", "config_to_dict", "config_from_dict", "save_config",
           "load_config", "load_compact"]

SCHEMA = "dist_compact.compact_config"
SCHEMA_VERSION = 1

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


def config_from_dict(d: dict, source: str = "<dict>") -> CompactConfig:
    """Inverse of :func:`config_to_dict`; ``source`` names the file in error messages."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a Compact config must be a mapping, got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{source}: not a dist_compact Compact config (schema {d.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    if d.get("version") != SCHEMA_VERSION:
        raise ValueError(f"{source}: config schema version {d.get('version')!r} is not supported "
                         f"(this dist_compact reads version {SCHEMA_VERSION})")
    for key in ("model", "num_layers", "num_heads", "patterns"):
        if key not in d:
            raise ValueError(f"{source}: missing key {key!r}")
    pats = d["patterns"]
    if not isinstance(pats, list) or not all(isinstance(layer, list) for layer in pats):
        raise ValueError(f"{source}: 'patterns' must be a list (layers) of lists (heads) of strings")
    if len(pats) != d["num_layers"] or any(len(layer) != d["num_heads"] for layer in pats):
        raise ValueError(f"{source}: 'patterns' is not num_layers={d['num_layers']} x num_heads={d['num_heads']}")
    layers = []
    for li, layer in enumerate(pats):
        row = []
        for h, text in enumerate(layer):
            try:
                row.append(HeadPattern.parse(text))
            except ValueError as e:
                raise ValueError(f"{source}: layer {li} head {h}: {e}") from None
        layers.append(tuple(row))
    sf = d.get("searched_for")
    grid = tile = None
    if sf is not None:
        if not isinstance(sf, dict) or "grid" not in sf or "tile" not in sf:
            raise ValueError(f"{source}: 'searched_for' must be null or {{grid: [T, H, W], tile: [t, h, w]}}")
        grid, tile = tuple(sf["grid"]), tuple(sf["tile"])
    search = d.get("search") or {}
    try:
        return CompactConfig(tuple(layers), model=str(d["model"] or ""), grid=grid, tile=tile,
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
    raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")


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
    path = pathlib.Path(path)
    fmt = config_format(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; sparsity.compact_config takes a Compact config file (.yaml / .json) "
                         "written by `dist-compact-search search`")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the Compact config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a Compact config (.yaml / "
                         ".json) written by `dist-compact-search search`") from None
    try:
        d = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {fmt.upper()}: {e}") from None
    config = config_from_dict(d, source=str(path))
    try:
        config.check_compatible(model=model, num_layers=num_layers, num_heads=num_heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
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
