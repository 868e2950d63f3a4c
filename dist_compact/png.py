"""A tiny PNG writer (pure Python + zlib), a colour map and a labelled heatmap figure.

The writer needs no matplotlib / pillow. Only what the quality reports need: 8-bit RGB images, no
interlacing, filter type 0 on every row. The file layout follows the PNG specification (RFC 2083):
signature, IHDR, one IDAT with the zlib stream of the filtered scanlines, IEND; every chunk carries
a CRC-32 of its type and data.

:func:`heatmap_figure` draws a matrix as a figure readable at a glance: title, row / column axes
with tick numbers, a colour bar with its scale. The text is drawn with Pillow (in the [video]
extra, which the main command installs); without Pillow the same figure is drawn without text.
"""

from __future__ import annotations

import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["encode_png", "write_png", "colormap", "heatmap_figure", "scatter_figure", "VIRIDIS"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Anchor colours of a viridis-like map (dark blue -> green -> yellow), interpolated linearly.
VIRIDIS: Tuple[Tuple[int, int, int], ...] = (
    (68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37),
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _as_rgb(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:  # grey -> RGB
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"PNG image must be [height, width, 3] RGB or [height, width] grey, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"PNG image must not be empty, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise ValueError("PNG image values must be uint8 (or integers in [0, 255])")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def encode_png(image) -> bytes:
    """PNG bytes of an RGB image ``[height, width, 3]`` (uint8) or a grey image ``[height, width]``."""
    arr = _as_rgb(image)
    h, w, _ = arr.shape
    # each scanline is prefixed by its filter type byte (0 = None)
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), arr.reshape(h, w * 3)], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 (RGB)
    return _SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_png(path, image) -> None:
    """Write an RGB ``[height, width, 3]`` uint8 (or grey ``[height, width]``) image to ``path``."""
    data = encode_png(image)
    with open(path, "wb") as f:
        f.write(data)


def colormap(values, vmin: float = 0.0, vmax: float = 1.0,
             anchors: Sequence[Tuple[int, int, int]] = VIRIDIS, nan_color=(255, 255, 255)) -> np.ndarray:
    """Map an array of floats to uint8 RGB ``[..., 3]`` by linear interpolation between anchor colours.

    Values are clipped to ``[vmin, vmax]``; NaN (e.g. a head never captured) gets ``nan_color``.
    """
    if not vmax > vmin:
        raise ValueError(f"colormap needs vmax > vmin, got [{vmin}, {vmax}]")
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    x = np.clip((np.where(nan, vmin, v) - vmin) / (vmax - vmin), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(anchors) - 2)
    frac = (x - lo)[..., None]
    pal = np.asarray(anchors, dtype=np.float64)
    rgb = pal[lo] * (1.0 - frac) + pal[lo + 1] * frac
    rgb[nan] = nan_color
    return np.rint(rgb).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- figure
def _font():
    """Pillow's default font at a readable size (a scalable one from Pillow 10.1), or None without Pillow."""
    try:
        from PIL import ImageFont
    except ImportError:
        return None
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        return ImageFont.load_default()


def _tick_step(cell: int, room: int) -> int:
    """Label every k-th row / column so that labels ``room`` pixels apart do not overlap (k in 1, 2, 5, 10, ...)."""
    for k in (1, 2, 5, 10, 20, 50, 100, 200, 500):
        if k * cell >= room:
            return k
    return 1000


def heatmap_figure(matrix: Sequence[Sequence[Optional[float]]], *, title: str, subtitle: Sequence[str] = (),
                   vmin: float = 0.0, vmax: float = 1.0, row_label: str = "layer", col_label: str = "head",
                   bar_label: str = "", max_grid: int = 360) -> np.ndarray:
    """uint8 RGB figure of a ``[rows][cols]`` matrix (viridis on ``[vmin, vmax]``; None / NaN white).

    Layout: ``title`` and the ``subtitle`` lines on top; the ``col_label`` axis above the grid with column
    numbers, the ``row_label`` axis left of it with row numbers (from 0, every k-th when cells are
    small); a vertical colour bar on the right with ticks at 0, 1/4, ..., 1 of the scale. Cells are
    as large as fit ``max_grid`` pixels (6 to 28). Without Pillow the figure has no text.
    """
    vals = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    if vals.ndim != 2 or vals.size == 0:
        raise ValueError(f"heatmap_figure needs a non-empty [rows][cols] matrix, got shape {vals.shape}")
    rows, cols = vals.shape
    cell = int(np.clip(max_grid // max(rows, cols), 6, 28))
    font = _font()
    text = font is not None

    def size(s: str) -> Tuple[int, int]:
        if not text or not s:
            return 0, 0
        box = font.getbbox(s)
        return box[2], box[3]

    line_h = size("Ag0")[1] + 4 if text else 0
    row_w = size(str(rows - 1))[0] + 6 if text else 0
    gw, gh = cols * cell, rows * cell
    pad = 10
    # vertical: title, subtitle, column axis label, column numbers, grid
    subtitle = list(subtitle)
    top = pad + line_h * (1 + len(subtitle)) + 2 * line_h + (4 if text else 0)
    left = pad + line_h + row_w  # the rotated row label, then the row numbers
    bar_x = left + gw + 16
    bar_w = 14
    bar_h = max(gh, 120)
    tick_w = size(f"{vmax:.2f}")[0]
    width = max(bar_x + bar_w + 6 + tick_w + pad, bar_x + size(bar_label)[0] + pad,
                pad + max(size(s)[0] for s in [title, *subtitle]) + pad)
    height = top + max(gh, bar_h) + line_h + pad
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    # grid: cells, 1-px white lines between them
    cells = colormap(vals, vmin, vmax).repeat(cell, axis=0).repeat(cell, axis=1)
    cells[::cell, :] = 255
    cells[:, ::cell] = 255
    img[top:top + gh, left:left + gw] = cells
    img[top - 1, left:left + gw] = img[top + gh, left:left + gw] = 0  # a frame, so white cells read as cells
    img[top:top + gh, left - 1] = img[top:top + gh, left + gw] = 0
    # colour bar: vmax at the top
    ramp = colormap(np.linspace(vmax, vmin, bar_h), vmin, vmax)
    img[top:top + bar_h, bar_x:bar_x + bar_w] = ramp[:, None, :]
    ticks: List[Tuple[int, str]] = []
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + int(round((1.0 - f) * (bar_h - 1)))
        img[y, bar_x + bar_w:bar_x + bar_w + 4] = 0
        ticks.append((y, f"{vmin + f * (vmax - vmin):.2f}"))
    if not text:
        return img
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    ink = (0, 0, 0)
    y = pad
    draw.text((pad, y), title, fill=ink, font=font)
    for s in subtitle:
        y += line_h
        draw.text((pad, y), s, fill=(70, 70, 70), font=font)
    # column axis: label, then numbers centred on their cells
    draw.text((left, top - 2 * line_h - 2), col_label, fill=ink, font=font)
    k = _tick_step(cell, size(str(cols - 1))[0] + 6)
    for c in range(0, cols, k):
        w = size(str(c))[0]
        draw.text((left + c * cell + (cell - w) // 2, top - line_h), str(c), fill=ink, font=font)
    # row axis: numbers right-aligned, label rotated along the grid
    k = _tick_step(cell, line_h)
    for r in range(0, rows, k):
        w, h = size(str(r))
        draw.text((left - 4 - w, top + r * cell + (cell - h) // 2), str(r), fill=ink, font=font)
    label = row_label
    lw, lh = size(label)
    tmp = Image.new("RGB", (lw + 2, lh + 2), (255, 255, 255))
    ImageDraw.Draw(tmp).text((0, 0), label, fill=ink, font=font)
    tmp = tmp.rotate(-90, expand=True)  # reads top to bottom, as the rows count
    pil.paste(tmp, (pad, top))
    for ty, s in ticks:
        draw.text((bar_x + bar_w + 6, ty - line_h // 2), s, fill=ink, font=font)
    if bar_label:
        draw.text((bar_x, top + bar_h + 4), bar_label, fill=ink, font=font)
    return np.asarray(pil, dtype=np.uint8).copy()


#: marker colours of :func:`scatter_figure`'s series (distinct on white, colour-blind-safe order)
SERIES_COLOURS: Tuple[Tuple[int, int, int], ...] = (
    (0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (230, 159, 0), (0, 0, 0),
)


def _nice_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 times a power of ten)."""
    span = max(hi - lo, 1e-9)
    raw = span / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = np.floor(lo / step) * step
    return [float(start + i * step) for i in range(int(np.ceil((hi - start) / step)) + 1)]


def scatter_figure(series, *, title: str, x_label: str, y_label: str, hlines=(), vlines=(),
                   size: Tuple[int, int] = (760, 520)) -> np.ndarray:
    """uint8 RGB scatter plot: ``series`` maps a legend name to points ``(x, y, label)``.

    Axes with round ticks, a dashed reference line for each ``(value, text)`` of ``hlines`` /
    ``vlines``, each point a filled square in its series colour with its label beside it, the legend
    on the right. Needs Pillow (the [video] extra) for text; without it raises ImportError.
    """
    from PIL import Image, ImageDraw

    font = _font()
    width, height = size
    pts = [(x, y) for pts_ in series.values() for x, y, _ in pts_]
    xs = [x for x, _ in pts] + [v for v, _ in vlines] + [1.0]
    ys = [y for _, y in pts] + [v for v, _ in hlines]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_pad, y_pad = 0.08 * max(x_hi - x_lo, 0.1), 0.08 * max(y_hi - y_lo, 1.0)
    xt = _nice_ticks(x_lo - x_pad, x_hi + x_pad)
    yt = _nice_ticks(y_lo - y_pad, y_hi + y_pad)
    x_lo, x_hi, y_lo, y_hi = xt[0], xt[-1], yt[0], yt[-1]
    legend_w = 190
    left, right, top, bottom = 70, width - legend_w, 44, height - 56
    pil = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(pil)
    ink, grey = (0, 0, 0), (200, 200, 200)

    def px(x: float, y: float) -> Tuple[int, int]:
        return (int(round(left + (x - x_lo) / (x_hi - x_lo) * (right - left))),
                int(round(bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))))

    for v in xt:
        x, _ = px(v, y_lo)
        draw.line([(x, top), (x, bottom)], fill=(235, 235, 235))
        draw.line([(x, bottom), (x, bottom + 4)], fill=ink)
        s = f"{v:g}"
        draw.text((x - font.getbbox(s)[2] // 2, bottom + 6), s, fill=ink, font=font)
    for v in yt:
        _, y = px(x_lo, v)
        draw.line([(left, y), (right, y)], fill=(235, 235, 235))
        draw.line([(left - 4, y), (left, y)], fill=ink)
        s = f"{v:g}"
        draw.text((left - 8 - font.getbbox(s)[2], y - 7), s, fill=ink, font=font)
    draw.rectangle([left, top, right, bottom], outline=ink)

    def dashed(a, b):
        (x0, y0), (x1, y1) = a, b
        n = max(abs(x1 - x0), abs(y1 - y0)) // 6
        for i in range(0, n, 2):
            draw.line([(x0 + (x1 - x0) * i // n, y0 + (y1 - y0) * i // n),
                       (x0 + (x1 - x0) * (i + 1) // n, y0 + (y1 - y0) * (i + 1) // n)], fill=(120, 120, 120))

    for v, s in hlines:
        if y_lo <= v <= y_hi:
            _, y = px(x_lo, v)
            dashed((left, y), (right, y))
            draw.text((right - font.getbbox(s)[2] - 4, y - 16), s, fill=(90, 90, 90), font=font)
    for v, s in vlines:
        if x_lo <= v <= x_hi:
            x, _ = px(v, y_lo)
            dashed((x, top), (x, bottom))
            draw.text((x + 4, top + 2), s, fill=(90, 90, 90), font=font)
    for i, (name, pts_) in enumerate(series.items()):
        col = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        for x, y, label in pts_:
            cx, cy = px(x, y)
            draw.rectangle([cx - 4, cy - 4, cx + 4, cy + 4], fill=col, outline=ink)
            if label:
                draw.text((cx + 7, cy - 7), label, fill=col, font=font)
        ly = top + 8 + 20 * i
        draw.rectangle([right + 16, ly + 2, right + 26, ly + 12], fill=col, outline=ink)
        draw.text((right + 32, ly), name, fill=ink, font=font)
    draw.text((left, 12), title, fill=ink, font=font)
    draw.text(((left + right) // 2 - font.getbbox(x_label)[2] // 2, height - 26), x_label, fill=ink, font=font)
    lw, lh = font.getbbox(y_label)[2:]
    tmp = Image.new("RGB", (lw + 2, lh + 4), (255, 255, 255))
    ImageDraw.Draw(tmp).text((0, 0), y_label, fill=ink, font=font)
    tmp = tmp.rotate(90, expand=True)
    pil.paste(tmp, (8, (top + bottom) // 2 - tmp.size[1] // 2))
    return np.asarray(pil, dtype=np.uint8).copy()
