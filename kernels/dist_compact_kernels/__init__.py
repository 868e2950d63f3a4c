"""Triton kernels of dist_compact (importable as ``dist_compact_kernels``).

Only kernels and their launch functions live here: no configuration, no torch.distributed. The
public, checked entry points are in :mod:`dist_compact.ops`. ``block_sparse_fwd`` (dispatch.py)
picks the forward kernel: the warp-specialized Gluon one (block_sparse_ws.py) on Hopper, else the
Triton one (block_sparse_fwd.py); ``block_mass_fwd`` (block_mass.py) is AdaSpa's block statistic.
The folder ``kernels/`` that holds this package deliberately has no ``__init__.py``: a top-level ``kernels`` module of ours would shadow
Hugging Face's ``kernels`` package, which diffusers and transformers may import.
"""

from .block_mass import block_mass_fwd
from .block_sparse_fwd import interpreting, tma_ok
from .dispatch import block_sparse_fwd

__all__ = ["block_sparse_fwd", "block_mass_fwd", "interpreting", "tma_ok"]
