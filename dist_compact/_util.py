"""Small helpers shared across dist_compact (no torch, no package imports)."""

import math
import numbers
import unicodedata

__all__ = ["cdiv", "is_int", "as_int", "control_chars", "softmax_scale"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0): the number of blocks of b that cover a."""
    return -(-a // b)


def is_int(x) -> bool:
    """x is an int and not a bool (``True`` is an ``int`` to isinstance, never a valid count here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def as_int(x):
    """``x`` as a Python int if it is an integer (a Python int or a NumPy integer scalar), else None.

    A bool is no int here (``True`` would be a block size of 1), nor is a float or a tensor."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def control_chars(text: str) -> str:
    """The control and line-break characters of ``text`` as a short escaped list ('' when none).

    Newlines, tabs, escapes, NUL and the Unicode line / paragraph separators end a line or a shell
    word where a name or a path is written into a script, a log line or a folder name; the
    bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069) make a name display as
    another one.
    """
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI})
    return " ".join(repr(c)[1:-1] for c in bad)


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax scale to use: ``head_dim ** -0.5`` for None, else ``scale`` as a float, which must
    be finite and > 0 (NaN would turn every output into NaN, and a scale <= 0 or inf is no attention)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        val = math.nan if isinstance(scale, (bool, str, bytes)) else float(scale)
    except (TypeError, ValueError):
        val = math.nan
    if not (math.isfinite(val) and val > 0):
        raise ValueError(f"scale must be a finite number > 0 (or None for head_dim ** -0.5 = "
                         f"{1.0 / math.sqrt(head_dim):.6g}), got {scale!r}")
    return val
