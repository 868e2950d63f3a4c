"""Hostile config inputs (run configs and Compact config files): each is ONE short line that names the
file and the key, never a traceback, and nothing walks a YAML alias bomb's copies."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from dist_compact.cli.generate import main
from dist_compact.cmdline import YamlInputError, load_yaml_text, short_repr
from dist_compact.run.config import ConfigError
from dist_compact.run.loader import load_run_config
from dist_compact.search.config_file import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_COMPACT = ROOT / "dist_compact" / "models" / "weights" / "embedded-compact-0.5.yaml"
#: what a config error line may be at most (a message names a file, a key, a short value and the fix)
SHORT = 400


def _bomb(levels: int = 9) -> str:
    """A flow list of a few hundred bytes whose last item is 9**levels ones through aliases."""
    names = "abcdefghijklmnop"[:levels]
    items = ["&a [1,1,1,1,1,1,1,1,1]"] + [f"&{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    return "[" + ", ".join(items) + "]"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _config_error(capsys, *argv) -> str:
    """generate's main on ``argv`` (+ --print-config): exit 2 and one short config-error line."""
    assert main([*map(str, argv), "--print-config"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", lines
    assert lines[0].startswith("generate.py: config error: ") and len(lines[0]) < SHORT, lines[0][:1000]
    return lines[0]


def _raises_one_line(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    text = str(e.value)
    assert "\n" not in text and len(text) < SHORT, text[:1000]
    return text


def _compact(tmp_path, name, edit) -> pathlib.Path:
    """The shipped Compact config of the embedded model, with ``edit(text)`` applied."""
    return _write(tmp_path, name, edit(SHIPPED_COMPACT.read_text()))


# ---------------------------------------------------------------------------------------------- 1 alias bombs
def test_short_repr_is_bounded():
    assert short_repr("a\nb") == "'a\\nb'" and short_repr(2 ** 70) == str(2 ** 70)
    assert short_repr(None) == "None" and short_repr([1, 2]) == "[1, 2]"
    for value in ("x" * 10 ** 6, 10 ** 5000, [[[[[[1] * 1000] * 1000]]]], {str(i): i for i in range(10 ** 4)}):
        text = short_repr(value)
        assert len(text) <= 80 and text.endswith(("'", "...", "}", "]", ">")), text
    assert len(short_repr("x" * 500, 40)) == 40


@pytest.mark.parametrize("text,key", [
    (f"run:\n  prompt: {_bomb()}\n", "run.prompt"),
    (f"run:\n  nokey: {_bomb()}\n", "run.nokey: unknown key"),
    (f"sparsity:\n  search_steps: [{_bomb()}]\n", "sparsity.search_steps[0]"),
    (f"model:\n  tile: {_bomb()}\n", "model.tile"),
    (f"sparsity:\n  compact_config: {_bomb()}\n", "sparsity.compact_config"),
    (f"run: {_bomb()}\n", "run: expected a mapping"),
    (f"include: {_bomb()}\n", "include: expected a path"),
    (f"{{? {_bomb()} : 1}}\n", "a key must be a name or a number"),
], ids=["prompt", "unknown-key", "list-field", "tile", "path-field", "section", "include", "key"])
def test_alias_bomb_is_one_short_line(tmp_path, capsys, text, key):
    p = _write(tmp_path, "bomb.yaml", text)
    assert len(text) < 700
    line = _config_error(capsys, "--config", p)
    assert f"{p}: " in line and key in line, line


def test_alias_bomb_where_it_is_allowed_is_read_once(tmp_path):
    """A dotted top-level key may hold anchors; a bomb there (or merged, 9 levels of 9 merges) is no cost."""
    p = _write(tmp_path, "ok.yaml", f".bomb: {_bomb()}\nrun: {{steps: 3}}\n")
    assert load_run_config([p]).run.steps == 3
    merges = ["a: &a {steps: 4, seed: 1}"] + [f"{n}: &{n} {{<<: [" + ",".join([f"*{p}"] * 9) + "]}"
                                                for p, n in zip("abcdefghi", "bcdefghi")]
    data = load_yaml_text("\n".join(merges))
    assert data["i"] == {"steps": 4, "seed": 1}


def test_alias_bomb_in_a_compact_config(tmp_path):
    bomb = _bomb()
    p = _compact(tmp_path, "model.yaml", lambda t: t.replace("model: embedded", f"model: {bomb}"))
    assert "model must be a model name or null" in _raises_one_line(load_config, p)
    p = _compact(tmp_path, "pat.yaml", lambda t: re.sub(r"patterns:.*", f"patterns: {bomb}", t, flags=re.S)
                 .replace("num_layers: 8", "num_layers: 9").replace("num_heads: 6", "num_heads: 9"))
    assert "layer 0 head 0: a head pattern must be a string" in _raises_one_line(load_config, p)


# ---------------------------------------------------------------------------------------------- 2 keys
@pytest.mark.parametrize("text,where", [
    ("run:\n  ? [a, b]\n  : 1\n", "line 2, column 5"),
    ("? [a, b]\n: 1\n", "line 1, column 3"),
    ("run: {? {a: 1} : 2}\n", "line 1, column 9"),
], ids=["in-section", "top-level", "mapping-key"])
def test_unhashable_key_is_one_line(tmp_path, capsys, text, where):
    p = _write(tmp_path, "key.yaml", text)
    line = _config_error(capsys, "--config", p)
    assert f"{p}: not valid YAML: {where}: a key must be a name or a number" in line, line


# ---------------------------------------------------------------------------------------------- 3 nesting
def test_deep_nesting_is_one_line(tmp_path, capsys):
    p = _write(tmp_path, "d.yaml", "run: " + "[" * 100000 + "]" * 100000)
    line = _config_error(capsys, "--config", p)
    assert f"{p}: not valid YAML: line 1, column " in line and "nest deeper than 32 levels" in line
    for name in ("deep.json", "deep.yaml"):
        q = _write(tmp_path, name, "[" * 100000 + "]" * 100000)
        assert "nest" in _raises_one_line(load_config, q)


# ---------------------------------------------------------------------------------------------- 4 Compact fields
@pytest.mark.parametrize("edit,msg", [
    (lambda t: re.sub(r"^search: .*$", "search: [1, 2]", t, flags=re.M),
     "search must be null or {tau: number or null, lam: number or null}, got [1, 2] (list)"),
    (lambda t: re.sub(r"searched_for:\n.*\n.*\n", "searched_for: {grid: 5, tile: 3}\n", t),
     "searched_for.grid must be three ints >= 1, got 5 (int)"),
    (lambda t: t.replace("num_layers: 8", 'num_layers: "8"'), "num_layers must be an int >= 1, got '8' (str)"),
    (lambda t: t.replace("num_heads: 6", "num_heads: 6.0"), "num_heads must be an int >= 1, got 6.0 (float)"),
    (lambda t: t.replace("model: embedded", "model: [embedded]"), "model must be a model name or null"),
    (lambda t: t.replace("tau: 0.5", "tau: '0.5'"), "search.tau must be a number >= 0 or null, got '0.5' (str)"),
    (lambda t: t.replace("tau: 0.5", "tau: 0.5, beta: 1"), "search must be null or {tau"),
    (lambda t: t.replace("version: 1", "version: true"), "config schema version True is not supported"),
    (lambda t: t + "pattern: []\n", "unknown key 'pattern'; a Compact config has schema, version"),
    (lambda t: t.replace("- ['0-3: *x0; 4: 1x0'", "- [5"), "layer 1 head 0: a head pattern must be a string"),
    (lambda t: t.replace("num_layers: 8", "num_layers: 7"),
     "'patterns' is not num_layers=7 x num_heads=6 (it has 8 layers)"),
], ids=["search-list", "searched-for-ints", "layers-string", "heads-float", "model-list", "tau-string",
        "search-extra", "version-bool", "unknown-key", "pattern-int", "layers-mismatch"])
def test_compact_config_fields_are_checked(tmp_path, edit, msg):
    p = _compact(tmp_path, "cc.yaml", edit)
    line = _raises_one_line(load_config, p, model="embedded", num_layers=8, num_heads=6)
    assert line.startswith(f"{p}: ") and msg in line, line


def test_compact_config_error_through_generate(tmp_path, capsys, small_weights):
    p = _compact(tmp_path, "cc.yaml",
                 lambda t: re.sub(r"searched_for:\n.*\n.*\n", "searched_for: {grid: 5, tile: 3}\n", t))
    argv = ["--model-path", str(small_weights), "--model.frames", "4", "--model.height", "16", "--model.width", "16",
            "--steps", "2", "--run.progress", "false", "--run.video", "false", "--output-dir", str(tmp_path / "out"),
            "--sparsity.mode", "compact", "--sparsity.compact_config", str(p)]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"generate.py: error: {p}: searched_for.grid must be three ints >= 1, got 5 (int)"]


# ---------------------------------------------------------------------------------------------- 5 paths
def test_path_errors_are_one_line(tmp_path, capsys):
    long = tmp_path / ("x" * 300 + ".yaml")
    line = _config_error(capsys, "--config", long)
    assert "longer than the file system takes (255 bytes); choose a shorter name" in line
    assert line.startswith("generate.py: config error: '/") and "..." in line and line.count("x") < 150  # shortened
    assert "longer than the file system takes" in _raises_one_line(load_config, long)
    loop = tmp_path / "s.yaml"
    os.symlink(loop, loop)
    assert f"{loop}: a symbolic link loop" in _config_error(capsys, "--config", loop)
    assert f"{loop}: a symbolic link loop" in _raises_one_line(load_config, loop)
    assert _config_error(capsys, "--config", "/dev/zero").endswith(
        "/dev/zero: not a regular file (a device, a pipe or a socket); give a config file (.yaml)")
    zero = tmp_path / "zero.yaml"
    os.symlink("/dev/zero", zero)
    assert ": not a regular file" in _raises_one_line(load_config, zero)
    top = _write(tmp_path, "top.yaml", "include: [base.yaml]\n")
    assert _config_error(capsys, "--config", top).endswith(
        f"config file not found: {tmp_path / 'base.yaml'} (included by {top})")


# ---------------------------------------------------------------------------------------------- 6 YAML errors
def test_yaml_errors_are_one_line(tmp_path, capsys):
    line = _config_error(capsys, "--run.steps", "[1")
    assert line == ("generate.py: config error: command line: --run.steps: cannot read value '[1': column 3: "
                    "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at column 1)")
    line = _config_error(capsys, "--run.steps", "!!python/object:os.system x")
    assert "column 1: the tag '!!python/object:os.system' is not read; write a plain value" in line
    p = _write(tmp_path, "bad.yaml", "run:\n  steps: 3\n  seed: [1,\n  prompt: x\n")
    assert _config_error(capsys, "--config", p).endswith(
        f"{p}: not valid YAML: line 5, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow "
        "sequence at line 3, column 9)")
    q = _compact(tmp_path, "cc.yaml", lambda t: t.replace("num_heads: 6", "num_heads: [6"))
    assert f"{q}: not valid YAML: line 9, column 13: expected ',' or ']'" in _raises_one_line(load_config, q)
    for value, msg in (("2001-13-45", "cannot read '2001-13-45': month must be in 1..12"),
                       ("1" * 5000, "a number of 5000 digits is longer than Python reads")):
        assert msg in _config_error(capsys, "--run.seed", value)
    p = _write(tmp_path, "ctl.yaml", "run: {prompt: \x01}\n")
    assert f"{p}: not valid YAML: character 15: unacceptable character #x0001" in _config_error(capsys, "--config", p)


# ---------------------------------------------------------------------------------------------- 7 merge keys
def test_merge_keys(tmp_path, capsys):
    p = _write(tmp_path, "m.yaml", ".base: &b {seed: 3, steps: 5}\nrun: {<<: *b, steps: 4}\n")
    cfg = load_run_config([p])
    assert (cfg.run.seed, cfg.run.steps) == (3, 4)
    p = _write(tmp_path, "two.yaml", ".a: &a {seed: 1}\n.b: &b {seed: 2, steps: 6}\nrun: {<<: [*a, *b]}\n")
    assert (load_run_config([p]).run.seed, load_run_config([p]).run.steps) == (1, 6)  # the first merged wins
    p = _write(tmp_path, "dup.yaml", ".b: &b {seed: 3}\nrun:\n  <<: *b\n  steps: 4\n  steps: 5\n")
    assert "'steps' is given twice (lines 4 and 5)" in _config_error(capsys, "--config", p)
    p = _write(tmp_path, "self.yaml", "run: &r {<<: *r}\n")
    assert "not valid YAML: line 1, column" in _config_error(capsys, "--config", p)
    p = _write(tmp_path, "scalar.yaml", "run: {<<: 3}\n")
    assert "a merge key '<<' takes a mapping" in _config_error(capsys, "--config", p)
    p = _compact(tmp_path, "cc.yaml", lambda t: t.replace("search: {tau: 0.5, lam: null}",
                                                           ".s: &s {tau: 0.5}\nsearch: {<<: *s, lam: null}"))
    assert load_config(p).tau == 0.5


# ---------------------------------------------------------------------------------------------- 8 path fields
def test_home_in_path_fields_is_the_same_in_a_file_and_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    p = _write(tmp_path, "h.yaml", "run: {output_dir: ~/runs}\nmodel: {path: ~/w.safetensors}\n"
                                   "sparsity: {compact_config: ~/c.yaml}\n")
    from_file = load_run_config([p])
    from_cli = load_run_config([], [("run.output_dir", "~/runs"), ("model.path", "~/w.safetensors"),
                                    ("sparsity.compact_config", "~/c.yaml")])
    for cfg in (from_file, from_cli):
        assert (cfg.run.output_dir, cfg.model.path, cfg.sparsity.compact_config) == (
            f"{home}/runs", f"{home}/w.safetensors", f"{home}/c.yaml")
    (tmp_path / "home").mkdir()
    _write(tmp_path / "home", "inc.yaml", "run: {seed: 7}\n")
    assert load_run_config([_write(tmp_path, "top.yaml", "include: ~/inc.yaml\n")]).run.seed == 7
    assert load_run_config(["~/inc.yaml"]).run.seed == 7


def test_control_characters_in_output_dir_are_refused(capsys):
    line = _config_error(capsys, "--run.output_dir", "a\x01b")
    assert line.endswith("command line: [run] RunOptions.output_dir must be a path without control characters "
                         "(\\x01), got 'a\\x01b'")


@pytest.mark.parametrize("key", ["--model.path", "--sparsity.compact_config"])
def test_control_characters_in_the_other_path_fields_are_refused(capsys, key):
    line = _config_error(capsys, key, "w\x1b[2Jx.yaml")
    assert "without control characters (\\x1b)" in line and "\x1b" not in line


@pytest.mark.parametrize("name", [" ", "  run", "run ", "evil\u202egpj.mp4", "a\u2066b"])
def test_run_names_that_display_as_something_else_are_refused(capsys, name):
    """A blank name, one with leading or trailing spaces, and bidirectional overrides (a name shown
    reversed) are refused like control characters."""
    line = _config_error(capsys, "--name", name)
    assert "RunOptions.name must be a plain folder name" in line, line


def test_long_inputs_are_quoted_short(capsys):
    from dist_compact.patterns.compact import HeadPattern

    line = _config_error(capsys, "x" * 5000)
    assert "unexpected argument 'xxxx" in line and len(line) < 300
    text = _raises_one_line(HeadPattern.parse, "0: " + "2x2 + " * 2000)
    assert len(text) < 300 and "bad window" in text
    assert len(_raises_one_line(HeadPattern.parse, "zz" * 5000)) < 300


def test_a_list_field_given_one_number_says_how_to_write_the_list(tmp_path, capsys):
    line = _config_error(capsys, "--sparsity.search_steps", "1000")
    assert "expected list of int, got 1000 (int); a list is written in brackets: [1000]" in line
    p = _write(tmp_path, "s.yaml", "sparsity: {search_kinds: fused}\n")
    assert "a list is written in brackets: [fused]" in _config_error(capsys, "--config", p)


# ---------------------------------------------------------------------------------------------- 9 sources
def test_the_source_named_is_the_one_that_set_the_key(tmp_path, capsys):
    p = _write(tmp_path, "bigseed.yaml", f"run: {{seed: {2 ** 70}}}\n")
    line = _config_error(capsys, "--config", p, "--run.progress", "false", "--steps", "2")
    assert line.startswith(f"generate.py: config error: {p}: [run] RunOptions.seed must be an int"), line
    line = _config_error(capsys, "--config", p, "--run.seed", "-1", "--run.video", "false")
    assert line.startswith("generate.py: config error: command line: [run] RunOptions.seed"), line
    # a rule of several keys names every source that set a key of the section
    q = _write(tmp_path, "cluster.yaml", "cluster: {nproc: 2}\n")
    line = _config_error(capsys, "--config", q, "--cluster.ulysses", "1")
    assert f"{q}, command line: [cluster]" in line, line


def test_load_yaml_text_errors_carry_the_position():
    with pytest.raises(YamlInputError) as e:
        load_yaml_text("a: 1\nb: [\n")
    assert e.value.position.startswith("line ") and "\n" not in str(e.value)
    with pytest.raises(YamlInputError) as e:
        load_yaml_text("[1", value=True)
    assert e.value.position == "column 3"
    with pytest.raises(YamlInputError, match="'a' is given twice"):
        load_yaml_text("a: 1\na: 2\n")
    assert json.dumps(load_yaml_text("a: 1e300\nb: 10\n")) == '{"a": 1e+300, "b": 10}'


@pytest.mark.parametrize("text", ["null", "NULL", "~", "none"])
def test_a_text_field_takes_null_as_text_and_an_optional_one_as_unset(text):
    cfg = load_run_config([], [("run.prompt", text), ("run.name", text)])
    assert cfg.run.prompt == text and cfg.run.name is None
