"""Offline Compact search: capture statistics, greedy search, union merge, quality report, CLI."""

import math
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from dist_compact import BlockIndex, VideoLayout
from dist_compact.sparsity.context import AttentionContext
from dist_compact.sparsity.attention_ops import AttentionOps
from dist_compact.patterns import HeadPattern
from dist_compact.png import colormap, encode_png
from dist_compact.reference import reference_attention, reference_block_mass, token_mask
from dist_compact.cli.search import main as cli_main
from dist_compact.search.capture import CaptureAttention, MassStore, reduce_block_mass
from dist_compact.search.config_file import load_config
from dist_compact.search.offline import SearchSettings, search_store, search_stores
from dist_compact.search.quality import evaluate, heatmap_image
from dist_compact.synthetic import HEAD_KINDS, synthetic_qkv

from helpers import random_config

TORCH_OPS = AttentionOps(backend="torch")


def _direct_quality(cfg, layer, lay, mass):
    """Recall / density straight from the full fp64 block-mass map and the block mask."""
    keep = cfg.block_mask(layer, lay)[0].double()  # [H, NB, NB]
    bv = lay.block_valid().double()
    m = mass.double().sum(0) * bv.view(1, -1, 1)  # token-weighted rows
    recall = (m * keep).sum(dim=(1, 2)) / m.sum(dim=(1, 2))
    ne = (bv > 0).double()
    density = (keep * ne.view(1, -1, 1) * ne.view(1, 1, -1)).sum(dim=(1, 2)) / ne.sum() ** 2
    return recall, density


# ------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("lay", [
    VideoLayout(4, 9, 7, tile=(1, 4, 4), text_tokens=21),
    VideoLayout(5, 6, 9, tile=(2, 4, 4), text_tokens=6, text_position="before", slab_multiple=2),
], ids=["ragged-text-after", "ragged-t-text-before-padslab"])
def test_capture_statistics_match_direct_computation(lay):
    torch.manual_seed(0)
    H = 3
    q, k, v = synthetic_qkv(lay, ["local", "cross", "global"], head_dim=32, batch=2, noise=0.5, seed=1)
    store = MassStore.for_layout(lay, num_layers=2, num_heads=H, model="tiny")
    attn = CaptureAttention(1, store, steps=[3])
    with torch.no_grad():
        skipped = attn(q, k, v, AttentionContext(lay, step=2, ops=TORCH_OPS))
        assert int(store.samples.sum()) == 0 and float(store.total.abs().sum()) == 0
        out = attn(q, k, v, AttentionContext(lay, step=3, ops=TORCH_OPS))
    dense = TORCH_OPS.dense(q, k, v, lay)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped, dense, rtol=1e-5, atol=1e-5)
    assert store.samples.tolist() == [0, 2]
    # golden block mass in float64 from the oracle (token-level mask, LSE)
    bv = lay.block_valid()
    P = lay.padded_len
    full = token_mask(BlockIndex.full(1, H, lay.num_blocks, lay.num_blocks, lay.block_size), P, P, bv, bv)
    _, lse = reference_attention(q.double(), k.double(), v.double(), full)
    mass = reference_block_mass(q.double(), k.double(), lse, lay.block_size, q_valid=bv, kv_valid=bv)
    n_tokens = 2 * lay.seq_len
    torch.testing.assert_close(store.total[1], torch.full((H,), float(n_tokens), dtype=torch.float64), rtol=1e-4, atol=0)
    cfg = random_config(7, layers=2, heads=H)
    rep = evaluate(cfg, store)
    recall, density = _direct_quality(cfg, 1, lay, mass)
    torch.testing.assert_close(rep.recall[1], recall, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(rep.density[1], density, rtol=0, atol=1e-12)
    assert torch.isnan(rep.recall[0]).all()


def test_reduce_is_additive_over_query_row_shards():
    """Ring ranks reduce their own query rows; the sum over ranks is the full reduction."""
    lay = VideoLayout(4, 8, 8, tile=(1, 4, 4), text_tokens=20, slab_multiple=2)
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(2, 3, lay.num_blocks, lay.num_blocks, generator=g)
    mass[..., lay.block_valid() == 0] = 0
    full = reduce_block_mass(mass, lay)
    cut = 13
    a = reduce_block_mass(mass[:, :, :cut], lay, (0, cut))
    b = reduce_block_mass(mass[:, :, cut:], lay, (cut, lay.num_blocks))
    for x, y, z in zip(full, a, b):
        torch.testing.assert_close(x, y + z, rtol=1e-12, atol=1e-9)
    # rows given as global ids with weights (a ring rank: video shard + replicated text rows)
    ids = torch.cat([torch.arange(cut), torch.arange(lay.num_video_blocks, lay.num_blocks)])
    w = torch.cat([torch.ones(cut), torch.zeros(lay.num_text_blocks)])  # text rows counted elsewhere
    c = reduce_block_mass(mass[:, :, ids], lay, ids, w)
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="does not match 18 query blocks"):
        reduce_block_mass(mass[:, :, :cut], lay)


