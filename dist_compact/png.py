"""A tiny PNG writer (pure Python + zlib) and a colour map, so reports need no matplotlib / pillow.

Only what the quality reports need: 8-bit RGB images, no interlacing, filter type 0 on every row.
The file layout follows the PNG specification (RFC 2083): signature, IHDR, one IDAT with the zlib
stream of the filtered scanlines, IEND; every chunk carries a CRC-32 of its type and data.
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence, Tuple

import numpy as np

__all__ = ["encode_png", "write_png", "colormap", "VIRIDIS"]

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
