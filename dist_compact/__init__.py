"""dist_compact: training-free block-sparse attention for video diffusion transformers.

Core API (single device):

* :class:`VideoLayout` - latent grid + text tokens <-> kernel block (tile) order.
* :class:`BlockIndex` - the one block-sparse format (BCSR) all pattern producers emit.
* :func:`block_sparse_attention` - the block-sparse attention op (Triton on GPU), with LSE.
* :func:`block_attention_mass` - AdaSpa's block attention mass statistic.
* :func:`dense_attention` - dense attention with the same layout conventions.
* :class:`SparsityConfig` - how sparse attention behaves over a run (mode, schedule, budgets).
* :func:`sparsify` - install our attention on a diffusers Wan / HunyuanVideo transformer or the
  embedded model (diffusers is imported only when a diffusers model is passed).
"""

from .block_index import BlockIndex
from .layout import SUPPORTED_BLOCK_SIZES, VideoLayout
from .ops import block_attention_mass, block_sparse_attention, dense_attention
from .sparsity.config import SparsityConfig
from .integrations.diffusers import sparsify, unsparsify

__version__ = "0.1.0"

__all__ = [
    "BlockIndex",
    "VideoLayout",
    "SUPPORTED_BLOCK_SIZES",
    "block_sparse_attention",
    "block_attention_mass",
    "dense_attention",
    "SparsityConfig",
    "sparsify",
    "unsparsify",
    "__version__",
]
