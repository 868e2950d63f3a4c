"""`dist-compact-search capture` records block-mass files from dense runs of the main job's
model, and `search` turns them into a config the main job can load."""

import pytest
import torch

from dist_compact.cli.search import main
from dist_compact.search.capture import MassStore
from dist_compact.search.config_file import load_config


@pytest.mark.timeout(300)
def test_capture_then_search(tmp_path):
    """The shipped model at 4 frames (4 x 12 x 12 tokens; its 16 frames cost 16x the attention work on a CPU):
    the README's compact-search block runs the same commands at this size (tests/test_readme.py)."""
    pytest.importorskip("safetensors")
    out = tmp_path / "cap"
    rc = main(["capture", "--out-dir", str(out), "--prompt", "a red square moving left",
               "--prompt", "a blue circle bouncing", "--capture-steps", "1",
               "--", "--steps", "2", "--run.guidance", "1.0", "--model.frames", "4",
               "--cluster.device", "cpu", "--run.attn_backend", "torch", "--run.video", "false"])
    assert rc == 0
    # the dense runs' clips are kept beside the capture, one run folder per prompt
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["capture-0", "capture-1"]
    stores = [MassStore.load(out / f"mass_{i}.pt") for i in range(2)]
    for s in stores:
        assert s.num_layers == 8 and s.num_heads == 6 and s.model == "embedded"
        assert int(s.samples.min()) >= 1  # every layer recorded the captured step
        # each captured query row's mass sums to 1 over all key blocks: totals are token counts
        assert torch.all(s.total > 0)
    assert not torch.allclose(stores[0].rel, stores[1].rel), "two prompts, two different captures"
    cfg_path = tmp_path / "compact.yaml"
    assert main(["search", str(out / "mass_0.pt"), str(out / "mass_1.pt"), "--out", str(cfg_path),
                 "--tau", "0.9", "--device", "cpu"]) == 0
    cfg = load_config(str(cfg_path), model="embedded", num_layers=8, num_heads=6)
    assert cfg.num_layers == 8
    with pytest.raises(ValueError, match="heads"):
        load_config(str(cfg_path), model="embedded", num_layers=8, num_heads=7)


@pytest.mark.parametrize("model", ["configs/models/hunyuanvideo-random.yaml", "configs/models/wan2.1-t2v-14b-random.yaml"])
def test_capture_refuses_other_models_up_front(tmp_path, model, capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / model
    assert main(["capture", "--out-dir", str(tmp_path), "--prompt", "x", "--", "--config", str(cfg)]) == 2
    assert "runs the embedded model, not model.kind 'random'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
