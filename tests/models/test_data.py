"""Procedural training videos: deterministic by seed, in range, prompts that say what the video shows."""

import pytest
import torch

from dist_compact.models.data import (
    COLORS,
    MOTIONS,
    SHAPES,
    VOCAB,
    make_batch,
    prompt_of,
    render,
    sample_scenes,
    scenes_from_prompt,
)
from dist_compact.models.embedded import WordTokenizer


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_deterministic_by_seed():
    a, pa = make_batch(6, _gen(3), frames=8, height=32, width=32)
    b, pb = make_batch(6, _gen(3), frames=8, height=32, width=32)
    c, pc = make_batch(6, _gen(4), frames=8, height=32, width=32)
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c)


def test_shape_and_range():
    v, prompts = make_batch(5, _gen(0), frames=6, height=40, width=24)
    assert v.shape == (5, 3, 6, 40, 24) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1 and torch.isfinite(v).all()
    assert len(prompts) == 5


def test_prompts_use_the_vocabulary_and_fit_the_tokenizer():
    tok = WordTokenizer(12)
    _, prompts = make_batch(64, _gen(1))
    for p in prompts:
        assert all(w in VOCAB for w in p.split()), p
        ids = tok.encode(p)
        assert ids.shape == (12,) and int((ids != 0).sum()) == len(p.split())
    assert any(p.startswith("an orange") for p in prompt_of(sample_scenes(64, _gen(2), color=list(COLORS).index("orange"))))


def _centroids(video: torch.Tensor, rgb) -> torch.Tensor:
    """[T, 2] (x, y) centroid of the pixels of one video [3, T, H, W] with the shape's colour."""
    col = torch.tensor(rgb).view(3, 1, 1, 1) * 2 - 1
    hit = ((video - col).abs().max(0).values < 0.05).float()  # [T, H, W]
    T, H, W = hit.shape
    ys = torch.arange(H).view(1, H, 1).float()
    xs = torch.arange(W).view(1, 1, W).float()
    n = hit.sum((1, 2)).clamp(min=1)
    return torch.stack([(hit * xs).sum((1, 2)) / n, (hit * ys).sum((1, 2)) / n], 1)


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_motion_matches_the_prompt(motion):
    m = list(MOTIONS).index(motion)
    color = list(COLORS).index("red")
    scenes = sample_scenes(4, _gen(5), 16, 48, 48, color=color, motion=m, texture=0)
    videos = render(scenes, 16, 48, 48)
    for b in range(4):
        assert motion in prompt_of(scenes)[b]
        c = _centroids(videos[b], COLORS["red"])
        delta = c[-1] - c[0]
        d = MOTIONS[motion]
        if d is None:  # bouncing: the shape stays inside the frame and moves
            assert (c >= 0).all() and (c <= 48).all()
            assert (c[1:] - c[:-1]).abs().sum() > 5
        else:
            along = delta[0] * d[0] + delta[1] * d[1]
            across = delta[0] * d[1] - delta[1] * d[0]
            assert along > 5 and abs(across) < 1.5, (motion, delta)


def test_scenes_from_prompt():
    p = "a blue triangle moving up on a checkerboard"
    scenes = scenes_from_prompt(p, 3, _gen(0))
    assert prompt_of(scenes) == [p] * 3
    assert all(s == SHAPES.index("triangle") for s in scenes.shape.tolist())
    with pytest.raises(ValueError, match="more than one"):
        scenes_from_prompt("a red blue square", 1, _gen(0))


def test_bad_sizes():
    with pytest.raises(ValueError, match="height and width"):
        make_batch(1, _gen(0), frames=4, height=8, width=48)
    with pytest.raises(ValueError, match="batch"):
        sample_scenes(0, _gen(0))
