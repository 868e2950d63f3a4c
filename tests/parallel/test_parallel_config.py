"""ParallelConfig / SequenceParallel / init_distributed on one process, and the LSE merge.

Bad parallel configs each get one clear error; layout_for pads (never truncates) to shards that
divide evenly; the LSE merge equals attention over the union and never yields NaN.
"""

import math

import pytest
import torch

from dist_compact import BlockIndex, VideoLayout, block_sparse_attention
from dist_compact.parallel import (
    ParallelConfig,
    ParallelConfigError,
    ParallelGroups,
    SequenceParallel,
    init_distributed,
    merge_many,
    merge_partials,
)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw, match", [
    (dict(ulysses=0), "ulysses must be a positive int"),
    (dict(ring=-2), "ring must be a positive int"),
    (dict(ulysses=True), "ulysses must be a positive int"),
    (dict(ring=2.0), "ring must be a positive int"),
], ids=["ulysses0", "ring-neg", "ulysses-bool", "ring-float"])
def test_bad_degrees(kw, match):
    with pytest.raises(ParallelConfigError, match=match):
        ParallelConfig(**kw)


def test_product_must_equal_world_size():
    with pytest.raises(ParallelConfigError, match=r"2 x 2 = 4 ranks, but the world size is 3"):
        ParallelConfig(2, 2).check(world_size=3)
    assert ParallelConfig(2, 2).check(world_size=4).degree == 4


def test_heads_must_divide_by_ulysses():
    with pytest.raises(ParallelConfigError, match=r"6 attention heads are not divisible by ulysses=4"):
        ParallelConfig(4, 1).check(num_heads=6)
    ParallelConfig(2, 3).check(num_heads=6)  # the ring degree does not care about heads


def test_plan_needs_groups_and_valid_options():
    with pytest.raises(ParallelConfigError, match="needs process groups"):
        SequenceParallel(ParallelConfig(2, 1))
    with pytest.raises(ParallelConfigError, match="shard_unit"):
        SequenceParallel(shard_unit="frame")
    sp = SequenceParallel()
    with pytest.raises(ParallelConfigError, match="already returns the SequenceParallel"):
        SequenceParallel(ParallelConfig(), sp)
    with pytest.raises(ParallelConfigError, match="needs a ring_group"):
        ParallelGroups(ParallelConfig(1, 2), None, None)


def test_one_process_is_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sp = init_distributed()
    assert not sp.enabled and sp.sp_rank == 0 and sp.is_first
    layout = VideoLayout(3, 5, 7, tile=(1, 4, 4), text_tokens=5)
    assert sp.layout_for(layout) is layout
    x = torch.randn(1, layout.padded_len, 2, 16)
    assert sp.shard(x, layout) is x and sp.gather(x, layout) is x

    def attn(q, k, v, ctx):
        return q

    assert sp.wrap(attn) is attn
    with pytest.raises(ParallelConfigError, match=r"torchrun --nproc-per-node 4"):
        init_distributed(ParallelConfig(2, 2))


