"""Compact Attention patterns: config -> BlockIndex exact against a token-level brute force."""

import json
import random

import pytest
import torch

from dist_compact import BlockIndex, VideoLayout
from dist_compact.patterns import CompactConfig, FrameGroup, HeadPattern, Window, cover_windows, merge_union
from dist_compact.reference import token_mask
from dist_compact.search.config_file import config_to_dict, load_config, save_config
from helpers import random_config, random_window

LAYOUTS = [
    VideoLayout(5, 9, 11, tile=(1, 4, 4)),                                                   # ragged h, w
    VideoLayout(5, 9, 11, tile=(1, 4, 4), text_tokens=13, text_position="before"),
    VideoLayout(5, 9, 6, tile=(2, 4, 8), text_tokens=70, slab_multiple=2),                    # ragged t + pad slab
    VideoLayout(7, 6, 10, tile=(2, 4, 4), text_tokens=5, text_position="after", slab_multiple=3),
    VideoLayout(1, 3, 3, tile=(1, 4, 4)),                                                    # one tile
]


def _lid(lay):
    return f"{lay.frames}x{lay.height}x{lay.width}-t{''.join(map(str, lay.tile))}-txt{lay.text_tokens}-sm{lay.slab_multiple}"


def brute_force_mask(pattern: HeadPattern, lay: VideoLayout) -> torch.Tensor:
    """bool [P, P] over block-order positions from token coordinates only (no blocks, no bins)."""
    pos = lay.token_positions()
    valid = lay.token_valid()
    video = pos[:, 0] >= 0
    text = valid & ~video
    tt, th, tw = lay.tile
    tile = torch.stack([pos[:, 0] // tt, pos[:, 1] // th, pos[:, 2] // tw], 1)
    d = (tile[:, None, :] - tile[None, :, :]).abs()
    allowed = torch.zeros(d.shape[:2], dtype=torch.bool)
    for g in pattern.groups:
        in_g = d[..., 0] >= g.lo
        if g.hi is not None:
            in_g &= d[..., 0] <= g.hi
        for w in g.windows:
            ok = in_g.clone()
            if w.rows is not None:
                ok &= d[..., 1] <= w.rows
            if w.cols is not None:
                ok &= d[..., 2] <= w.cols
            allowed |= ok
    allowed &= video[:, None] & video[None, :]
    allowed |= (text[:, None] & valid[None, :]) | (valid[:, None] & text[None, :])
    return allowed & valid[:, None] & valid[None, :]


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("make,msg", [
    (lambda: Window(-1, 0), "Window.rows"),
    (lambda: Window(0, 1.5), "Window.cols"),
    (lambda: FrameGroup(-1, 2), "FrameGroup.lo"),
    (lambda: FrameGroup(3, 2), "FrameGroup.hi"),
    (lambda: FrameGroup(0, 1, (Window(1, 1),) * 3), "at most 2"),
    (lambda: HeadPattern((FrameGroup(0, 2, (Window(1, 1),)), FrameGroup(2, 3, (Window(0, 0),)))), "disjoint"),
    (lambda: HeadPattern((FrameGroup(0, None, (Window(1, 1),)), FrameGroup(5, 6, ()))), "disjoint"),
    (lambda: HeadPattern((FrameGroup(1, 3, (Window(1, 1),)),)), "distance 0"),
    (lambda: HeadPattern((FrameGroup(0, 0, ()), FrameGroup(1, 3, (Window(1, 1),)))), "distance 0"),
    (lambda: HeadPattern(()), "non-empty"),
    (lambda: HeadPattern.parse("0: 1y1"), "bad window"),
    (lambda: HeadPattern.parse("zero: 1x1"), "bad frame group"),
    (lambda: CompactConfig(((HeadPattern.dense(),), (HeadPattern.dense(),) * 2)), "layer 1 has 2 heads"),
    (lambda: CompactConfig(((HeadPattern.dense(),),), grid=(4, 4, 4)), "both grid and tile"),
    (lambda: CompactConfig(((HeadPattern.dense(),),), tau=-1), "tau"),
    (lambda: CompactConfig(()), "at least one layer"),
], ids=["win-neg", "win-float", "grp-lo", "grp-hi", "grp-3win", "overlap", "after-open", "no-d0", "empty-d0",
        "no-groups", "parse-win", "parse-grp", "ragged-heads", "grid-no-tile", "tau", "no-layers"])
def test_invalid_input_is_refused(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_text_form_roundtrip_and_queries():
    p = HeadPattern.parse("0: 2x2; 1-3: 0x* + 1x0; 5+: -")
    assert str(p) == "0: 2x2; 1-3: 0x* + 1x0; 5+: -"
    assert HeadPattern.parse(str(p)) == p
    assert p.windows_at(0) == (Window(2, 2),) and p.windows_at(4) == () and p.windows_at(9) == ()
    assert p.max_distance() == 3
    assert HeadPattern.parse("0: 1x1; 1+: 0x0").max_distance() is None
    assert HeadPattern.dense().max_distance() is None
    per, tail = p.to_distances(6)
    assert HeadPattern.from_distances(per, tail).to_distances(6) == (per, tail)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("lay", LAYOUTS, ids=[_lid(x) for x in LAYOUTS])
def test_index_is_exact_against_token_brute_force(lay):
    cfg = random_config(100 + LAYOUTS.index(lay), layers=2, heads=4)
    for layer in range(2):
        idx = cfg.index_for(layer, lay, 4)
        assert idx.shape == (1, 4, lay.num_blocks, lay.num_blocks) and idx.block_size == lay.block_size
        bv = lay.block_valid()
        P = lay.padded_len
        tm = token_mask(idx, P, P, bv, bv)[0]
        for h in range(4):
            want = brute_force_mask(cfg.patterns[layer][h], lay)
            assert torch.equal(tm[h], want), f"layer {layer} head {h} {cfg.patterns[layer][h]}"
        # empty padding blocks: no row, never a key; rows are sorted, padded with -1
        empty = bv == 0
        dense = idx.to_dense()[0]
        assert not dense[:, empty].any() and not dense[:, :, empty].any()
        assert idx.equal(BlockIndex.from_dense(dense.unsqueeze(0), lay.block_size))
        used = idx.entry_mask()
        assert bool((idx.indices[..., 1:] > idx.indices[..., :-1])[used[..., 1:]].all())
        assert bool((idx.indices[~used] == -1).all())


def test_index_for_caches_and_checks():
    lay = LAYOUTS[2]
    cfg = random_config(3, layers=2, heads=3)
    a = cfg.index_for(1, lay, 3)
    assert cfg.index_for(1, lay, 3) is a
    assert cfg.index_for(1, lay.with_(slab_multiple=1), 3) is not a
    with pytest.raises(ValueError, match="3 heads per layer but the model asks for 4"):
        cfg.index_for(0, lay, 4)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        cfg.index_for(2, lay, 3)
    with pytest.raises(TypeError, match="VideoLayout"):
        cfg.block_mask(0, "not a layout")
    small = CompactConfig(cfg.patterns, cache_size=1)
    small.index_for(0, lay, 3)
    small.index_for(1, lay, 3)
    assert len(small._cache) == 1


def test_bounded_temporal_window_skips_far_key_shards():
    """A head that looks at most w slabs away never needs key shards further away (ring path)."""
    lay = VideoLayout(8, 8, 8, tile=(1, 4, 4), text_tokens=16)
    cfg = CompactConfig.uniform(1, 2, HeadPattern.parse("0: 1x1; 1: 0x0"))
    assert cfg.max_distance(0) == 1
    idx = cfg.index_for(0, lay, 2)
    per_slab = lay.blocks_per_slab
    shard = 2 * per_slab  # two slabs per ring shard
    for q in range(0, lay.num_video_blocks, shard):
        rows = idx.select_rows(q, q + shard)
        for k in range(0, lay.num_video_blocks, shard):
            needed = rows.select_keys(k, k + shard).nnz() > 0
            assert needed == (abs(q - k) <= shard), (q, k)
    # a head pattern whose far group is explicitly empty reads the same
    assert HeadPattern.parse("0: 1x1; 1: 0x0; 2+: -").max_distance() == 1


# ------------------------------------------------------------------------------------------ union / cover
def _region(ws, n=7):
    r = torch.arange(n).view(-1, 1)
    c = torch.arange(n).view(1, -1)
    out = torch.zeros(n, n, dtype=torch.bool)
    for w in ws:
        out |= (r <= (n if w.rows is None else w.rows)) & (c <= (n if w.cols is None else w.cols))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_cover_windows_is_a_superset(seed):
    rng = random.Random(seed)
    ws = [random_window(rng, 6, 6) for _ in range(rng.randrange(1, 6))]
    cov = cover_windows(ws)
    assert 1 <= len(cov) <= 2
    assert bool((_region(cov) >= _region(ws)).all())
    if len({w for w in ws if not any(o != w and o.covers(w) for o in ws)}) <= 2:
        assert torch.equal(_region(cov), _region(ws))  # exact when two windows suffice


@pytest.mark.parametrize("lay", LAYOUTS[:4], ids=[_lid(x) for x in LAYOUTS[:4]])
def test_union_keeps_every_block_of_either(lay):
    a, b, c = random_config(10), random_config(11), random_config(12)
    u = merge_union([a, b, c])
    for layer in range(a.num_layers):
        ma, mb, mc, mu = (x.block_mask(layer, lay) for x in (a, b, c, u))
        assert bool((mu >= (ma | mb | mc)).all())
    # when two windows suffice the union is exact
    x = CompactConfig.uniform(1, 1, HeadPattern.parse("0: 1x1; 1: 0x0"))
    y = CompactConfig.uniform(1, 1, HeadPattern.parse("0: 2x0; 2+: 0x1"))
    assert str(x.union(y).patterns[0][0]) == "0: 1x1 + 2x0; 1: 0x0; 2+: 0x1"
    assert torch.equal(x.union(y).block_mask(0, lay), x.block_mask(0, lay) | y.block_mask(0, lay))


def test_union_refuses_mismatch():
    a = random_config(1, layers=2, heads=3)
    with pytest.raises(ValueError, match="differ in shape"):
        merge_union([a, random_config(2, layers=2, heads=2)])
    with pytest.raises(ValueError, match="different grids"):
        merge_union([a, CompactConfig(a.patterns, grid=(4, 8, 8), tile=(1, 4, 4))])
    with pytest.raises(ValueError, match="different models"):
        merge_union([CompactConfig(a.patterns, model="x"), CompactConfig(a.patterns, model="y")])


# ------------------------------------------------------------------------------------------ rescaling
@pytest.mark.parametrize("n,m", [(5, 5), (5, 10), (6, 3), (10, 7), (4, 13)])
def test_rescale_rule_keeps_axis_share(n, m):
    src, dst = (4, n, n), (4, m, m)
    for a in range(n - 1):
        p = HeadPattern.window(a, a).rescaled(src, dst)
        (w,) = p.windows_at(0)
        if w.rows is None:
            assert (2 * (m - 2) + 1) * n < (2 * a + 1) * m or m <= 1  # only whole when m-2 would be too small
            continue
        assert (2 * w.rows + 1) * n >= (2 * a + 1) * m  # covers at least the same share
        assert w.rows == 0 or (2 * w.rows - 1) * n < (2 * a + 1) * m  # and is the smallest that does
    if m != n:  # on another grid, an extent reaching the whole axis stays whole
        assert HeadPattern.window(None, n - 1).rescaled(src, dst).windows_at(0) == (Window(None, None),)


def test_rescale_frame_groups_and_identity():
    p = HeadPattern.parse("0: 2x2; 1-3: 0x* + 1x0; 4+: -")
    assert p.rescaled((6, 5, 5), (6, 5, 5)) is p
    assert str(p.rescaled((6, 5, 5), (12, 10, 10))) == "0-1: 5x5; 2-7: 1x* + 3x1"
    assert str(p.rescaled((6, 5, 5), (3, 3, 3))) == "0: 0x* + 1x1; 1: 0x* + 1x0"
    # a config searched on one grid applies to another layout through index_for
    cfg = CompactConfig.uniform(1, 2, p, grid=(6, 20, 20), tile=(1, 4, 4))
    lay = VideoLayout(12, 40, 40, tile=(1, 4, 4))
    assert torch.equal(cfg.relative_mask(0, (12, 10, 10))[0], p.rescaled((6, 5, 5), (12, 10, 10)).relative_mask((12, 10, 10)))
    assert cfg.index_for(0, lay, 2).num_q_blocks == lay.num_blocks
    assert cfg.max_distance(0, lay) == 7 and cfg.max_distance(0) == 3


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_roundtrip(tmp_path, suffix):
    cfg = random_config(5, layers=3, heads=2, model="tiny-dit", grid=(5, 9, 11), tile=(1, 4, 4), tau=0.9, lam=0.05)
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    back = load_config(path, model="tiny-dit", num_layers=3, num_heads=2)
    assert back == cfg
    lay = LAYOUTS[1]
    assert back.index_for(2, lay, 2).equal(cfg.index_for(2, lay, 2))
    if suffix == ".json":
        assert json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize("kw,msg", [
    (dict(model="other-dit"), "model 'tiny-dit' \\(wanted 'other-dit'\\)"),
    (dict(num_heads=24), "2 heads per layer \\(model has 24\\)"),
    (dict(num_layers=30), "3 layers \\(model has 30\\)"),
], ids=["model", "heads", "layers"])
def test_config_file_refuses_mismatch(tmp_path, kw, msg):
    path = tmp_path / "cfg.yaml"
    save_config(random_config(5, layers=3, heads=2, model="tiny-dit"), path)
    with pytest.raises(ValueError, match=msg):
        load_config(path, **kw)


def test_config_file_refuses_bad_files(tmp_path):
    cfg = random_config(5, layers=1, heads=2)
    good = config_to_dict(cfg)
    cases = [
        ({**good, "schema": "something.else"}, "not a dist_compact Compact config"),
        ({**good, "version": 99}, "schema version 99 is not supported"),
        ({**good, "num_heads": 3}, "not num_layers=1 x num_heads=3"),
        ({**good, "patterns": [["0: 1x1", "1: 1x1"]]}, "layer 0 head 1: .*distance 0"),
    ]
    for i, (d, msg) in enumerate(cases):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=msg):
            load_config(p)
    with pytest.raises(ValueError, match="must end in .yaml"):
        save_config(cfg, tmp_path / "cfg.txt")
    (tmp_path / "broken.yaml").write_text("patterns: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    # binary bytes and a folder: the message names the file (a UnicodeDecodeError named none)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'binary.yaml'}: not a text file \(byte 128 is not UTF-8\); "
                                         "give a Compact config"):
        load_config(tmp_path / "binary.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'folder.yaml'} is a directory; sparsity.compact_config takes"):
        load_config(tmp_path / "folder.yaml")


def test_relative_bins_are_offsets_and_cached():
    from dist_compact.patterns.compact import real_tile_grid, relative_bins

    lay = LAYOUTS[2]  # ragged t, a padding slab, text
    nt, nh, nw = real_tile_grid(lay)
    bins = relative_bins(lay)
    assert relative_bins(lay) is bins and relative_bins(lay, "cpu") is bins  # no rebuild or copy per call
    t = lay.tile_origin()[: nt * nh * nw] // torch.tensor(lay.tile)
    for i, j in [(0, 0), (1, 7), (nt * nh * nw - 1, 2)]:
        ds, dr, dc = (t[i] - t[j]).abs().tolist()
        assert int(bins[i, j]) == (ds * nh + dr) * nw + dc
