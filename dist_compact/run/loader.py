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
import functools
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import DEMO_SPARSITY, SECTIONS, ConfigError, RunConfig, build_section, coerce, field_type

__all__ = ["load_yaml", "load_run_config", "parse_override", "to_yaml"]


#: the deepest chain of ``include`` files, and the most files one config may bring in
MAX_INCLUDE_DEPTH, MAX_INCLUDE_FILES = 32, 256
#: the largest config file read (a config is a few hundred bytes; this is far beyond any)
MAX_CONFIG_BYTES = 1 << 20


def _read_mapping(p: Path) -> Dict[str, Any]:
    """One config file's mapping: a folder, binary bytes, invalid YAML, a key given twice at any
    level, or a file that is not a mapping is one :class:`ConfigError` naming the file."""
    import yaml

    if p.is_dir():
        raise ConfigError(f"{p} is a directory, not a config file; give a .yaml file (e.g. one of "
                          "configs/cluster/*.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()[:MAX_CONFIG_BYTES + 1]
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file; give a config file "
                          "(.yaml)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); give a config file (.yaml)") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it holds NUL bytes); give a config file (.yaml)")
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


#: a number float() reads, unquoted: YAML 1.1 (PyYAML) takes 1e300 and 8e-1 for strings, since its
#: floats need a dot and a signed exponent (ints still resolve first, so 10 stays an int)
_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"


@functools.lru_cache(maxsize=None)
def _unique_key_loader():
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)
        and reads every unquoted number that Python's float() reads as a float."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key] + 1} and "
                                        f"{key_node.start_mark.line + 1}); merge the two into one (YAML would keep "
                                        "only the last)")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))
    return Loader


def read_yaml_value(text: str):
    """One YAML value (a command-line override) with the config files' reading of numbers."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())


class _DuplicateKey(ValueError):
    pass


def load_yaml(path, _stack: Tuple[Path, ...] = (), _seen: Optional[Dict[Path, Any]] = None
              ) -> List[Tuple[str, Dict[str, Any]]]:
    """Read a config file and its ``include`` files: ``[(source, {section: {key: value}})]`` in merge order.

    Each file comes once, at its first place in the order (a file included by two others is read
    once, and a file always overrides what it includes); include chains are at most
    :data:`MAX_INCLUDE_DEPTH` deep and bring at most :data:`MAX_INCLUDE_FILES` files.
    """
    seen: Dict[Path, Any] = {} if _seen is None else _seen
    p = Path(path)
    key = p.resolve()
    if key in _stack:
        chain = " -> ".join(str(s) for s in (*_stack, key))
        raise ConfigError(f"{p}: include cycle: {chain}")
    if key in seen:
        return []
    if len(_stack) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{p}: includes nest more than {MAX_INCLUDE_DEPTH} files deep ({_stack[0]} -> ...); "
                          "flatten the chain")
    if len(seen) >= MAX_INCLUDE_FILES:
        raise ConfigError(f"{_stack[0] if _stack else p}: brings in more than {MAX_INCLUDE_FILES} config files; "
                          "flatten the includes")
    data = _read_mapping(p)
    seen[key] = True
    out: List[Tuple[str, Dict[str, Any]]] = []
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{p}: include: expected a path or a list of paths, got {includes!r}")
    for inc in includes:
        out.extend(load_yaml(p.parent / inc, _stack + (key,), seen))
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
        value = read_yaml_value(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot read value {raw!r}: {e}") from e
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
