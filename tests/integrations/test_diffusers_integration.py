"""dist_compact attention inside diffusers' Wan / HunyuanVideo transformers and the embedded model.

Tiny random-weight models built here (no downloads): with a dense config the output equals the
stock model's (fp32, <= 1e-5); a sparse config runs and records densities below 1; two gloo
processes (Ulysses 2, and ring 2) equal one process; a tiny WanPipeline runs end to end from a
folder written with ``save_pretrained`` (its tokenizer is a word-level one built offline), both
through :func:`generate` and through the main-job entry :func:`run_diffusers_generation`.
"""

import math

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install -e '.[diffusers]'")

from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

from dist_compact import denoising_state, installed, sparsify, unsparsify  # noqa: E402
from dist_compact.integrations import DenoisingState  # noqa: E402
from dist_compact.integrations.core import default_tile  # noqa: E402
from dist_compact.patterns import CompactConfig, HeadPattern  # noqa: E402
from dist_compact.sparsity.config import SparsityConfig  # noqa: E402
from dist_compact.stats import AttentionStats  # noqa: E402
from helpers import save_tiny_wan_pipeline  # noqa: E402
from parallel_helpers import run_workers  # noqa: E402

TOL = 1e-5
DENSE = SparsityConfig(mode="dense")
# a fused search at step 0 (its output is dense), the found index reused at step 1
ADASPA = SparsityConfig(mode="adaspa", dense_steps=0, search_steps=(0,), search_kinds=("fused",),
                        reference_steps=2, sparsity=0.5, head_adaptive=False)
COMPACT = SparsityConfig(mode="compact", dense_steps=0)


def compact_for(num_layers, heads=2):
    # the query's own tile column and row +-0 at frame distance <= 1: well below full density
    return CompactConfig.uniform(num_layers, heads, HeadPattern.window(0, 1, max_distance=1))


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def tiny_hunyuan(seed=0):
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(4, 6, 6)).eval()


