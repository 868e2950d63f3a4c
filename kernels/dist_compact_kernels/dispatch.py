"""Which forward kernel runs a call: the warp-specialized Gluon kernel (block_sparse_ws.py) or the
Triton kernel (block_sparse_fwd.py).

``impl="auto"`` takes the Gluon kernel where it applies (an sm_90 GPU, compiled mode, a Triton with
Gluon, inputs `block_sparse_ws.shapes_ok` accepts, no Triton-kernel tuning arguments) and the
Triton kernel everywhere else; ``"triton"`` and ``"ws"`` force one (``"ws"`` is an error where it
cannot run). A Gluon kernel that fails to *build* the first time (a Triton whose Gluon API differs
from the ones it was written for: 3.6, 3.9) switches ``"auto"`` to the Triton kernel for the rest of
the process, with one warning.
"""

import torch

from .block_sparse_fwd import block_sparse_fwd_triton, interpreting

__all__ = ["IMPLS", "block_sparse_fwd", "ws_supported"]

IMPLS = ("auto", "triton", "ws")

_WS = []  # [module or None]: the Gluon kernel module once imported, None where it cannot be used
_WS_BUILT = []  # non-empty after the Gluon kernel has run once in this process


def _ws_module():
    """The Gluon kernel module, or None where this Triton has no Gluon (imported once, lazily)."""
    if not _WS:
        try:
            from . import block_sparse_ws
        except ImportError:
            block_sparse_ws = None
        _WS.append(block_sparse_ws)
    return _WS[0]


def ws_supported(q, k, v, block_size, q_valid=None, kv_valid=None) -> bool:
    """True when the warp-specialized kernel can run this call: an sm_90 GPU (the kernel uses Hopper's
    wgmma and TMA, and nothing newer was measured) and inputs it takes (``ws.shapes_ok``)."""
    ws = _ws_module()
    if ws is None or q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return ws.shapes_ok(q, k, v, block_size, q_valid, kv_valid)


def _run_ws(ws, args, kwargs, auto):
    """Run the Gluon kernel. In auto mode, a failure to *build* it before it has ever run disables it
    for this process with a warning and returns None, so the caller falls back to the Triton kernel;
    later errors, and errors of a forced ``impl="ws"``, propagate."""
    from triton.compiler.errors import TritonError

    try:
        out = ws.block_sparse_fwd_ws(*args, **kwargs)
    except (TritonError, AttributeError, TypeError) as e:
        if not auto or _WS_BUILT:
            raise
        import warnings

        warnings.warn(f"dist_compact: the warp-specialized Hopper kernel did not build with this Triton "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); using the Triton "
                      f"kernel from now on", RuntimeWarning, stacklevel=3)
        _WS[:] = [None]
        return None
    _WS_BUILT.append(True)
    return out


def block_sparse_fwd(q, k, v, counts, indices, block_size, scale, q_valid=None, kv_valid=None,
                     return_lse=True, block_n=None, num_warps=None, num_stages=None, use_tma=True,
                     impl="auto", ws_stages=None, ws_persistent=None, ws_pingpong=None, ws_overlap=None,
                     ws_exp_emu=None, ws_order=None):
    """Block-sparse attention forward on the kernel ``impl`` picks. Inputs are assumed checked by the
    caller (dist_compact.ops); layouts as in block_sparse_fwd.py. Returns (out, lse) with lse None
    unless return_lse.

    ``impl``: "auto", "triton" or "ws" (see the module docstring). ``block_n`` / ``num_warps`` /
    ``num_stages`` / ``use_tma`` tune the Triton kernel (any of the first three keeps "auto" on it);
    ``ws_stages`` / ``ws_persistent`` / ``ws_pingpong`` / ``ws_overlap`` / ``ws_exp_emu`` / ``ws_order``
    are the Gluon kernel's schedule (block_sparse_ws.Schedule: K/V ring depth 2 or 3, the grid,
    ping-pong turns, the overlapped consumer loop, half the exponentials on the FMA pipe, the order
    tiles start in).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'ws', got {impl!r}")
    if impl != "triton" and not interpreting():
        tuned = block_n is not None or num_warps is not None or num_stages is not None
        ws = _ws_module() if (impl == "ws" or not tuned) else None
        if ws is not None and ws_supported(q, k, v, block_size, q_valid, kv_valid):
            res = _run_ws(ws, (q, k, v, counts, indices, scale),
                          dict(return_lse=return_lse, stages=ws_stages, persistent=ws_persistent,
                               pingpong=ws_pingpong, overlap=ws_overlap, exp_emu=ws_exp_emu, q_valid=q_valid,
                               kv_valid=kv_valid, order=ws_order),
                          auto=impl == "auto")
            if res is not None:
                return res
        if impl == "ws":
            raise ValueError("the warp-specialized kernel cannot run this call (it needs an sm_90 GPU, Gluon, "
                             "block size 128, bf16/fp16, head_dim 64/128 and whole blocks)")
    return block_sparse_fwd_triton(q, k, v, counts, indices, block_size, scale, q_valid, kv_valid,
                                   return_lse=return_lse, block_n=block_n, num_warps=num_warps,
                                   num_stages=num_stages, use_tma=use_tma)
