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

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["merge_partials", "merge_many", "all_reduce_merge"]


def _weights(lse: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(lse - m) with -inf entries (and a non-finite m) giving exactly 0."""
    return torch.exp(lse - m)


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
    cdtype = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    la, lb = lse_a.to(cdtype), lse_b.to(cdtype)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = _weights(la, m), _weights(lb, m)
    s = wa + wb
    pos = s > 0
    lse = torch.where(pos, m + torch.log(torch.where(pos, s, torch.ones_like(s))), torch.full_like(s, float("-inf")))
    inv = torch.where(pos, 1.0 / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))
    # [B, H, S] weights -> [B, S, H, 1] to scale [B, S, H, D] outputs
    ca = (wa * inv).transpose(1, 2).unsqueeze(-1)
    cb = (wb * inv).transpose(1, 2).unsqueeze(-1)
    out = ca * out_a.to(cdtype) + cb * out_b.to(cdtype)
    return out, lse


def merge_many(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partials over disjoint key sets (same formula, one max over all)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_many needs as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    out, lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:]):
        out, lse = merge_partials(out, lse, o, l)
    if len(outs) == 1:
        cd = torch.float64 if out.dtype == torch.float64 else torch.float32
        out, lse = out.to(cd), lse.to(cd)
    return out, lse


def all_reduce_merge(out: torch.Tensor, lse: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partials of the SAME query rows held by every rank of ``group`` (disjoint key sets).

    Same derivation as :func:`merge_partials` with ``m = max over ranks`` (one all_reduce MAX) and
    the weighted numerators and denominators summed (one all_reduce SUM of both, packed together).
    Every rank gets the merged ``(out, lse)``; float32 (float64 stays float64).
    """
    cdtype = torch.float64 if torch.float64 in (out.dtype, lse.dtype) else torch.float32
    l = lse.to(cdtype)
    m = l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = _weights(l, m)  # [B, H, S]
    num = w.transpose(1, 2).unsqueeze(-1) * out.to(cdtype)  # [B, S, H, D]
    packed = torch.cat([num.reshape(-1), w.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    num = packed[: num.numel()].view_as(num)
    s = packed[num.numel():].view_as(w)
    pos = s > 0
    lse_out = torch.where(pos, m + torch.log(torch.where(pos, s, torch.ones_like(s))), torch.full_like(s, float("-inf")))
    inv = torch.where(pos, 1.0 / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))
    return num * inv.transpose(1, 2).unsqueeze(-1), lse_out
