"""Optional dependencies: import one, or fail with one error that names the extra to install.

The core install needs only torch, triton, numpy, pyyaml and tqdm; everything else comes with an
extra of ``setup.cfg`` (``pip install -e ".[NAME]"`` from a checkout, ``pip install
"dist_compact[NAME]"`` from a wheel). :func:`require` is the one place that turns a missing module
into that instruction, so every optional import site says the same thing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]

#: extra -> what it is for (the extras of setup.cfg a user may be told to install)
EXTRAS = {
    "video": "writing videos and reading the embedded model's weights (imageio, imageio-ffmpeg, pillow, safetensors)",
    "diffusers": "real and random-weight Wan / HunyuanVideo transformers (diffusers, transformers, accelerate)",
    "usp": "yunchang's USP attention (yunchang)",
    "xdit": "xDiT's USP path (xfuser 0.7.0, GPU machines only)",
    "deepspeed": "deepspeed's DistributedAttention (deepspeed)",
}


class MissingExtraError(ImportError):
    """An optional module is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    """The install line of ``extra``: ``pip install "dist_compact[NAME]"`` and the checkout form."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    return f"pip install \"dist_compact[{extra}]\" (from a checkout: pip install -e \".[{extra}]\")"


def require(module: str, extra: str, what: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    Args:
        module: a dotted module name, e.g. ``"diffusers"`` or ``"safetensors.torch"``.
        extra: the extra of setup.cfg that installs it (a key of :data:`EXTRAS`).
        what: the feature that needs it, for the message (default: the module's name).
    Raises:
        MissingExtraError: the module (or one of its own imports) is missing.
    """
    hint = install_hint(extra)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        raise MissingExtraError(
            f"{what or module} needs the [{extra}] extra ({missing} is not installed): {hint}"
        ) from e
