"""Hostile inputs to the diffusers integration's public surface: one clear line each, before any work.

``sparsify``, ``set_sparse_backend``, ``cp_plan``, ``installed`` / ``denoising_state``,
:class:`DenoisingState`, ``default_tile`` and ``ChunkGeometry.build`` given wrong types, out-of-range
numbers, wrong shapes, wrappers instead of the transformer, or a model set up for another kind of
parallelism. Each case names the input, what it got and the fix in ONE line of the exact exception
type (docs/errors.md); NumPy integers count as ints. Tiny random-weight models (CPU, fp32).
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install -e '.[diffusers]'")

from dist_compact import denoising_state, installed, sparsify  # noqa: E402
from dist_compact.integrations import DenoisingState  # noqa: E402
from dist_compact.integrations.core import default_tile  # noqa: E402
from dist_compact.integrations.diffusers_backend import ChunkGeometry, cp_plan, set_sparse_backend  # noqa: E402
from dist_compact.layout import VideoLayout  # noqa: E402
from dist_compact.search.config_file import save_config  # noqa: E402
from test_diffusers_integration import (COMPACT, DENSE, compact_for, hunyuan_inputs, run, tiny_hunyuan,  # noqa: E402
                                        tiny_wan, wan_inputs)

TILE = (1, 4, 4)
INSTALLERS = {"sparsify": sparsify, "set_sparse_backend": set_sparse_backend}


def one_line(exc_type, pattern, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises exactly ``exc_type`` with one line matching ``pattern``."""
    with pytest.raises(exc_type, match=pattern) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc_type
    assert "\n" not in str(info.value)
    return info.value


def installed_wan(who, **kwargs):
    model = tiny_wan()
    INSTALLERS[who](model, DENSE, tile=TILE, backend="torch", **kwargs)
    return model


# ---------------------------------------------------------------------------------------------- install arguments
@pytest.mark.parametrize("who", INSTALLERS)
def test_tile_that_is_not_a_sequence(who):
    # was: TypeError "'int' object is not iterable" from inside the install
    one_line(ValueError, rf"^{who}: tile must be three positive ints \(t, h, w\) with t \* h \* w in "
             r"\(16, 32, 64, 128\), e\.g\. \(1, 4, 4\), got 16$", INSTALLERS[who], tiny_wan(), DENSE, tile=16)


@pytest.mark.parametrize("who", INSTALLERS)
def test_state_with_a_non_int_field_is_refused_at_install(who):
    # was: installed, then "'<' not supported between instances of 'int' and 'str'" at the first forward
    state = DenoisingState()
    state.num_steps = "5"
    one_line(ValueError, rf"^{who}: state\.num_steps must be an int >= 1 \(set it with state\.begin\(num_steps\)\), "
             r"got '5'$", INSTALLERS[who], tiny_wan(), DENSE, state=state)


@pytest.mark.parametrize("who", INSTALLERS)
def test_stats_that_is_no_recorder(who):
    # was: installed, then AttributeError "'str' object has no attribute 'call'" at the first sparse forward
    one_line(TypeError, rf"^{who}: stats must be a dist_compact\.stats\.AttentionStats \(or None for a new one\), "
             r"got str$", INSTALLERS[who], tiny_wan(), DENSE, stats="stats")


@pytest.mark.parametrize("who", INSTALLERS)
def test_attention_factory_that_is_not_callable(who):
    # was: installed, then TypeError "'str' object is not callable" at the first forward
    one_line(TypeError, rf"^{who}: attention_factory must be callable as factory\(num_layers, sparsity, compact, sp\) "
             r"-> \[attn, \.\.\.\] \(or None\), got str$", INSTALLERS[who], tiny_wan(), DENSE, attention_factory="f")


@pytest.mark.parametrize("made,err,pattern", [
    (5, TypeError, r"attention_factory returned int; it must return a list of 2 attention callables "
                   r"attn\(q, k, v, ctx\), one per layer$"),
    ([None, None], TypeError, r"attention_factory's entry 0 is NoneType, not a callable attn\(q, k, v, ctx\); "
                              r"return one attention callable per layer$"),
])
def test_attention_factory_result_is_checked(made, err, pattern):
    # was: "'int' object is not iterable" / "'NoneType' object is not callable" deep in the forward
    model = installed_wan("sparsify", attention_factory=lambda *a: made)
    one_line(err, r"^sparsify: " + pattern, run, model, wan_inputs())


