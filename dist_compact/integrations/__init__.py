"""Install APIs: our attention inside other libraries' models, one mechanism for all (:mod:`.core`).

Each integration exports an install function and its handle: :mod:`.diffusers` (``sparsify`` /
``SparsifyHandle``: stream hooks, our sharding), :mod:`.diffusers_backend` (``set_sparse_backend`` /
``BackendHandle``: diffusers' processors and context parallelism), :mod:`.xfuser` (``sparsify_xfuser`` /
``XfuserHandle``: xDiT's USP); :mod:`.yunchang_adapter` and :mod:`.deepspeed_adapter` are the op inside
those libraries' sequence parallelism. What is the same for every install is here: the installed
handle, its step state and its removal. The libraries themselves are imported lazily.
"""

from .core import DenoisingState, denoising_state, installed, unsparsify

__all__ = ["DenoisingState", "denoising_state", "installed", "unsparsify"]
