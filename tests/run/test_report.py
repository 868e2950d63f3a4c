"""The run report explains itself: the speed sentence, the schedule in this run's steps, the heatmap
figures, the progress bar's step kinds, and docs/report.md naming every field a run writes."""

import dataclasses
import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest
import torch

from dist_compact.run.config import DEMO_SPARSITY
from dist_compact.sparsity.config import SparsityConfig, describe_schedule, sparsity_line, step_kinds
from dist_compact.run.generation import run_generation
from dist_compact.png import colormap, heatmap_figure
from dist_compact.run.report import REAL_SPEEDUP_COMMAND, SMALL_SHAPE_TOKENS, heatmap, speed_section
from dist_compact.run.sampler import sample

from test_generate import _cfg, weights  # noqa: F401  (the small random-weight model fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
REAL = (f"for the real speed-up run on a GPU: {REAL_SPEEDUP_COMMAND} (HunyuanVideo 720p, 118,800 tokens, random "
        "weights; 2.52x at density 0.2 on an H100, BENCHMARKS.md)")
CPU_WHY = ("on a CPU the sparse path is PyTorch SDPA with the index as a mask (every block is still computed) plus "
           "the searches, so it cannot beat dense there")


# ---------------------------------------------------------------------------------------------- speed
def test_speed_sentence_on_a_cpu_measured_and_not():
    s = speed_section(2316, "cpu", 37.25, 12.5)
    assert s["speedup_vs_dense"] == pytest.approx(12.5 / 37.25) and s["small_shape"] and s["device"] == "cpu"
    assert s["summary"] == ("speed-up vs dense 0.34x (sparse 37.2 s, dense 12.5 s of denoising) at 2,316 tokens; "
                            f"{CPU_WHY}; {REAL}")
    s = speed_section(2316, torch.device("cpu"), 37.25, None)
    assert s["speedup_vs_dense"] is None and s["dense_seconds"] is None
    assert s["summary"] == ("speed-up vs dense not measured (add --compare-dense for a dense run from the same "
                            f"noise); {CPU_WHY}; {REAL}")


def test_speed_sentence_on_a_gpu_small_and_real_shapes():
    s = speed_section(2316, "cuda:0", 10.0, 0.6)
    assert s["device"] == "cuda" and s["small_shape"]
    assert s["summary"] == (
        "speed-up vs dense 0.06x (sparse 10.0 s, dense 0.6 s of denoising) at 2,316 tokens; at 2,316 tokens the "
        "shape is too small for sparse attention to pay (index building, searches, kernel launches and the first "
        f"run's Triton compilation outweigh the skipped blocks); {REAL}")
    s = speed_section(118800 + 256, "cuda", 733.3, 1194.6)
    assert not s["small_shape"] and s["real_speedup_command"] == REAL_SPEEDUP_COMMAND
    assert s["summary"] == ("speed-up vs dense 1.63x (sparse 733.3 s, dense 1194.6 s of denoising) at 119,056 "
                            "tokens (the whole loop: dense warm-up steps and searches included)")
    s = speed_section(SMALL_SHAPE_TOKENS, "cuda", 1.0, None)
    assert s["summary"] == "speed-up vs dense not measured (add --compare-dense for a dense run from the same noise)"


def test_the_real_speedup_command_is_the_benchmarked_one():
    """The command the report points to is the one BENCHMARKS.md measured, and its flags exist."""
    bench = (ROOT / "BENCHMARKS.md").read_text()
    assert REAL_SPEEDUP_COMMAND.replace("python ", "python3 ", 1) in bench
    src = (ROOT / "benchmarks" / "model_forward.py").read_text()
    for flag in re.findall(r"--[a-z-]+", REAL_SPEEDUP_COMMAND):
        assert f'"{flag}"' in src, flag


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_in_this_runs_steps():
    assert describe_schedule(DEMO_SPARSITY, 20) == ("steps 0-11 dense, 12 fused search, 13 sparse, 14 fused search, "
                                                    "15 sparse, 16 fused search, 17 sparse, 18 fused search, 19 sparse")
    paper = SparsityConfig()  # AdaSpa's 50 steps: 10 dense, fused at 10, cached at 30
    assert describe_schedule(paper, 50) == "steps 0-9 dense, 10 fused search, 11-29 sparse, 30 cached search, 31-49 sparse"
    # consecutive searches stay separate entries; a 3-step run keeps the schedule's shape
    assert describe_schedule(paper, 3) == "steps 0 dense, 1 fused search, 2 cached search"
    assert describe_schedule(dataclasses.replace(DEMO_SPARSITY, mode="dense"), 20) == "steps 0-19 dense"
    assert describe_schedule(dataclasses.replace(DEMO_SPARSITY, mode="compact"), 20) == "steps 0-11 dense, 12-19 sparse"
    assert step_kinds(paper, 3) == ["dense", "fused search", "cached search"]
    line = sparsity_line(DEMO_SPARSITY, 20)
    assert line.startswith("mode adaspa, 20 steps: steps 0-11 dense, 12 fused search, ")
    assert "(the config's step numbers are written for reference_steps=50 and scaled)" in line
    assert "search_steps" not in line and "dense_steps" not in line and "sparsity=0.77" in line
    assert "written for" not in sparsity_line(paper, 50)