@pytest.mark.parametrize("mode", [DENSE, COMPACT], ids=["dense", "compact"])
def test_compact_of_a_wrong_type_names_the_installer_in_every_mode(mode):
    # was: ignored under mode="dense"; under a Compact mode the message named "sparsify"
    one_line(TypeError, r"^set_sparse_backend: compact must be a Compact pattern object with index_for\(layer, layout, "
             r"num_heads\) \(e\.g\. a CompactConfig\) or a config file path \(\.yaml / \.json\), got 3$",
             set_sparse_backend, tiny_wan(), mode, compact=3)


@pytest.mark.parametrize("who", INSTALLERS)
def test_compact_as_a_pathlib_path_is_a_config_file_path(who, tmp_path):
    # was: TypeError "compact must have index_for(...) or be a config file path" for a pathlib.Path
    path = tmp_path / "compact.yaml"
    save_config(compact_for(2), path)
    model = tiny_wan()
    INSTALLERS[who](model, COMPACT, compact=Path(path), tile=TILE, backend="torch")
    assert installed(model).compact.num_layers == 2


# ---------------------------------------------------------------------------------------------- the model argument
@pytest.mark.parametrize("who", ["sparsify", "set_sparse_backend", "cp_plan"])
def test_a_pipeline_instead_of_its_transformer(who):
    # was: "unsupported model WanPipeline; supported: ..." (no word of pipe.transformer)
    class WanPipeline:  # what a user holds after WanPipeline.from_pretrained
        transformer = tiny_wan()

    fn = cp_plan if who == "cp_plan" else INSTALLERS[who]
    one_line(TypeError, rf"^{who}: got the pipeline WanPipeline, not a transformer; pass pipe\.transformer "
             r"\(and pipe\.transformer_2 where the pipeline has two\)$", fn, WanPipeline())


def test_a_compiled_transformer():
    # was: "unsupported model OptimizedModule; supported: ..." (no word of the model inside)
    one_line(TypeError, r"^sparsify: got a torch\.compile'd WanTransformer3DModel \(OptimizedModule\); install on "
             r"the model itself \(sparsify\(compiled\._orig_mod\)\), then compile$", sparsify,
             torch.compile(tiny_wan()))


def test_sparsify_on_a_model_with_diffusers_parallelism():
    # was: installed; under torchrun the forward failed with "expected 108 tokens ... (was the stream permuted
    # twice?)", since diffusers' cp plan had split the tokens before sparsify's own sharding.
    # enable_parallelism records its config on the model: that attribute is what is read
    pattern = (r"^sparsify: WanTransformer3DModel has diffusers' parallelism enabled \(enable_parallelism\); sparsify "
               r"shards the tokens itself \(sequence_parallel=\.\.\.\): use dist_compact\.integrations\."
               r"diffusers_backend\.set_sparse_backend with diffusers' parallelism$")
    cp = SimpleNamespace(context_parallel_config=object(), tensor_parallel_config=None)
    model = tiny_wan()
    model._parallel_config = cp
    one_line(ValueError, pattern, sparsify, model, DENSE)
    assert installed(model) is None
    model = installed_wan("sparsify")  # enable_parallelism after the install: refused at the forward
    model._parallel_config = cp
    one_line(ValueError, pattern, run, model, wan_inputs())


# ---------------------------------------------------------------------------------------------- forward inputs
@pytest.mark.parametrize("who", INSTALLERS)
def test_hunyuan_mask_of_values_other_than_0_and_1(who):
    # was: RuntimeError "index_copy_(): Source/destination tensor must have same slice shapes" (sparsify) or
    # "diffusers' cp plan must split the video tokens only" (set_sparse_backend), after the embedders ran
    model = tiny_hunyuan()
    INSTALLERS[who](model, DENSE, tile=TILE, backend="torch")
    inputs = hunyuan_inputs()
    inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"] * 2
    one_line(ValueError, rf"^{who}: encoder_attention_mask must hold 0 or 1 per prompt token \(1 = valid, valid "
             r"tokens first\), got values in \[0, 2\]$", run, model, inputs)


def test_hunyuan_mask_shape_error_names_the_installer():
    # was: "sparsify: encoder_attention_mask must be ..." from set_sparse_backend's forward
    model = tiny_hunyuan()
    set_sparse_backend(model, DENSE, tile=TILE, backend="torch")
    inputs = hunyuan_inputs()
    inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"][:, :5]
    one_line(ValueError, r"^set_sparse_backend: encoder_attention_mask must be \[batch, text_len\] = \[2, 9\] \(that "
             r"of encoder_hidden_states\), got \(2, 5\)$", run, model, inputs)


