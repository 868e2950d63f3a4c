"""The embedded DiT: shapes, the exactness of its block-order forward under an install, the tokenizer, the
weights file."""

import os

import pytest
import torch

from dist_compact import SparsityConfig, installed, sparsify, unsparsify
from dist_compact.models.embedded import (
    DEFAULT_WEIGHTS,
    EmbeddedConfig,
    EmbeddedDiT,
    WeightsError,
    WordTokenizer,
    load_embedded,
    rope_tables,
    save_embedded,
    sha256_of,
)
from dist_compact.sparsity.context import DenseAttention

SMALL = dict(dim=64, depth=2, heads=2, rope_split=(8, 12, 12), frames=4, height=16, width=16)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = EmbeddedDiT(EmbeddedConfig(**{**SMALL, **kw}))
    # the adaLN-Zero layers start at zero; randomise them so every path carries signal
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return m.eval()


def _inputs(m, B=2, frames=4, height=16, width=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, frames, height, width, generator=g)
    t = torch.rand(B, generator=g)
    text = m.tokenizer.batch(["a red square moving left", ""][:B] + ["a blue circle bouncing"] * (B - 2))
    return x, t, text


@pytest.mark.parametrize(
    "frames,height,width,tile",
    [(4, 16, 16, (2, 4, 4)), (4, 16, 16, (1, 4, 8)), (3, 20, 12, (2, 4, 4)), (5, 24, 28, (4, 2, 4))],
    ids=["even-2x4x4", "ragged-w-1x4x8", "ragged-all-2x4x4", "ragged-t-4x2x4"],
)
def test_block_order_forward_equals_plain_forward(frames, height, width, tile):
    """The ONE permutation per forward is exact: dense attention installed (block order) == the stock
    model-order SDPA forward; removing the install gives the stock forward back."""
    m = _model()
    x, t, text = _inputs(m, frames=frames, height=height, width=width)
    with torch.no_grad():
        stock = m(x, t, text)
        sparsify(m, SparsityConfig(mode="dense"), tile=tile, backend="torch")
        out = m(x, t, text)
        ref = m.forward_plain(x, t, text)  # the stock network whatever is installed
        assert installed(m).layout == m.video_layout(frames, height, width, tile)
        unsparsify(m)
        back = m(x, t, text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(stock, ref) and torch.equal(back, ref)


def test_attention_is_called_in_block_order_with_the_context():
    m = _model()
    x, t, text = _inputs(m)
    layout = m.video_layout(4, 16, 16, (2, 4, 4))
    seen = []

    class Spy(DenseAttention):
        def __call__(self, q, k, v, ctx):
            seen.append((self.layer, tuple(q.shape), ctx.step, ctx.layout))
            return super().__call__(q, k, v, ctx)

    sparsify(m, SparsityConfig(mode="dense"), tile=(2, 4, 4), backend="torch",
             attention_factory=lambda n, s, c, sp: [Spy(i) for i in range(n)])
    installed(m).state.begin(5)
    installed(m).state.step = 3
    with torch.no_grad():
        m(x, t, text)
    assert seen == [(0, (2, layout.padded_len, 2, 32), 3, layout), (1, (2, layout.padded_len, 2, 32), 3, layout)]


def test_bad_inputs():
    m = _model()
    x, t, text = _inputs(m)
    with torch.no_grad():
        with pytest.raises(ValueError, match="multiple of the model's patch"):
            m(torch.randn(2, 3, 4, 18, 16), t, text)
        with pytest.raises(ValueError, match="text must be int64"):
            m(x, t, text[:, :5])
    with pytest.raises(TypeError, match="processor must be callable"):
        m.blocks[0].set_processor(None)
    with pytest.raises(ValueError, match="attention factory gave 1 callables for 2 layers"):
        sparsify(m, SparsityConfig(mode="dense"), attention_factory=lambda n, s, c, sp: [DenseAttention(0)])
        with torch.no_grad():
            m(x, t, text)
    with pytest.raises(ValueError, match="head_dim"):
        EmbeddedConfig(dim=96, heads=2)


def test_rope_identity_for_text_positions():
    pos = torch.tensor([[0, 0, 0], [3, 2, 1], [-1, -1, -1]])
    cos, sin = rope_tables(pos, (8, 12, 12), 1000.0)
    assert cos.shape == (3, 16)
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[2], torch.zeros(16))
    assert not torch.equal(cos[1], torch.ones(16))


