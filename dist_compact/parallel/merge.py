"""The one LSE merge of partial attention results (ring steps, text rows split over ranks).

Layout: out ``[batch, seq, heads, head_dim]``, lse ``[batch, heads, seq]`` float32, natural log, as
returned by :func:`dist_compact.ops.block_sparse_attention`.

Derivation. Split the keys of one query row into disjoint sets A and B. With scores ``s_j``,

    lse_A = log sum_{j in A} exp(s_j),        out_A = sum_{j in A} exp(s_j - lse_A) v_j

and the same for B. The attention over A u B is

    lse = log(exp(lse_A) + exp(lse_B)) = m + log(exp(lse_A - m) + exp(lse_B - m)),  m = max(lse_A, lse_B)
    out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B.

Subtracting ``m`` keeps every exponent <= 0 (no overflow). A set with no visible key has
``lse = -inf`` and ``out = 0`` (the kernel's convention): its weight ``exp(-inf - m)`` is exactly 0.
When *both* are empty ``m = -inf`` and ``lse_A - m`` would be ``-inf - -inf = NaN``; so ``m`` is
replaced by 0 where it is not finite, the weights are then both 0, and the result is out 0,
lse -inf: the merge never produces NaN (yunchang's sigmoid form ``lse - logsigmoid(lse - lse_B)``
does, when the running lse is -inf). The same formula with a max-reduction and a sum-reduction
merges partials held by different ranks (:func:`all_reduce_merge`).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["merge_partials", "merge_many", "all_reduce_merge"]


def _cdtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _finite(m: torch.Tensor) -> torch.Tensor:
    """The max LSE with non-finite entries (every part empty) replaced by 0, so exp(lse - m) is 0 there."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _normalize(m: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lse, 1/s)`` from the max ``m`` and the summed weights ``s``: ``-inf`` and 0 where ``s == 0``."""
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    lse = torch.where(pos, m + torch.log(safe), torch.full_like(s, float("-inf")))
    return lse, torch.where(pos, 1.0 / safe, torch.zeros_like(s))


def _per_token(w: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` weights -> ``[B, S, H, 1]``, to scale ``[B, S, H, D]`` outputs."""
    return w.transpose(1, 2).unsqueeze(-1)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (see the module docstring).

    Args:
        out_a, out_b: ``[B, S, H, D]`` partial outputs (any float dtype).
        lse_a, lse_b: ``[B, H, S]`` their log-sum-exps; ``-inf`` marks an empty contribution.

    Returns:
        ``(out, lse)``: out float32 (float64 stays float64), lse float32 (same rule). Rows empty in
        both inputs give out 0 and lse -inf, never NaN.
    """
    return merge_many((out_a, out_b), (lse_a, lse_b))


def merge_many(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partials over disjoint key sets (same formula, one max over all)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_many needs as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    cdtype = _cdtype(*outs, *lses)
    ls = [l.to(cdtype) for l in lses]
    m = _finite(functools.reduce(torch.maximum, ls))
    ws = [torch.exp(l - m) for l in ls]
    lse, inv = _normalize(m, functools.reduce(torch.add, ws))
    out = functools.reduce(torch.add, [_per_token(w * inv) * o.to(cdtype) for w, o in zip(ws, outs)])
    return out, lse


def all_reduce_merge(out: torch.Tensor, lse: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partials of the SAME query rows held by every rank of ``group`` (disjoint key sets).

    Same derivation as :func:`merge_partials` with ``m = max over ranks`` (one all_reduce MAX) and
    the weighted numerators and denominators summed (one all_reduce SUM of both, packed together).
    Every rank gets the merged ``(out, lse)``; float32 (float64 stays float64).
    """
    cdtype = _cdtype(out, lse)
    l = lse.to(cdtype)
    m = l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = _finite(m)
    w = torch.exp(l - m)  # [B, H, S]
    num = _per_token(w) * out.to(cdtype)  # [B, S, H, D]
    packed = torch.cat([num.reshape(-1), w.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    num = packed[: num.numel()].view_as(num)
    lse_out, inv = _normalize(m, packed[num.numel():].view_as(w))
    return num * _per_token(inv), lse_out
