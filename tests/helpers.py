"""Shared test helpers: tolerances relative to the low-precision error of PyTorch eager."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close_to_golden(out, golden, eager_lowp=None, k=3.0, atol=1e-5, what="output"):
    """out vs float64 golden: error <= k * (error of eager PyTorch in the same dtype) + atol.

    NaN never passes. ``eager_lowp`` is the same computation done by PyTorch in the low precision.
    """
    assert not torch.isnan(out).any(), f"{what}: NaN in result"
    err = (out.double() - golden.double()).abs().max().item()
    base = 0.0 if eager_lowp is None else (eager_lowp.double() - golden.double()).abs().max().item()
    assert err <= k * base + atol, f"{what}: max abs error {err:.3g} > {k} x eager {base:.3g} + {atol:g}"


def tol_for(dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def child_env(**extra):
    """The environment for a child process that runs this checkout (not an installed copy), without
    any launcher variables of the parent; ``extra`` set on top."""
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]), OMP_NUM_THREADS="1", **extra)
    return env
