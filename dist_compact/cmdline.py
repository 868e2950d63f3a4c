"""The argument parser of every command: argparse, with each error as ONE line (no usage block)."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``prog: error: message (see --help)`` on one line
    and exit code 2 (argparse prints its usage block first, which buries the one line that matters).
    Sub-command parsers made by :meth:`add_subparsers` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
