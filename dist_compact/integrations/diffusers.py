"""Our attention inside diffusers' video DiTs (and the embedded model): :func:`sparsify`.

::

    from dist_compact import SparsityConfig, denoising_state, sparsify
    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
    sparsify(pipe.transformer, SparsityConfig(mode="adaspa", sparsity=0.8))
    state = denoising_state(pipe.transformer)
    state.begin(50)
    video = pipe(prompt, num_inference_steps=50, callback_on_step_end=state.on_step_end).frames

Supported models: diffusers' ``WanTransformer3DModel`` (self-attention sparse; the cross-attention
to the text stays diffusers' own), ``HunyuanVideoTransformer3DModel`` (joint text + video attention
of the dual- and single-stream blocks; the text tokens go to their own blocks after the video
blocks, as our layout's text sink expects; the token refiner's text-only attention stays stock) and
:class:`~dist_compact.models.embedded.EmbeddedDiT`.

How it is installed (the torchtitan way: hooks and processors on the stock modules, no model code
copied per model; what each model is, and where its hooks go, is its adapter,
:mod:`dist_compact.models.adapters`):

* a forward pre-hook on the transformer reads the latent grid from the input ``hidden_states``
  ``[B, C, F, H, W]`` and the patch size from ``transformer.config`` (``(F/pt, H/ph, W/pw)``
  tokens), the text token count from ``encoder_attention_mask`` (HunyuanVideo), builds the global
  :class:`~dist_compact.layout.VideoLayout` (``sp.layout_for`` applied) and the
  :class:`~dist_compact.sparsity.context.AttentionContext` of this forward (step from the
  :class:`DenoisingState`);
* the video tokens go to block order ONCE per forward, and are sharded there: a hook on the first
  module that sees them as tokens (Wan: pre-hook of ``blocks[0]``; HunyuanVideo: output of
  ``x_embedder``) applies ``layout.to_blocks`` then ``sp.shard``; a hook on the ``rope`` output does
  the same to the rotary tables, so every block sees tokens and their positions in one order. All
  other ops of these blocks are per token, so the order does not change them. A hook on
  ``proj_out``'s output gathers (``sp.gather``) and returns to model order (``from_blocks``);
* the attention modules get our processor: q, k, v exactly as the stock processor (diffusers'
  projection / norm / ``apply_rotary_emb`` helpers), then ``attn(q, k, v, ctx)`` (DenseAttention or
  SparseAttention, wrapped by the sequence-parallel plan), then the stock output projections.

Padding. Ragged tiles hold zero tokens after ``to_blocks``; they are masked as keys (``block_valid``),
their outputs are dropped when leaving block order, so they never reach a real token.

HunyuanVideo text masks. The stock model masks the padded prompt tokens as keys. Here each sample's
valid prompt length ``l`` (from ``encoder_attention_mask``, valid tokens first) is the layout's
``text_tokens``; the padded prompt tokens take no part in attention (their rows get zeros; they
never reach a video token, as in the stock model where they are masked keys). Samples of one batch
with different lengths run as one attention call per distinct length (exact; e.g. the
unconditional half of classifier-free guidance).

The denoising step. Schedules (dense warm-up, searches) need the step index; the transformer does
not know it, so it is read from a :class:`~dist_compact.integrations.core.DenoisingState` that the
pipeline runner updates:
``state.begin(num_steps)`` before the pipeline call and ``callback_on_step_end=state.on_step_end``
(diffusers calls it after every step ``i``; it sets ``step = i + 1``).
:mod:`dist_compact.run.jobs.diffusers` does both. Without it the step stays 0.

One layout, one set of attention objects: every distinct layout (Wan: one per video size;
HunyuanVideo: one per prompt length) gets its own per-layer attention objects (so the cached
indices of a classifier-free-guidance pair do not evict each other), at most ``MAX_LAYOUTS`` of
them (least recently used dropped).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..models.adapters import adapter_for
from ..parallel.plan import SequenceParallel
from ..sparsity.config import SparsityConfig
from .core import DenoisingState, IntegrationHandle, check_model, install

__all__ = ["sparsify", "SparsifyHandle"]


class SparsifyHandle(IntegrationHandle):
    """What :func:`sparsify` installed on one transformer (``dist_compact.integrations.installed(model)``):
    the stream hooks (tokens to block order and this rank's shard once per forward, back at the
    output) and our processors. Attributes: :class:`~dist_compact.integrations.core.IntegrationHandle`'s."""

    WHO = "sparsify"

    def check_forward(self, grid) -> None:
        _refuse_diffusers_parallelism(self.model)


