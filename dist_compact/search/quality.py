"""Quality of a Compact config on captured data: recall and density per (layer, head), CSV and PNG.

* recall  = (softmax mass in kept blocks, text included) / (all mass), token-weighted;
* density = kept (query block, key block) pairs / all pairs, both on the captured shape.

Both come from a :class:`~dist_compact.search.capture.MassStore` (relative-offset statistics), so a
config searched on one prompt or resolution can be checked on the captures of another (the config
is rescaled to the store's tile grid).

The PNG (:func:`heatmap_image`) has two panels side by side, layers as rows and heads as columns:
density (colour scale 0 -> 1) and recall (colour scale ``recall_range``, default 0.8 -> 1); dark
blue is low, yellow is high, white marks layers never captured. Under each panel a strip shows its
colour scale from low (left) to high (right).
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import numpy as np
import torch

from ..patterns.compact import CompactConfig
from ..png import colormap, write_png
from .capture import MassStore

__all__ = ["QualityReport", "evaluate", "heatmap_image", "report_paths", "write_report"]


NOT_CAPTURED = "no captured layers"


def heads_summary(recall: torch.Tensor, density: torch.Tensor) -> str:
    """One line on the captured heads (recall not NaN) of ``[L, H]`` figures; ``""`` if there are none."""
    ok = ~torch.isnan(recall)
    if not ok.any():
        return ""
    r, d = recall[ok], density[ok]
    return (f"{int(ok.sum())} heads: density mean {d.mean():.4f} (min {d.min():.4f}, max {d.max():.4f}), "
            f"recall mean {r.mean():.4f} (min {r.min():.4f})")


@dataclass
class QualityReport:
    """Recall and density float64 ``[L, H]`` of a config on a store (NaN: layer not captured)."""

    recall: torch.Tensor
    density: torch.Tensor
    model: str = ""
    grid: Tuple[int, int, int] = ()
    tile: Tuple[int, int, int] = ()

    def summary(self) -> str:
        heads = heads_summary(self.recall, self.density)
        return f"{self.model or 'model'} at grid {self.grid} tile {self.tile}: {heads}" if heads else NOT_CAPTURED

    def to_csv(self, path: Union[str, pathlib.Path]) -> None:
        L, H = self.recall.shape
        lines = ["layer,head,recall,density"]
        for li in range(L):
            for h in range(H):
                lines.append(f"{li},{h},{float(self.recall[li, h]):.6f},{float(self.density[li, h]):.6f}")
        pathlib.Path(path).write_text("\n".join(lines) + "\n")


def evaluate(config: CompactConfig, store: MassStore) -> QualityReport:
    """Recall and density of ``config`` on the captures in ``store``."""
    if not isinstance(config, CompactConfig):
        raise TypeError(f"expected a CompactConfig, got {type(config).__name__}")
    if not isinstance(store, MassStore):
        raise TypeError(f"expected a MassStore, got {type(store).__name__}")
    config.check_compatible(num_layers=store.num_layers, num_heads=store.num_heads)
    L, H = store.num_layers, store.num_heads
    pairs = store.pairs()
    text_pairs, total_pairs = store.block_counts()
    recall = torch.full((L, H), math.nan, dtype=torch.float64)
    density = torch.zeros(L, H, dtype=torch.float64)
    for li in range(L):
        keep = config.relative_mask(li, store.tile_grid).to(torch.float64)  # [H, nt, nh, nw]
        density[li] = (text_pairs + (keep * pairs).sum(dim=(1, 2, 3))) / total_pairs
        if store.samples[li] > 0:
            kept = store.text[li] + (keep * store.rel[li]).sum(dim=(1, 2, 3))
            total = store.total[li]
            recall[li] = torch.where(total > 0, kept / total.clamp(min=1e-300), torch.full_like(total, math.nan))
    return QualityReport(recall, density, store.model, store.grid, store.tile)


def heatmap_image(report: QualityReport, cell: int = 8, recall_range: Tuple[float, float] = (0.8, 1.0)) -> np.ndarray:
    """uint8 RGB ``[height, width, 3]``: density and recall panels (layers x heads), scale strips below."""
    if not (isinstance(cell, int) and cell >= 1):
        raise ValueError(f"cell must be an int >= 1 (pixels), got {cell!r}")
    L, H = report.recall.shape
    dens = report.density.numpy().copy()
    dens[np.isnan(report.recall.numpy())] = np.nan  # not captured: white in both panels
    panels = [colormap(dens, 0.0, 1.0), colormap(report.recall.numpy(), *recall_range)]
    gap, strip = 2 * cell, max(cell, 4)
    pw, ph = H * cell, L * cell
    width = 2 * pw + 3 * gap
    height = ph + strip + 3 * gap
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    ramp = colormap(np.linspace(0.0, 1.0, pw), 0.0, 1.0)  # [pw, 3]
    for i, p in enumerate(panels):
        x0 = gap + i * (pw + gap)
        img[gap: gap + ph, x0: x0 + pw] = np.repeat(np.repeat(p, cell, axis=0), cell, axis=1)
        img[2 * gap + ph: 2 * gap + ph + strip, x0: x0 + pw] = ramp[None]
    return img


def report_paths(out_dir: Union[str, pathlib.Path], prefix: str = "quality") -> Dict[str, pathlib.Path]:
    """The files :func:`write_report` writes: ``{"csv": ..., "png": ..., "txt": ...}`` in ``out_dir``."""
    out = pathlib.Path(out_dir)
    return {k: out / f"{prefix}.{k}" for k in ("csv", "png", "txt")}


def write_report(report: QualityReport, out_dir: Union[str, pathlib.Path], prefix: str = "quality") -> Dict[str, str]:
    """Write ``<prefix>.csv``, ``<prefix>.png`` and ``<prefix>.txt`` (summary) to ``out_dir`` (created if
    missing): all three or, on a failure, none (each is written under a temporary name, then renamed;
    folders made here are removed again)."""
    out = pathlib.Path(out_dir)
    paths = report_paths(out, prefix)
    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in paths.items()}
    placed = []
    try:
        report.to_csv(tmp["csv"])
        write_png(tmp["png"], heatmap_image(report))
        L, H = report.recall.shape
        lines = [report.summary(), "", "per layer: mean density, mean recall"]
        for li in range(L):
            lines.append(f"layer {li:3d}: density {float(report.density[li].mean()):.4f}  "
                         f"recall {float(report.recall[li].mean()):.4f}")
        lines.append("")
        lines.append(f"{paths['png'].name}: left density (0..1), right recall (0.8..1); rows = layers, "
                     f"columns = heads; dark = low, yellow = high, white = not captured")
        tmp["txt"].write_text("\n".join(lines) + "\n")
        for k, p in paths.items():
            os.replace(tmp[k], p)
            placed.append(p)
    except BaseException:
        for p in (*tmp.values(), *placed):
            try:
                p.unlink()
            except OSError:
                pass
        for d in made:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return {k: str(v) for k, v in paths.items()}