def wan_inputs(seed=1, batch=1, frames=3, height=10, width=14, per_token_t=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    if per_token_t:  # Wan2.2 TI2V: one timestep per token
        t = torch.full((batch, frames * (height // 2) * (width // 2)), 500.0)
        t[:, :7] = 0.0
    else:
        t = torch.full((batch,), 500.0)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
                return_dict=False)


def hunyuan_inputs(seed=1, lengths=(6, 9), frames=3, height=10, width=14):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, 9)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return dict(hidden_states=torch.randn(B, 4, frames, height, width, generator=g),
                timestep=torch.full((B,), 500.0), encoder_hidden_states=torch.randn(B, 9, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(B, 8, generator=g),
                guidance=torch.full((B,), 6000.0), return_dict=False)


MODELS = {"wan": (tiny_wan, wan_inputs, 2), "hunyuan": (tiny_hunyuan, hunyuan_inputs, 2)}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ---------------------------------------------------------------------------------------------- dense == stock
@pytest.mark.parametrize("case", ["wan", "wan-per-token-t", "wan-default-tile", "hunyuan-two-text-lengths",
                                  "hunyuan-default-tile"])
def test_dense_equals_stock(case):
    name = case.split("-")[0]
    build, make, _ = MODELS[name]
    model = build()
    inputs = make(per_token_t=True) if case == "wan-per-token-t" else make()
    ref = run(model, inputs)
    tile = None if "default-tile" in case else (1, 4, 4)
    assert sparsify(model, DENSE, tile=tile, backend="torch") is model
    out = run(model, inputs)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    h = installed(model)
    assert h.layout.grid == (3, 5, 7)
    if tile is None:
        assert h.layout.tile == default_tile((3, 5, 7))
    if name == "hunyuan":
        assert h.num_layers == 2 and h.layout.text_tokens in (6, 9)


def test_unsparsify_restores_stock_processors():
    model = tiny_wan()
    inputs = wan_inputs()
    ref = run(model, inputs)
    procs = {k: type(v) for k, v in model.attn_processors.items()}
    sparsify(model, COMPACT, compact=compact_for(2), tile=(1, 4, 4), backend="torch")
    assert not torch.allclose(run(model, inputs), ref, atol=1e-4)
    unsparsify(model)
    assert installed(model) is None
    assert {k: type(v) for k, v in model.attn_processors.items()} == procs
    assert torch.equal(run(model, inputs), ref)


def test_one_layout_instance_per_grid_and_prompt_length():
    """Forwards of one video size reuse their layout objects (maps and device copies built once)."""
    from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT

    model = tiny_hunyuan()
    sparsify(model, DENSE, tile=(1, 4, 4), backend="torch")
    h = installed(model)
    inputs = hunyuan_inputs(lengths=(5, 9))
    run(model, inputs)
    first = h.layout
    assert first.text_tokens == 5 and first.grid == (3, 5, 7)
    run(model, inputs)
    assert h.layout is first
    run(model, hunyuan_inputs(lengths=(5, 9), height=16))  # another size: another layout
    assert h.layout is not first and h.layout.grid == (3, 8, 7)
    emb = EmbeddedDiT(EmbeddedConfig(dim=32, depth=2, heads=2, rope_split=(4, 6, 6), frames=4, height=16,
                                     width=16)).eval()
    sparsify(emb, DENSE, tile=(1, 4, 4), backend="torch")
    x, t = torch.randn(1, 3, 4, 16, 16), torch.tensor([0.5])
    text = emb.tokenizer.encode("a red square").unsqueeze(0)
    with torch.no_grad():
        emb(x, t, text)
        layout = installed(emb).layout
        emb(x, t, text)
    assert installed(emb).layout is layout
    assert layout == emb.video_layout(4, 16, 16, tile=(1, 4, 4))


def test_default_tile_prefers_least_padding():
    assert default_tile((21, 30, 52)) == (1, 16, 8)
    assert default_tile((33, 45, 80)) == (1, 8, 16)
    assert default_tile((16, 32, 32)) == (2, 8, 8)


# ---------------------------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("name,mode", [("wan", "compact"), ("hunyuan", "compact"), ("wan", "adaspa"),
                                       ("hunyuan", "adaspa")])
def test_sparse_runs_below_full_density(name, mode):
    build, make, layers = MODELS[name]
    model = build()
    inputs = make(height=16, width=16)
    dense = run(model, inputs)
    stats = AttentionStats(timing=False)
    if mode == "compact":
        sparsify(model, COMPACT, compact=compact_for(layers), tile=(1, 4, 4), stats=stats, backend="torch")
        steps = 1
    else:
        sparsify(model, ADASPA, tile=(1, 4, 4), stats=stats, backend="torch")
        denoising_state(model).begin(2)
        steps = 2
    for step in range(steps):
        denoising_state(model).step = step
        out = run(model, inputs)
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max().item() > 1e-4  # the sparse output is not the dense one
    s = stats.summary()
    groups = 2 if name == "hunyuan" else 1  # two prompt lengths: one attention call per length
    assert s["calls"]["sparse"] == layers * groups
    assert 0.0 < s["mean_density_sparse"] < 1.0
    rows = [r for r in stats.rows() if r["kind"] == "sparse"]
    assert {r["layer"] for r in rows} == set(range(layers))


def test_sparse_kernel_path_equals_torch_path():
    """The default backend (the Triton kernel; its interpreter on CPU) gives the torch path's output."""
    outs = []
    for backend in ("auto", "torch"):
        model = tiny_wan()
        sparsify(model, COMPACT, compact=compact_for(2), tile=(1, 4, 4), backend=backend)
        outs.append(run(model, wan_inputs(height=16, width=16)))
    assert (outs[0] - outs[1]).abs().max().item() <= TOL


def test_hunyuan_mixed_text_lengths_equal_separate_calls():
    """A batch whose prompts differ in length equals running each sample alone (sparse too)."""
    model = tiny_hunyuan()
    sparsify(model, COMPACT, compact=compact_for(2), tile=(1, 4, 4), backend="torch")
    both = hunyuan_inputs(lengths=(5, 9), height=16, width=16)
    out = run(model, both)
    for b in range(2):
        one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in both.items()}
        assert (run(model, one) - out[b:b + 1]).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------- embedded
