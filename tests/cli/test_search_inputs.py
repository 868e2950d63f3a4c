"""`dist-compact-search` on bad inputs: one error line, no traceback, and nothing written.

One small capture (the small random model of conftest.py) is shared by the module; the mass files
that are damaged in each test are edited copies of its ``mass_0.pt``.
"""

import errno
import os

import pytest
import torch

import dist_compact.cli.search as cli
from dist_compact.search.capture import MassStore

PROMPT = "a red square moving left"
SMALL = ["--model.frames", "4", "--model.height", "16", "--model.width", "16", "--steps", "2",
         "--run.video", "false", "--run.progress", "false", "--cluster.device", "cpu",
         "--run.attn_backend", "torch"]


def _run(capsys, *argv):
    """``(exit code, stdout, the one stderr line)``; the command must print exactly one error line."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return rc, out, lines[0]


def _tree(path):
    """Every file under ``path`` with its bytes (what a refused command must leave as it was)."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def capture(tmp_path_factory, small_weights):
    """``(gen_args, out_dir, mass_0.pt)`` of one capture."""
    gen = ["--model-path", str(small_weights)] + SMALL
    out = tmp_path_factory.mktemp("capture") / "cap"
    assert cli.main(["capture", "--out-dir", str(out), "--prompt", PROMPT, "--", *gen]) == 0
    return gen, out, out / "mass_0.pt"


@pytest.fixture
def state(capture):
    """The state dict of the captured mass file (a fresh copy to damage)."""
    return dict(torch.load(capture[2], weights_only=True))


# ------------------------------------------------------------------------------------------ capture
def test_capture_again_into_the_same_folder_is_refused(capture, capsys, monkeypatch):
    gen, out, _ = capture
    before = _tree(out)
    monkeypatch.setattr(cli, "capture_run", lambda *a: pytest.fail("ran before checking --out-dir"))
    rc, _, err = _run(capsys, "capture", "--out-dir", out, "--prompt", PROMPT, "--", *gen)
    assert rc == 2 and err == (f"error: --out-dir {out} already holds mass_0.pt, {os.path.join('runs', 'capture-0')} "
                               "(an earlier capture); choose another --out-dir or remove them")
    assert _tree(out) == before


