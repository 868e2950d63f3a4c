"""SparsityConfig validation and the step schedule (dense / fused search / cached search / reuse)."""

import pytest

from dist_compact.sparsity.config import SparsityConfig, CACHED, DENSE, FUSED, REUSE


def _actions(cfg, n):
    return [cfg.action(s, n) for s in range(n)]


def test_default_is_the_adaspa_paper_schedule():
    cfg = SparsityConfig()
    acts = _actions(cfg, 50)
    assert acts[:10] == [DENSE] * 10
    assert acts[10] == FUSED and acts[30] == CACHED
    assert acts[11:30] == [REUSE] * 19 and acts[31:] == [REUSE] * 19
    assert cfg.density == pytest.approx(0.2)
    # the LSE of step 10 is needed until the cached search at step 30, not after
    assert cfg.needs_lse_after(10, 50) and cfg.needs_lse_after(29, 50) and not cfg.needs_lse_after(30, 50)


@pytest.mark.parametrize(
    "num_steps, dense, searches",
    [
        (50, 10, ((10, "fused"), (30, "cached"))),
        (25, 5, ((5, "fused"), (15, "cached"))),
        (100, 20, ((20, "fused"), (60, "cached"))),
        (30, 6, ((6, "fused"), (18, "cached"))),
        (4, 1, ((1, "fused"), (2, "cached"))),
        (2, 0, ((0, "fused"), (1, "cached"))),
        (1, 0, ((0, "fused"),)),  # both searches land on step 0: the fused one is kept
    ],
    ids=lambda x: str(x) if isinstance(x, int) else None,
)
def test_schedule_scaling(num_steps, dense, searches):
    sched = SparsityConfig().schedule(num_steps)
    assert sched.dense_steps == dense
    assert sched.searches == searches
    acts = _actions(SparsityConfig(), num_steps)
    assert acts[searches[0][0]] == FUSED
    assert all(a == DENSE for a in acts[:dense])


def test_late_search_moves_to_the_last_step():
    cfg = SparsityConfig(dense_steps=40, search_steps=(45, 49), search_kinds=("fused", "cached"))
    sched = cfg.schedule(10)
    assert sched.searches == ((9, "fused"),)  # 45 -> 9, 49 -> 10 -> clamped to 9, collapsed
    assert sched.dense_steps == 8


def test_modes():
    assert _actions(SparsityConfig(mode="dense"), 12) == [DENSE] * 12
    comp = _actions(SparsityConfig(mode="compact", dense_steps=15), 50)
    assert comp == [DENSE] * 15 + [REUSE] * 35
    # adaspa: steps between the warm-up and the first search have no index -> dense
    ada = _actions(SparsityConfig(dense_steps=5, search_steps=(10,), search_kinds=("fused",)), 50)
    assert ada[:10] == [DENSE] * 10 and ada[10] == FUSED and ada[11:] == [REUSE] * 39
    # compact+adaspa: the static index alone before the first search
    both = _actions(SparsityConfig(mode="compact+adaspa", dense_steps=5, search_steps=(10, 20),
                                   search_kinds=("fused", "fused")), 50)
    assert both[:5] == [DENSE] * 5 and both[5:10] == [REUSE] * 5 and both[10] == FUSED and both[20] == FUSED


def test_yaml_lists_become_tuples_and_from_dict():
    cfg = SparsityConfig.from_dict({"search_steps": [12, 20, 40], "search_kinds": ["fused", "cached", "cached"],
                                    "dense_steps": 12, "sparsity": 0.75})
    assert cfg.search_steps == (12, 20, 40) and isinstance(cfg.search_kinds, tuple)
    hash(cfg)
    with pytest.raises(ValueError, match="unknown keys \\['sparsty'\\]"):
        SparsityConfig.from_dict({"sparsty": 0.5})


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"mode": "sparse"}, "mode must be one of"),
        ({"dense_steps": -1}, "dense_steps must be an int in"),
        ({"dense_steps": 2.0}, "dense_steps must be an int in"),
        ({"reference_steps": 0}, "reference_steps must be an int >= 1"),
        ({"search_steps": (30, 10)}, "search_steps must be strictly increasing"),
        ({"search_steps": (5, 30)}, "search_steps must lie in \\[dense_steps=10"),
        ({"search_steps": (10, 50)}, "search_steps must lie in"),
        ({"search_steps": "10"}, "search_steps must be a list or tuple"),
        ({"search_kinds": ("fused",)}, "search_kinds must have one entry per search step"),
        ({"search_kinds": ("fused", "lazy")}, "search_kinds entries must be one of"),
        ({"search_kinds": ("cached", "fused")}, "search_kinds must start with 'fused'"),
        ({"search_steps": (), "search_kinds": ()}, "search_steps must name at least one step"),
        ({"sparsity": 1.0}, "sparsity must be None or a number in \\[0, 1\\)"),
        ({"sparsity": float("nan")}, "sparsity must be None or a number"),
        ({"top_p": 0.0}, "top_p must be None or a number in \\(0, 1\\]"),
        ({"sparsity": None, "top_p": None, "head_adaptive": False}, "sparsity SparsityConfig|or top_p must be set"),
        ({"sparsity": None, "top_p": 0.9}, "must be set when head_adaptive is on"),
        ({"head_rule": "greedy"}, "head_rule must be one of"),
        ({"head_threshold": 1.0}, "head_threshold must be a number in \\(0, 1\\)"),
        ({"text_sink": 1}, "text_sink must be a bool"),
        ({"batch_index": "each"}, "batch_index must be one of"),
        ({"compact_config": ""}, "compact_config must be None or a non-empty path string"),
        ({"dense_threshold": 0.0}, "dense_threshold must be a number in \\(0, 1\\]"),
        ({"mass_query_rows": 24}, "mass_query_rows must be None or a power of two >= 16"),
        ({"mass_query_rows": 8}, "mass_query_rows must be None or a power of two >= 16"),
    ],
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None,
)
def test_bad_values_give_one_clear_error(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SparsityConfig(**kwargs)


def test_top_p_alone_and_dense_mode_need_no_search():
    SparsityConfig(sparsity=None, top_p=0.95, head_adaptive=False)
    SparsityConfig(mode="dense", search_steps=(), search_kinds=())
    SparsityConfig(mode="compact", search_steps=(), search_kinds=(), compact_config="configs/x.yaml")


@pytest.mark.parametrize("step, n", [(-1, 50), (50, 50), (0, 0)])
def test_bad_step(step, n):
    with pytest.raises(ValueError, match="step|num_steps"):
        SparsityConfig().action(step, n)
