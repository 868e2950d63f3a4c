"""Helpers shared by the benchmark scripts (run from the repository root: ``python benchmarks/x.py``)."""

import csv
import os
import time


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


class Timer:
    """Spans of device work: CUDA events on a GPU, perf_counter on the CPU; read after a synchronisation.

    ``start()`` returns a mark, ``stop(mark, key)`` records the span ``(key, start, end)``.
    """

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.spans = []

    def start(self):
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start, key="all"):
        self.spans.append((key, start, self.start()))

    def span_ms(self, key=None):
        """Milliseconds of every span (of ``key`` only, if given), in recording order."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return [a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for k, a, b in self.spans
                if key is None or k == key]

    def totals(self):
        out = {}
        for (key, _, _), ms in zip(self.spans, self.span_ms()):
            out[key] = out.get(key, 0.0) + ms
        return out

    def counts(self):
        out = {}
        for key, _, _ in self.spans:
            out[key] = out.get(key, 0) + 1
        return out

    def reset(self):
        self.spans = []
