"""Model adapters: what dist_compact knows of each model family (:class:`~.base.ModelAdapter`).

:func:`adapter_for` finds the adapter of a transformer; diffusers is imported only when the model
is not the embedded one.
"""

from __future__ import annotations

from .base import ModelAdapter
from .embedded import EmbeddedAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .wan import WanAdapter

__all__ = ["ModelAdapter", "ADAPTERS", "SUPPORTED_MODELS", "adapter_for"]

#: the families, by their one name
ADAPTERS = {a.name: a for a in (WanAdapter, HunyuanVideoAdapter, EmbeddedAdapter)}
#: the model classes the adapters take
SUPPORTED_MODELS = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "EmbeddedDiT")


def adapter_for(model, who: str = "sparsify") -> ModelAdapter:
    """The adapter of ``model`` (``who`` names the caller in the error)."""
    if EmbeddedAdapter.matches(model):
        return EmbeddedAdapter(model)
    for cls in (WanAdapter, HunyuanVideoAdapter):
        if cls.matches(model):
            return cls(model)
    raise TypeError(f"{who}: unsupported model {type(model).__name__}; supported: {', '.join(SUPPORTED_MODELS)}")
