"""dist_compact as the local attention of xDiT's USP path (dist_compact.integrations.xfuser).

CPU, without xfuser: the module imports without it, a missing xfuser is one clear ImportError, the
sequence xDiT's backend function sees (video chunks, split / replicated prompt, Wan padding) is
mapped to our block order exactly as ``VideoLayout.to_blocks``, and the backend function itself
(``xdit_attention``) equals plain SDPA on xDiT-ordered tensors (dense) and our own sparse attention
on block order (sparse). The full path (xDiT's wrappers, USP, all-to-all) needs xfuser and a GPU:
``benchmarks/device/xfuser_check.py``; the test that needs xfuser is skipped when it does not import.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dist_compact.sparsity.attention import build_attention
from dist_compact.sparsity.context import AttentionContext
from dist_compact.sparsity.attention_ops import AttentionOps
from dist_compact.models.adapters import ModelAdapter
from dist_compact.sparsity.config import SparsityConfig
from dist_compact.integrations import xfuser as xf

DENSE = SparsityConfig(mode="dense")
ADASPA = SparsityConfig(mode="adaspa", dense_steps=0, search_steps=(0,), search_kinds=("fused",),
                        reference_steps=2, sparsity=0.5, head_adaptive=False)


def _xfuser_imports():
    try:
        xf._xfuser()
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------- imports
def test_module_imports_without_xfuser():
    code = ("import sys; sys.modules['xfuser'] = None; import dist_compact.integrations.xfuser as m; "
            "assert m.BACKEND_KEY == 'dist_compact'; "
            "assert not any(k == 'xfuser' or k.startswith('xfuser.') for k, v in sys.modules.items() if v is not None)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clear_import_error_without_xfuser(monkeypatch):
    for name in [k for k in sys.modules if k == "xfuser" or k.startswith("xfuser.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "xfuser", None)
    for call in (xf.register_backend, lambda: xf.sparsify_xfuser(torch.nn.Linear(1, 1)),
                 lambda: xf.xfuser_transformer(torch.nn.Linear(1, 1))):
        with pytest.raises(ImportError) as e:
            call()
        msg = str(e.value)
        assert "xfuser==0.7.0" in msg and "GPU" in msg and "distvae" in msg


# ---------------------------------------------------------------------------------------------- sequence
def test_sequence_wan():
    s = xf.infer_sequence(24, 1, 24, 24, joint=False)
    assert (s.text, s.pad, s.q_len) == (0, 0, 24)
    assert torch.equal(s.model_index("q"), torch.arange(24))
    s = xf.infer_sequence(10, 4, 12, 12, joint=False)  # xDiT pads 2 zero tokens
    assert s.pad == 2
    assert s.model_index("q").tolist() == list(range(10)) + [-1, -1]
    with pytest.raises(ValueError, match="expected 12"):
        xf.infer_sequence(10, 4, 12, 7, joint=False)  # a cross-attention, not ours


def test_sequence_hunyuan_split_and_replicated():
    # split prompt: P chunks of [V/P video | L/P text]
    s = xf.infer_sequence(8, 2, 12, 12, joint=True)
    assert (s.text, s.split_text) == (4, True)
    assert s.model_index("q").tolist() == [0, 1, 2, 3, 8, 9, 4, 5, 6, 7, 10, 11]
    # replicated prompt (L % P != 0): queries [V/P video | all L text] per chunk, keys [V | L]
    s = xf.infer_sequence(8, 2, 8 + 2 * 3, 8 + 3, joint=True)
    assert (s.text, s.split_text) == (3, False)
    assert s.model_index("q").tolist() == [0, 1, 2, 3, 8, 9, 10, 4, 5, 6, 7, 8, 9, 10]
    assert s.model_index("k").tolist() == list(range(11))
    with pytest.raises(ValueError, match="equal"):
        xf.infer_sequence(9, 2, 13, 13, joint=True)
    with pytest.raises(ValueError, match="do not match"):
        xf.infer_sequence(8, 2, 15, 11, joint=True)


# ---------------------------------------------------------------------------------------------- backend function
class _Adapter(ModelAdapter):
    """A model family's dimensions without a model: the backend function needs nothing else."""

    def __init__(self, name, layers, heads):
        super().__init__(None)
        self.name, self._layers, self._heads = name, layers, heads

    num_layers = property(lambda self: self._layers)
    num_heads = property(lambda self: self._heads)
    head_dim = property(lambda self: 16)


