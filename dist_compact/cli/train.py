"""Train the embedded DiT: the ``dist-compact-train`` command (also ``python -m dist_compact.models.train``).

The training itself, its options and their checks are :mod:`dist_compact.models.train`; this is the
installed entry point.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..models.train import main as train_main

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    """``dist-compact-train [options]`` (``--help`` lists them)."""
    return train_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
