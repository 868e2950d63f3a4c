"""Public attention ops: input checks, then dispatch to the Triton kernel or the PyTorch path.

Tensor layout for every function here: q, k, v are ``[batch, seqlen, heads, head_dim]`` in block order
(see :class:`~dist_compact.layout.VideoLayout`); block ``b`` covers tokens
``[b*block_size, min((b+1)*block_size, seqlen))``; LSE is ``[batch, heads, seqlen]`` float32, natural log.

Backends: ``"triton"`` (the kernel; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"torch"`` (the
PyTorch gather path of :mod:`dist_compact.reference`; on CPUs without LSE, SDPA with the index as a
cached token mask, which is faster there), ``"auto"`` (Triton on CUDA and under the interpreter,
PyTorch otherwise). These ops are forward-only: the methods are training-free.
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._util import as_int, cdiv, softmax_scale
from .block_index import BlockIndex
from .reference import reference_block_mass, token_mask, token_valid_mask, torch_block_sparse_attention

__all__ = [
    "measured_dense_threshold",
    "TRITON_DENSE_CROSSOVER",
    "block_sparse_attention",
    "block_attention_mass",
    "dense_attention",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_BACKENDS = ("auto", "triton", "torch")


def _kernels():
    # imported lazily: the Triton package is needed only when a kernel runs
    import dist_compact_kernels

    return dist_compact_kernels


def _check_tensor(name: str, x, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [batch, seqlen, heads, head_dim] (4-D), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")


def _check_qk(q, k, v=None) -> None:
    _check_tensor("q", q)
    _check_tensor("k", k)
    if v is not None:
        _check_tensor("v", v)
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim "
            "(layout [batch, seqlen, heads, head_dim])"
        )
    if v is not None and v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    tensors = [q, k] + ([v] if v is not None else [])
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {', '.join(str(t.dtype) for t in tensors)}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {', '.join(str(t.device) for t in tensors)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"empty sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "dist_compact attention ops are forward-only (training-free inference); "
            "call them under torch.no_grad() / torch.inference_mode()"
        )


#: a block may be longer than the sequences (one short block), but at most this many times the longest
#: one, and always up to the largest kernel block: a larger block only pads with nothing
_BLOCK_OVER_SEQ = 2
_BLOCK_SIZE_FLOOR = 128


def _check_block_size(block_size, seq_q: int, seq_k: int, name: str = "block_size") -> int:
    """block_size as an int, checked before anything is allocated: a positive int (a NumPy integer
    scalar is one, a bool is not), at most ``max(128, 2 * max(seq_q, seq_k))``."""
    bs = as_int(block_size)
    if bs is None or bs < 1:
        raise ValueError(f"{name} must be a positive int, got {block_size!r}")
    limit = max(_BLOCK_SIZE_FLOOR, _BLOCK_OVER_SEQ * max(seq_q, seq_k))
    if bs > limit:
        raise ValueError(f"{name} {bs} is far longer than the sequences (seq_q={seq_q}, seq_k={seq_k}): pass a "
                         f"{name} <= {limit} (one block of {max(seq_q, seq_k)} tokens already covers them)")
    return bs


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _check_dense_threshold(value) -> Optional[float]:
    if value is None:
        return None
    try:
        val = math.nan if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        val = math.nan
    if not (0.0 < val <= 1.0):  # NaN fails too
        raise ValueError(f"dense_threshold must be None (no dense dispatch) or a number in (0, 1], got {value!r}")
    return val


def _check_valid(name: str, valid, nblocks: int, block_size: int, device) -> Optional[torch.Tensor]:
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of valid tokens per block")
    if valid.shape != (nblocks,):
        raise ValueError(f"{name} must have shape [{nblocks}] (one count per block), got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"{name} is on {valid.device} but q is on {device}")
    # the value check reads the tensor back (a device sync on GPUs): do it once per counts tensor and
    # version, since every layer and step passes the same cached tensor (VideoLayout.block_valid)
    if _VALIDATED.get(valid) != (valid._version, block_size):
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) > block_size):
            raise ValueError(f"{name} values must lie in [0, {block_size}]")
        _VALIDATED.put(valid, (valid._version, block_size))
    return valid if valid.dtype == torch.int32 and valid.is_contiguous() else valid.to(torch.int32).contiguous()


class _TensorMemo:
    """A value remembered per live tensor (by identity; the entry goes when the tensor does).

    ``WeakKeyDictionary`` cannot key tensors (their ``==`` is elementwise), hence id + weakref.
    """

    def __init__(self):
        self._d = {}

    def get(self, t: torch.Tensor):
        hit = self._d.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def put(self, t: torch.Tensor, value) -> None:
        key = id(t)
        self._d[key] = (weakref.ref(t, lambda _r, key=key, d=self._d: d.pop(key, None)), value)

    def __len__(self) -> int:
        return len(self._d)


# Valid-count tensors already checked, and the valid token positions derived from them (values carry
# the tensor's version counter, so an in-place change is seen).
_VALIDATED = _TensorMemo()
_POSITIONS = _TensorMemo()


def _valid_positions(valid: torch.Tensor, seqlen: int, block_size: int) -> Tuple[torch.Tensor, Optional[int]]:
    """int64 positions of the real tokens, and their count when they are the first ones (a prefix:
    only the sequence's tail is padding), else None. ``nonzero`` syncs on GPUs: computed once per tensor."""
    key = (valid._version, seqlen, block_size)
    hit = _POSITIONS.get(valid)
    if hit is None or hit[0] != key:
        pos = token_valid_mask(seqlen, block_size, valid, valid.device).nonzero().squeeze(1)
        n = pos.numel()
        prefix = n if n == 0 or int(pos[-1]) == n - 1 else None  # sorted and distinct: a prefix iff it ends at n-1
        hit = (key, (pos, prefix))
        _POSITIONS.put(valid, hit)
    return hit[1]


def _real_tokens(x: torch.Tensor, pos: Optional[torch.Tensor], n: Optional[int], dim: int) -> torch.Tensor:
    """The real tokens of ``x`` along ``dim`` (:func:`_valid_positions`' ``pos, n``): a view when they are
    the first ``n``, else a gather; ``x`` itself without padding (``pos`` None)."""
    if pos is None:
        return x
    return x.narrow(dim, 0, n) if n is not None else x.index_select(dim, pos)


def _place_real_tokens(full: torch.Tensor, part: torch.Tensor, pos: torch.Tensor, n: Optional[int],
                       dim: int) -> torch.Tensor:
    """Write ``part`` (the real tokens) into ``full`` along ``dim``, the inverse of :func:`_real_tokens`."""
    if n is not None:
        full.narrow(dim, 0, n).copy_(part)
    else:
        full.index_copy_(dim, pos, part)
    return full


def _resolve_valid(block_valid, q_valid, kv_valid, same_len: bool):
    if block_valid is not None:
        if not same_len and (q_valid is None or kv_valid is None):
            raise ValueError("block_valid applies to q and k of one length; pass q_valid / kv_valid instead")
        q_valid = block_valid if q_valid is None else q_valid
        kv_valid = block_valid if kv_valid is None else kv_valid
    return q_valid, kv_valid


def _valid_counts(block_valid, q_valid, kv_valid, seq_q: int, seq_k: int, block_size: int, device):
    """The checked (q_valid, kv_valid) of a call that takes block_valid / q_valid / kv_valid."""
    q_valid, kv_valid = _resolve_valid(block_valid, q_valid, kv_valid, seq_q == seq_k)
    return (_check_valid("q_valid", q_valid, cdiv(seq_q, block_size), block_size, device),
            _check_valid("kv_valid", kv_valid, cdiv(seq_k, block_size), block_size, device))


# The density at which the Triton block-sparse kernel and dense cuDNN attention cross on an H100 (they
# meet near 0.76): the one measured crossover below 1, documented in measured_dense_threshold.
TRITON_DENSE_CROSSOVER = 0.75


def measured_dense_threshold(device: torch.device, dtype: torch.dtype, head_dim: int,
                             block_size: Optional[int] = None) -> float:
    """Index density above which dense cuDNN attention is faster than the block-sparse kernel.

    The source of truth for the dense/sparse crossover, which two thresholds build on:

    * ``block_sparse_attention(dense_threshold=1.0)``: the op sends an index at least this dense to
      dense attention. Its default 1.0 sends only full indices, so the op's result is always the
      index's exact result; passing this function's value trades that for speed.
    * ``SparsityConfig.dense_threshold`` (default ``TRITON_DENSE_CROSSOVER``, 0.75): the schedule
      runs heads above it with full rows and layers whose mean density is above it dense.

    Measured on an H100 (docs/history/notebook.md, 2026-11-23; sparse time scales with density). Triton kernel:
    379 ms at density 1.0 vs SDPA-cuDNN 288 ms at S=118,784 H=24 d=128 bf16 -> they cross near 0.76
    (``TRITON_DENSE_CROSSOVER``). The warp-specialized kernel (sm_90, block size 128) with its
    overlapped consumer loop: 274 ms at density 1.0 vs cuDNN 282 ms (Wan shape: 34.1 vs 36.1 ms), so
    it is never slower than dense: 1.0 for ``block_size=128`` (only full indices go dense, where the
    two are within a few per cent). Other devices and dtypes are unmeasured: 1.0.
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return 1.0
    cap = torch.cuda.get_device_capability(device)
    if cap == (9, 0) and block_size == 128:
        return 1.0
    return TRITON_DENSE_CROSSOVER if cap[0] == 9 else 1.0


def _cudnn_dense_with_lse(q, k, v, scale):
    """SDPA's cuDNN kernel with its log-sum-exp ([B, H, S] float32), or None when unavailable.

    Uses the ATen op behind SDPA's cuDNN backend (checked against our kernel's LSE in
    benchmarks/kernel_bench.py); only fp16/bf16 on CUDA.
    """
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is None:
        return None
    try:
        res = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale)
    except RuntimeError:
        return None
    B, S, H, _ = q.shape
    return res[0].transpose(1, 2), res[1].reshape(B, H, S).float()


# Largest token mask (elements) the CPU path builds; beyond it the gather path runs instead.
_MASK_ELEMENTS_MAX = 1 << 28


def _masked_sdpa(q, k, v, index: BlockIndex, scale, q_valid, kv_valid):
    """Block-sparse attention as SDPA with the index expanded to a token mask (no LSE).

    On CPUs PyTorch's fused SDPA kernel with a boolean mask beats gathering the kept blocks by ~3.7x
    at the embedded model's shape (2,336 tokens, 6 heads, density 0.26: 0.105 s vs 0.385 s per call),
    although it visits every block. The mask is built once per index (indices are immutable and
    reused across steps) and cached on it. Rows with no visible key get 0, as in the kernel.
    """
    SQ, SK = q.shape[1], k.shape[1]
    key = (SQ, SK, None if q_valid is None else tuple(q_valid.tolist()),
           None if kv_valid is None else tuple(kv_valid.tolist()))
    def build():
        m = token_mask(index, SQ, SK, q_valid, kv_valid)
        return m, m.any(-1)

    mask, has = index.cached("token_mask", key, build)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    o = torch.where(has.unsqueeze(-1), o, torch.zeros((), dtype=o.dtype))  # all-masked rows: NaN -> 0
    return o.transpose(1, 2)


def _use_triton(backend: str, device: torch.device) -> bool:
    _check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto" and device.type == "cpu" and importlib.util.find_spec("triton") is None:
        return False  # platforms without Triton wheels: the CPU path is the PyTorch reference
    interp = _kernels().interpreting() if device.type == "cpu" else False
    if backend == "triton":
        if device.type != "cuda" and not interp:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (tensors are on {device})"
            )
        return True
    return device.type == "cuda" or interp


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    block_valid: Optional[torch.Tensor] = None,
    q_valid: Optional[torch.Tensor] = None,
    kv_valid: Optional[torch.Tensor] = None,
    backend: str = "auto",
    dense_threshold: Optional[float] = 1.0,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Block-sparse attention: each query block attends to the key blocks its index row lists.

    Args:
        q: ``[batch, seq_q, heads, head_dim]``; k, v: ``[batch, seq_k, heads, head_dim]``; block order;
            fp16 / bf16 / fp32; head_dim in ``SUPPORTED_HEAD_DIMS``.
        index: :class:`BlockIndex` with ``heads`` heads, batch 1 or ``batch``,
            ``ceil(seq_q / block_size)`` query blocks and ``ceil(seq_k / block_size)`` key blocks.
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp ``[batch, heads, seq_q]`` float32 (natural log).
        block_valid: int ``[num_blocks]`` valid tokens at the start of each block (what
            ``VideoLayout.block_valid`` gives), for q and k alike; ``q_valid`` / ``kv_valid`` set them
            separately (ring shards). Padded keys are masked, padded query rows return 0 / -inf.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        dense_threshold: on CUDA, an index whose density is at least this runs as dense attention
            (SDPA/cuDNN over the valid tokens) instead of the kernel. The default 1.0 sends only full
            indices there, which is exact. A lower value (the device's crossover:
            :func:`measured_dense_threshold`, where the thresholds are documented) also sends
            near-dense indices, computing a superset of their blocks: faster, and no further from
            full attention, but no longer the index's exact result. None disables dispatch.

    Returns:
        out ``[batch, seq_q, heads, head_dim]`` in q's dtype, or ``(out, lse)``. A query block with an
        empty row returns zeros and LSE ``-inf``.
    """
    _check_qk(q, k, v)
    if not isinstance(index, BlockIndex):
        raise TypeError(f"index must be a BlockIndex, got {type(index).__name__}")
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    bs = index.block_size
    nq, nk = cdiv(SQ, bs), cdiv(SK, bs)
    if index.num_heads != H:
        raise ValueError(f"index has {index.num_heads} heads but q has {H}")
    if index.batch not in (1, B):
        raise ValueError(f"index batch {index.batch} must be 1 or the batch size {B}")
    if index.num_q_blocks != nq or index.num_k_blocks != nk:
        raise ValueError(
            f"index is for {index.num_q_blocks} query x {index.num_k_blocks} key blocks of {bs}, but "
            f"seq_q={SQ}, seq_k={SK} give {nq} x {nk}"
        )
    if index.device != q.device:
        raise ValueError(f"index is on {index.device} but q is on {q.device}; use index.to(q.device)")
    _check_block_size(bs, SQ, SK, "index.block_size")
    _check_flag("return_lse", return_lse)
    _check_backend(backend)
    dense_threshold = _check_dense_threshold(dense_threshold)
    q_valid, kv_valid = _valid_counts(block_valid, q_valid, kv_valid, SQ, SK, bs, q.device)
    scale = softmax_scale(scale, D)

    if (dense_threshold is not None and q.device.type == "cuda" and backend == "auto"
            and index.density() >= dense_threshold):
        return dense_attention(q, k, v, block_size=bs, scale=scale, return_lse=return_lse, q_valid=q_valid,
                               kv_valid=kv_valid)
    if _use_triton(backend, q.device):
        if bs < 16:
            raise ValueError(f"the Triton kernel needs block_size >= 16, got {bs}")
        out, lse = _kernels().block_sparse_fwd(
            q, k, v, index.counts, index.indices, bs, scale, q_valid, kv_valid, return_lse=return_lse
        )
    elif (not return_lse and q.device.type == "cpu"
          and index.batch * H * SQ * SK <= _MASK_ELEMENTS_MAX):
        return _masked_sdpa(q, k, v, index, scale, q_valid, kv_valid)
    else:
        out, lse = torch_block_sparse_attention(q, k, v, index, scale, q_valid, kv_valid, return_lse=True)
    return (out, lse) if return_lse else out


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    *,
    scale: Optional[float] = None,
    block_valid: Optional[torch.Tensor] = None,
    q_valid: Optional[torch.Tensor] = None,
    kv_valid: Optional[torch.Tensor] = None,
    query_rows: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """AdaSpa block attention mass ``[batch, heads, q_blocks, k_blocks]`` float32.

    ``mass[b, h, i, j]`` is the mean over the valid query tokens ``t`` of block ``i`` of
    ``sum_{s in block j} exp(q_t . k_s * scale - lse[b, h, t])``: with the LSE of dense attention each
    row sums to 1 (the share of block i's attention that lands in block j). ``lse`` may come from an
    earlier step ("LSE-cached search"), in which case rows sum only approximately to 1.

    ``query_rows`` (a power of two, 16 <= query_rows <= block_size) averages over that many query rows
    per block, spread evenly over its valid rows (see ``reference.sampled_query_rows``) instead of all
    of them: an unbiased estimate at ``query_rows / block_size`` of the cost. None = exact.

    ``block_size`` may exceed the sequences (one short block) up to ``max(128, 2 * max(seq_q, seq_k))``.
    """
    _check_qk(q, k)
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    block_size = _check_block_size(block_size, SQ, SK)
    _check_backend(backend)
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, SQ):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be [batch, heads, seq_q] = {(B, H, SQ)}, got {got}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    q_valid, kv_valid = _valid_counts(block_valid, q_valid, kv_valid, SQ, SK, block_size, q.device)
    scale = softmax_scale(scale, D)
    if query_rows is not None:
        qr = as_int(query_rows)
        if qr is None or qr < 16 or qr > block_size or (qr & (qr - 1)):
            raise ValueError(f"query_rows must be a power of two in [16, {block_size}] or None, got {query_rows!r}")
        query_rows = qr
        if query_rows == block_size:
            query_rows = None
    if _use_triton(backend, q.device):
        if block_size < 16:
            raise ValueError(f"the Triton kernel needs block_size >= 16, got {block_size}")
        return _kernels().block_mass_fwd(q, k, lse, block_size, scale, q_valid, kv_valid, query_rows=query_rows)
    return reference_block_mass(q, k, lse, block_size, scale, q_valid, kv_valid, query_rows=query_rows)


