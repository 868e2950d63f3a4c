"""The sequence-parallel cost model (dist_compact/parallel/cost.py): index sources, plans, byte counts
and cost-model arithmetic, a prediction with a fixed timer, and the real layer on two processes."""


import pytest
import torch

from dist_compact import BlockIndex, VideoLayout
from dist_compact.models.embedded import DEFAULT_WEIGHTS
from dist_compact.parallel import (ParallelConfig, block_kv_bytes, ring_blocks, ring_bytes, ring_needs, ring_rank_plan,
                                   shard_kv_bytes)
from dist_compact.parallel import cost as sm
from dist_compact.parallel.balance import head_block_costs
from dist_compact.search.config_file import load_config
from parallel_helpers import expected_ring_blocks, run_workers

LAYOUT = VideoLayout(6, 9, 10, tile=(1, 4, 4), text_tokens=20)  # 6 x 3 x 3 tiles (ragged) + 2 text blocks
LAYOUT4 = sm.padded_layout(LAYOUT, ParallelConfig(2, 2))  # 8 slabs: 72 video blocks
SHIPPED = load_config(str(DEFAULT_WEIGHTS.parent / "embedded-compact-0.5.yaml"))


def _compact(layout, heads, layers):
    return sm.Source("compact-0.5", layout, heads=heads, layers=layers, compact=SHIPPED)


def fixed_timer(fn, reps):
    """A timer that runs ``fn`` (so every call is exercised) and reports 1 ms: no test depends on wall time."""
    fn()
    return 1.0

def test_pooled_compact_source_is_the_pooled_config():
    src = _compact(LAYOUT, 8, 3)
    cfg = sm.pooled_compact(SHIPPED, "small", 3, 8)
    for l in range(3):
        assert torch.equal(src.mask(l)[0], cfg.block_mask(l, LAYOUT).reshape(8, LAYOUT.num_blocks, -1))
    assert [d.tolist() for d in src.draws] != [src.draws[0].tolist()] * 3  # layers draw different heads
    with pytest.raises(ValueError, match="only 48 patterns"):
        sm.pooled_compact(SHIPPED, "small", 1, 49)


def test_adaspa_source_rows_keep_their_budget():
    src = sm.Source("adaspa", LAYOUT, heads=8, layers=2)
    m = src.mask(1)[0]  # [H, NB, NB]
    nv = LAYOUT.num_video_blocks
    valid = LAYOUT.block_valid() > 0
    assert m[:, nv:][:, :, valid].all()  # text rows keep every real key
    assert m[:, :nv, nv:].all()  # the text sink
    per_row = m[:, :nv, :nv].sum(-1)  # video keys per video row: one budget per head
    assert all(len(set(per_row[h].tolist())) == 1 for h in range(8))
    assert len(set(per_row[:, 0].tolist())) > 1  # head-adaptive: not every head the same budget
    with pytest.raises(ValueError, match="unknown index source"):
        sm.Source("bogus", LAYOUT, 8, 1)
    with pytest.raises(ValueError, match="needs compact="):
        sm.Source("compact-0.5", LAYOUT, 8, 1)


def test_plan_for_matches_the_runtime_rule():
    src = _compact(LAYOUT4, 8, 3)
    bounds, orders = sm.plan_for(src, 2, 2, balance=False)
    assert bounds == (0, 36, 72) and orders == [None] * 3
    bounds, orders = sm.plan_for(src, 2, 2, balance=True)
    assert all((y - x) % 2 == 0 for x, y in zip(bounds[:-1], bounds[1:]))
    assert any(o is not None for o in orders)
    ada = sm.Source("adaspa", LAYOUT4, heads=8, layers=2)
    b = sm.plan_for(ada, 1, 2, balance=True)[0]
    valid = (LAYOUT4.block_valid()[:72] > 0).long()
    assert b != (0, 36, 72) and abs(int(valid[:b[1]].sum()) - int(valid[b[1]:].sum())) <= 1  # real blocks split evenly
    # runtime: AdaSpa heads re-planned on the searched index when that lowers the top Ulysses rank by > REPLAN_GAIN
    orders = sm.plan_for(ada, 2, 1, balance=True)[1]
    assert any(o is not None for o in orders)
    for l, o in enumerate(orders):
        c, tt = ada.costs(l)
        per_head = c.sum(1) + tt

        def top(order):
            return float(per_head[order].view(2, -1).sum(1).max())

        contiguous = top(torch.arange(8))
        if o is None:
            assert top(sm.balanced_head_order(per_head, 2)) >= (1 - sm.REPLAN_GAIN) * contiguous
        else:
            assert sorted(o.tolist()) == list(range(8)) and top(o) < (1 - sm.REPLAN_GAIN) * contiguous


