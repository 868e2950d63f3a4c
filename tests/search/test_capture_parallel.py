"""Offline-search capture under sequence parallelism equals the one-process capture."""

import pytest
import torch

from dist_compact import VideoLayout
from parallel_helpers import run_workers

LAYOUT = VideoLayout(5, 6, 7, tile=(1, 4, 4), text_tokens=13)
H, D = 4, 32


def _capture(sp, layout, q, k, v):
    from dist_compact.sparsity.context import AttentionContext
    from dist_compact.sparsity.attention_ops import AttentionOps
    from dist_compact.search.capture import CaptureAttention, MassStore

    store = MassStore.for_layout(layout, num_layers=1, num_heads=H)
    attn = sp.wrap(CaptureAttention(0, store)) if sp is not None else CaptureAttention(0, store)
    glay = sp.layout_for(layout) if sp is not None else layout
    ctx = AttentionContext(glay, ops=AttentionOps("torch"))
    qb, kb, vb = (glay.to_blocks(x) for x in (q, k, v))
    if sp is not None:
        qb, kb, vb = (sp.shard(x, glay) for x in (qb, kb, vb))
    out = attn(qb, kb, vb, ctx)
    if sp is not None:
        out = sp.gather(out, glay)
    return glay.from_blocks(out), store


def _inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, LAYOUT.seq_len, H, D, generator=g) for _ in range(3)]


def _worker(rank, world, configs):
    from dist_compact.parallel import ParallelConfig, SequenceParallel, build_groups

    q, k, v = _inputs()
    res = {}
    for u, r in configs:
        cfg = ParallelConfig(ulysses=u, ring=r)
        sp = SequenceParallel(cfg, build_groups(cfg))
        out, store = _capture(sp, LAYOUT, q, k, v)
        res[(u, r)] = (out, store.rel.clone(), store.text.clone(), store.total.clone())
    return res


@pytest.mark.timeout(200)
def test_capture_ulysses_and_ring_equal_one_process(tmp_path):
    q, k, v = _inputs()
    with torch.no_grad():
        ref_out, ref = _capture(None, LAYOUT, q, k, v)
    configs = [(2, 1), (1, 2)]
    results = run_workers(_worker, 2, tmp_path, configs, timeout=180)
    for rank_res in results:
        for cfg in configs:
            out, rel, text, total = rank_res[cfg]
            assert (out - ref_out).abs().max() <= 1e-5, cfg
            assert torch.allclose(rel, ref.rel, atol=1e-9), cfg
            assert torch.allclose(text, ref.text, atol=1e-9), cfg
            assert torch.allclose(total, ref.total, atol=1e-9), cfg