def test_mass_store_files_and_checks(tmp_path):
    lay = VideoLayout(4, 8, 8, tile=(1, 4, 4), text_tokens=5)
    s = _random_store(lay, layers=2, heads=3, seed=0)
    s.save(tmp_path / "m.pt")
    back = MassStore.load(tmp_path / "m.pt")
    for k in ("rel", "text", "total", "samples"):
        assert torch.equal(getattr(back, k), getattr(s, k))
    assert (back.grid, back.tile, back.text_tokens, back.model) == (s.grid, s.tile, s.text_tokens, s.model)
    both = s.merged(back)
    torch.testing.assert_close(both.rel, 2 * s.rel)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a dist_compact mass file"):
        MassStore.load(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dist_compact mass file of format"):
        MassStore.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not match this MassStore"):
        s.check_layout(lay.with_(text_tokens=6))
    with pytest.raises(ValueError, match="different shapes"):
        s.merged(_random_store(lay, layers=2, heads=2, seed=0))
    # pair counts: every (query, key) video block pair exactly once
    text_pairs, total_pairs = s.block_counts()
    nbv = lay.num_video_blocks
    assert float(s.pairs().sum()) == nbv * nbv and total_pairs == lay.num_blocks ** 2
    assert text_pairs == total_pairs - nbv * nbv


@pytest.mark.parametrize("change,message", [
    (dict(rel=None), "mass file without 'rel'"),
    (dict(rel=[0.0]), "rel must be a tensor, got list"),
    (dict(grid=5), "grid must be three positive ints, got 5"),
    (dict(num_layers=10 ** 6, num_heads=10 ** 6),
     r"rel has shape \(2, 3, 4, 2, 2\), expected \(1000000, 1000000, 4, 2, 2\)"),
    (dict(grid=[4, 8, 8000]), r"rel has shape \(2, 3, 4, 2, 2\), expected \(2, 3, 4, 2, 2000\)"),
    (dict(text_tokens=-1), "text_tokens must be an int >= 0"),
    (dict(model=3), "model must be a string"),
    (dict(samples=torch.ones(2)), "samples must be an int tensor"),
    (dict(samples=torch.tensor([1, -1])), "samples holds negative counts"),
    (dict(total=torch.full((2, 3), math.inf)), "total holds NaN or infinite values"),
], ids=["no-rel", "rel-list", "grid-int", "huge-layers", "huge-grid", "text-negative", "model-int", "samples-float",
        "samples-negative", "total-inf"])
def test_mass_store_load_checks_the_file_before_sizing_a_store(tmp_path, change, message):
    lay = VideoLayout(4, 8, 8, tile=(1, 4, 4), text_tokens=5)
    d = _random_store(lay, layers=2, heads=3, seed=0).state_dict()
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'bad.pt'))}: {message}"):
        MassStore.load(tmp_path / "bad.pt")


