"""dist_compact: training-free block-sparse attention for video diffusion transformers.

Core API (single device):

* :class:`VideoLayout` - latent grid + text tokens <-> kernel block (tile) order.
* :class:`BlockIndex` - the one block-sparse format (BCSR) all pattern producers emit.
* :func:`block_sparse_attention` - the block-sparse attention op (Triton on GPU), with LSE.
* :func:`block_attention_mass` - AdaSpa's block attention mass statistic.
* :func:`dense_attention` - dense attention with the same layout conventions.
* :class:`SparsityConfig` - how sparse attention behaves over a run (mode, schedule, budgets).
* :class:`SparseAttention` - the schedule of one attention layer (dense, searches, sparse reuse).
* :func:`sparsify` - install our attention on a diffusers Wan / HunyuanVideo transformer or the
  embedded model (diffusers is imported only when a diffusers model is passed); :func:`installed`,
  :func:`denoising_state` and :func:`unsparsify` work on whatever install a model has.
"""

from .block_index import BlockIndex
from .layout import SUPPORTED_BLOCK_SIZES, VideoLayout
from .ops import block_attention_mass, block_sparse_attention, dense_attention
from .sparsity.config import SparsityConfig
from .integrations.core import denoising_state, installed, unsparsify
from .integrations.diffusers import sparsify
from .sparsity.attention import SparseAttention

from ._version import __version__

__all__ = [
    "BlockIndex",
    "VideoLayout",
    "SUPPORTED_BLOCK_SIZES",
    "block_sparse_attention",
    "block_attention_mass",
    "dense_attention",
    "SparsityConfig",
    "SparseAttention",
    "sparsify",
    "unsparsify",
    "installed",
    "denoising_state",
    "__version__",
]