def test_imbalance_rows():
    src = _compact(LAYOUT4, 8, 3)
    rows = sm.imbalance_rows(src, "t", [(2, "ulysses2", 2, 1), (4, "hybrid2x2", 2, 2)])
    for r in rows:
        assert 1.0 <= r["balanced"] <= r["contiguous"] and r["balanced"] == r["balanced_oracle"]
    assert rows[0]["balanced_slab_aligned"] == "" and rows[1]["balanced_slab_aligned"] >= rows[1]["balanced"]


def test_byte_counts_equal_the_ring_prediction():
    src = _compact(LAYOUT, 8, 1)
    idx = src.index(0)
    bounds = sm.plan_for(src, 1, 3, balance=True)[0]
    plans = [ring_rank_plan(idx, LAYOUT, bounds, r) for r in range(3)]
    blocks = [p.blocks for p in plans]
    assert torch.equal(torch.tensor(blocks), ring_blocks(idx, LAYOUT, 3, bounds=bounds))
    assert torch.equal(torch.tensor(blocks), expected_ring_blocks(idx, LAYOUT, bounds))
    assert torch.equal(torch.tensor([p.needs for p in plans]), ring_needs(idx, LAYOUT, 3, bounds=bounds))
    pb = block_kv_bytes(LAYOUT.block_size, batch=1, heads=8, head_dim=128, element_size=2)
    sent = ring_bytes(torch.tensor(blocks), pb)
    for r in range(3):
        assert sm.p2p_bytes(blocks, pb, r)[0] == int(sent[r])
    assert sum(sm.p2p_bytes(blocks, pb, r)[1] for r in range(3)) == int(sent.sum())  # every byte received once
    # fetching key ranges never moves more than whole shards
    whole = ring_bytes(ring_needs(idx, LAYOUT, 3, bounds=bounds),
                       shard_kv_bytes(bounds, LAYOUT.block_size, batch=1, heads=8, head_dim=128, element_size=2))
    assert (sent <= whole).all()
    # Ulysses: 4 tensors of the rank's video tokens x all heads, (U-1)/U of them leave
    assert sm.a2a_bytes(10, 128, 24, 128, 2, 1) == 0
    assert sm.a2a_bytes(10, 128, 24, 128, 2, 4) == 4 * 10 * 128 * 24 * 128 * 2 * 3 / 4
    # the docs' calibration: one [S/2, 24, 128] bf16 tensor at P=2 in 0.64 ms is ~285 GB/s sent per rank
    one = 59_400 * 24 * 128 * 2 / 2
    assert one / 0.64e-3 / 1e9 == pytest.approx(sm.A2A_GBPS, rel=0.01)


def test_rank_ms():
    # 1e6 bytes at 1 GB/s = 1 ms
    assert sm.rank_ms(5.0, None, 1e6, 0.0, 1.0, 1.0) == (6.0, 6.0)
    plain, ov = sm.rank_ms(5.0, 3.0, 0.0, 2e6, 1.0, 1.0)  # own 3 ms hides the 2 ms transfer
    assert plain == 7.0 and ov == 5.0
    assert sm.rank_ms(5.0, 1.0, 0.0, 2e6, 1.0, 1.0)[1] == 6.0  # 2 ms transfer > 1 ms own shard


def test_costs_of_a_mask_equal_those_of_its_index():
    src = sm.Source("adaspa", LAYOUT, heads=8, layers=1)
    a, b = head_block_costs(src.mask(0), LAYOUT), head_block_costs(src.index(0), LAYOUT)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="a mask of shape"):
        head_block_costs(src.mask(0)[..., :-1], LAYOUT)


