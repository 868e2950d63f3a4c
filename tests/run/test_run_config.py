"""Run config: YAML files and --section.key overrides -> typed, validated dataclasses; errors name file and key."""

import dataclasses

import pathlib

import pytest

from dist_compact.run.config import DEMO_SPARSITY, ClusterConfig, ConfigError, ModelConfig, RunConfig
from dist_compact.run.loader import load_run_config, parse_override, to_yaml
from dist_compact.cli.generate import parse_generate_args
from dist_compact.sparsity.config import SparsityConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*/*.yaml"))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_embedded_demo():
    cfg = RunConfig()
    assert cfg.model.name == "embedded" and cfg.cluster.world_size == 1
    assert cfg.sparsity == DEMO_SPARSITY and isinstance(cfg.sparsity, SparsityConfig)
    assert load_run_config() == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_shipped_configs_parse(path):
    cfg = load_run_config([path])
    assert str(path) in cfg.sources
    assert cfg.cluster.ulysses * cfg.cluster.ring == cfg.cluster.world_size


def test_shipped_cluster_files():
    names = {p.stem for p in (ROOT / "configs" / "cluster").glob("*.yaml")}
    assert {"cpu-demo", "1gpu", "1x4-ulysses", "1x8-ulysses", "1x8-hybrid", "2x8-hybrid"} <= names
    demo = load_run_config([ROOT / "configs/cluster/cpu-demo.yaml"])
    assert (demo.cluster.nproc, demo.cluster.ulysses, demo.cluster.device, demo.cluster.backend) == (2, 2, "cpu", "gloo")
    assert demo.model.name == "embedded" and demo.sparsity.mode != "dense"
    # the demo sparsity file is the built-in default, and its Compact config fits the shipped model
    assert load_run_config([ROOT / "configs/cluster/1gpu.yaml"]).sparsity == DEMO_SPARSITY
    from dist_compact.models.embedded import WEIGHTS_DIR
    from dist_compact.search.config_file import load_compact

    assert DEMO_SPARSITY.mode == "adaspa" and DEMO_SPARSITY.compact_config is None
    for tau in ("0.5", "0.6", "0.7"):  # the Compact configs searched for the shipped weights fit them
        shipped = dataclasses.replace(DEMO_SPARSITY, mode="compact", compact_config=f"embedded-compact-{tau}.yaml")
        cc = load_compact(shipped, model="embedded", num_layers=8, num_heads=6, shipped_dir=WEIGHTS_DIR)
        assert cc.num_layers == 8
    two = load_run_config([ROOT / "configs/cluster/2x8-hybrid.yaml"])
    assert two.cluster.world_size == 16


def test_files_merge_in_order_and_include(tmp_path):
    _write(tmp_path, "base.yaml", "run: {steps: 7, seed: 3}\nmodel: {frames: 8}\n")
    top = _write(tmp_path, "top.yaml", "include: base.yaml\nrun: {steps: 9}\n")
    cfg = load_run_config([top])
    assert (cfg.run.steps, cfg.run.seed, cfg.model.frames) == (9, 3, 8)
    later = _write(tmp_path, "later.yaml", "run: {seed: 5}\n")
    cfg = load_run_config([top, later], [("run.steps", "11")])
    assert (cfg.run.steps, cfg.run.seed) == (11, 5)
    assert cfg.sources[-1] == "command line"


def test_overrides_are_typed():
    assert parse_override("run.steps", "10") == ("run", "steps", 10)
    assert parse_override("run.guidance", "2") == ("run", "guidance", 2.0)
    assert parse_override("model.tile", "1,8,8") == ("model", "tile", (1, 8, 8))
    assert parse_override("model.tile", "[2, 4, 4]") == ("model", "tile", (2, 4, 4))
    assert parse_override("run.prompt", "true") == ("run", "prompt", "true")  # a str field keeps the text
    assert parse_override("run.name", "null") == ("run", "name", None)
    assert parse_override("run.compare-dense", "yes") == ("run", "compare_dense", True)
    assert parse_override("sparsity.search_steps", "5,20") == ("sparsity", "search_steps", (5, 20))
    assert parse_override("sparsity.sparsity", "none") == ("sparsity", "sparsity", None)


@pytest.mark.parametrize(
    "key,raw,match",
    [
        ("run.steps", "abc", r"command line: --run.steps: expected int, got 'abc'"),
        ("run.steps", "2.5", r"--run.steps: expected int, got 2.5"),
        ("run.compare_dense", "maybe", r"--run.compare_dense: expected bool"),
        ("model.tile", "1,8", r"--model.tile: expected list of 3 int"),
        ("run.stepz", "3", r"--run.stepz: unknown key; run keys are: .*steps"),
        ("runs.steps", "3", r"unknown section 'runs'"),
        ("steps", "3", r"--section.key"),
    ],
)
def test_bad_overrides(key, raw, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config([], [(key, raw)])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = _write(tmp_path, "bad.yaml", "cluster:\n  nproc: 1\n  gpus: 8\n")
    with pytest.raises(ConfigError) as e:
        load_run_config([p])
    assert str(p) in str(e.value) and "cluster.gpus" in str(e.value) and "unknown key" in str(e.value)


def test_unknown_section_in_file(tmp_path):
    p = _write(tmp_path, "bad.yaml", "clustr:\n  nproc: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown section 'clustr'"):
        load_run_config([p])


@pytest.mark.parametrize(
    "text,key,expect",
    [
        ("run:\n  steps: '20'\n", "run.steps", "expected int, got '20' (str)"),
        ("run:\n  guidance: high\n", "run.guidance", "expected float"),
        ("model:\n  tile: 64\n", "model.tile", "expected list of 3 int"),
        ("cluster:\n  ulysses: true\n", "cluster.ulysses", "expected int, got True (bool)"),
        ("sparsity:\n  sparsity: '0.8'\n", "sparsity.sparsity", "expected float or null"),
        ("sparsity:\n  search_steps: 10\n", "sparsity.search_steps", "expected list of int"),
    ],
)
def test_bad_type_in_file_names_file_and_key(tmp_path, text, key, expect):
    p = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_run_config([p])
    msg = str(e.value)
    assert str(p) in msg and key in msg and expect in msg, msg


def test_bad_values_name_file_and_field(tmp_path):
    p = _write(tmp_path, "bad.yaml", "cluster: {nproc: 4, ulysses: 2, ring: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_run_config([p])
    assert str(p) in str(e.value) and "[cluster]" in str(e.value) and "world size" in str(e.value)
    p = _write(tmp_path, "bad2.yaml", "sparsity: {mode: sparse}\n")
    with pytest.raises(ConfigError, match=r"bad2.yaml: \[sparsity\] SparsityConfig.mode"):
        load_run_config([p])
    p = _write(tmp_path, "bad3.yaml", "model: {tile: [4, 4, 5]}\n")
    with pytest.raises(ConfigError, match=r"bad3.yaml: \[model\] ModelConfig.tile"):
        load_run_config([p])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config([tmp_path / "nope.yaml"])
    p = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_run_config([p])
    a = _write(tmp_path, "a.yaml", "include: b.yaml\n")
    _write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_run_config([a])
    p = _write(tmp_path, "broken.yaml", "run: {steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config([p])


def test_sections_are_frozen_and_validated():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.run.steps = 3
    with pytest.raises(ValueError, match="world size"):
        ClusterConfig(nproc=2)
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="onnx")
    assert cfg.replace(run={"steps": 3}).run.steps == 3


def test_generate_cli(capsys):
    cfg, args = parse_generate_args(["--prompt", "a blue circle bouncing", "--seed", "4", "--steps", "6",
                                     "--compare-dense", "--sparsity.sparsity", "0.5", "--model.frames=8"])
    assert (cfg.run.prompt, cfg.run.seed, cfg.run.steps, cfg.run.compare_dense) == ("a blue circle bouncing", 4, 6, True)
    assert cfg.sparsity.sparsity == 0.5 and cfg.model.frames == 8
    with pytest.raises(ConfigError, match="needs a value"):
        parse_generate_args(["--run.steps"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_generate_args(["extra"])
    back = load_run_config([], [])
    assert to_yaml(back).startswith("cluster:")


def test_generate_print_config(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_main", ROOT / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--config", str(ROOT / "configs/cluster/1gpu.yaml"), "--steps", "5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "mode: adaspa" in out
    assert gen.main(["--run.steps", "x"]) == 2
    assert "config error: command line: --run.steps" in capsys.readouterr().err