def test_tokenizer():
    tok = WordTokenizer(6)
    ids = tok.encode("A red square, moving left.")
    assert ids.tolist()[5] == 0 and (ids[:5] > 0).all()
    assert tok.encode("").eq(0).all()
    with pytest.raises(ValueError, match="does not know the word"):
        tok.encode("a red dog")
    with pytest.raises(ValueError, match="at most 6"):
        tok.encode("a red square moving left on stripes")


def test_weights_roundtrip_and_checksum(tmp_path):
    m = _model()
    path = tmp_path / "w.safetensors"
    digest = save_embedded(m, path)
    assert digest == sha256_of(path)
    assert (tmp_path / "w.safetensors.sha256").read_text().split()[0] == digest
    m2 = load_embedded(path)
    x, t, text = _inputs(m)
    with torch.no_grad():
        assert torch.equal(m.forward_plain(x, t, text), m2.forward_plain(x, t, text))
    assert m2.config == m.config


def test_weights_refused_when_corrupt_or_missing(tmp_path):
    m = _model()
    path = tmp_path / "w.safetensors"
    save_embedded(m, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_embedded(path)
    with pytest.raises(WeightsError, match="not found"):
        load_embedded(tmp_path / "missing.safetensors")
    os.remove(tmp_path / "w.safetensors.sha256")
    with pytest.raises(WeightsError, match="checksum file missing"):
        load_embedded(path)


def test_weights_paths_that_are_not_plain_files_are_one_line(tmp_path):
    m = _model()
    path = tmp_path / "w.safetensors"
    save_embedded(m, path)
    checksum = tmp_path / "w.safetensors.sha256"
    checksum.write_bytes(b"\x8a\xff" * 40)  # binary, not '<hex>  <name>'
    with pytest.raises(WeightsError, match=r"checksum file .*w\.safetensors\.sha256 is malformed"):
        load_embedded(path)
    checksum.unlink()
    checksum.mkdir()
    with pytest.raises(WeightsError, match=r"checksum file .*w\.safetensors\.sha256: a directory; it must be a text file"):
        load_embedded(path)
    with pytest.raises(WeightsError, match=r"model weights /dev/null: not a regular file"):
        load_embedded("/dev/null")
    with pytest.raises(WeightsError, match=r"a name in the path is longer than the file system takes \(255 bytes\); "
                                           r"choose a shorter name$"):
        load_embedded(tmp_path / ("x" * 300 + ".safetensors"))


def test_a_block_number_that_is_not_ascii_digits_is_a_shape_error(tmp_path):
    """'blocks.\u00b2.x' (a digit to str.isdigit, not to int): the file does not match its model."""
    from safetensors.torch import load_file, save_file

    m = _model()
    path = tmp_path / "w.safetensors"
    save_embedded(m, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["blocks.\u00b2.extra"] = torch.zeros(1)
    save_file(tensors, str(path), metadata=meta)
    (tmp_path / "w.safetensors.sha256").write_text(f"{sha256_of(path)}  w.safetensors\n")
    with pytest.raises(WeightsError, match=r"do not match the model of its metadata \(missing \[\], unexpected "
                                           r"\['blocks\.\u00b2\.extra'\]"):
        load_embedded(path)


def test_shipped_weights_load_and_are_small():
    assert DEFAULT_WEIGHTS.is_file(), "the embedded model's weights must ship with the package"
    assert DEFAULT_WEIGHTS.stat().st_size <= 20 * 2 ** 20
    m = load_embedded()
    assert isinstance(m, EmbeddedDiT) and not m.training
    cfg = m.config
    x = torch.zeros(1, 3, cfg.patch[0] * 2, cfg.patch[1] * 2, cfg.patch[2] * 2)
    with torch.no_grad():
        out = m.forward_plain(x, torch.ones(1), m.tokenizer.batch(["a red square moving left"]))
    assert torch.isfinite(out).all()


def _hostile_weights(tmp_path, name, tensors, config_text):
    """A weights file with a valid checksum (so the checks behind it are reached) and any metadata."""
    import safetensors.torch as st

    from dist_compact.models.embedded import _FORMAT

    path = tmp_path / f"{name}.safetensors"
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                 metadata={"format": _FORMAT, "config": config_text})
    (tmp_path / f"{name}.safetensors.sha256").write_text(f"{sha256_of(path)}  {path.name}\n")
    return path


def test_hostile_weights_metadata_and_shapes_are_one_clear_error(tmp_path, monkeypatch):
    """Metadata that is not JSON, a list, a string rope_theta, a model larger than the tensors (refused
    before any parameter is allocated), a tensor of the wrong shape: each one WeightsError line."""
    import json

    m = _model()
    sd = m.state_dict()
    cfg = json.loads(m.config.to_json())
    wrong = dict(sd, **{"patch_embed.weight": torch.zeros(3, 3)})
    redo = r"; re-train it or re-download the file$"
    cases = [
        ("notjson", sd, "{depth: 2", r"its metadata does not describe a model \(EmbeddedConfig: the config is not JSON"),
        ("list", sd, "[64, 2]", r"the config must be a JSON object of fields, got a list"),
        ("theta", sd, json.dumps({**cfg, "rope_theta": "1000"}), r"rope_theta must be a finite number > 1, got '1000'"),
        ("deep", sd, json.dumps({**cfg, "depth": 10 ** 9}), r"describes 1000000000 blocks but the file holds tensors of 2"),
        ("wide", sd, json.dumps({**cfg, "dim": 2 ** 20, "heads": 2 ** 14, "rope_split": [16, 24, 24]}),
         r"tensor text_pos has shape \[1, 12, 64\] but the model of its metadata needs \[1, 12, 1048576\]"),
        ("shape", wrong, json.dumps(cfg), r"tensor patch_embed.weight has shape \[3, 3\] but the model of its metadata "
                                          r"needs \[64, 48\]"),
    ]
    built = []
    real_init = EmbeddedDiT.__init__

    def spy(self, config=None):
        built.append(torch.empty(0).device.type)  # the default device the model is built on
        real_init(self, config)

    monkeypatch.setattr(EmbeddedDiT, "__init__", spy)
    for name, tensors, text, want in cases:
        path = _hostile_weights(tmp_path, name, tensors, text)
        with pytest.raises(WeightsError, match=want + ".*" + redo) as e:
            load_embedded(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert set(built) <= {"meta"}  # no model was built with real memory
    with pytest.raises(WeightsError, match=rf"^{tmp_path} is a directory; the embedded model's weights are one "):
        load_embedded(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations exist on a GPU only")
@pytest.mark.parametrize("mode", ["dense", "compact", "adaspa", "compact+adaspa"])
def test_denoising_forwards_never_wait_for_the_gpu(mode):
    """The installed forward of a whole 8-step schedule reads nothing back to the host once a first run has
    filled the caches (the sampler's own per-step check aside): any read would leave the GPU idle while the
    host launches the rest of the forward. On a failure the error names the line that read."""
    from dist_compact.integrations import DenoisingState
    from dist_compact.patterns.baselines import window_for_density

    m = _model(dim=128, heads=2, rope_split=(16, 24, 24), frames=4, height=32, width=32).cuda().to(torch.bfloat16)
    x, t, text = (a.cuda() for a in _inputs(m, frames=4, height=32, width=32))
    x = x.to(torch.bfloat16)
    tile = (1, 4, 4)
    layout = m.video_layout(4, 32, 32, tile)
    compact = window_for_density(layout, m.config.depth, m.config.heads, 0.5, model="test")[0]
    cfg = SparsityConfig(mode=mode, reference_steps=8, dense_steps=2, search_steps=(2, 5),
                         search_kinds=("fused", "cached"), dense_threshold=1.0, head_adaptive=True)
    state = DenoisingState()
    sparsify(m, cfg, compact=compact if cfg.uses_compact else None, tile=tile, state=state)

    def run():
        state.begin(8)
        for step in range(8):
            state.step = step
            m(x, t, text)

    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
