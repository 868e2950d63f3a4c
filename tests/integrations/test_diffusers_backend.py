"""dist_compact attention through diffusers' processors and diffusers' own context parallelism.

Tiny random Wan / HunyuanVideo transformers (fp32, CPU): with a dense config the output equals the
stock model's; with Compact / AdaSpa it equals our own :func:`sparsify` path (the same per-layer
state); under ``enable_parallelism(ContextParallelConfig(ulysses_degree, ring_degree))`` on 2 and 4
gloo processes (Ulysses, ring, Ulysses x ring; chunks that cut tiles) both still hold, and so does
the equality with our own sequence-parallel path. The diffusers internals the backend relies on are
checked, so an upgrade that moves them fails here.
"""

import dataclasses
import inspect
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install -e '.[diffusers]'")

from dist_compact import denoising_state, installed, sparsify, unsparsify  # noqa: E402
from dist_compact.integrations.diffusers_backend import ChunkGeometry, cp_plan, set_sparse_backend  # noqa: E402
from dist_compact.layout import VideoLayout  # noqa: E402
from dist_compact.sparsity.config import SparsityConfig  # noqa: E402
from parallel_helpers import run_workers  # noqa: E402
from test_diffusers_integration import (ADASPA, COMPACT, DENSE, compact_for, hunyuan_inputs, run,  # noqa: E402
                                        tiny_hunyuan, tiny_wan, wan_inputs)

TOL = 1e-5
TILE = (1, 4, 4)
# latent grid 3 x 6 x 6 = 108 tokens: ragged 4x4 tiles, and 2 or 4 equal chunks that cut tiles
GRID_KW = dict(frames=3, height=12, width=12)
# "wan22": Wan2.2 TI2V's per-token timestep ([B, tokens], split by diffusers' cp plan too)
BUILD = {"wan": tiny_wan, "wan22": tiny_wan, "hunyuan": tiny_hunyuan}


def inputs(name):
    if name == "hunyuan":
        return hunyuan_inputs(**GRID_KW)
    return wan_inputs(per_token_t=name == "wan22", **GRID_KW)


# head-adaptive budgets: per-head statistics gathered over the ranks (cut tiles counted once)
ADASPA_HA = dataclasses.replace(ADASPA, head_adaptive=True)


def sparsity(mode):
    return {"dense": DENSE, "adaspa": ADASPA, "adaspa-ha": ADASPA_HA, "compact": COMPACT}[mode]


def install(model, mode, how):
    """``how``: "backend" (ours through diffusers' processors) or "sparsify" (our own path)."""
    fn = set_sparse_backend if how == "backend" else sparsify
    compact = compact_for(2) if mode == "compact" else None
    fn(model, sparsity(mode), compact=compact, tile=TILE, backend="torch")


def two_steps(model, name, how):
    """Step 0 (AdaSpa: the fused search) and step 1 (the found index reused)."""
    state = denoising_state(model)
    state.begin(2)
    outs = []
    for step in range(2):
        state.step = step
        outs.append(run(model, inputs(name)))
    return outs


def records(model, how):
    h = installed(model)
    return [(r.layer, r.step, r.kind, r.density or [], r.recall or []) for r in h.stats.records]


def records_err(a, b):
    """Largest difference of the recorded per-head densities / recalls (inf if the calls differ)."""
    if [x[:3] for x in a] != [x[:3] for x in b]:
        return float("inf")
    err = 0.0
    for x, y in zip(a, b):
        for u, v in ((x[3], y[3]), (x[4], y[4])):
            if len(u) != len(v):
                return float("inf")
            err = max([err] + [abs(p - q) for p, q in zip(u, v)])
    return err