# ---------------------------------------------------------------------------- layout_for
def _fake_plan(u, r, rank=0, unit="block"):
    cfg = ParallelConfig(u, r)
    groups = ParallelGroups(cfg, object(), object(), rank % u, rank // u)  # layout math needs no real group
    return SequenceParallel(cfg, groups, shard_unit=unit)


@pytest.mark.parametrize("grid, tile, u, r, unit, slabs", [
    ((21, 30, 52), (1, 8, 8), 2, 2, "block", 21),  # Wan 480p: 21 slabs x 28 tiles split 4 ways as is
    ((21, 30, 52), (1, 8, 8), 1, 4, "slab", 24),  # whole-slab ring shards need 3 empty slabs
    ((33, 45, 80), (1, 8, 16), 4, 1, "block", 34),  # Hunyuan 720p: 30 tiles per slab -> 1 slab
    ((33, 45, 80), (1, 8, 16), 2, 4, "block", 36),
    ((5, 6, 7), (1, 4, 4), 1, 3, "slab", 6),
], ids=["wan-p4", "wan-ring4-slab", "hunyuan-p4", "hunyuan-p8", "ragged-ring3-slab"])
def test_layout_for_pads_least(grid, tile, u, r, unit, slabs):
    layout = VideoLayout(*grid, tile=tile, text_tokens=77)
    sp = _fake_plan(u, r, unit=unit)
    out = sp.layout_for(layout)
    assert out.grid == layout.grid and out.text_tokens == 77, "padding, never truncation"
    assert out.num_slabs == slabs
    assert out.num_video_blocks % (u * r) == 0
    if unit == "slab":
        assert out.num_slabs % r == 0
    # the fewest slabs that work
    P = u * r
    for ns in range(layout.num_slabs, slabs):
        ok = (ns * layout.blocks_per_slab) % P == 0 and (unit == "block" or ns % r == 0)
        assert not ok, f"{ns} slabs would already do"
    assert sp.layout_for(out) is out
    if out is not layout:
        with pytest.raises(ValueError, match="use sp.layout_for"):
            sp.check_layout(layout)


def test_shard_takes_video_chunk_and_all_text():
    layout = _fake_plan(2, 2).layout_for(VideoLayout(4, 5, 9, tile=(1, 4, 4), text_tokens=20))
    bs, nv = layout.block_size, layout.num_video_blocks
    x = torch.arange(layout.padded_len).view(1, -1, 1).float()
    for rank in range(4):
        sp = _fake_plan(2, 2, rank)
        part = sp.shard(x, layout)
        assert part.shape[1] == sp.local_len(layout)
        want = torch.cat([torch.arange(rank * nv // 4 * bs, (rank + 1) * nv // 4 * bs),
                          torch.arange(nv * bs, layout.padded_len)]).float()
        assert torch.equal(part.flatten(), want)
        assert torch.equal(sp.local_blocks(layout), torch.cat([
            torch.arange(rank * nv // 4, (rank + 1) * nv // 4), torch.arange(nv, layout.num_blocks)]))


# ---------------------------------------------------------------------------- LSE merge
def _attn(q, k, v, keep):
    """fp64 attention of q over the keys in ``keep`` (bool [S_k]) with LSE; nothing kept -> 0, -inf."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep.view(1, 1, 1, -1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(torch.isfinite(lse).unsqueeze(-1), p, torch.zeros_like(p))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


@pytest.mark.parametrize("split", ["halves", "first-empty", "second-empty", "both-empty", "three-one-empty"])
def test_merge_equals_union_and_never_nan(split):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    Sk = k.shape[1]
    parts = {
        "halves": [torch.arange(Sk) < 2, torch.arange(Sk) >= 2],
        "first-empty": [torch.zeros(Sk, dtype=torch.bool), torch.ones(Sk, dtype=torch.bool)],
        "second-empty": [torch.ones(Sk, dtype=torch.bool), torch.zeros(Sk, dtype=torch.bool)],
        "both-empty": [torch.zeros(Sk, dtype=torch.bool), torch.zeros(Sk, dtype=torch.bool)],
        "three-one-empty": [torch.zeros(Sk, dtype=torch.bool), torch.arange(Sk) % 2 == 0, torch.arange(Sk) % 2 == 1],
    }[split]
    outs, lses = zip(*(_attn(q, k, v, p) for p in parts))
    ref, ref_lse = _attn(q, k, v, torch.stack(parts).any(0))
    for fp32 in (False, True):
        o_in = [o.float() for o in outs] if fp32 else list(outs)
        l_in = [l.float() for l in lses] if fp32 else list(lses)
        out, lse = merge_many(o_in, l_in) if len(parts) > 2 else merge_partials(o_in[0], l_in[0], o_in[1], l_in[1])
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        tol = 1e-5 if fp32 else 1e-12
        assert (out.double() - ref).abs().max() <= tol
        fin = torch.isfinite(ref_lse)
        if fin.any():
            assert (lse.double()[fin] - ref_lse[fin]).abs().max() <= tol
        if split == "both-empty":
            assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_merge_of_kernel_partials_matches_one_call():
    """Split the key blocks of an index in two and merge: equals the kernel over the whole index."""
    layout = VideoLayout(3, 5, 6, tile=(1, 4, 4), text_tokens=9)
    nb, bs = layout.num_blocks, layout.block_size
    g = torch.Generator().manual_seed(2)
    m = torch.rand(1, 2, nb, nb, generator=g) < 0.4
    m[0, 0, 1] = False  # an empty row: both partials empty
    idx = BlockIndex.from_dense(m, bs)
    q, k, v = (torch.randn(1, layout.padded_len, 2, 16, generator=g) for _ in range(3))
    bv = layout.block_valid()
    ref, ref_lse = block_sparse_attention(q, k, v, idx, return_lse=True, block_valid=bv, backend="torch")
    cut = nb // 2
    a = BlockIndex.from_dense(m & (torch.arange(nb) < cut), bs)
    b = BlockIndex.from_dense(m & (torch.arange(nb) >= cut), bs)
    oa, la = block_sparse_attention(q, k, v, a, return_lse=True, block_valid=bv, backend="torch")
    ob, lb = block_sparse_attention(q, k, v, b, return_lse=True, block_valid=bv, backend="torch")
    out, lse = merge_partials(oa, la, ob, lb)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- backend / sharing GPUs
def test_select_backend():
    import warnings

    from dist_compact.parallel.launch import select_backend

    def sel(backend=None, dev="cuda", n=4, gpus=4, share=None):
        return select_backend(backend, device_type=dev, local_world_size=n, device_count=gpus, share_gpus=share)

    assert sel() == ("nccl", False)  # one rank per GPU
    assert sel("gloo") == ("gloo", False)
    assert sel(dev="cpu", gpus=0) == ("gloo", False)
    assert sel(share=True) == ("gloo", True)  # opt-in even with enough GPUs
    with pytest.warns(UserWarning, match="4 ranks share 1 GPU"):
        assert sel(gpus=1) == ("gloo", True)  # automatic, with the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sel(gpus=1, share=True) == ("gloo", True)  # asked for: no warning
        assert select_backend(None, device_type="cuda", local_world_size=4, device_count=1, warn=False) == ("gloo", True)
    with pytest.raises(ParallelConfigError, match="share_gpus is false: NCCL refuses two ranks on one GPU"):
        sel(gpus=2, share=False)
    with pytest.raises(ParallelConfigError, match="invalid usage"):
        sel("nccl", gpus=1)
    with pytest.raises(ParallelConfigError, match="share_gpus needs CUDA devices"):
        sel(dev="cpu", share=True)
    with pytest.raises(ParallelConfigError, match="nccl backend needs CUDA"):
        sel("nccl", dev="cpu")
    with pytest.raises(ParallelConfigError, match="backend must be"):
        sel("mpi")


def test_cluster_share_gpus_field():
    from dist_compact.run.config import ClusterConfig

    assert ClusterConfig().share_gpus is None
    assert ClusterConfig(nproc=4, ulysses=2, ring=2, device="cuda", backend="gloo", share_gpus=True).share_gpus
    with pytest.raises(ValueError, match="share_gpus: true runs gloo on CUDA devices"):
        ClusterConfig(nproc=2, ulysses=2, device="cpu", share_gpus=True)
    with pytest.raises(ValueError, match="share_gpus: true runs gloo on CUDA devices"):
        ClusterConfig(nproc=2, ulysses=2, backend="nccl", share_gpus=True)
    with pytest.raises(ValueError, match="share_gpus must be true, false or null"):
        ClusterConfig(share_gpus="yes")


@pytest.mark.parametrize("env,line", [
    (dict(RANK="\u00b2"), "RANK='\u00b2' is not a whole number >= 0"),  # a digit to str.isdigit, not to int()
    (dict(WORLD_SIZE="\u00b2"), "WORLD_SIZE='\u00b2' is not a whole number >= 1"),
    (dict(WORLD_SIZE="2", RANK="3"), "RANK=3 is outside the world of WORLD_SIZE=2 processes (0..1)"),
    (dict(WORLD_SIZE="2", RANK="0", MASTER_PORT="abc"), "MASTER_PORT='abc' is not a port number (1-65535)"),
    (dict(WORLD_SIZE="2", RANK="0", MASTER_PORT="70000"), "MASTER_PORT='70000' is not a port number (1-65535)"),
])
def test_a_hand_made_launch_environment_is_one_line(monkeypatch, env, line):
    from dist_compact.parallel.launch import launched_world

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ParallelConfigError) as e:
        launched_world()
    assert str(e.value).startswith(line) and "\n" not in str(e.value)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_world() == (2, 1, 0)