def test_capture_into_a_file_is_refused(tmp_path, capture, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    rc, _, err = _run(capsys, "capture", "--out-dir", target, "--prompt", PROMPT, "--", *capture[0])
    assert rc == 2 and err.startswith(f"error: --out-dir {target} is a file, not a folder")
    assert target.read_text() == "mine\n" and os.listdir(tmp_path) == ["notes.txt"]


def test_capture_with_missing_weights_is_one_line(tmp_path, capsys):
    out = tmp_path / "cap"
    rc, _, err = _run(capsys, "capture", "--out-dir", out, "--prompt", PROMPT, "--", *SMALL,
                      "--model-path", tmp_path / "none.safetensors")
    assert rc == 1 and "embedded model weights not found" in err and str(tmp_path / "none.safetensors") in err
    assert not out.exists()


@pytest.mark.parametrize("extra,expect,exact", [
    (["--prompt", "a dragon"], "prompt 'a dragon': the embedded model does not know the word(s) ['dragon']", False),
    (["--capture-steps", "1,5"], "error: --capture-steps 5: the runs have 2 denoising steps (0..1); choose steps in "
                                 "that range", True),
], ids=["every-prompt", "steps-beyond-the-run"])
def test_capture_refuses_bad_prompts_and_steps_before_running(tmp_path, capture, capsys, monkeypatch, extra, expect,
                                                              exact):
    out = tmp_path / "cap"
    monkeypatch.setattr(cli, "capture_run", lambda *a: pytest.fail("ran before checking its inputs"))
    rc, _, err = _run(capsys, "capture", "--out-dir", out, "--prompt", PROMPT, *extra, "--", *capture[0])
    assert rc == 2 and (err == expect if exact else expect in err)
    assert not out.exists()
    assert not out.exists()


def test_a_failed_run_leaves_no_capture_behind(tmp_path, capture, capsys, monkeypatch):
    """The second prompt's run fails: the first prompt's run folder and mass file go again."""
    from dist_compact.run.sampler import NonFiniteLatentsError

    store = MassStore.load(capture[2])

    def run(cfg, model, steps):
        if cfg.run.name == "capture-1":
            raise NonFiniteLatentsError("the latents hold NaN after step 1")
        folder = os.path.join(cfg.run.output_dir, cfg.run.name)
        os.makedirs(folder)
        return folder, store

    monkeypatch.setattr(cli, "capture_run", run)
    out = tmp_path / "new" / "cap"
    rc, stdout, err = _run(capsys, "capture", "--out-dir", out, "--prompt", PROMPT, "--prompt", "a blue circle",
                           "--", *capture[0])
    assert rc == 1 and err == "error: the latents hold NaN after step 1" and stdout == ""
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ mass files
def _damaged(state, path, **changes):
    for k, v in changes.items():
        if v is KeyError:
            state.pop(k)
        else:
            state[k] = v
    torch.save(state, path)
    return path


@pytest.mark.parametrize("changes,message", [
    (dict(rel=KeyError), "mass file without 'rel'"),
    (dict(rel="list"), "rel must be a tensor, got list"),
    (dict(grid=5), "grid must be three positive ints, got 5"),
    (dict(num_layers=10 ** 6, num_heads=10 ** 6),
     "rel has shape (2, 2, 4, 1, 1), expected (1000000, 1000000, 4, 1, 1)"),
    (dict(num_layers=0), "num_layers must be a positive int, got 0"),
    (dict(tile=[1, 0, 4]), "tile must be three positive ints"),
    (dict(samples="float"), "samples must be an int tensor, got torch.float64"),
    (dict(rel="nan"), "rel holds NaN or infinite values"),
    (dict(total="nan"), "total holds NaN or infinite values"),
], ids=["no-rel", "rel-list", "grid-int", "huge", "no-layers", "tile-0", "samples-float", "rel-nan", "total-nan"])
def test_damaged_mass_files_are_one_line(tmp_path, state, capsys, changes, message):
    for k, v in changes.items():
        if v == "list":
            changes[k] = state[k].tolist()
        elif v == "float":
            changes[k] = state[k].double()
        elif v == "nan":
            changes[k] = torch.full_like(state[k], float("nan"))
    bad = _damaged(state, tmp_path / "bad.pt", **changes)
    out = tmp_path / "c.yaml"
    rc, _, err = _run(capsys, "search", bad, "--out", out, "--device", "cpu")
    assert rc == 2 and err.startswith(f"error: {bad}: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_a_pickled_object_is_refused_in_one_line(tmp_path, capsys):
    import argparse

    bad = tmp_path / "obj.pt"
    torch.save({"format": "dist_compact.block_mass_stats/1", "rel": argparse.Namespace(a=1)}, bad)
    rc, _, err = _run(capsys, "search", bad, "--out", tmp_path / "c.yaml", "--device", "cpu")
    assert rc == 2 and err == (f"error: {bad}: not a dist_compact mass file (it holds a pickled Python object "
                               "(argparse.Namespace), which is not loaded: it could run code)")


@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zeros", "nan"])
def test_a_mass_file_without_captured_mass_is_refused(tmp_path, state, capsys, fill):
    bad = _damaged(state, tmp_path / "empty.pt", rel=torch.full_like(state["rel"], fill),
                   text=torch.full_like(state["text"], fill), total=torch.full_like(state["total"], fill),
                   samples=torch.zeros_like(state["samples"]))
    for argv in (["search", bad, "--out", tmp_path / "c.yaml", "--device", "cpu"],
                 ["report", "--config", tmp_path / "c.yaml", "--mass", bad, "--out", tmp_path / "rep"]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and err.startswith(f"error: {bad}: "), err
    assert sorted(os.listdir(tmp_path)) == ["empty.pt"]


# ------------------------------------------------------------------------------------------ outputs
def test_search_report_onto_a_file_writes_nothing(tmp_path, capture, capsys):
    (tmp_path / "file1").write_text("mine\n")
    out = tmp_path / "m_r.yaml"
    rc, _, err = _run(capsys, "search", capture[2], "--out", out, "--report", tmp_path / "file1", "--device", "cpu")
    assert rc == 2 and err.startswith(f"error: --report {tmp_path / 'file1'} is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["file1"] and (tmp_path / "file1").read_text() == "mine\n"


def test_search_and_report_keep_an_earlier_report(tmp_path, capture, capsys):
    cfg, rep = tmp_path / "c.yaml", tmp_path / "rep"
    assert cli.main(["search", str(capture[2]), "--out", str(cfg), "--report", str(rep), "--device", "cpu"]) == 0
    # --out replaces the config it names (the documented use: re-search into the same file)
    assert cli.main(["search", str(capture[2]), "--out", str(cfg), "--device", "cpu", "--tau", "0.8"]) == 0
    before = _tree(tmp_path)
    rc, _, err = _run(capsys, "search", capture[2], "--out", tmp_path / "c2.yaml", "--report", rep, "--device", "cpu")
    assert rc == 2 and err == (f"error: --report {rep} already holds quality.csv, quality.png, quality.txt (an earlier "
                               "report); choose another folder or remove them")
    rc, _, err = _run(capsys, "report", "--config", cfg, "--mass", capture[2], "--out", rep)
    assert rc == 2 and err.startswith(f"error: --out {rep} already holds quality.csv")
    rc, _, err = _run(capsys, "report", "--config", cfg, "--mass", capture[2], "--out", rep / "quality.csv")
    assert rc == 2 and err.startswith(f"error: --out {rep / 'quality.csv'} is a file, not a folder")
    assert _tree(tmp_path) == before


def test_a_failed_write_leaves_neither_config_nor_report(tmp_path, capture, capsys, monkeypatch):
    import dist_compact.search.quality as quality

    cfg = tmp_path / "c.yaml"
    cfg.write_text("old config\n")

    def full(path, image):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(quality, "write_png", full)
    rc, _, err = _run(capsys, "search", capture[2], "--out", cfg, "--report", tmp_path / "a" / "rep", "--device", "cpu")
    assert rc == 1 and err == (f"error: --report {tmp_path / 'a' / 'rep'}: cannot write it (No space left on device); "
                               "choose another path")
    assert os.listdir(tmp_path) == ["c.yaml"] and cfg.read_text() == "old config\n"
    monkeypatch.setattr(cli, "save_config", lambda config, path: full(path, None))
    rc, _, err = _run(capsys, "search", capture[2], "--out", cfg, "--device", "cpu")
    assert rc == 1 and err.startswith(f"error: --out {cfg}: cannot write it (No space left on device)")
    assert os.listdir(tmp_path) == ["c.yaml"] and cfg.read_text() == "old config\n"


def test_a_file_name_too_long_is_one_line(tmp_path, capture, capsys):
    long = tmp_path / ("x" * 300 + ".yaml")
    rc, _, err = _run(capsys, "search", capture[2], "--out", long, "--device", "cpu")
    assert rc == 2 and err == (f"error: --out {long}: the file name has 305 bytes, more than the 255 this file "
                               "system takes; choose a shorter name")
    rc, _, err = _run(capsys, "search", capture[2], "--out", tmp_path / "c.yaml", "--report", tmp_path / ("r" * 300),
                      "--device", "cpu")
    assert rc == 2 and "has 300 bytes, more than the 255" in err
    rc, _, err = _run(capsys, "capture", "--out-dir", tmp_path / ("c" * 300), "--prompt", PROMPT, "--", *capture[0])
    assert rc == 2 and err.startswith(f"error: --out-dir {tmp_path / ('c' * 300)}: the name ccc")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name,text", [
    ("deep.json", "[" * 100000 + "]" * 100000),
    ("grid.yaml", "schema: dist_compact.compact_config\nversion: 1\nmodel: embedded\nnum_layers: 2\nnum_heads: 2\n"
                  "searched_for: {grid: 5, tile: 3}\nsearch: {tau: 0.9, lam: null}\n"
                  "patterns:\n- ['0+: *x*', '0+: *x*']\n- ['0+: *x*', '0+: *x*']\n"),
], ids=["nested-100000", "grid-int"])
def test_a_bad_compact_config_is_one_line(tmp_path, capture, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    rc, _, err = _run(capsys, "report", "--config", path, "--mass", capture[2], "--out", tmp_path / "rep")
    assert rc == 2 and err.startswith(f"error: {path}: "), err
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded"),
                                   TypeError("'int' object is not iterable"), KeyError("layers")],
                         ids=["recursion", "type", "key"])
def test_a_config_the_parser_chokes_on_is_one_line(tmp_path, capture, capsys, monkeypatch, error):
    def choke(path, **kw):
        raise error

    monkeypatch.setattr(cli, "load_config", choke)
    path = tmp_path / "c.yaml"
    rc, _, err = _run(capsys, "report", "--config", path, "--mass", capture[2], "--out", tmp_path / "rep")
    assert rc == 2 and err.startswith(f"error: {path}: not a valid Compact config (")
    assert os.listdir(tmp_path) == []