def _handle(kind, heads, world, sparsity, grid, tile=(1, 4, 4), layers=1):
    h = xf.XfuserHandle(None, _Adapter(kind, layers, heads), sparsity=sparsity, tile=tile, ops=AttentionOps("torch"),
                        world=world)
    h.grid = grid
    return h


def _xdit_view(x_model, seq, which):
    """xDiT's sequence (``[B, H, S, D]``) from model-order tokens: gather, zeros at xDiT's padding."""
    mi = seq.model_index(which)
    out = x_model.index_select(2, mi.clamp(min=0))
    return out * (mi >= 0).view(1, 1, -1, 1).to(out.dtype)


CASES = [
    # kind, grid, text, world, q_len offset (replicated prompt)
    ("wan", (2, 6, 5), 0, 1),        # ragged tiles, one rank
    ("wan", (2, 6, 5), 0, 4),        # 60 tokens over 4 ranks
    ("wan", (1, 7, 5), 0, 2),        # 35 tokens: xDiT pads one zero token
    ("hunyuan_video", (2, 4, 6), 6, 1),
    ("hunyuan_video", (2, 4, 6), 6, 2),   # split prompt
    ("hunyuan_video", (2, 4, 6), 5, 2),   # replicated prompt
]


@pytest.mark.parametrize("kind,grid,text,world", CASES)
def test_backend_dense_equals_sdpa(kind, grid, text, world):
    torch.manual_seed(0)
    B, H, D = 2, 4, 16
    V = grid[0] * grid[1] * grid[2]
    joint = kind == "hunyuan_video"
    pad = 0 if joint else (-V) % world
    split = joint and text % world == 0
    seq = xf.XditSequence(V, text, world, split or not joint, pad)
    qm, km, vm = (torch.randn(B, H, V + text, D) for _ in range(3))
    Hl = H // world
    u = world - 1  # the last rank's heads
    sl = slice(u * Hl, (u + 1) * Hl)
    q, k, v = _xdit_view(qm[:, sl], seq, "q"), _xdit_view(km[:, sl], seq, "k"), _xdit_view(vm[:, sl], seq, "k")
    h = _handle(kind, H, world, DENSE, grid)
    out, lse = xf.xdit_attention(q, k, v, attention_kwargs={xf.KWARGS_KEY: xf._LayerCall(h, 0)})
    assert lse is None and out.shape == q.shape
    ref = F.scaled_dot_product_attention(q, km[:, sl], vm[:, sl])  # real keys only (no xDiT padding)
    real = seq.model_index("q") >= 0
    torch.testing.assert_close(out[:, :, real], ref[:, :, real], atol=1e-5, rtol=1e-5)
    assert h.layout.text_tokens == text and h.layout.grid == grid


def test_backend_block_order_is_to_blocks():
    """One rank: the tensors our attention sees are exactly ``layout.to_blocks`` of the model order."""
    torch.manual_seed(1)
    grid, text = (2, 4, 6), 6
    h = _handle("hunyuan_video", 2, 1, DENSE, grid)
    seen = {}

    def factory(n, sparsity, compact, sp):
        def attn(q, k, v, ctx):
            seen.update(q=q, k=k, layout=ctx.layout)
            return q
        return [attn]

    h.attention_factory = factory
    xm = torch.randn(1, 2, 48 + text, 16)
    out, _ = xf.xdit_attention(xm, xm, xm, attention_kwargs={xf.KWARGS_KEY: xf._LayerCall(h, 0)})
    lay = seen["layout"]
    assert torch.equal(seen["q"], lay.to_blocks(xm.transpose(1, 2)))
    assert torch.equal(out, xm)  # identity attention: back to xDiT's order exactly


@pytest.mark.parametrize("world", [1, 2])
def test_backend_sparse_equals_block_order_sparse(world):
    """Sparse (AdaSpa fused search at step 0, then the found index at step 1): the backend equals our
    SparseAttention run directly on ``layout.to_blocks`` of the same heads."""
    torch.manual_seed(2)
    grid, H, D, B = (2, 8, 8), 2 * world, 16, 1
    V = 128
    seq = xf.XditSequence(V, 0, world, True, 0)
    qm, km, vm = (torch.randn(B, H, V, D) for _ in range(3))
    Hl = H // world
    sl = slice(0, Hl)  # rank 0's heads; AttentionOps("torch") keeps head_range (0, H) of the local heads
    q, k, v = (_xdit_view(t[:, sl], seq, "q") for t in (qm, km, vm))
    h = _handle("wan", H, world, ADASPA, grid, tile=(1, 4, 4))
    h.state.begin(2)
    ref_attn = build_attention(1, ADASPA)[0]
    for step in range(2):
        h.state.step = step
        out, _ = xf.xdit_attention(q, k, v, attention_kwargs={xf.KWARGS_KEY: xf._LayerCall(h, 0)})
        lay = h.layout
        ctx = AttentionContext(layout=lay, step=step, num_steps=2, ops=AttentionOps("torch"))
        ref = ref_attn(*(lay.to_blocks(t.transpose(1, 2)) for t in (q, k, v)), ctx)
        ref = lay.from_blocks(ref).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-3  # step 1 really ran sparse


