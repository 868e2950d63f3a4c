"""Helpers shared by the benchmark scripts (run from the repository root: ``python benchmarks/x.py``)."""

import csv
import os


def write_csv(path, rows, fieldnames=None):
    """Write ``rows`` (dicts) to ``path`` (folders created); columns from the first row by default."""
    if not path or not rows:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
