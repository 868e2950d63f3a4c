"""Small helpers shared across dist_compact (no torch, no package imports)."""

import unicodedata

__all__ = ["cdiv", "is_int", "control_chars"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0): the number of blocks of b that cover a."""
    return -(-a // b)


def is_int(x) -> bool:
    """x is an int and not a bool (``True`` is an ``int`` to isinstance, never a valid count here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def control_chars(text: str) -> str:
    """The control and line-break characters of ``text`` as a short escaped list ('' when none).

    Newlines, tabs, escapes, NUL and the Unicode line / paragraph separators end a line or a shell
    word where a name or a path is written into a script, a log line or a folder name.
    """
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    return " ".join(repr(c)[1:-1] for c in bad)
