"""Sparse attention over a run: the config and its step schedule (:mod:`.config`)."""

from .config import SparsityConfig

__all__ = ["SparsityConfig"]