def test_plan_built_once_per_call_shape():
    """The layout instance (its device maps) and the gathers are built at the first call of a shape and
    reused by every later layer; sequences already in model order need no gather."""
    grid = (2, 4, 6)
    # one rank, split prompt: xDiT's order is the model order
    h = _handle("hunyuan_video", 2, 1, DENSE, grid, layers=2)
    x = torch.randn(1, 2, 48 + 6, 16)
    layouts = []
    for layer in (0, 1, 0):
        xf.xdit_attention(x, x, x, attention_kwargs={xf.KWARGS_KEY: xf._LayerCall(h, layer)})
        layouts.append(h.layout)
    assert len(h._plans) == 1 and all(lay is layouts[0] for lay in layouts)
    (plan,) = h._plans.values()
    assert isinstance(plan.q_take, int) and isinstance(plan.k_take, int)  # no gather
    # two ranks, replicated prompt: queries are gathered, keys [video | text] are the model order
    h = _handle("hunyuan_video", 4, 2, DENSE, grid)
    q, k = torch.randn(1, 2, 48 + 2 * 5, 16), torch.randn(1, 2, 48 + 5, 16)
    xf.xdit_attention(q, k, k, attention_kwargs={xf.KWARGS_KEY: xf._LayerCall(h, 0)})
    (plan,) = h._plans.values()
    assert not isinstance(plan.q_take, int) and isinstance(plan.k_take, int)
    h.reset()
    assert not h._plans and not h._bank


def test_backend_argument_checks():
    h = _handle("wan", 2, 1, DENSE, (1, 4, 4))
    kw = {xf.KWARGS_KEY: xf._LayerCall(h, 0)}
    x = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="dropout"):
        h.attend(0, x, x, x, dropout_p=0.1)
    with pytest.raises(ValueError, match="causal"):
        xf.xdit_attention(x, x, x, is_causal=True, attention_kwargs=kw)
    with pytest.raises(ValueError, match="local heads"):
        xf.xdit_attention(x[:, :1], x[:, :1], x[:, :1], attention_kwargs=kw)
    with pytest.raises(RuntimeError, match="without attention_kwargs"):
        xf.xdit_attention(x, x, x, attention_kwargs={})
    h.grid = None
    with pytest.raises(RuntimeError, match="grid"):
        xf.xdit_attention(x, x, x, attention_kwargs=kw)
    with pytest.raises(ValueError, match="must be Wan or HunyuanVideo"):
        xf.XfuserHandle(None, _Adapter("flux", 1, 2), sparsity=DENSE)


def test_usp_with_backend_fills_only_a_missing_backend():
    calls = []

    def usp(*args, backend=None, **kwargs):
        calls.append(backend)

    f = xf._usp_with_backend(usp)
    f(1, 2, 3, backend=None, attention_kwargs={})
    f(1, 2, 3)
    f(1, 2, 3, backend="cross")
    assert calls == [xf.BACKEND_KEY, xf.BACKEND_KEY, "cross"]


def test_latent_grid():
    from dist_compact.models.adapters.base import latent_grid

    assert latent_grid(torch.zeros(1, 4, 3, 8, 10), (1, 2, 2), "x") == (3, 4, 5)
    with pytest.raises(ValueError, match="frames"):
        latent_grid(torch.zeros(1, 4, 8, 10), (1, 2, 2), "x")
    with pytest.raises(ValueError, match="smaller than the patch"):
        latent_grid(torch.zeros(1, 4, 3, 1, 10), (1, 2, 2), "x")


# ---------------------------------------------------------------------------------------------- with xfuser
@pytest.mark.skipif(not _xfuser_imports(), reason="xfuser does not import here (needs xfuser 0.7.0 and a GPU); "
                    "run benchmarks/device/xfuser_check.py on the GPU machine")
def test_registry_entry():
    key = xf.register_backend()
    from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY

    assert ATTENTION_FUNCTION_REGISTRY[key] is xf.xdit_attention
