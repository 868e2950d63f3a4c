"""What commands read from users, with each error as ONE line: the argument parser of every command
(:class:`OneLineParser`), values quoted in messages at a bounded length (:func:`short_repr`), YAML read
strictly (:func:`load_yaml_text`), paths in messages (:func:`show_path`) and file-system errors in words
(:func:`path_problem`)."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import reprlib
import stat
from typing import Any, NoReturn, Optional

from ._util import control_chars

__all__ = ["OneLineParser", "short_repr", "show_path", "path_problem", "YamlInputError", "MAX_YAML_DEPTH",
           "load_yaml_text"]


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``prog: error: message (see --help)`` on one line
    and exit code 2 (argparse prints its usage block first, which buries the one line that matters).
    Sub-command parsers made by :meth:`add_subparsers` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _ShortRepr(reprlib.Repr):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 4
        self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = self.maxlong = self.maxother = limit

    def repr_int(self, x, level):
        if x.bit_length() > 1024:  # repr() refuses ints of more than 4300 digits
            return f"<int of {int(x.bit_length() * 0.30103)}+ digits>"
        return super().repr_int(x, level)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` in at most ``limit`` characters (``...`` marks what is left out), for quoting
    what a user gave in a message: containers show a few items a few levels deep, so a huge, deep or
    aliased structure costs as little as a small one."""
    try:
        text = _ShortRepr(limit).repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is named by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show_path(path) -> str:
    """A path as a message quotes it: as it is, or quoted and shortened when it holds control
    characters or is longer than any real path (so the message stays one short line)."""
    text = str(path)
    return text if len(text) <= 300 and not control_chars(text) else short_repr(text, 120)


#: the longest file name the usual file systems take, in bytes
NAME_MAX = 255

#: what :func:`path_problem` / :func:`file_problem` say for a missing path and a folder
NOT_FOUND, A_DIRECTORY = "not found", "a directory"


def path_problem(e: OSError) -> str:
    """An ``OSError`` of a path as the problem and its fix, in words (no path: the caller names it)."""
    if e.errno == errno.ENOENT:
        return NOT_FOUND
    if e.errno == errno.ENAMETOOLONG:
        return f"a name in the path is longer than the file system takes ({NAME_MAX} bytes); choose a shorter name"
    if e.errno == errno.ELOOP:
        return "a symbolic link loop (a link that points back to itself); point the link at a real file"
    if e.errno == errno.ENOTDIR:
        return "a part of the path before the last is a file, not a folder"
    return f"cannot read it ({e.strerror or e})"


def file_problem(path) -> Optional[str]:
    """None when ``path`` is a regular file; else what is wrong, in words: ``"not found"``, ``"a
    directory"``, ``"not a regular file (a device, a pipe or a socket)"``, a NUL character, or
    :func:`path_problem` of the file system's error."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return path_problem(e)
    except ValueError:
        return "a path cannot hold a NUL character"
    if stat.S_ISDIR(mode):
        return A_DIRECTORY
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, a pipe or a socket)"
    return None


#: how deep the lists and mappings of a YAML file may nest (a config nests a few levels)
MAX_YAML_DEPTH = 32


class YamlInputError(ValueError):
    """YAML that cannot be read: one line, ``line L, column C: problem`` (no file name; the caller
    adds it). ``problem`` is the text after the position."""

    def __init__(self, problem: str, position: str = "") -> None:
        super().__init__(f"{position}: {problem}" if position else problem)
        self.problem, self.position = problem, position


def load_yaml_text(text: str, value: bool = False) -> Any:
    """One YAML document, read safely and strictly; any problem is a :class:`YamlInputError`.

    PyYAML's safe loader, and: a key given twice in one mapping is an error (YAML keeps the last
    silently) except where a merge key (``<<: *base``) brings it in; every unquoted number that
    Python's ``float()`` reads is a float; a key must be hashable; lists and mappings nest at most
    :data:`MAX_YAML_DEPTH` deep; an alias is one shared object, never a copy. ``value``: the text
    is one value typed on a command line (positions are ``column C`` alone).
    """
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())
    except YamlInputError:
        raise
    except yaml.YAMLError as e:
        raise _one_line(e, value) from None
    except RecursionError:  # merge keys chained deeper than the stack; nesting alone stops at the limit
        raise YamlInputError("anchors and merge keys chain too deep; flatten it") from None


def _position(mark, one_line: bool) -> str:
    return f"column {mark.column + 1}" if one_line else f"line {mark.line + 1}, column {mark.column + 1}"


def _one_line(e, one_line: bool) -> YamlInputError:
    """PyYAML's error (several lines: the problem, its context and a drawing of each place) in one line."""
    from yaml.error import MarkedYAMLError
    from yaml.reader import ReaderError

    def clip(s: str) -> str:
        s = " ".join(str(s).split())
        return s if len(s) <= 160 else s[:157] + "..."

    if isinstance(e, ReaderError):
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else short_repr(e.character)
        return YamlInputError(f"unacceptable character {what} ({clip(e.reason)})", f"character {e.position + 1}")
    if not isinstance(e, MarkedYAMLError):
        return YamlInputError(clip(str(e).splitlines()[0] if str(e) else type(e).__name__))
    mark = e.problem_mark or e.context_mark
    problem = clip(e.problem or e.context or "not valid YAML")
    if e.problem and e.context:
        at = e.context_mark
        same = at is None or (mark is not None and (at.line, at.column) == (mark.line, mark.column))
        problem += f" ({clip(e.context)}" + ("" if same else f" at {_position(at, one_line)}") + ")"
    return YamlInputError(problem, _position(mark, one_line) if mark is not None else "")


