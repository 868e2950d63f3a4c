"""The motion metric: clips of the data with known motion follow their prompt; reversed, static,
teleporting, wrongly coloured and sideways clips do not."""

import pytest
import torch

from dist_compact.models.data import COLORS, MOTIONS, prompt_of, render, sample_scenes
from dist_compact.models.motion import DIRECTIONS, MotionCriteria, score_clips, score_track, summarize, track

STRAIGHT = list(DIRECTIONS)


def _clips(motion, n=6, seed=0):
    scenes = sample_scenes(n, torch.Generator().manual_seed(seed), 16, 48, 48, motion=list(MOTIONS).index(motion))
    return render(scenes), prompt_of(scenes)


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_data_follows_its_prompt(motion):
    videos, prompts = _clips(motion)
    scores = score_clips(videos, prompts)
    assert all(s.follows and s.smooth and s.visible and s.direction for s in scores), [s for s in scores if not s.follows]
    assert all(s.max_step <= 3.2 for s in scores)


def test_data_follows_on_a_large_random_batch():
    scenes = sample_scenes(200, torch.Generator().manual_seed(7))
    summary = summarize(score_clips(render(scenes), prompt_of(scenes)))
    assert summary["follows_pct"] == 100.0 and summary["clips"] == 200


def test_centroid_of_a_known_square():
    video = torch.full((1, 3, 3, 20, 30), -1.0)
    for t in range(3):  # a 4x4 red square whose top-left pixel is at (x=2+3t, y=5)
        video[0, :, t, 5:9, 2 + 3 * t:6 + 3 * t] = torch.tensor(COLORS["red"]).view(3, 1, 1) * 2 - 1
    cen, area = track(video, COLORS["red"])
    assert torch.allclose(cen[0], torch.tensor([[4.0, 7.0], [7.0, 7.0], [10.0, 7.0]]))
    assert torch.allclose(area[0], torch.full((3,), 16.0))
    cen, area = track(video, COLORS["green"])  # another colour: nothing
    assert (area == 0).all()


@pytest.mark.parametrize("motion", STRAIGHT)
def test_reversed_clip_goes_the_wrong_way(motion):
    videos, prompts = _clips(motion)
    scores = score_clips(videos.flip(2), prompts)
    assert not any(s.follows or s.direction for s in scores)
    assert all(s.smooth for s in scores)  # still smooth: only the direction is wrong
    assert all(s.travel < 0 for s in scores)


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_static_clip_does_not_move(motion):
    videos, prompts = _clips(motion)
    static = videos[:, :, :1].expand_as(videos).contiguous()
    assert not any(s.follows or s.direction for s in score_clips(static, prompts))


@pytest.mark.parametrize("motion", STRAIGHT)
def test_teleport_is_not_smooth(motion):
    """Mid-clip the object jumps back to where it started (the issue's symptom: a jump mid-clip)."""
    videos, prompts = _clips(motion, n=4)
    jumped = torch.cat([videos[:, :, :8], videos[:, :, :8]], 2)
    scores = score_clips(jumped, prompts)
    assert all(not s.smooth and not s.follows for s in scores), scores
    assert all(s.visible for s in scores)


def test_sideways_and_wrong_colour_fail():
    videos, prompts = _clips("moving left", n=4)
    sideways = [p.replace("moving left", "moving up") for p in prompts]
    assert not any(s.follows for s in score_clips(videos, sideways))
    recoloured = []
    for p in prompts:
        colour = next(c for c in COLORS if f" {c} " in f" {p} ")
        other = "cyan" if colour != "cyan" else "red"
        recoloured.append(p.replace(f" {colour} ", f" {other} ").replace("an cyan", "a cyan").replace("a orange", "an orange"))
    scores = score_clips(videos, recoloured)
    assert not any(s.follows or s.visible for s in scores)


def test_bouncing_teleport_is_not_smooth():
    x = torch.tensor([10.0 + 2.0 * t for t in range(16)])
    x[9:] += 12.0  # one 14 px step among 2 px steps
    s = score_track(torch.stack([x, torch.full((16,), 20.0)], 1), torch.full((16,), 50.0), "bouncing")
    assert s.direction and not s.smooth and not s.follows and s.max_step == pytest.approx(14.0)


