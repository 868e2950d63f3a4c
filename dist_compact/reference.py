"""Plain-PyTorch references shared by tests, benchmarks and CPU runs.

Tensor layout everywhere: q, k, v are ``[batch, seqlen, heads, head_dim]`` (block order when a
``BlockIndex`` is involved); LSE is ``[batch, heads, seqlen]`` float32/float64, natural log.

* :func:`token_mask` expands a :class:`BlockIndex` to a token-level mask (the oracle's view).
* :func:`reference_attention` is dense masked attention that also returns the LSE; run it on
  float64 inputs for a golden result.
* :func:`torch_block_sparse_attention` computes the same thing as the Triton kernel by gathering
  only the kept key blocks (memory bounded by chunking), so CPU runs do sparse work only.
* :func:`reference_block_mass` is the AdaSpa block-mass statistic.

Conventions shared with the kernel: a query row with no visible key gets output 0 and LSE -inf;
padded query rows (beyond ``q_valid``) get output 0 and LSE -inf.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._util import cdiv, softmax_scale
from .block_index import BlockIndex

__all__ = [
    "token_valid_mask",
    "token_mask",
    "reference_attention",
    "reference_block_sparse_attention",
    "torch_block_sparse_attention",
    "reference_block_mass",
    "sampled_query_rows",
]


def token_valid_mask(seqlen: int, block_size: int, valid: Optional[torch.Tensor], device=None) -> torch.Tensor:
    """bool [seqlen]: token i is real iff it is inside the sequence and ``i % bs < valid[i // bs]``."""
    pos = torch.arange(seqlen, device=device)
    if valid is None:
        return torch.ones(seqlen, dtype=torch.bool, device=device)
    valid = valid.to(device=device, dtype=torch.long)
    return (pos % block_size) < valid[pos // block_size]


def token_mask(index: BlockIndex, q_len: int, kv_len: int, q_valid: Optional[torch.Tensor] = None,
               kv_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool ``[batch or 1, heads, q_len, kv_len]``: True where query i may attend to key j."""
    bs = index.block_size
    dense = index.to_dense()
    qb = torch.arange(q_len, device=index.device) // bs
    kb = torch.arange(kv_len, device=index.device) // bs
    m = dense[:, :, qb][:, :, :, kb]
    qv = token_valid_mask(q_len, bs, q_valid, index.device)
    kv = token_valid_mask(kv_len, bs, kv_valid, index.device)
    return m & qv.view(1, 1, -1, 1) & kv.view(1, 1, 1, -1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention with LSE, computed in the inputs' dtype (pass float64 for a golden).

    mask: bool broadcastable to ``[batch, heads, q_len, kv_len]`` (True = attend), or None.
    Returns out ``[B, Sq, H, D]`` and lse ``[B, H, Sq]``; fully masked rows give 0 and -inf.
    """
    scale = softmax_scale(scale, q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def reference_block_sparse_attention(q, k, v, index: BlockIndex, scale=None, q_valid=None, kv_valid=None):
    """The oracle: expand the index to a token mask and run :func:`reference_attention`."""
    mask = token_mask(index, q.shape[1], k.shape[1], q_valid, kv_valid)
    return reference_attention(q, k, v, mask, scale)


def _pad_blocks(x: torch.Tensor, nblocks: int, bs: int) -> torch.Tensor:
    """[B, S, H, D] -> [B, H, nblocks, bs, D] with zero padding at the end."""
    B, S, H, D = x.shape
    if S < nblocks * bs:
        x = torch.cat([x, x.new_zeros(B, nblocks * bs - S, H, D)], dim=1)
    return x.view(B, nblocks, bs, H, D).permute(0, 3, 1, 2, 4)


def torch_block_sparse_attention(q, k, v, index: BlockIndex, scale=None, q_valid=None, kv_valid=None,
                                 return_lse: bool = True, chunk_bytes: int = 1 << 28):
    """Block-sparse attention in PyTorch that touches only the kept key blocks.

    Same contract as the Triton kernel. Computes in float32 (float64 stays float64), returns out in
    q's dtype and lse float32. Query blocks are processed in chunks so the gathered keys stay under
    about ``chunk_bytes``.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    bs = index.block_size
    nq, nk = index.num_q_blocks, index.num_k_blocks
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale(scale, D)
    qb = _pad_blocks(q.to(cdtype), nq, bs)  # [B,H,nq,bs,D]
    kb = _pad_blocks(k.to(cdtype), nk, bs)
    vb = _pad_blocks(v.to(cdtype), nk, bs)
    kv_tok = token_valid_mask(nk * bs, bs, kv_valid, q.device)
    kv_tok &= torch.arange(nk * bs, device=q.device) < Sk
    kv_tok = kv_tok.view(nk, bs)
    q_tok = token_valid_mask(nq * bs, bs, q_valid, q.device).view(nq, bs)

    L = index.max_count
    counts = index.counts.expand(B, -1, -1)
    indices = index.indices.expand(B, -1, -1, -1)
    out = q.new_zeros((B, H, nq, bs, D), dtype=cdtype)
    lse = torch.full((B, H, nq, bs), float("-inf"), dtype=cdtype, device=q.device)
    per_qblock = B * H * L * bs * (2 * D + bs) * (8 if cdtype == torch.float64 else 4)
    chunk = max(1, min(nq, chunk_bytes // max(per_qblock, 1)))
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=q.device).view(1, H, 1, 1)
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        idx = indices[:, :, c0:c1].long()  # [B,H,c,L]
        used = torch.arange(L, device=q.device).view(1, 1, 1, L) < counts[:, :, c0:c1].unsqueeze(-1)
        safe = idx.clamp(min=0)
        kg = kb[bi, hi, safe]  # [B,H,c,L,bs,D]
        vg = vb[bi, hi, safe]
        s = torch.einsum("bhcmd,bhclnd->bhcmln", qb[:, :, c0:c1], kg) * scale
        keymask = used.unsqueeze(-1) & kv_tok[safe]  # [B,H,c,L,bs]
        keymask = keymask.unsqueeze(3) & q_tok[c0:c1].view(1, 1, c1 - c0, bs, 1, 1)
        s = s.masked_fill(~keymask, float("-inf"))
        s = s.flatten(-2)  # [B,H,c,bs,L*bs]
        row_lse = torch.logsumexp(s, dim=-1)
        finite = torch.isfinite(row_lse)
        p = torch.exp(s - torch.where(finite, row_lse, torch.zeros_like(row_lse)).unsqueeze(-1))
        p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
        out[:, :, c0:c1] = torch.einsum("bhcmj,bhcjd->bhcmd", p, vg.flatten(3, 4))
        lse[:, :, c0:c1] = row_lse
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nq * bs, H, D)[:, :Sq].to(q.dtype)
    lse = lse.reshape(B, H, nq * bs)[:, :, :Sq].float()
    return (out, lse) if return_lse else out


def sampled_query_rows(seqlen: int, block_size: int, valid: Optional[torch.Tensor], rows: Optional[int],
                       device=None) -> torch.Tensor:
    """bool [seqlen]: the query rows block mass averages over.

    All valid rows when ``rows`` is None; otherwise per block with n valid rows, rows
    ``floor(i * n / rows)`` for i < rows (all n rows when n <= rows): an even spread.
    """
    ok = token_valid_mask(seqlen, block_size, valid, device)
    if rows is None or rows >= block_size:
        return ok
    nb = cdiv(seqlen, block_size)
    n = ok.new_zeros(nb * block_size, dtype=torch.long)
    n[:seqlen] = ok.long()
    n = n.view(nb, block_size).sum(1)  # valid rows per block (valid rows come first)
    pick = torch.zeros(nb, block_size, dtype=torch.bool, device=device)
    i = torch.arange(rows, device=device)
    off = torch.where((n <= rows).view(-1, 1), i.view(1, -1), (i.view(1, -1) * n.view(-1, 1)) // rows)
    take = torch.where((n <= rows).view(-1, 1), i.view(1, -1) < n.view(-1, 1), (n > 0).view(-1, 1).expand(-1, rows))
    pick.scatter_(1, off.clamp(max=block_size - 1), take)
    return pick.view(-1)[:seqlen] & ok


def reference_block_mass(q, k, lse, block_size: int, scale=None, q_valid=None, kv_valid=None, query_rows=None):
    """AdaSpa block attention mass, ``[B, H, q_blocks, k_blocks]`` float32.

    ``mass[b, h, i, j] = mean over valid query tokens t of block i of
    sum over valid keys s of block j of exp(q_t . k_s * scale - lse[b, h, t])``.
    With ``query_rows`` the mean runs over the rows :func:`sampled_query_rows` picks.

    With the exact LSE of dense attention, each row sums to 1 over j (the share of the query block's
    attention that key block j receives). Rows of blocks with no valid query (or lse = -inf) are 0.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    bs = block_size
    nq, nk = cdiv(Sq, bs), cdiv(Sk, bs)
    scale = softmax_scale(scale, D)
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_tok = token_valid_mask(Sk, bs, kv_valid, q.device)
    q_tok = sampled_query_rows(Sq, bs, q_valid, query_rows, q.device)
    lse_c = lse.to(cdtype)
    q_ok = q_tok.view(1, 1, Sq) & torch.isfinite(lse_c)  # [B,H,Sq]
    out = torch.zeros(B, H, nq, nk, dtype=cdtype, device=q.device)
    kk = k.to(cdtype)
    rows = max(bs, (1 << 24) // max(Sk * H * B, 1) // bs * bs)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, r0:r1].to(cdtype), kk) * scale
        p = torch.exp(s - torch.where(q_ok[:, :, r0:r1], lse_c[:, :, r0:r1], torch.zeros_like(lse_c[:, :, r0:r1])).unsqueeze(-1))
        p = p * (q_ok[:, :, r0:r1].unsqueeze(-1) & kv_tok.view(1, 1, 1, Sk))
        if Sk < nk * bs:
            p = torch.cat([p, p.new_zeros(*p.shape[:-1], nk * bs - Sk)], dim=-1)
        p = p.view(B, H, r1 - r0, nk, bs).sum(-1)  # [B,H,rows,nk]
        qblk = torch.arange(r0, r1, device=q.device) // bs
        out.index_add_(2, qblk, p)
    nvalid = torch.zeros(B, H, nq, dtype=cdtype, device=q.device)
    nvalid.index_add_(2, torch.arange(Sq, device=q.device) // bs, q_ok.to(cdtype))
    out = out / nvalid.clamp(min=1).unsqueeze(-1)
    return out.float()
