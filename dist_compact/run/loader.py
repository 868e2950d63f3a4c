"""Run configuration files: YAML files + command-line overrides -> one :class:`RunConfig`.

A config file is a mapping of sections (every section and key optional; what is left out keeps
its default)::

    include: [../models/embedded.yaml]     # optional: files merged first (paths relative to this one)
    cluster: {nproc: 2, ulysses: 2, ring: 1, device: cpu, backend: gloo}
    model:   {name: embedded, frames: 16, height: 48, width: 48, tile: [1, 4, 4]}
    sparsity: {mode: adaspa, sparsity: 0.75}   # SparsityConfig
    run:     {prompt: "a red square moving left", seed: 0, steps: 20, guidance: 4.0}

Several files are merged in order (later keys win), then ``--section.key value`` overrides. Every
value is type-checked against the dataclass field it lands in; unknown sections/keys and bad types
are a :class:`~dist_compact.run.config.ConfigError` that names the file (or "command line") and the
key; value checks run in each dataclass's ``__post_init__``.

Only the command-line tools and launchers read files; library functions take the dataclasses or
plain arguments.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from .config import DEMO_SPARSITY, SECTIONS, ConfigError, RunConfig, build_section, coerce, field_type

__all__ = ["load_yaml", "load_run_config", "parse_override", "to_yaml"]


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
        if section not in SECTIONS:
            raise ConfigError(f"{p}: unknown section {section!r}; sections are: include, {', '.join(SECTIONS)}")
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
        raise ConfigError(f"{where}: overrides are --section.key value (sections: {', '.join(SECTIONS)})")
    section, name = key.split(".")
    name = name.replace("-", "_")
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; sections are: {', '.join(SECTIONS)}")
    hint = field_type(section, name, where)
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
    return section, name, coerce(value, hint, where)


def load_run_config(paths: Sequence = (), overrides: Sequence[Tuple[str, str]] = ()) -> RunConfig:
    """Merge config files (in order) and ``--section.key value`` overrides into a :class:`RunConfig`.

    Args:
        paths: YAML files, later ones win key by key.
        overrides: ``(dotted_key, raw_value)`` pairs from the command line, applied last.
    Raises:
        ConfigError: naming the file (or "command line") and the key.
    """
    merged: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    origin: Dict[str, Dict[str, str]] = {name: {} for name in SECTIONS}
    sources: List[str] = []
    for path in paths:
        for src, data in load_yaml(path):
            sources.append(src)
            for section, body in data.items():
                for key, value in (body or {}).items():
                    where = f"{src}: {section}.{key}"
                    merged[section][key] = coerce(value, field_type(section, key, where), where)
                    origin[section][key] = src
    for key, raw in overrides:
        section, name, value = parse_override(key, raw)
        merged[section][name] = value
        origin[section][name] = "command line"
        if "command line" not in sources:
            sources.append("command line")
    built = {}
    for name in SECTIONS:
        base = dataclasses.asdict(DEMO_SPARSITY) if name == "sparsity" else {}  # the sparsity default
        built[name] = build_section(name, {**base, **merged[name]}, origin[name], "defaults")
    return RunConfig(sources=tuple(sources), **built)


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