@pytest.mark.parametrize("who", INSTALLERS)
def test_hunyuan_without_prompt_tokens(who):
    # was: AttributeError "'NoneType' object has no attribute 'shape'" from the adapter
    model = tiny_hunyuan()
    INSTALLERS[who](model, DENSE, tile=TILE, backend="torch")
    one_line(ValueError, rf"^{who}: encoder_hidden_states must be the prompt tokens \[batch, text_len, channels\], "
             r"got NoneType$", run, model, {**hunyuan_inputs(), "encoder_hidden_states": None})


# ---------------------------------------------------------------------------------------------- DenoisingState
def test_denoising_state_refuses_bad_fields_when_built():
    # was: built, then "'<=' not supported ..." or a schedule error at the first forward
    one_line(ValueError, r"^DenoisingState\.num_steps must be an int >= 1 \(the steps of the run\), got 2\.5$",
             DenoisingState, num_steps=2.5)
    one_line(ValueError, r"^DenoisingState\.step must be an int >= 0 \(the 0-based step of the next forward\), "
             r"got -1$", DenoisingState, step=-1)


def test_denoising_state_takes_numpy_ints():
    # was: ValueError "DenoisingState.begin: num_steps must be an int >= 1, got np.int64(5)"
    state = DenoisingState().begin(np.int64(5))
    assert state.num_steps == 5 and type(state.num_steps) is int
    state = DenoisingState(step=np.int32(1), num_steps=np.int64(4))
    assert (state.step, state.num_steps) == (1, 4) and type(state.step) is int


def test_step_set_by_hand_to_a_non_int():
    # was: TypeError "'<=' not supported between instances of 'int' and 'str'" at the forward
    model = installed_wan("sparsify")
    denoising_state(model).step = "1"
    one_line(ValueError, r"^DenoisingState: step and num_steps must be ints, got step='1', num_steps=50; set them "
             r"with state\.begin\(num_steps\) and callback_on_step_end=state\.on_step_end$", run, model, wan_inputs())


@pytest.mark.parametrize("step_index", [1.5, "2", None, -1, math.nan, True])
def test_on_step_end_refuses_a_step_index_that_is_no_int(step_index):
    # was: 1.5 -> step 2, "2" -> step 3, -1 -> step 0, True -> step 2 silently; None / nan other errors
    state = DenoisingState().begin(5)
    one_line(ValueError, r"^DenoisingState\.on_step_end: step_index must be an int >= 0 \(the step just done, as "
             r"diffusers passes it to callback_on_step_end\), got ", state.on_step_end, None, step_index, 999, {})
    assert state.step == 0
    for ok, nxt in [(np.int64(1), 2), (torch.tensor(2), 3), (3, 4)]:
        state.on_step_end(None, ok, 999, {})
        assert state.step == nxt and type(state.step) is int


# ---------------------------------------------------------------------------------------------- queries, helpers
@pytest.mark.parametrize("fn", [installed, denoising_state])
def test_queries_on_something_that_is_not_a_model(fn):
    # was: AttributeError "'NoneType' object has no attribute '__dict__'"
    one_line(TypeError, rf"^{fn.__name__}: transformer must be the model \(a torch\.nn\.Module\) that sparsify / "
             r"set_sparse_backend / sparsify_xfuser installed on, got NoneType$", fn, None)


@pytest.mark.parametrize("grid", [(0, 5, 7), (-1, 2, 2), (3.5, 5, 7), (3, 5), "abc", None])
def test_default_tile_of_a_bad_grid(grid):
    # was: a tile for (0, 5, 7), (-1, 2, 2), (3.5, 5, 7); unpacking / operand errors for the others
    one_line(ValueError, r"^default_tile: grid must be three positive ints \(frames, height, width\) of latent tokens, "
             r"e\.g\. \(21, 30, 52\), got ", default_tile, grid)
    assert default_tile((np.int64(21), 30, 52)) == (1, 16, 8)


@pytest.mark.parametrize("ring,rank,pattern", [
    (0, 0, r"ring must be an int >= 1 \(the ring degree\), got 0$"),
    (2.0, 0, r"ring must be an int >= 1 \(the ring degree\), got 2\.0$"),
    (2, 2, r"rank must be an int in \[0, ring - 1 = 1\] \(this rank's ring position\), got 2$"),
    (2, -1, r"rank must be an int in \[0, ring - 1 = 1\] \(this rank's ring position\), got -1$"),
])
def test_chunk_geometry_of_a_bad_ring_or_rank(ring, rank, pattern):
    # was: ZeroDivisionError, TypeError, IndexError, and rank -1 silently taken as the last chunk
    layout = VideoLayout(3, 6, 6, tile=TILE)
    one_line(ValueError, r"^ChunkGeometry\.build: " + pattern, ChunkGeometry.build, layout, ring, rank)
    assert ChunkGeometry.build(layout, np.int64(2), np.int64(1)).rank == 1
