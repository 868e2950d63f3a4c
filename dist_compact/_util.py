"""Small integer helpers shared across dist_compact (no torch, no package imports)."""

__all__ = ["cdiv", "is_int"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0): the number of blocks of b that cover a."""
    return -(-a // b)


def is_int(x) -> bool:
    """x is an int and not a bool (``True`` is an ``int`` to isinstance, never a valid count here)."""
    return isinstance(x, int) and not isinstance(x, bool)
