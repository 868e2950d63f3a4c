"""Run configuration files: YAML files + command-line overrides -> one :class:`RunConfig`.

A config file is a mapping of sections (every section and key optional; what is left out keeps
its default)::

    include: [../models/embedded.yaml]     # optional: files merged first (paths relative to this one)
    cluster: {nproc: 2, ulysses: 2, ring: 1, device: cpu, backend: gloo}
    model:   {name: embedded, frames: 16, height: 48, width: 48, tile: [1, 4, 4]}
    sparsity: {mode: adaspa, sparsity: 0.75}   # SparsityConfig
    run:     {prompt: "a red square moving left", seed: 0, steps: 20, guidance: 4.0}

A top-level key that starts with a dot (``.base: &base {seed: 3}``) is skipped: it holds what YAML
anchors name for merge keys (``run: {<<: *base, steps: 10}``). A leading ``~`` of a path (a config
file, an include, ``model.path``, ``run.output_dir``, ``sparsity.compact_config``) is the home folder,
in a file as on the command line.

Several files are merged in order (later keys win), then ``--section.key value`` overrides. Every
value is type-checked against the dataclass field it lands in; unknown sections/keys and bad types
are a :class:`~dist_compact.run.config.ConfigError` that names the file (or "command line") and the
key; value checks run in each dataclass's ``__post_init__``.

Only the command-line tools and launchers read files; library functions take the dataclasses or
plain arguments.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..cmdline import A_DIRECTORY, NOT_FOUND, YamlInputError, file_problem, load_yaml_text, path_problem, short_repr, show_path
from .config import DEMO_SPARSITY, SECTIONS, ConfigError, RunConfig, build_section, coerce, field_type

__all__ = ["load_yaml", "load_run_config", "parse_override", "to_yaml", "PATH_FIELDS"]


#: the deepest chain of ``include`` files, and the most files one config may bring in
MAX_INCLUDE_DEPTH, MAX_INCLUDE_FILES = 32, 256
#: the largest config file read (a config is a few hundred bytes; this is far beyond any)
MAX_CONFIG_BYTES = 1 << 20
#: the fields that hold a path: a leading ``~`` is the home folder, in a file as on the command line
PATH_FIELDS = frozenset({("model", "path"), ("run", "output_dir"), ("sparsity", "compact_config")})


def _key(key) -> str:
    """A key as a message writes it after ``section.``: a plain name as it is, anything else quoted."""
    return key if isinstance(key, str) and key.isidentifier() and len(key) <= 64 else short_repr(key, 40)


def _check_file(p: Path, included_by: Optional[Path]) -> None:
    """A missing path, a folder or anything but a regular file is one :class:`ConfigError` naming it
    (and the file whose ``include`` named it)."""
    problem = file_problem(p)
    if problem is None:
        return
    by = f" (included by {show_path(included_by)})" if included_by is not None else ""
    if problem == NOT_FOUND:
        raise ConfigError(f"config file not found: {show_path(p)}{by}")
    if problem == A_DIRECTORY:
        raise ConfigError(f"{show_path(p)}{by} is a directory, not a config file; give a .yaml file (e.g. one of "
                          "configs/cluster/*.yaml)")
    raise ConfigError(f"{show_path(p)}{by}: {problem}{'' if ';' in problem else '; give a config file (.yaml)'}")


def _read_mapping(p: Path) -> Dict[str, Any]:
    """One config file's mapping: binary bytes, invalid YAML, a key given twice at any level, or a
    file that is not a mapping is one :class:`ConfigError` naming the file."""
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{show_path(p)}: {path_problem(e)}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{show_path(p)}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file; give a "
                          "config file (.yaml)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{show_path(p)}: not a text file (byte {e.start} is not UTF-8); give a config file "
                          "(.yaml)") from None
    if "\x00" in text:
        raise ConfigError(f"{show_path(p)}: not a text file (it holds NUL bytes); give a config file (.yaml)")
    try:
        data = load_yaml_text(text)
    except YamlInputError as e:
        what = f"not valid YAML: {e}" if e.position else str(e)
        raise ConfigError(f"{show_path(p)}: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{show_path(p)}: a config file must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def read_yaml_value(text: str):
    """One YAML value (a command-line override) with the config files' reading of numbers."""
    return load_yaml_text(text, value=True)