def test_bouncing_must_keep_moving():
    c = torch.stack([torch.linspace(10, 12, 16), torch.full((16,), 20.0)], 1)  # 2 px in 15 frames
    s = score_track(c, torch.full((16,), 50.0), "bouncing")
    assert s.smooth and not s.direction and not s.follows
    x = torch.tensor([10.0 + 2.5 * t if t < 10 else 35.0 - 2.5 * (t - 10) for t in range(16)])  # reflects
    s = score_track(torch.stack([x, torch.full((16,), 20.0)], 1), torch.full((16,), 50.0), "bouncing")
    assert s.follows and s.median_speed == pytest.approx(2.5)


def test_criteria_are_what_decides():
    videos, prompts = _clips("moving down", n=3)
    strict = MotionCriteria(min_travel=100.0)
    assert all(s.follows for s in score_clips(videos, prompts))
    assert not any(s.follows for s in score_clips(videos, prompts, strict))


def test_bad_inputs():
    videos, prompts = _clips("moving up", n=2)
    with pytest.raises(ValueError, match="must be \\[batch, 3, frames, height, width\\]"):
        track(videos[0], COLORS["red"])
    with pytest.raises(ValueError, match="2 prompts for 1 videos"):
        score_clips(videos[:1], prompts)
    with pytest.raises(ValueError, match="must name a colour and a motion"):
        score_clips(videos, ["a red square", "a blue circle moving up"])
    with pytest.raises(ValueError, match="is not one of"):
        score_track(torch.zeros(16, 2), torch.ones(16), "spinning")
    with pytest.raises(ValueError, match="frames >= 3"):
        score_track(torch.zeros(2, 2), torch.ones(2), "bouncing")
    with pytest.raises(ValueError, match="no scores"):
        summarize([])


class _RenderingModel:
    """A stand-in velocity field whose clean-video prediction is the data's own clip of the prompt (with
    its motion word mapped by ``swap``): ``v = (x_t - x0) / t``, so the probe's ``x_t - t v`` is ``x0``."""

    def __init__(self, swap=None):
        from dist_compact.models.data import VOCAB

        self.vocab, self.swap = VOCAB, swap or {}

    def __call__(self, x, t, text):
        from dist_compact.models.data import render, scenes_from_prompt

        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            words = [self.vocab[i] for i in text[b].tolist() if i != 0]
            if not words:  # the empty prompt: predict grey
                out[b] = x[b] / t[b]
                continue
            prompt = " ".join(words)
            said = next((a for a in self.swap if a in prompt), None)  # one swap, never swapped back
            if said is not None:
                prompt = prompt.replace(said, self.swap[said])
            scenes = scenes_from_prompt(prompt, 1, torch.Generator().manual_seed(b), *x.shape[2:])
            out[b] = (x[b] - render(scenes, *x.shape[2:])[0]) / t[b]
        return out


def test_direction_probe_scores_sign_and_axis():
    from dist_compact.models.embedded import WordTokenizer
    from dist_compact.models.motion import direction_probe

    tok = WordTokenizer(12)
    kw = dict(guidance=1.0, seeds=(0,), colours=("red", "cyan"))
    right = direction_probe(_RenderingModel(), tok, 16, 48, 48, **kw)
    assert right["right_way_pct"] == 100.0 and right["axis_pct"] == 100.0 and right["clips"] == 8
    assert set(right["per_motion"]) == set(DIRECTIONS)
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}
    rev = direction_probe(_RenderingModel({f"moving {a}": f"moving {b}" for a, b in flipped.items()}), tok, 16, 48,
                          48, **kw)
    assert rev["right_way_pct"] == 0.0 and rev["axis_pct"] == 100.0  # the axis without the sign
    blind = direction_probe(_RenderingModel({"moving right": "moving left", "moving down": "moving up"}), tok, 16,
                            48, 48, **kw)
    assert blind["right_way_pct"] == 50.0 and blind["per_motion"]["moving right"] == 0.0
    with pytest.raises(ValueError, match="colour 'pink'"):
        direction_probe(_RenderingModel(), tok, 16, 48, 48, colours=("pink",))
    with pytest.raises(ValueError, match="t must be in"):
        direction_probe(_RenderingModel(), tok, 16, 48, 48, t=0.0)
