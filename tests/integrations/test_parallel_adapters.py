"""Our block-sparse op inside yunchang's LongContextAttention and deepspeed's DistributedAttention.

Each runs on gloo processes and must equal the one-process ``block_sparse_attention`` (fp32,
<= 1e-5). Skipped, with the reason, when the package is not installed.
"""

import importlib.util
from unittest import mock

import pytest
import torch

from dist_compact import BlockIndex, VideoLayout, block_sparse_attention, dense_attention
from parallel_helpers import run_workers

TOL = 1e-5
LAYOUT = VideoLayout(5, 6, 7, tile=(1, 4, 4), text_tokens=13)  # 20 video + 1 text blocks: padded for P=4


def _index(layout, heads, density, seed):
    nb = layout.num_blocks
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(1, heads, nb, nb, generator=g) < density
    m[:, 0, 3] = False  # an empty row
    m[..., layout.num_video_blocks:] = True  # text sink columns
    return BlockIndex.from_dense(m, layout.block_size)


def _problem(layout, heads, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, layout.padded_len, heads, 16, generator=g) for _ in range(3)]


# ---------------------------------------------------------------------------- yunchang
def _yunchang_worker(rank, world, configs):
    import torch.distributed as dist
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP

    import dist_compact.ops as kops
    from dist_compact.integrations.yunchang_adapter import YunchangBlockSparse

    heads = 4
    index = _index(LAYOUT, heads, 0.15, seed=7)  # sparse: many ring steps contribute nothing to a row
    q, k, v = _problem(LAYOUT, heads, seed=8)
    bv = LAYOUT.block_valid()
    ref = block_sparse_attention(q, k, v, index, block_valid=bv, backend="torch")
    errs = {}
    for u, r, low in configs:
        set_seq_parallel_pg(u, r, rank, world, use_ulysses_low=low)
        proc = YunchangBlockSparse(LAYOUT, PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG, index, backend="torch")
        attn = LongContextAttention(ring_impl_type="basic", attn_type=None, attn_processor=proc)
        with torch.no_grad():
            out = attn(proc.chunk(q), proc.chunk(k), proc.chunk(v))
        assert not torch.isnan(out).any(), "NaN from yunchang's merge"
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out)  # chunk i lives on rank i (offset 0: the whole world is the SP group)
        full = proc.unpad(torch.cat(parts, 1))
        e = (full - ref).abs().max().item()
        assert e <= TOL, f"yunchang ulysses={u} ring={r} low={low}: max abs error {e:.3g}"
        errs[(u, r, low)] = e
        # the next forward reuses the per-step sub-indices and valid counts (no copies, no re-checks)
        with torch.no_grad(), mock.patch.object(kops._VALIDATED, "put", wraps=kops._VALIDATED.put) as checked:
            again = attn(proc.chunk(q), proc.chunk(k), proc.chunk(v))
        assert checked.call_count == 0 and torch.equal(again, out)
    return errs


@pytest.mark.timeout(200)
@pytest.mark.skipif(importlib.util.find_spec("yunchang") is None,
                    reason="yunchang not installed (pip install yunchang==0.6.4, or dist_compact[usp])")
def test_yunchang_long_context_attention(tmp_path):
    configs = [(4, 1, True), (1, 4, True), (2, 2, True), (2, 2, False)]
    res = run_workers(_yunchang_worker, 4, tmp_path, configs, timeout=180)
    assert all(len(r) == len(configs) for r in res)


# ---------------------------------------------------------------------------- deepspeed
def _deepspeed_worker(rank, world):
    import torch.distributed as dist

    import deepspeed
    import deepspeed.ops

    # deepspeed would JIT-compile its CPU shared-memory all-reduce in init_distributed (about 90 s on
    # CI's 2 cores); the test needs gloo only. Its op-compatibility cache is a plain module dict.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.sequence.layer import DistributedAttention
    from deepspeed.utils import groups

    from dist_compact.integrations.deepspeed_adapter import DeepSpeedBlockSparse, sequence_parallel_mpu

    sp_group = dist.new_group(list(range(world)))
    bv = LAYOUT.block_valid()
    n = LAYOUT.padded_len // world
    def err(index, q, k, v, ref):
        # this rank's slab through DeepSpeed's all-to-all wrapper vs the single-process reference
        attn = DistributedAttention(DeepSpeedBlockSparse(LAYOUT, sp_group, index, backend="torch"), sp_group,
                                    scatter_idx=2, gather_idx=1)
        with torch.no_grad():
            out = attn(*(t[:, rank * n:(rank + 1) * n] for t in (q, k, v)), 0)
        return (out - ref[:, rank * n:(rank + 1) * n]).abs().max().item()

    errs = {}
    for heads in (4, 3):  # 3 heads over 2 ranks: deepspeed's uneven split, which needs its mpu
        if heads % world:
            groups.mpu = sequence_parallel_mpu(sp_group)
        index = _index(LAYOUT, heads, 0.3, seed=heads)
        q, k, v = _problem(LAYOUT, heads, seed=10 + heads)
        e = err(index, q, k, v, block_sparse_attention(q, k, v, index, block_valid=bv, backend="torch"))
        assert e <= TOL, f"deepspeed {heads} heads: max abs error {e:.3g}"
        errs[heads] = e
    # no index: dense attention over the valid tokens
    q, k, v = _problem(LAYOUT, 4, seed=20)
    e = err(None, q, k, v, dense_attention(q, k, v, block_size=LAYOUT.block_size, block_valid=bv, backend="torch"))
    assert e <= TOL, f"deepspeed dense: max abs error {e:.3g}"
    return errs


@pytest.mark.timeout(200)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed (pip install deepspeed, or dist_compact[deepspeed])")
def test_deepspeed_distributed_attention(tmp_path):
    res = run_workers(_deepspeed_worker, 2, tmp_path, timeout=180)
    assert all(set(r) == {4, 3} for r in res)


def test_adapters_import_without_the_packages():
    """Importing the adapters never imports yunchang / deepspeed (lazy)."""
    import subprocess
    import sys

    code = ("import sys, dist_compact.integrations.yunchang_adapter, dist_compact.integrations.deepspeed_adapter, "
            "dist_compact.parallel; print([m for m in ('yunchang', 'deepspeed', 'xfuser') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
