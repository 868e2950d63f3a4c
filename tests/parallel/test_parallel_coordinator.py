"""Coordinator, cross-rank LSE merge and the errors that need a process group (2 gloo processes).

One spawn runs every check (start-up dominates on CI):
config broadcast (and a load error raised on every rank, no hang), hash agreement and mismatch
detection for configs and cached indices, index broadcast and gather (ring and Ulysses),
all_reduce_merge with empty contributions, and one clear error per bad parallel input.
"""

from dataclasses import dataclass

import pytest
import torch

from dist_compact import BlockIndex, VideoLayout
from parallel_helpers import run_workers


@dataclass(frozen=True)
class _Sparsity:
    target: float
    layers: tuple


def _expect(exc, match, fn, *args, **kwargs):
    import re

    try:
        fn(*args, **kwargs)
    except exc as e:
        assert re.search(match, str(e)), f"{exc.__name__} message {str(e)!r} does not match {match!r}"
        return str(e)
    raise AssertionError(f"expected {exc.__name__} matching {match!r}")


def _worker(rank, world):
    import torch.distributed as dist

    from dist_compact.sparsity.context import AttentionContext
    from dist_compact.sparsity.attention_ops import AttentionOps
    from dist_compact.parallel import (
        Coordinator,
        ParallelConfig,
        ParallelConfigError,
        ParallelGroups,
        ParallelMismatchError,
        RingOps,
        SequenceParallel,
        UlyssesOps,
        all_reduce_merge,
        build_groups,
    )
    from dist_compact.parallel.coordinator import ParallelLoadError, config_digest, gather_index, global_head_stats

    out = {}
    co = Coordinator()

    # ---- broadcast a config loaded on rank 0 only; everyone checks its hash
    def load():
        assert dist.get_rank() == 0, "only the source rank loads"
        return _Sparsity(0.8, (0, 1, 2))

    cfg = co.broadcast_object(load=load)
    assert cfg == _Sparsity(0.8, (0, 1, 2))
    co.check_config(cfg)

    def bad_load():
        raise FileNotFoundError("sparsity.yaml")

    # the loading rank raises its own error; the others learn what it was
    if rank == 0:
        _expect(FileNotFoundError, r"^sparsity.yaml$", co.broadcast_object, load=bad_load)
    else:
        _expect(ParallelLoadError, r"loading on rank 0 failed: FileNotFoundError: sparsity.yaml", co.broadcast_object,
                load=bad_load)

    # ---- mismatches are detected on every rank, with one clear message
    msg = _expect(ParallelMismatchError, r"^sparsity config: not the same on every rank \(target differs: ranks \[0\]: "
                  r"\"0\.8\", ranks \[1\]: \"0\.7\"\); every rank must hold the same one$",
                  co.check_config, _Sparsity(0.8 if rank == 0 else 0.7, (0, 1, 2)))
    out["config mismatch"] = msg
    assert config_digest(_Sparsity(0.8, (0, 1))) != config_digest(_Sparsity(0.8, (0, 2)))
    layout = VideoLayout(4, 5, 6, tile=(1, 4, 4), text_tokens=9)
    nb = layout.num_blocks
    g = torch.Generator().manual_seed(3)  # same on both ranks
    m = torch.rand(1, 4, nb, nb, generator=g) < 0.4
    index = BlockIndex.from_dense(m, layout.block_size)
    co.check_indices({(0, 10): index, (1, 10): index})
    other = index if rank == 0 else BlockIndex.from_dense(m ^ (torch.arange(nb) == 0), layout.block_size)
    _expect(ParallelMismatchError, "cached block indices: not the same on every rank", co.check_indices, {(0, 10): other})

    # ---- an index searched on rank 1 only reaches everyone
    got = co.broadcast_index(index if rank == 1 else None, src=1)
    assert got.equal(index)
    _expect(RuntimeError, "rank 0 has no BlockIndex", co.broadcast_index, None)
    assert co.decide(lambda x: x * 2 + dist.get_rank(), 21) == 42  # computed on rank 0 only

    # ---- local indices of every rank give back the global one (ring: rows; Ulysses: heads)
    for u, r in ((1, 2), (2, 1)):
        pc = ParallelConfig(u, r)
        sp = SequenceParallel(pc, build_groups(pc))
        lay = sp.layout_for(layout)
        mm = torch.rand(1, 4, lay.num_blocks, lay.num_blocks, generator=torch.Generator().manual_seed(4)) < 0.4
        gidx = BlockIndex.from_dense(mm, lay.block_size)
        ops = sp.make_ops("torch")
        assert isinstance(ops, RingOps if r > 1 else UlyssesOps)
        back = gather_index(ops.localize(gidx, lay), ops, lay)
        assert back.equal(gidx), f"gather_index under {pc}"
        stat = torch.arange(4.0)[slice(*ops.head_range(4))] * (1 if r == 1 else 0.5)
        assert torch.equal(global_head_stats(stat, ops), torch.arange(4.0))
    single = AttentionOps()
    assert gather_index(single.localize(index, layout), single, layout).equal(index)

    # ---- cross-rank LSE merge: rank 0 holds an empty contribution for some rows, rank 1 for others
    g = torch.Generator().manual_seed(5)
    o = [torch.randn(1, 6, 2, 8, generator=g) for _ in range(2)]
    l_ = [torch.randn(1, 2, 6, generator=g) for _ in range(2)]
    l_[0][:, :, 0] = float("-inf"); o[0][:, 0] = 0  # noqa: E702
    l_[1][:, :, 1] = float("-inf"); o[1][:, 1] = 0  # noqa: E702
    for t in l_:  # row 2 empty on both
        t[:, :, 2] = float("-inf")
    o[0][:, 2] = 0
    o[1][:, 2] = 0
    mo, ml = all_reduce_merge(o[rank], l_[rank])
    w = torch.softmax(torch.stack(l_).nan_to_num(neginf=-1e30), 0)  # weights of the two partials
    ref = (w.transpose(2, 3).unsqueeze(-1) * torch.stack(o)).sum(0)
    ref[:, 2] = 0
    assert not torch.isnan(mo).any() and not torch.isnan(ml).any()
    assert (mo - ref).abs().max() <= 1e-6
    assert torch.all(ml[:, :, 2] == float("-inf")) and torch.isfinite(ml[:, :, :2]).all()

    # ---- one clear error per bad parallel input
    _expect(ParallelConfigError, r"2 x 2 = 4 ranks, but the world size is 2", build_groups, ParallelConfig(2, 2))
    pc = ParallelConfig(1, 2)
    sp = SequenceParallel(pc, build_groups(pc))
    single_group = dist.new_group([0])  # collective: both ranks create it
    if rank == 0:
        _expect(ParallelConfigError, r"the ring group has 1 ranks but ulysses1xring2 needs 2",
                ParallelGroups.from_groups, pc, None, single_group)
    lay = sp.layout_for(layout)
    ctx = AttentionContext(layout=lay, ops=AttentionOps("torch"))
    q = torch.randn(1, lay.padded_len, 4, 16)  # not sharded
    wrapped = sp.wrap(lambda q, k, v, c: q)
    _expect(ValueError, r"this rank holds \[batch, \d+, heads, head_dim\].*use sp.shard", wrapped, q, q, q, ctx)
    pu = ParallelConfig(2, 1)
    spu = SequenceParallel(pu, build_groups(pu))
    ql = spu.shard(torch.randn(1, lay.padded_len, 3, 16), lay)
    _expect(ParallelConfigError, r"3 attention heads are not divisible by ulysses=2", spu.wrap(lambda q, k, v, c: q),
            ql, ql, ql, ctx)
    ops = sp.make_ops("torch")
    qs = sp.shard(q, lay)
    _expect(ValueError, r"not localized for this rank.*ops.localize", ops.attention, qs, qs, qs, index, lay)
    _expect(ValueError, r"3 video blocks.*does not split into 2 equal shards.*layout_for", ops.attention, qs, qs, qs, index,
            VideoLayout(3, 4, 4, tile=(1, 4, 4)))
    return out


@pytest.mark.timeout(200)
def test_coordinator_and_errors(tmp_path):
    res = run_workers(_worker, 2, tmp_path, timeout=180)
    assert res[0]["config mismatch"] == res[1]["config mismatch"], "every rank raises the same error"