_MERGE_TAG = "tag:yaml.org,2002:merge"


@functools.lru_cache(maxsize=None)
def _strict_loader():
    import re

    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError
    from yaml.nodes import MappingNode, SequenceNode

    class Loader(yaml.SafeLoader):
        """The loader of :func:`load_yaml_text`."""

        nesting = 0

        def compose_node(self, parent, index):
            if self.nesting >= MAX_YAML_DEPTH:
                raise ComposerError(None, None, f"lists and mappings nest deeper than {MAX_YAML_DEPTH} levels "
                                    "(a config nests a few); flatten it", self.peek_event().start_mark)
            self.nesting += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.nesting -= 1

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep=deep)
            except (YamlInputError, yaml.YAMLError):
                raise
            except (ValueError, OverflowError) as e:  # a date or an int PyYAML's resolver takes but cannot build
                text = str(node.value)
                if "Exceeds the limit" in str(e):
                    problem = f"a number of {len(text)} digits is longer than Python reads (4300); write a smaller one"
                else:
                    problem = f"cannot read {short_repr(text, 40)}: {str(e).split(';')[0]}"
                raise ConstructorError(None, None, problem, node.start_mark) from None

        def construct_undefined(self, node):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConstructorError(None, None, f"the tag {short_repr(tag)} is not read; write a plain value "
                                   "(no ! or !! tags)", node.start_mark)

        def construct_mapping(self, node, deep=False):
            if not isinstance(node, MappingNode):
                raise ConstructorError(None, None, f"expected a mapping, got a {node.id}", node.start_mark)
            return {key: self.construct_object(value, deep=deep) for key, value in self._pairs(node).items()}

        def _pairs(self, node):
            """``{key: value node}`` of a mapping node, merge keys applied (a key of the mapping wins
            over a merged one, an earlier merged mapping over a later); each node is flattened once."""
            done = self.__dict__.setdefault("_flat", {})
            if node in done:
                if done[node] is None:
                    raise ConstructorError(None, None, "a mapping merges itself (<<: *anchor inside the anchor)",
                                           node.start_mark)
                return done[node]
            done[node] = None
            merged, own, lines = {}, {}, {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                    for src in sources:
                        if not isinstance(src, MappingNode):
                            raise ConstructorError(None, None, "a merge key '<<' takes a mapping (*anchor) or a list "
                                                   "of them", src.start_mark)
                        for key, value in self._pairs(src).items():
                            merged.setdefault(key, value)
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise ConstructorError(None, None, f"a key must be a name or a number, got a "
                                           f"{type(key).__name__} {short_repr(key)}; write a plain key",
                                           key_node.start_mark) from None
                if key in own:
                    raise YamlInputError(f"{short_repr(key)} is given twice (lines {lines[key] + 1} and "
                                         f"{key_node.start_mark.line + 1}); merge the two into one (YAML would keep "
                                         "only the last)")
                own[key], lines[key] = value_node, key_node.start_mark.line
            merged.update(own)
            done[node] = merged
            return merged

    Loader.add_constructor(None, Loader.construct_undefined)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))
    return Loader


#: a number float() reads, unquoted: YAML 1.1 (PyYAML) takes 1e300 and 8e-1 for strings, since its
#: floats need a dot and a signed exponent (ints still resolve first, so 10 stays an int)
_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