def test_embedded_model_dense_and_sparse():
    from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT

    torch.manual_seed(0)
    model = EmbeddedDiT(EmbeddedConfig(dim=32, depth=2, heads=2, rope_split=(4, 6, 6), frames=4, height=16,
                                       width=16)).eval()
    for p in model.parameters():  # adaLN-zero starts at zero: give every branch some weight
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 3, 4, 20, 28)
    t = torch.tensor([0.5])
    text = model.tokenizer.encode("a red square moving left").unsqueeze(0)
    with torch.no_grad():
        ref = model.forward_plain(x, t, text)
        sparsify(model, DENSE, tile=(1, 4, 4), backend="torch")
        assert (model(x, t, text) - ref).abs().max().item() <= TOL
        stats = AttentionStats(timing=False)
        sparsify(model, COMPACT, compact=compact_for(2), tile=(1, 4, 4), stats=stats, backend="torch")
        out = model(x, t, text)
        assert torch.isfinite(out).all() and (out - ref).abs().max().item() > 1e-4
        assert 0.0 < stats.summary()["mean_density_sparse"] < 1.0
        unsparsify(model)
        assert (model(x, t, text) - ref).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    with pytest.raises(TypeError, match="unsupported model Linear"):
        sparsify(torch.nn.Linear(2, 2))
    model = tiny_wan()
    with pytest.raises(ValueError, match="block size"):
        sparsify(model, DENSE, tile=(1, 2, 2))
    with pytest.raises(TypeError, match="SparsityConfig"):
        sparsify(model, {"mode": "dense"})
    with pytest.raises(ValueError, match="has no dist_compact attention installed"):
        denoising_state(model)
    sparsify(model, ADASPA, tile=(1, 4, 4), backend="torch")
    state = denoising_state(model)
    state.begin(2)
    state.step = 2
    with pytest.raises(ValueError, match=r"state.begin\(num_steps\)"):
        run(model, wan_inputs())
    with pytest.raises(RuntimeError, match="outside a hooked transformer forward"):
        model.blocks[0].attn1(torch.zeros(1, 16, 32))
    with pytest.raises(ValueError, match="num_steps must be an int"):
        DenoisingState().begin(0)
    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
                                        image_condition_type="token_replace")
    with pytest.raises(ValueError, match="token_replace"):
        sparsify(tr, DENSE)


def test_denoising_state_follows_the_callback():
    state = DenoisingState().begin(3)
    kw = {"latents": torch.zeros(1)}
    assert state.on_step_end(None, 0, 999, kw) is kw and state.step == 1
    state.on_step_end(None, 1, 500, kw)
    assert state.step == 2


# ---------------------------------------------------------------------------------------------- 2 processes
CASES = [(name, mode) for name in ("wan", "hunyuan") for mode in ("dense", "compact")]
PAR = [(2, 1), (1, 2)]  # (ulysses, ring)


def _sparsity(mode, name):
    if mode == "dense":
        return DENSE, None
    return COMPACT, compact_for(MODELS[name][2])


