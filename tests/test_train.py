"""The training script: a short CPU run learns (validation loss falls) and writes weights, checksum, log, preview."""

import json

from dist_compact.models.embedded import load_embedded
from dist_compact.models.train import main


def test_short_training_run_learns_and_saves(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    rc = main(["--minutes", "2", "--max-steps", "40", "--batch-size", "4", "--dim", "64", "--depth", "2",
               "--heads", "2", "--frames", "4", "--height", "16", "--width", "16", "--lr", "3e-3",
               "--warmup", "5", "--ema", "0.9", "--log-every", "10", "--val-every", "20", "--val-batch", "8",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    log = json.loads((tmp_path / "tiny.train.json").read_text())
    val = [v["loss"] for v in log["val"]]
    assert len(val) >= 2 and val[-1] < 0.8 * val[0], val
    assert log["train"][-1]["step"] == 40
    model = load_embedded(out)  # checksum verified
    assert (model.config.dim, model.config.frames, model.config.height) == (64, 4, 16)
    assert (tmp_path / "tiny.preview.png").read_bytes()[:4] == b"\x89PNG"
    assert "final save" in capsys.readouterr().out