def test_mass_store_save_writes_the_whole_file_or_nothing(tmp_path, monkeypatch):
    lay = VideoLayout(4, 8, 8, tile=(1, 4, 4), text_tokens=5)
    s = _random_store(lay, layers=2, heads=3, seed=0)
    (tmp_path / "m.pt").write_bytes(b"earlier")

    def cut(obj, path):
        open(path, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(OSError):
        s.save(tmp_path / "m.pt")
    assert os.listdir(tmp_path) == ["m.pt"] and (tmp_path / "m.pt").read_bytes() == b"earlier"


def test_write_report_writes_all_three_files_or_none(tmp_path, monkeypatch):
    import dist_compact.search.quality as quality

    lay = VideoLayout(4, 8, 8, tile=(1, 4, 4), text_tokens=5)
    s = _random_store(lay, layers=2, heads=3, seed=0)
    rep = evaluate(random_config(7, layers=2, heads=3), s)

    def full(path, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quality, "write_png", full)
    with pytest.raises(OSError):
        quality.write_report(rep, tmp_path / "a" / "rep")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    paths = quality.write_report(rep, tmp_path / "a" / "rep")
    assert sorted(os.listdir(tmp_path / "a" / "rep")) == ["quality.csv", "quality.png", "quality.txt"]
    assert paths["csv"] == str(tmp_path / "a" / "rep" / "quality.csv")


# ------------------------------------------------------------------------------------------ search
def _random_store(lay, layers=2, heads=4, seed=0, integer=False, text_share=0.05):
    """Structured random statistics: mass decaying with offset, per-head random widths and shapes."""
    g = torch.Generator().manual_seed(seed)
    s = MassStore.for_layout(lay, layers, heads, model="tiny")
    nt, nh, nw = s.tile_grid
    d = torch.arange(nt).view(-1, 1, 1).double()
    r = torch.arange(nh).view(1, -1, 1).double()
    c = torch.arange(nw).view(1, 1, -1).double()
    pairs = s.pairs()
    for li in range(layers):
        for h in range(heads):
            st, sr, sc = (0.3 + 3 * torch.rand(3, generator=g, dtype=torch.float64)).tolist()
            w = torch.exp(-(d / st) ** 2 - (r / sr) ** 2 - (c / sc) ** 2)
            if h % 2:  # a cross-shaped head
                w = w + 0.5 * torch.exp(-(d / st) ** 2) * ((r == 0) | (c == 0)).double()
            w = w * (0.5 + torch.rand(w.shape, generator=g, dtype=torch.float64)) * pairs
            if integer:  # exact sums in float64: the reference greedy sees identical numbers
                w = torch.round(w / w.max() * 1000)
            s.rel[li, h] = w
            s.text[li, h] = torch.round(w.sum() * text_share) if integer else w.sum() * text_share
            s.total[li, h] = s.rel[li, h].sum() + s.text[li, h]
    s.samples[:] = 1
    return s


LAY_SEARCH = VideoLayout(6, 20, 24, tile=(1, 4, 4), text_tokens=40)


@pytest.mark.parametrize("tau,lam,groups", [
    (0.9, None, None),
    (0.95, None, ((0, 0), (1, 2), (3, None))),
    (0.8, 0.5, None),
    (1.0, None, None),
], ids=["tau0.9", "tau0.95-groups", "tau0.8-lam0.5", "tau1"])
def test_search_keeps_recall_and_never_increases_cost(tau, lam, groups):
    store = _random_store(LAY_SEARCH, layers=2, heads=4, seed=3)
    res = search_store(store, SearchSettings(tau=tau, lam=lam, groups=groups), trace=True)
    assert bool((res.recall >= tau - 1e-12).all()), res.recall  # tau=1: full coverage, up to rounding
    # the config, re-expanded and evaluated independently, has the figures the search reports
    rep = evaluate(res.config, store)
    torch.testing.assert_close(rep.recall, res.recall, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rep.density, res.density, rtol=1e-12, atol=1e-12)
    assert bool((rep.recall >= tau - 1e-12).all())
    dt, rt = res.density_trace, res.recall_trace
    assert dt.shape[0] == rt.shape[0] >= 1 and float(dt[0].min()) == 1.0
    moved = dt[1:] != dt[:-1]
    assert bool((dt[1:] <= dt[:-1]).all()), "a greedy step increased the cost"
    assert bool((rt[1:] <= rt[:-1] + 1e-15).all())
    assert bool((res.steps == moved.sum(0)).all())  # every taken step strictly saved compute
    if tau < 1.0:
        assert float(res.density.max()) < 1.0
    if lam is not None:
        # every step taken lost at most lam recall per unit density saved
        gain = (rt[:-1] - rt[1:])[moved] / (dt[:-1] - dt[1:])[moved]
        assert float(gain.max()) <= lam + 1e-9
    if groups is not None:  # distances of one group share their windows
        for p in (p for layer in res.config.patterns for p in layer):
            assert p.windows_at(1) == p.windows_at(2)


def test_lambda_trades_density_for_recall():
    store = _random_store(LAY_SEARCH, layers=1, heads=4, seed=4)
    loose = search_store(store, SearchSettings(tau=0.0, lam=0.2))
    tight = search_store(store, SearchSettings(tau=0.0, lam=0.02))
    assert bool((tight.density >= loose.density).all()) and bool((tight.recall >= loose.recall).all())
    assert float(tight.density.mean()) > float(loose.density.mean())


def _ref_moves(s, has0):
    """The move set of the module docstring, written out case by case."""
    a_s, a_t, b_n, b_w = s
    if a_t < 0:
        return [None] * 6
    rect = a_s == a_t and b_n == b_w
    out = []
    if rect:
        out.append((a_t - 1, a_t - 1, b_w, b_w) if a_t >= 1 else None)
        out.append((a_t, a_t, b_w - 1, b_w - 1) if b_w >= 1 else None)
        out += [None, None]
        out.append((a_t - 1, a_t, b_w - 1, b_w) if a_t >= 1 and b_w >= 1 else None)
    else:
        out.append((a_s, a_s, b_w, b_w) if a_t - 1 == a_s else (a_s, a_t - 1, b_n, b_w))
        out.append((a_t, a_t, b_n, b_n) if b_w - 1 == b_n else (a_s, a_t, b_n, b_w - 1))
        out.append((a_t, a_t, b_n, b_n) if a_s == 0 else (a_s - 1, a_t, b_n, b_w))
        out.append((a_s, a_s, b_w, b_w) if b_n == 0 else (a_s, a_t, b_n - 1, b_w))
        out.append(None)
    out.append(None if has0 else (-1, -1, -1, -1))
    return out


def _ref_region(s, nh, nw):
    a_s, a_t, b_n, b_w = s
    r = torch.arange(nh).view(-1, 1)
    c = torch.arange(nw).view(1, -1)
    return ((r <= a_t) & (c <= b_n)) | ((r <= a_s) & (c <= b_w))


def _ref_greedy(rel, text, total, pairs, text_pairs, total_pairs, tau, lam):
    """Slow greedy with explicit masks, one head."""
    nt, nh, nw = rel.shape
    st = [(nh - 1, nh - 1, nw - 1, nw - 1)] * nt
    val = lambda d, s: float((rel[d] * _ref_region(s, nh, nw)).sum())  # noqa: E731
    cost = lambda d, s: float((pairs[d] * _ref_region(s, nh, nw)).sum())  # noqa: E731
    while True:
        kept = text + sum(val(d, st[d]) for d in range(nt))
        best = None
        for d in range(nt):
            for new in _ref_moves(st[d], d == 0):
                if new is None:
                    continue
                dv, dc = val(d, st[d]) - val(d, new), cost(d, st[d]) - cost(d, new)
                if dc <= 0.5 or kept - dv < tau * total * (1 + 1e-12):
                    continue
                ratio = (dv / total) / (dc / total_pairs)
                if best is None or ratio < best[0]:
                    best = (ratio, d, new)
        if best is None or (lam is not None and best[0] > lam):
            return st
        st[best[1]] = best[2]


@pytest.mark.parametrize("seed,tau,lam", [(0, 0.9, None), (1, 0.7, None), (2, 0.5, 0.8)])
def test_greedy_matches_slow_reference(seed, tau, lam):
    lay = VideoLayout(4, 12, 16, tile=(1, 4, 4), text_tokens=8)
    store = _random_store(lay, layers=1, heads=3, seed=seed, integer=True)
    res = search_store(store, SearchSettings(tau=tau, lam=lam))
    text_pairs, total_pairs = store.block_counts()
    nt, nh, nw = store.tile_grid
    for h in range(3):
        st = _ref_greedy(store.rel[0, h], float(store.text[0, h]), float(store.total[0, h]), store.pairs(),
                         text_pairs, total_pairs, tau, lam)
        per = [tuple(sorted(_ref_region(s, nh, nw).nonzero().tolist())) for s in st]
        got = res.config.patterns[0][h].relative_mask(store.tile_grid)
        assert per == [tuple(sorted(got[d].nonzero().tolist())) for d in range(nt)], f"head {h}"


def test_union_of_prompts_keeps_every_block_and_recall():
    lay = LAY_SEARCH
    stores = [_random_store(lay, layers=2, heads=3, seed=s) for s in (5, 6, 7)]
    merged, results = search_stores(stores, SearchSettings(tau=0.9))
    for r in results:
        for layer in range(2):
            assert bool((merged.block_mask(layer, lay) >= r.config.block_mask(layer, lay)).all())
    for s, r in zip(stores, results):
        assert bool((evaluate(merged, s).recall >= r.recall - 1e-12).all())
    avg, (res,) = search_stores(stores, SearchSettings(tau=0.9), merge="average")
    assert bool((res.recall >= 0.9).all())
    with pytest.raises(ValueError, match="merge must be"):
        search_stores(stores, merge="max")


def test_uncaptured_layers_stay_dense_and_settings_are_checked():
    store = _random_store(LAY_SEARCH, layers=2, heads=2, seed=1)
    store.samples[1] = 0
    store.rel[1] = 0
    store.total[1] = 0
    store.text[1] = 0
    res = search_store(store)
    assert all(p == HeadPattern.dense() for p in res.config.patterns[1])
    assert torch.isnan(res.recall[1]).all() and bool((res.density[1] == 1).all())
    for kw, msg in [(dict(tau=1.5), "tau"), (dict(lam=-1), "lam"), (dict(groups=((1, 2),)), "starting at 0"),
                    (dict(groups=((0, 1), (3, None))), "contiguous"), (dict(max_steps=-1), "max_steps")]:
        with pytest.raises(ValueError, match=msg):
            SearchSettings(**kw)
    with pytest.raises(ValueError, match="end with an open group"):
        search_store(store, SearchSettings(groups=((0, 0), (1, 2))))


def test_synthetic_heads_are_found_sparse():
    """Local, cross-shaped, temporal and global synthetic heads: density <= 0.3 at recall >= 0.9."""
    lay = VideoLayout(12, 16, 16, tile=(1, 4, 4))
    q, k, v = synthetic_qkv(lay, HEAD_KINDS, head_dim=32, noise=0.1)
    store = MassStore.for_layout(lay, 1, len(HEAD_KINDS))
    with torch.no_grad():
        CaptureAttention(0, store)(q, k, v, AttentionContext(lay, ops=TORCH_OPS))
    res = search_store(store, SearchSettings(tau=0.9))
    figures = {kind: (float(res.density[0, h]), float(res.recall[0, h])) for h, kind in enumerate(HEAD_KINDS)}
    print("synthetic (density, recall):", figures)
    for kind, (dens, rec) in figures.items():
        assert rec >= 0.9 and dens <= 0.3, (kind, dens, rec)
    pats = res.config.patterns[0]
    assert len(pats[1].windows_at(0)) == 2, f"cross head not found as a cross: {pats[1]}"
    assert pats[2].windows_at(lay.frames - 1), f"temporal head drops far frames: {pats[2]}"
    assert pats[3].max_distance() is not None and pats[3].max_distance() <= 2, f"global head: {pats[3]}"


# ------------------------------------------------------------------------------------------ report / CLI
def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_writer_roundtrip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(_decode_png(encode_png(img)), img)
    assert np.array_equal(_decode_png(encode_png(img[..., 0])), np.repeat(img[..., :1], 3, axis=2))
    cm = colormap(np.array([0.0, 1.0, math.nan]))
    assert tuple(cm[0]) == (68, 1, 84) and tuple(cm[1]) == (253, 231, 37) and tuple(cm[2]) == (255, 255, 255)
    with pytest.raises(ValueError, match="RGB"):
        encode_png(np.zeros((2, 2, 4), dtype=np.uint8))


def test_heatmap_cells_show_density_and_recall():
    store = _random_store(LAY_SEARCH, layers=3, heads=4, seed=2)
    res = search_store(store)
    rep = evaluate(res.config, store)
    img = heatmap_image(rep, cell=4)
    gap = 8
    for li, h in [(0, 0), (2, 3)]:
        y, x = gap + li * 4 + 1, gap + h * 4 + 1
        assert tuple(img[y, x]) == tuple(colormap(rep.density[li, h].numpy()))
        x2 = gap + 4 * 4 + gap + h * 4 + 1
        assert tuple(img[y, x2]) == tuple(colormap(rep.recall[li, h].numpy(), 0.8, 1.0))


def test_cli_search_and_report(tmp_path, capsys):
    lay = LAY_SEARCH
    paths = []
    for i in range(2):
        p = tmp_path / f"mass{i}.pt"
        _random_store(lay, layers=2, heads=3, seed=10 + i).save(p)
        paths.append(str(p))
    cfg = tmp_path / "cfg.yaml"
    rc = cli_main(["search", *paths, "--out", str(cfg), "--tau", "0.9", "--groups", "0,1,2-3,4+",
                   "--device", "cpu", "--report", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr().err
    config = load_config(cfg, model="tiny", num_layers=2, num_heads=3)
    assert config.grid == lay.grid and config.tau == 0.9
    img = _decode_png((tmp_path / "rep" / "quality.png").read_bytes())
    assert img.shape[2] == 3
    rows = (tmp_path / "rep" / "quality.csv").read_text().splitlines()
    assert rows[0] == "layer,head,recall,density" and len(rows) == 1 + 2 * 3
    assert min(float(r.split(",")[2]) for r in rows[1:]) >= 0.9
    rc = cli_main(["report", "--config", str(cfg), "--mass", paths[0], "--out", str(tmp_path / "rep2")])
    assert rc == 0 and (tmp_path / "rep2" / "quality.txt").exists()
    # a config for another head count is refused with a clear message
    other = tmp_path / "other.pt"
    _random_store(lay, layers=2, heads=4, seed=1).save(other)
    capsys.readouterr()
    rc = cli_main(["report", "--config", str(cfg), "--mass", str(other), "--out", str(tmp_path / "rep3")])
    assert rc == 2 and "3 heads per layer (model has 4)" in capsys.readouterr().err