def _parallel_worker(rank, world, cases, par):
    from dist_compact.parallel import ParallelConfig, SequenceParallel, build_groups

    outs = {}
    for u, r in par:
        cfg = ParallelConfig(ulysses=u, ring=r)
        sp = SequenceParallel(cfg, build_groups(cfg))
        for name, mode in cases:
            build, make, _ = MODELS[name]
            model = build()
            sparsity, compact = _sparsity(mode, name)
            sparsify(model, sparsity, compact=compact, sequence_parallel=sp, tile=(1, 4, 4), backend="torch")
            # numpy: torch tensors would travel through shared memory that dies with this process
            outs[(u, r, name, mode)] = run(model, make(height=16, width=20)).numpy()
    return outs


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    ref = {}
    for name, mode in CASES:
        build, make, _ = MODELS[name]
        model = build()
        sparsity, compact = _sparsity(mode, name)
        sparsify(model, sparsity, compact=compact, tile=(1, 4, 4), backend="torch")
        ref[(name, mode)] = run(model, make(height=16, width=20))
    results = run_workers(_parallel_worker, 2, tmp_path, CASES, PAR, timeout=240.0)
    for rank_out in results:
        for (u, r, name, mode), out in rank_out.items():
            err = (torch.from_numpy(out) - ref[(name, mode)]).abs().max().item()
            assert err <= TOL, f"ulysses {u} x ring {r}, {name} {mode}: max abs diff {err:.2e}"


# ---------------------------------------------------------------------------------------------- WanPipeline
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan"))


@pytest.mark.slow
def test_wan_pipeline_end_to_end(wan_folder):
    from dist_compact.run.jobs.diffusers import generate, load_pipeline

    pipe = load_pipeline(wan_folder, "WanPipeline")
    call = dict(max_sequence_length=16)
    kw = dict(prompt="a red square moving left", num_steps=3, frames=9, height=64, width=64, seed=0, guidance=3.0,
              call_kwargs=call)
    stock = pipe(prompt=kw["prompt"], height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt", **call).frames
    dense = generate(pipe, sparsity=DENSE, tile=(1, 4, 4), backend="torch", **kw)
    assert dense.video.shape == (1, 3, 9, 64, 64) and dense.latents.shape == (1, 16, 3, 8, 8)
    assert len(dense.step_seconds) == 3
    assert (dense.video - (stock.permute(0, 2, 1, 3, 4) * 2 - 1)).abs().max().item() <= 2 * TOL
    sparse = generate(pipe, sparsity=ADASPA, tile=(1, 4, 4), backend="torch",
                      **dict(kw, num_steps=2, height=128, width=128))
    summary = sparse.stats.summary()
    assert summary["calls"]["fused_search"] >= 2 and summary["calls"]["sparse"] >= 2
    assert 0.0 < summary["mean_density_sparse"] < 1.0
    assert sparse.layout.grid == (3, 8, 8)
    assert torch.isfinite(sparse.video).all() and sparse.video.abs().max() <= 1.0


@pytest.mark.slow
def test_main_job_entry_writes_a_run_folder(wan_folder, tmp_path):
    pytest.importorskip("imageio", reason="the run folder's videos need the [video] extra")
    from dist_compact.run.config import ClusterConfig, ModelConfig, RunConfig, RunOptions
    from dist_compact.run.jobs.diffusers import run_diffusers_generation

    cfg = RunConfig(
        cluster=ClusterConfig(device="cpu"),
        model=ModelConfig(name="tiny-wan", kind="diffusers", path=str(wan_folder), pipeline="WanPipeline", frames=9,
                          height=64, width=64, tile=(1, 4, 4), dtype="float32"),
        sparsity=ADASPA,
        run=RunOptions(prompt="a blue circle", steps=2, guidance=3.0, output_dir=str(tmp_path), name="run",
                       compare_dense=True, attn_backend="torch", progress=False, shift=2.0),
    )
    res = run_diffusers_generation(cfg)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"report.json", "latents.pt", "frames.png", "dense_latents.pt", "model_latents.pt", "logs"} <= files
    assert res.latents.shape == (1, 3, 9, 64, 64)
    q = res.report["quality"]
    assert math.isfinite(q["psnr_db"]) or q["psnr_db"] == math.inf
    assert 0.0 < res.report["sparse"]["mean_density"] < 1.0
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_load_pipeline_needs_a_local_folder(tmp_path):
    from dist_compact.run.jobs.diffusers import load_pipeline

    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path, "WanPipeline")
    with pytest.raises(ValueError, match="unknown diffusers pipeline"):
        load_pipeline(tmp_path, "FluxPipeline")
