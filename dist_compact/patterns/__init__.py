"""Static sparsity patterns (Compact Attention windows) that produce a BlockIndex."""

from .compact import (
    MAX_WINDOWS,
    CompactConfig,
    FrameGroup,
    HeadPattern,
    Window,
    cover_windows,
    merge_union,
)

__all__ = ["CompactConfig", "HeadPattern", "FrameGroup", "Window", "MAX_WINDOWS", "cover_windows", "merge_union"]