def _full_index_attention(q, k, v, block_size, scale, q_valid, kv_valid, backend):
    """Dense attention with LSE as the block-sparse op with a full index (blocks of 64 unless given)."""
    bs = 64 if block_size is None else block_size
    index = BlockIndex.full(1, q.shape[2], cdiv(q.shape[1], bs), cdiv(k.shape[1], bs), bs, device=q.device)
    return block_sparse_attention(q, k, v, index, scale=scale, return_lse=True, q_valid=q_valid, kv_valid=kv_valid,
                                  backend=backend, dense_threshold=None)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: Optional[int] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    block_valid: Optional[torch.Tensor] = None,
    q_valid: Optional[torch.Tensor] = None,
    kv_valid: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Dense attention over the valid tokens of block-ordered q, k, v (same layout and padding rules).

    It drops the padding, runs dense attention on the real tokens only and scatters back: exact, and
    as fast as dense gets. On a GPU in fp16 / bf16 that is SDPA's cuDNN kernel (asked for its
    log-sum-exp when wanted); without cuDNN, ``scaled_dot_product_attention``'s own choice, or for the
    LSE (CPU, fp32) the block-sparse path with a full index.
    """
    _check_qk(q, k, v)
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    if block_size is not None:
        block_size = _check_block_size(block_size, SQ, SK)
    _check_flag("return_lse", return_lse)
    _check_backend(backend)
    q_valid, kv_valid = _resolve_valid(block_valid, q_valid, kv_valid, SQ == SK)
    if (q_valid is not None or kv_valid is not None) and block_size is None:
        raise ValueError("dense_attention: block_size is required with valid-token counts")
    scale = softmax_scale(scale, D)
    if return_lse and (q.device.type != "cuda" or backend != "auto" or q.dtype == torch.float32):
        return _full_index_attention(q, k, v, block_size, scale, q_valid, kv_valid, backend)
    if block_size is not None:
        q_valid, kv_valid = _valid_counts(None, q_valid, kv_valid, SQ, SK, block_size, q.device)
    q_pos, q_n = (None, None) if q_valid is None else _valid_positions(q_valid, SQ, block_size)
    kv_pos, kv_n = (None, None) if kv_valid is None else _valid_positions(kv_valid, SK, block_size)
    # Padding only at the tail (the usual case: a partial last block) needs no gather: the keys are a
    # slice (a view), and the queries are taken whole when their padding fits in one block (its rows
    # cost at most one block of work and are zeroed after), else sliced too
    q_whole = q_n is not None and 0 < q_n and kv_n != 0 and SQ - q_n <= block_size
    qq = q if q_whole else _real_tokens(q, q_pos, q_n, 1)
    kk, vv = _real_tokens(k, kv_pos, kv_n, 1), _real_tokens(v, kv_pos, kv_n, 1)
    if return_lse:
        res = _cudnn_dense_with_lse(qq, kk, vv, scale)
        if res is None:  # no cuDNN: our kernel with a full index returns the LSE
            return _full_index_attention(q, k, v, block_size, scale, q_valid, kv_valid, backend)
        o, lse_c = res
    else:
        # cuDNN first where it runs: on Hopper it is the fastest dense kernel (1.8x SDPA's default flash
        # backend at the HunyuanVideo shape, BENCHMARKS.md), and the dense baseline all speed-ups are
        # measured against
        res = _cudnn_dense_with_lse(qq, kk, vv, scale)
        if res is not None:
            o = res[0]
        else:
            o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                               scale=scale).transpose(1, 2)
    if q_pos is None:
        return (o.contiguous(), lse_c) if return_lse else o.contiguous()
    if q_whole:
        o = o.contiguous()
        o[:, q_n:] = 0
        if not return_lse:
            return o
        lse_c[:, :, q_n:] = float("-inf")
        return o, lse_c
    out = _place_real_tokens(torch.zeros_like(q), o, q_pos, q_n, 1)
    if not return_lse:
        return out
    lse = torch.full((B, H, SQ), float("-inf"), dtype=torch.float32, device=q.device)
    return out, _place_real_tokens(lse, lse_c, q_pos, q_n, 2)