def _refuse_diffusers_parallelism(transformer) -> None:
    """sparsify shards the tokens itself: diffusers' own parallelism on the same model would split them
    a second time (``enable_parallelism`` before or after the install)."""
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(f"sparsify: {type(transformer).__name__} has diffusers' parallelism enabled "
                         "(enable_parallelism); sparsify shards the tokens itself (sequence_parallel=...): use "
                         "dist_compact.integrations.diffusers_backend.set_sparse_backend with diffusers' parallelism")


def sparsify(transformer, sparsity_config: Optional[SparsityConfig] = None, *, compact=None,
             sequence_parallel=None, tile: Optional[Sequence[int]] = None, state: Optional[DenoisingState] = None,
             stats=None, backend: str = "auto", attention_factory: Optional[Callable] = None):
    """Install dist_compact attention on ``transformer`` (in place) and return it.

    Args:
        transformer: diffusers ``WanTransformer3DModel`` / ``HunyuanVideoTransformer3DModel``, or an
            :class:`~dist_compact.models.embedded.EmbeddedDiT` (any model with an adapter).
        sparsity_config: the :class:`SparsityConfig` (default: ``SparsityConfig()``, AdaSpa's
            schedule); ``mode="dense"`` gives outputs equal to the stock model.
        compact: the static pattern object of the Compact modes (``index_for(layer, layout,
            num_heads)``, e.g. a :class:`~dist_compact.patterns.CompactConfig`), or a config file path;
            default: ``sparsity_config.compact_config`` loaded when the mode needs one.
        sequence_parallel: this rank's :class:`~dist_compact.parallel.SequenceParallel` plan (None: one
            process). Every rank calls the transformer with the same full inputs and gets the full
            output; inside, each rank holds its shard of the tokens.
        tile: kernel tile ``(t, h, w)`` in latent tokens; default
            :func:`~dist_compact.integrations.core.default_tile` of each forward's grid (or the tile a
            Compact config was searched with).
        state: the :class:`DenoisingState` to read the step from (default: a new one, see
            :func:`dist_compact.integrations.denoising_state`); share one between the transformers of one
            pipeline.
        stats: an :class:`~dist_compact.stats.AttentionStats` to record into (default: a new one).
        backend: attention kernels, ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.
        attention_factory: ``factory(num_layers, sparsity, compact, sp) -> [attn, ...]`` replacing
            :func:`dist_compact.sparsity.attention.build_attention` (which already wraps with ``sp``).

    Calling it again replaces the previous installation; :func:`dist_compact.unsparsify` removes it.
    """
    check_model("sparsify", transformer)
    adapter = adapter_for(transformer, "sparsify")
    sparsity, state, compact, tile, stats = SparsifyHandle.checked(
        "sparsify", adapter, sparsity_config, backend, state, compact, tile, stats,
        attention_factory=attention_factory)
    _refuse_diffusers_parallelism(transformer)
    if sequence_parallel is not None:
        if not isinstance(sequence_parallel, SequenceParallel):
            raise TypeError("sparsify: sequence_parallel must be a SequenceParallel plan, got "
                            f"{type(sequence_parallel).__name__}")
        sequence_parallel.config.check(num_heads=adapter.num_heads)
    h = SparsifyHandle(transformer, adapter, sparsity=sparsity, compact=compact, tile=tile, state=state, stats=stats,
                       backend=backend, sp=sequence_parallel, attention_factory=attention_factory)
    install(transformer, h)
    h.hook_forward(stream=True)
    h.set_processors(lambda layer: adapter.processor(h, layer))
    return transformer