def load_yaml(path, _stack: Tuple[Path, ...] = (), _seen: Optional[Dict[Path, Any]] = None,
              _by: Optional[Path] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """Read a config file and its ``include`` files: ``[(source, {section: {key: value}})]`` in merge order.

    Each file comes once, at its first place in the order (a file included by two others is read
    once, and a file always overrides what it includes); include chains are at most
    :data:`MAX_INCLUDE_DEPTH` deep and bring at most :data:`MAX_INCLUDE_FILES` files. A leading
    ``~`` of a path is the home folder; an included path is taken from the including file's folder.
    """
    seen: Dict[Path, Any] = {} if _seen is None else _seen
    p = Path(os.path.expanduser(str(path)))
    _check_file(p, _by)
    key = Path(os.path.realpath(p))
    if key in _stack:
        chain = " -> ".join(show_path(s) for s in (*_stack, key))
        raise ConfigError(f"{show_path(p)}: include cycle: {chain}")
    if key in seen:
        return []
    if len(_stack) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{show_path(p)}: includes nest more than {MAX_INCLUDE_DEPTH} files deep "
                          f"({show_path(_stack[0])} -> ...); flatten the chain")
    if len(seen) >= MAX_INCLUDE_FILES:
        raise ConfigError(f"{show_path(_stack[0] if _stack else p)}: brings in more than {MAX_INCLUDE_FILES} "
                          "config files; flatten the includes")
    data = {k: v for k, v in _read_mapping(p).items() if not (isinstance(k, str) and k.startswith("."))}
    seen[key] = True
    out: List[Tuple[str, Dict[str, Any]]] = []
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{show_path(p)}: include: expected a path or a list of paths, got "
                          f"{short_repr(includes)}")
    for inc in includes:
        out.extend(load_yaml(p.parent / os.path.expanduser(inc), _stack + (key,), seen, p))
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{show_path(p)}: unknown section {short_repr(section, 40)}; sections are: include, "
                              f"{', '.join(SECTIONS)}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{show_path(p)}: {section}: expected a mapping of keys, got {short_repr(body)}")
    out.append((str(p), data))
    return out


def parse_override(key: str, raw: str) -> Tuple[str, str, Any]:
    """``("run.steps", "10")`` -> ``("run", "steps", 10)``, the value typed by the field it sets.

    Values are read as YAML scalars / flow lists (``10``, ``0.5``, ``true``, ``null``, ``[1, 8, 8]``,
    or ``1,8,8``) except for string fields, which take the text as is.
    """
    where = f"command line: --{key if key.isprintable() and len(key) <= 80 else short_repr(key, 60)}"
    if key.count(".") != 1:
        raise ConfigError(f"{where}: overrides are --section.key value (sections: {', '.join(SECTIONS)})")
    section, name = key.split(".")
    name = name.replace("-", "_")
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {short_repr(section, 40)}; sections are: {', '.join(SECTIONS)}")
    hint = field_type(section, name, where)
    str_ok = hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint))
    # a plain text field takes any text, "null" included; an optional one reads null / none / ~ as unset
    if hint is str or (str_ok and raw.strip().lower() not in ("null", "none", "~")):
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
        value = read_yaml_value(text) if text else ""
    except YamlInputError as e:
        raise ConfigError(f"{where}: cannot read value {short_repr(raw)}: {e}") from None
    if isinstance(value, str) and _takes_float(hint):
        try:  # any text Python's float() reads (the field's own check refuses NaN and inf)
            value = float(value)
        except ValueError:
            pass
    return section, name, coerce(value, hint, where)


def _takes_float(hint) -> bool:
    return hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint))


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
                    where = f"{show_path(src)}: {section}.{_key(key)}"
                    value = coerce(value, field_type(section, key, where), where)
                    merged[section][key] = _expand(section, key, value)
                    origin[section][key] = show_path(src)
    for key, raw in overrides:
        section, name, value = parse_override(key, raw)
        merged[section][name] = _expand(section, name, value)
        origin[section][name] = "command line"
        if "command line" not in sources:
            sources.append("command line")
    built = {}
    for name in SECTIONS:
        base = dataclasses.asdict(DEMO_SPARSITY) if name == "sparsity" else {}  # the sparsity default
        built[name] = build_section(name, {**base, **merged[name]}, origin[name], "defaults")
    return RunConfig(sources=tuple(sources), **built)


def _expand(section: str, key: str, value):
    """A path field's value with a leading ``~`` made the home folder (as a shell does)."""
    return os.path.expanduser(value) if (section, key) in PATH_FIELDS and isinstance(value, str) else value


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