def test_progress_bar_names_the_kind_of_each_step(capsys):
    from dist_compact.integrations import DenoisingState

    labels = ["dense", "fused search", "sparse"]
    state, seen = DenoisingState(), []

    def model(x, t, text):
        seen.append((state.step, state.num_steps))
        return torch.zeros_like(x)

    sample(model, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3, 2, 4, 4), steps=3, state=state,
           progress=True, step_labels=labels)
    assert seen == [(0, 3), (1, 3), (2, 3)]  # the step of every forward, for the installed attention
    err = capsys.readouterr().err
    for i, lab in enumerate(labels):
        assert f"step {i}: {lab}" in err


# ---------------------------------------------------------------------------------------------- heatmaps
MATRIX = [[0.1, 0.5, None], [1.0, 0.0, 0.25]]


def _grid_origin(img, cell):
    """Top-left coloured pixel of cell (0, 0) (value 0.1): one below / right of the grid's top-left corner."""
    want = colormap(np.array(0.1))
    ys, xs = np.where((img == want).all(-1))
    return ys.min(), xs.min()


@pytest.mark.parametrize("pillow", [True, False], ids=["pillow", "no-pillow"])
def test_heatmap_figure_cells_bar_and_text(monkeypatch, pillow):
    if not pillow:
        monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    else:
        pytest.importorskip("PIL")
    img = heatmap_figure(MATRIX, title="density per layer and head", subtitle=["line two"], max_grid=84)
    cell = 28
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    y0, x0 = _grid_origin(img, cell)
    for r, row in enumerate(MATRIX):
        for c, v in enumerate(row):
            px = img[y0 + r * cell + cell // 2, x0 + c * cell + cell // 2]
            want = (255, 255, 255) if v is None else tuple(colormap(np.array(v)))
            assert tuple(px) == want, (r, c)
    # the colour bar right of the grid, from the grid's top: yellow (1.0) first, dark blue (0.0) last, 120 px
    right = img[:, x0 + 3 * cell + 2:]
    top = np.where((right == colormap(np.array(1.0))).all(-1))[0]
    low = np.where((right == colormap(np.array(0.0))).all(-1))[0]
    assert top.min() == y0 - 1 and low.max() == y0 - 1 + 119  # y0 - 1: the grid's top (a white line of cell 0)
    # text: the title band above the grid has ink with Pillow, none without
    ink = (img[: y0 - 2] < 128).all(-1).sum()  # above the black frame line at y0 - 2
    assert (ink > 50) if pillow else ink == 0


def test_report_heatmap_titles_and_value_summary(monkeypatch):
    import dist_compact.png as png

    seen = {}

    def spy(matrix, **kw):
        seen.update(kw)
        return np.zeros((1, 1, 3), np.uint8)

    monkeypatch.setattr(png, "heatmap_figure", spy)
    heatmap(MATRIX, "recall")
    assert seen["title"] == "recall per layer and head: share of attention mass kept"
    assert seen["subtitle"] == ["sparse run, the last call of each layer",
                                "min 0.00, mean 0.37, max 1.00 (5 of 6 heads); white: no value"]
    assert (seen["vmin"], seen["vmax"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="what must be one of"):
        heatmap(MATRIX, "speed")


# ---------------------------------------------------------------------------------------------- guide
def _keys(report: dict):
    """Every field name of a report that docs/report.md must explain (nested sections included)."""
    names = set(report)
    for section in ("sparse", "dense"):
        names |= set(report[section])
        names |= set(report[section]["attention"])
    for section in ("speed", "schedule", "quality", "layout"):
        names |= set(report[section])
    return names


def test_report_guide_names_every_field(tmp_path, weights):  # noqa: F811
    res = run_generation(_cfg(tmp_path, weights, ("run.name", "r"), ("run.compare_dense", "true")))
    rep = json.loads((pathlib.Path(res.folder) / "report.json").read_text())
    guide = (ROOT / "docs" / "report.md").read_text()
    missing = sorted(k for k in _keys(rep) if f"`{k}`" not in guide)
    assert not missing, f"docs/report.md does not explain {missing}"
    # the written report carries the sentences the console prints
    assert rep["schedule"]["summary"] == "steps 0 dense, 1 fused search, 2 cached search"
    assert rep["speed"]["summary"].startswith("speed-up vs dense ") and rep["speed"]["device"] == "cpu"
    # reported (the same figure in both places, a finite number), never bounded: it depends on the machine's load
    assert rep["speed"]["speedup_vs_dense"] == rep["speedup_vs_dense"] and math.isfinite(rep["speedup_vs_dense"])
    assert rep["speed"]["tokens"] == rep["layout"]["tokens"]
    assert (ROOT / "README.md").read_text().count("docs/report.md") >= 1
