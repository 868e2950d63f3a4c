"""Train the embedded DiT: the ``dist-compact-train`` command (also ``python -m dist_compact.models.train``).

The training itself, its options and their checks are :mod:`dist_compact.models.train`; this is the
installed entry point.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..models.train import cli as train_cli

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    """``dist-compact-train [options]`` (``--help`` lists them): a bad option is one line on stderr and
    exit status 2, a failed run 1, an interrupted one 130 (the last complete save is kept)."""
    return train_cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