def max_err(a, b):
    assert all(torch.isfinite(x).all() for x in a + b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("name", ["wan", "wan22", "hunyuan"])
def test_dense_equals_stock(name):
    model = BUILD[name]()
    ref = run(model, inputs(name))
    install(model, "dense", "backend")
    out = run(model, inputs(name))
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    h = installed(model)
    assert h.layout.grid == (3, 6, 6)
    unsparsify(model)
    assert installed(model) is None
    assert (run(model, inputs(name)) - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@pytest.mark.parametrize("mode", ["adaspa", "adaspa-ha", "compact"])
def test_sparse_equals_sparsify(name, mode):
    ours = BUILD[name]()
    install(ours, mode, "sparsify")
    ref = two_steps(ours, name, "sparsify")
    model = BUILD[name]()
    install(model, mode, "backend")
    out = two_steps(model, name, "backend")
    dense = run(BUILD[name](), inputs(name))
    assert max_err(out, ref) <= TOL
    assert records_err(records(model, "backend"), records(ours, "sparsify")) <= TOL
    # the sparse step really is sparse: it differs from dense attention
    assert (out[1] - dense).abs().max().item() > 1e-3


def test_chunk_geometry_packs_cut_tiles():
    lay = VideoLayout(3, 6, 6, tile=TILE, text_tokens=9)
    V, bs = lay.video_tokens, lay.block_size
    pos_all = []
    for r in range(4):
        g = ChunkGeometry.build(lay, 4, r)
        # my chunk's tokens land in distinct packed slots, valid slots first in each block
        loc = g.q_local[: V // 4]
        assert loc.unique().numel() == loc.numel()
        assert torch.equal(torch.bincount(loc // bs, minlength=g.q_valid.numel())[: -lay.num_text_blocks],
                           g.q_valid[: -lay.num_text_blocks].long())
        assert ((loc % bs) < g.q_valid[loc // bs]).all()
        pos_all.append(g.q_blocks[:-lay.num_text_blocks])
        # text keys belong to the local step only
        assert all((g.key_map[j][lay.num_video_blocks:] >= 0).all() == (j == r) for j in range(4))
    # every touched block's first token is on exactly one rank (row weights count it once)
    w = torch.zeros(lay.num_video_blocks, dtype=torch.float64)
    for r in range(4):
        g = ChunkGeometry.build(lay, 4, r)
        w.index_add_(0, g.q_blocks[:-1], g.row_weight[:-1])
    assert torch.equal(w, torch.ones_like(w))
    # the chunks cut tiles: some block is touched by two ranks
    touched = torch.cat(pos_all)
    assert touched.numel() > touched.unique().numel()
    with pytest.raises(ValueError, match="do not split into 5 ring chunks"):
        ChunkGeometry.build(lay, 5, 0)


def test_errors_are_clear():
    model = tiny_wan()
    install(model, "dense", "backend")
    with pytest.raises(ValueError, match="already has SparsifyHandle installed"):
        set_sparse_backend(tiny_wan_sparsified(), DENSE)
    with pytest.raises(TypeError, match="embedded model"):
        from dist_compact.models.embedded import EmbeddedConfig, EmbeddedDiT

        set_sparse_backend(EmbeddedDiT(EmbeddedConfig(dim=32, depth=1, heads=2, rope_split=(4, 6, 6))), DENSE)
    proc = installed(model).processors[0]
    cp = SimpleNamespace(ulysses_degree=2, ring_degree=2, ulysses_anything=False, ring_anything=False,
                         _ulysses_mesh=object(), _ring_mesh=object())
    for bad, err, msg in [
        (SimpleNamespace(tensor_parallel_config=object(), context_parallel_config=None), NotImplementedError,
         "tensor parallelism"),
        (SimpleNamespace(tensor_parallel_config=None, context_parallel_config=SimpleNamespace(
            **{**vars(cp), "ring_anything": True})), NotImplementedError, "ring_anything"),
        (SimpleNamespace(tensor_parallel_config=None, context_parallel_config=SimpleNamespace(
            **{**vars(cp), "_ring_mesh": None})), RuntimeError, "not set up"),
        # 3 x 5 x 7 = 105 video tokens: not 4 equal chunks (caught before diffusers' own assertion)
        (SimpleNamespace(tensor_parallel_config=None, context_parallel_config=cp), ValueError,
         "do not split into ulysses_degree"),
    ]:
        proc._parallel_config = bad
        with pytest.raises(err, match=msg):
            run(model, wan_inputs())
    proc._parallel_config = None


def tiny_wan_sparsified():
    m = tiny_wan()
    sparsify(m, DENSE, tile=TILE, backend="torch")
    return m


def test_diffusers_internals_we_rely_on():
    """What diffusers 0.42 gives a third-party backend, and the private pieces we use (module doc of
    dist_compact.integrations.diffusers_backend). A change here means the backend must be revisited."""
    from diffusers.models import attention_dispatch as ad
    from diffusers.models._modeling_parallel import ContextParallelConfig

    # backend names are a closed enum: diffusers refuses ours by name (why we install processors)
    with pytest.raises(ValueError):
        ad.AttentionBackendName("dist_compact")
    with pytest.raises(ValueError):
        tiny_wan().set_attention_backend("dist_compact")
    # the ring loop we hand our forward op to, with the argument order we pass
    params = list(inspect.signature(ad.TemplatedRingAttention.forward).parameters)
    assert params[1:] == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                          "return_lse", "forward_op", "backward_op", "_parallel_config"]
    src = inspect.getsource(ad.TemplatedRingAttention.forward)
    assert "_save_ctx=i == 0" in src and "next_rank = (rank + 1) % world_size" in src
    # the set-up attributes we read, and the processor attributes enable_parallelism sets
    fields = {f for f in ContextParallelConfig.__dataclass_fields__}
    assert {"_ulysses_mesh", "_ring_mesh", "ulysses_anything", "ring_anything"} <= fields
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    assert hasattr(WanAttnProcessor, "_parallel_config") and hasattr(WanAttnProcessor, "_attention_backend")
    # the plan we give HunyuanVideo (diffusers 0.42.1 has none) names modules the model has
    model = tiny_hunyuan()
    for name in cp_plan(model):
        assert isinstance(model.get_submodule(name), torch.nn.Module)


# ---------------------------------------------------------------------------------------------- processes
def _cp_worker(rank, world, cases):
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    # diffusers computes its device as rank % torch.accelerator.device_count(), which is 0 on a
    # CPU-only torch; one "device" per process is what a CPU run means
    torch.accelerator.device_count = lambda: 1
    from dist_compact.parallel import ParallelConfig, SequenceParallel, build_groups

    res = []
    for name, mode, U, R, enable_first, own in cases:
        ref_model = BUILD[name]()
        if mode == "dense":
            ref = [run(ref_model, inputs(name))] * 2
        else:
            install(ref_model, mode, "sparsify")
            ref = two_steps(ref_model, name, "sparsify")
            ref_rec = records(ref_model, "sparsify")
        model = BUILD[name]()
        cfg = ContextParallelConfig(ulysses_degree=U, ring_degree=R)
        plan = cp_plan(model)
        if enable_first:
            model.enable_parallelism(config=cfg, cp_plan=plan)
            install(model, mode, "backend")
        else:
            install(model, mode, "backend")
            model.enable_parallelism(config=cfg, cp_plan=plan)
        out = two_steps(model, name, "backend")
        err = max_err(out, ref)
        if mode != "dense":  # the same per-head densities / recalls as one process
            err = max(err, records_err(records(model, "backend"), ref_rec))
        if own:  # our own sequence-parallel path (stream in block order, our Ulysses / ring)
            par = ParallelConfig(ulysses=U, ring=R)
            theirs = BUILD[name]()
            compact = compact_for(2) if mode == "compact" else None
            sp = SequenceParallel(par, build_groups(par))
            sparsify(theirs, sparsity(mode), compact=compact, sequence_parallel=sp, tile=TILE, backend="torch")
            err = max(err, max_err(out, two_steps(theirs, name, "sparsify")))
        res.append((name, mode, U, R, err))
    dist.barrier()
    return res


def _check(results, cases):
    for per_rank in results:
        assert len(per_rank) == len(cases)
        for name, mode, U, R, err in per_rank:
            assert err <= TOL, (name, mode, U, R, err)


# (model, mode, ulysses, ring, enable_parallelism before set_sparse_backend, also vs our own parallel path)
CASES_2 = [("wan", "dense", 2, 1, True, False), ("wan", "dense", 1, 2, False, False),
           ("hunyuan", "dense", 1, 2, True, False), ("wan", "adaspa", 1, 2, False, True),
           ("hunyuan", "compact", 2, 1, False, False), ("hunyuan", "adaspa", 1, 2, True, True),
           ("wan", "adaspa-ha", 1, 2, True, False), ("wan22", "dense", 1, 2, False, False)]
CASES_4 = [("wan", "dense", 2, 2, False, False), ("hunyuan", "adaspa-ha", 2, 2, True, True),
           ("wan", "compact", 1, 4, True, False), ("hunyuan", "dense", 1, 4, False, False)]


def test_two_processes_equal_one(tmp_path):
    _check(run_workers(_cp_worker, 2, tmp_path, CASES_2, timeout=300.0), CASES_2)


def test_four_processes_equal_one(tmp_path):
    _check(run_workers(_cp_worker, 4, tmp_path, CASES_4, timeout=300.0), CASES_4)


# ---------------------------------------------------------------------------------------------- the example
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "diffusers_backend.py"
TINY = ["--device", "cpu", "--backend", "torch", "--dtype", "float32", "--steps", "2", "--frames", "9",
        "--height", "64", "--width", "64", "--tile", "1,4,4", "--max-sequence-length", "16",
        "--prompt", "a red square moving left"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from helpers import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan-backend"))


def _example(folder, out, *extra, torchrun=0):
    """Run examples/diffusers_backend.py: in this process, or as a script on ``torchrun`` ranks launched as
    torchrun launches them (parallel_helpers.run_like_torchrun: its environment and store, the script as
    ``__main__``; forked from a server that has torch and diffusers imported, where a fresh interpreter per
    rank spends about 10 s importing them on a 2-core machine)."""
    args = [str(folder), *TINY, "--out", str(out), *extra]
    if not torchrun:
        import importlib.util

        spec = importlib.util.spec_from_file_location("diffusers_backend_example", EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.main(args)
        return torch.load(out)
    from parallel_helpers import run_like_torchrun

    root = EXAMPLE.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = run_like_torchrun(EXAMPLE, args, torchrun, out.parent, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"wrote {out}" in p.stdout
    return torch.load(out)


@pytest.mark.slow
def test_example_one_process_and_torchrun(tiny_pipeline, tmp_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_pipeline), torch_dtype=torch.float32)
    stock = pipe("a red square moving left", num_inference_steps=2, num_frames=9, height=64, width=64,
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="latent").frames[0]
    dense = _example(tiny_pipeline, tmp_path / "dense.pt", "--dense")
    assert dense.shape == stock.shape and (dense - stock).abs().max().item() <= 2 * TOL
    # the default AdaSpa schedule on 2 steps: a fused search, then an LSE-cached search and its sparse pass
    sparse = _example(tiny_pipeline, tmp_path / "sparse.pt")
    ring = _example(tiny_pipeline, tmp_path / "ring.pt", "--ring", "2", torchrun=2)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max().item() > 1e-3  # 3.4e-3 here
    assert (ring - sparse).abs().max().item() <= 2 * TOL
