import pytest
import torch

from dist_compact import VideoLayout

GRIDS = [
    ((3, 5, 7), (1, 4, 4), 13, "after"),
    ((3, 5, 7), (1, 4, 4), 13, "before"),
    ((4, 8, 8), (2, 4, 8), 0, "after"),
    ((5, 9, 6), (2, 4, 8), 70, "before"),
    ((1, 1, 1), (1, 4, 4), 0, "after"),
    ((21, 30, 52), (1, 8, 8), 0, "after"),  # Wan 480p latent grid, not a multiple of the tile
    ((7, 3, 5), (4, 4, 8), 300, "after"),   # tile larger than the grid in h and w
]


def _ids(p):
    (t, h, w), tile, text, pos = p
    return f"{t}x{h}x{w}-tile{'x'.join(map(str, tile))}-text{text}{pos[0]}"


@pytest.mark.parametrize("grid,tile,text,pos", GRIDS, ids=[_ids(g) for g in GRIDS])
def test_roundtrip_and_coordinates(grid, tile, text, pos):
    lay = VideoLayout(*grid, tile=tile, text_tokens=text, text_position=pos)
    S = lay.seq_len
    x = torch.randn(2, S, 3)
    y = lay.to_blocks(x)
    assert y.shape == (2, lay.padded_len, 3)
    assert torch.equal(lay.from_blocks(y), x)
    # padding is zero and the valid mask marks exactly the real tokens
    valid = lay.token_valid()
    assert int(valid.sum()) == S
    assert torch.all(y[:, ~valid] == 0)
    perm = lay.permutation()
    assert perm.unique().numel() == S and bool(valid[perm].all())
    # every video token sits in the tile that contains its (frame, row, col), valid tokens first
    T, H, W = grid
    pos3 = lay.token_positions()
    f = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
    r = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
    c = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
    vid = perm[lay.text_offset: lay.text_offset + lay.video_tokens]
    assert torch.equal(pos3[vid], torch.stack([f, r, c], 1))
    blk = vid // lay.block_size
    origin = lay.tile_origin()[blk]
    coords = torch.stack([f, r, c], 1)
    assert bool(((coords >= origin) & (coords < origin + torch.tensor(tile))).all())
    assert bool(((vid % lay.block_size) < lay.block_valid()[blk]).all())
    # text tokens occupy the blocks after the video blocks, in order
    txt = perm[:text] if pos == "before" else perm[lay.video_tokens:]
    assert torch.equal(txt, lay.video_padded_len + torch.arange(text))
    assert int(lay.block_valid().sum()) == S
    assert lay.is_text_block().sum() == lay.num_text_blocks


def test_slab_multiple_pads_empty_slabs():
    lay = VideoLayout(5, 6, 6, tile=(2, 4, 8), slab_multiple=4, text_tokens=3)
    assert lay.num_slabs == 4  # ceil(5/2) = 3 slabs -> padded to 4
    bv = lay.block_valid()
    per_slab = lay.blocks_per_slab
    assert torch.all(bv[3 * per_slab: 4 * per_slab] == 0)
    assert int(bv.sum()) == lay.seq_len
    x = torch.randn(1, lay.seq_len, 2)
    assert torch.equal(lay.from_blocks(lay.to_blocks(x)), x)
    assert lay.slab_of_block()[-1] == -1


def test_layout_equality_and_repr():
    a = VideoLayout(3, 5, 7, tile=[1, 4, 4])
    b = VideoLayout(3, 5, 7, tile=(1, 4, 4))
    assert a == b and hash(a) == hash(b)
    assert a != a.with_(text_tokens=2)
    assert "3x5x7" in repr(a)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(frames=0, height=4, width=4), "frames"),
        (dict(frames=2, height=4, width=4, tile=(2, 2, 2)), "block size"),
        (dict(frames=2, height=4, width=4, tile=(1, 4)), "three positive"),
        (dict(frames=2, height=4, width=4, text_tokens=-1), "text_tokens"),
        (dict(frames=2, height=4, width=4, text_position="middle"), "text_position"),
        (dict(frames=2, height=4, width=4, slab_multiple=0), "slab_multiple"),
    ],
)
def test_layout_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        VideoLayout(**kwargs)


def test_wrong_length_is_refused():
    lay = VideoLayout(2, 4, 4, tile=(1, 4, 4))
    with pytest.raises(ValueError, match="expected 32 tokens"):
        lay.to_blocks(torch.zeros(1, 31, 2))
    with pytest.raises(ValueError, match="expected"):
        lay.from_blocks(torch.zeros(1, 31, 2))


@pytest.mark.parametrize("grid,tile,text,pos", GRIDS, ids=[_ids(g) for g in GRIDS])
def test_has_padding_matches_block_valid(grid, tile, text, pos):
    lay = VideoLayout(*grid, tile=tile, text_tokens=text, text_position=pos)
    assert lay.has_padding == bool((lay.block_valid() < lay.block_size).any())
    padded = lay.with_(slab_multiple=lay.num_slabs + 1)
    assert padded.has_padding and bool((padded.block_valid() < padded.block_size).any())
