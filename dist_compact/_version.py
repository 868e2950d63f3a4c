"""The package version (one place: setup.cfg reads it, the run report records it)."""

__version__ = "0.1.0"