def test_predict_with_a_fixed_timer():
    pad = sm.padded_layout(sm.shape_layout(sm.SMALL_SHAPES["small"]), ParallelConfig(1, 4))
    work = sm.Work(pad, 8, 16, torch.float32, torch.device("cpu"), "torch")
    src = _compact(pad, 8, 4)
    # 1 GB/s: the few hundred KB a rank sends per call cost a visible fraction of a ms
    rows = sm.predict(src, work, [0], [(4, "hybrid2x2", 2, 2)], a2a_gbps=1.0, p2p_gbps=1.0, reps=1,
                      timer=fixed_timer)
    assert [r["plan"] for r in rows] == ["contiguous", "balanced"]
    # every call 1 ms: one-GPU time = 4 layers x 1 ms; a rank's step adds its communication
    assert all(r["t1_ms"] == 4.0 and r["step_ms"] > 4.0 and r["step_overlap_ms"] <= r["step_ms"] + 1e-9
               and r["a2a_mb_per_layer"] > 0 for r in rows)


def test_ring_traffic_of_key_ranges_is_at_most_whole_shards():
    lay = sm.padded_layout(sm.shape_layout(sm.SMALL_SHAPES["small"]), ParallelConfig(1, 2))
    src = sm.Source("adaspa", lay, 8, 4)
    for bal in (False, True):
        bounds, _ = sm.plan_for(src, 1, 2, bal)
        new, old, worst = sm.ring_traffic(src, lay, 2, bounds, [0, 2], 8)
        assert 0 < new <= old and worst > 0


def _measure_worker(rank, world):
    lay = sm.padded_layout(sm.shape_layout(sm.SMALL_SHAPES["small-text"]), ParallelConfig(1, 2))
    src = _compact(lay, 8, 2)
    work = sm.Work(lay, 8, 16, torch.float32, torch.device("cpu"), "torch")
    calls = []

    def timer(fn, reps):
        fn()
        calls.append(1)
        return 1.0 + rank  # the ranks disagree: the slowest one must win

    got = sm.measure(src, work, [1], [(2, "ring2", 1, 2), (2, "ulysses2", 2, 1), (4, "ring4", 1, 4)], reps=1,
                     timer=timer)
    return got, len(calls)


def test_measure_on_two_processes(tmp_path):
    res = run_workers(_measure_worker, 2, tmp_path, timeout=120)
    assert res[0] == res[1]  # the slowest rank's time, agreed
    got, calls = res[0]
    assert set(got) == {(n, p) for n in ("ring2", "ulysses2") for p in ("contiguous", "balanced")}
    assert calls == 4  # one timed layer per (layout of 2 ranks, plan); ring4 is not a layout of 2 ranks
    assert all(v == 4.0 for v in got.values())  # rank 1 (2 ms) is the slowest; 1 of 2 layers timed: x 2


def test_ring_fetches_key_ranges_not_shards_nor_padding():
    # +-1 slab in time on 8 slabs of 9 blocks, the last 2 slabs padding (18 blocks), 3 equal shards of 24
    lay = LAYOUT.with_(slab_multiple=4)
    nv, nb, per = lay.num_video_blocks, lay.num_blocks, lay.blocks_per_slab
    assert (nv, per) == (72, 9) and int((lay.block_valid()[:nv] > 0).sum()) == 54
    slab = torch.arange(nv) // per
    mask = torch.ones(nb, nb, dtype=torch.bool)
    mask[:nv, :nv] = (slab[:, None] - slab[None, :]).abs() <= 1
    idx = BlockIndex.from_dense(mask.expand(1, 2, nb, nb), lay.block_size)
    bounds = (0, 24, 48, 72)
    want = torch.tensor([[0, 12, 0],    # rank 0 (slabs 0-2) reaches slab 3 only: blocks 24-35
                         [15, 0, 6],    # rank 1: slab 1 and its part of slab 2 (9-23); the 6 real blocks of shard 2
                         [0, 12, 0]])   # rank 2 (slab 5 + padding): slabs 4-5 of shard 1, blocks 36-47
    assert torch.equal(ring_blocks(idx, lay, 3, bounds=bounds), want)
    assert torch.equal(expected_ring_blocks(idx, lay, bounds), want)
    pb = block_kv_bytes(lay.block_size, batch=1, heads=2, head_dim=8, element_size=2)
    whole = ring_bytes(ring_needs(idx, lay, 3, bounds=bounds),
                       shard_kv_bytes(bounds, lay.block_size, batch=1, heads=2, head_dim=8, element_size=2))
    assert ring_bytes(want, pb).tolist() == [15 * pb, 24 * pb, 6 * pb] and (ring_bytes(want, pb) < whole).all()


