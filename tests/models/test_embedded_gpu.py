"""The GPU-scale embedded model that ships beside the tiny one: its config file, its weights (size,
dtype, checksum, shape of the model they describe), its FLOP share, loading and a forward on the CPU,
the refusal of a corrupt copy, and generate.py's one line on a machine without a GPU."""

import os
import shutil

import pytest
import torch

from dist_compact.run.loader import load_run_config
from dist_compact.models.embedded import (WeightsError, load_embedded, sha256_of, shipped_weights)
from helpers import video_writers_installed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "models", "embedded-gpu.yaml")
WEIGHTS = shipped_weights("embedded-gpu")


def test_config_selects_the_gpu_model_at_its_shape():
    cfg = load_run_config([CONFIG])
    mc = cfg.model
    assert (mc.name, mc.kind, mc.path) == ("embedded-gpu", "embedded", None)
    assert (mc.frames, mc.height, mc.width) == (16, 128, 128)
    assert mc.tile[0] * mc.tile[1] * mc.tile[2] == 128  # blocks of 128: the Hopper kernel's
    assert cfg.sparsity.mode != "dense"


@pytest.fixture(scope="module")
def model():
    return load_embedded(WEIGHTS)  # sha256-checked


def test_weights_are_small_bf16_and_checksummed(model):
    assert WEIGHTS.is_file() and os.path.getsize(WEIGHTS) <= 48 * 10**6
    digest = (WEIGHTS.parent / (WEIGHTS.name + ".sha256")).read_text().split()[0]
    assert sha256_of(WEIGHTS) == digest
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_model_shape_and_flop_share(model):
    c = model.config
    layout = model.video_layout(c.frames, c.height, c.width, (2, 8, 8))
    assert layout.video_tokens >= 16384 and layout.video_tokens == 16 * 32 * 32
    assert c.head_dim == 128 and c.heads % 4 == 0
    flops = c.forward_flops()
    assert flops["video_tokens"] == layout.video_tokens
    assert flops["attention_share"] >= 0.75, flops
    # the formula itself, on the tiny model's known shape: 2,316 tokens, width 192, 8 blocks, MLP 4x
    tiny = load_embedded().config.forward_flops()
    S, d = 2316, 192
    assert tiny["attention"] == 8 * 4 * S * S * d
    assert tiny["linear"] == 8 * 2 * S * 12 * d * d + 4 * 2304 * 48 * d


def test_forward_on_cpu_at_a_small_size(model):
    """The weights drive the same network on any size: block order (any tile) equals the plain forward."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 32, 32, generator=g)
    t = torch.tensor([0.7])
    text = model.tokenizer.batch(["a red square moving left"])
    with torch.no_grad():
        plain = model.forward_plain(x, t, text)
        ordered = model(x, t, text)
    assert plain.shape == x.shape and torch.isfinite(plain).all()
    assert (ordered - plain).abs().max() <= 1e-4 * plain.abs().max()
    assert c.depth * c.heads >= 4


def test_a_corrupt_copy_is_refused(tmp_path):
    bad = tmp_path / "embedded-gpu.safetensors"
    shutil.copy(WEIGHTS, bad)
    shutil.copy(str(WEIGHTS) + ".sha256", str(bad) + ".sha256")
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_embedded(bad)


def test_generate_on_a_cpu_names_the_cpu_default(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_main", os.path.join(ROOT, "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    # the README's GPU demo command, as written there, on this CPU
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("<!-- gpu-demo-command -->", 1)[1].split("```")[1].strip()
    words = block.split()
    assert words[:2] == ["python", "generate.py"] and "--compare-dense" in words
    args = [os.path.join(ROOT, w) if w.startswith("configs/") else w for w in words[2:]]
    video = [] if video_writers_installed() else ["--run.video", "false"]  # no [video] extra here
    rc = generate.main(args + ["--cluster.device", "cpu", "--output-dir", str(tmp_path), *video])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert "16,384 video tokens" in err[0] and "python generate.py" in err[0]
    assert not os.listdir(tmp_path)
