"""Capture block-attention-mass statistics from any model that calls ``attn(q, k, v, ctx)``.

The offline Compact search only needs, per (layer, head), how much softmax mass lands at each
*relative tile offset*: the slab distance ``d = |slab_q - slab_k|`` and the absolute tile offsets
``|d_row|, |d_col|`` (its windows are centred on the query tile and symmetric). So instead of the
``NB x NB`` block-mass map of every call, a :class:`MassStore` keeps

* ``rel``   float64 ``[L, H, nt, nh, nw]``: summed over query tokens and calls, the mass at each
  relative offset (``nt, nh, nw`` = real tile grid, no padding slabs). A query block's row of the
  ``block_attention_mass`` map is the *mean* over its valid tokens, so it is weighted by its number
  of valid tokens: the result is the token-summed mass and ``rel.sum() + text = total``;
* ``text``  ``[L, H]``: the mass in text rows or text columns (always kept by the patterns);
* ``total`` ``[L, H]``: all mass (= number of valid query tokens x calls, up to rounding);
* ``samples`` ``[L]``: how many (batch sample, call) maps were added per layer.

That is ``L*H*nt*nh*nw`` numbers (30 x 24 x 33x6x5 = 5.7 MB for Hunyuan 720p at tiles (1,8,16))
whatever the number of steps or prompts, so memory stays bounded and one file per prompt is small.

Capture with :class:`CaptureAttention`, a drop-in attention entry point (design contract 3) that runs
dense attention with LSE through ``ctx.ops``, then ``ctx.ops.block_mass``, reduces the map to relative
offsets and adds it to the store (for the chosen steps only). Under sequence parallelism the local
statistics go through ``ctx.ops.reduce_rows`` and ``ctx.ops.gather_heads`` (contract 5), so every
rank holds the full store and rank 0 can save it::

    store = MassStore.for_layout(layout, num_layers=30, num_heads=24, model="hunyuan_video")
    attns = [CaptureAttention(i, store, steps=range(15, 50, 5)) for i in range(30)]
    ...  # run the denoising loop with these attention entry points
    store.save("mass_prompt0.pt")
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Iterable, Optional, Tuple, Union

import torch

from .._util import is_int
from ..sparsity.context import AttentionContext, AttentionLayer
from ..sparsity.attention_ops import global_head_stats
from ..layout import VideoLayout
from ..patterns.compact import real_tile_grid, relative_bins

__all__ = ["MassStore", "CaptureAttention", "reduce_block_mass", "MASS_FORMAT", "axis_pairs"]

MASS_FORMAT = "dist_compact.block_mass_stats/1"
_TENSORS = ("rel", "text", "total", "samples")
_KEYS = ("model", "num_layers", "num_heads", "grid", "tile", "text_tokens") + _TENSORS


def _load_failure(e: Exception) -> str:
    """One line on why ``torch.load`` refused a file (its messages run over several lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "Weights only load failed" in text:
        what = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        return (f"it holds a pickled Python object{f' ({what.group(1)})' if what else ''}, which is not loaded: "
                "it could run code")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _check_state(path, d: dict) -> None:
    """The loaded dict of a mass file has every key, of the right type, and finite tensors whose shapes
    follow from its metadata (so a store is never sized from numbers its tensors do not hold); one
    ValueError naming ``path`` otherwise."""
    missing = [k for k in _KEYS if k not in d]
    if missing:
        raise ValueError(f"{path}: mass file without {', '.join(map(repr, missing))}; it is damaged or was not "
                         "written by MassStore.save (capture it again)")
    for k in ("num_layers", "num_heads"):
        if not is_int(d[k]) or d[k] < 1:
            raise ValueError(f"{path}: {k} must be a positive int, got {d[k]!r}")
    if not is_int(d["text_tokens"]) or d["text_tokens"] < 0:
        raise ValueError(f"{path}: text_tokens must be an int >= 0, got {d['text_tokens']!r}")
    for k in ("grid", "tile"):
        v = d[k]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(is_int(x) and x >= 1 for x in v)):
            raise ValueError(f"{path}: {k} must be three positive ints, got {v!r}")
    if not isinstance(d["model"], str):
        raise ValueError(f"{path}: model must be a string, got {type(d['model']).__name__}")
    for k in _TENSORS:
        if not isinstance(d[k], torch.Tensor):
            raise ValueError(f"{path}: {k} must be a tensor, got {type(d[k]).__name__}")
    try:
        layout = VideoLayout(*d["grid"], tile=tuple(d["tile"]), text_tokens=d["text_tokens"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    L, H = d["num_layers"], d["num_heads"]
    shapes = {"rel": ((L, H, *real_tile_grid(layout)), torch.float64), "text": ((L, H), torch.float64),
              "total": ((L, H), torch.float64), "samples": ((L,), torch.int64)}
    for k, (shape, dtype) in shapes.items():
        t = d[k]
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, expected {shape} (from num_layers {L}, "
                             f"num_heads {H}, grid {tuple(d['grid'])}, tile {tuple(d['tile'])})")
        if dtype.is_floating_point and not t.is_floating_point():
            raise ValueError(f"{path}: {k} must be a float tensor, got {t.dtype}")
        if not dtype.is_floating_point and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{path}: {k} must be an int tensor, got {t.dtype}")
        if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {k} holds NaN or infinite values; it is damaged (capture it again)")
        if not dtype.is_floating_point and bool((t < 0).any()):
            raise ValueError(f"{path}: {k} holds negative counts; it is damaged (capture it again)")


def axis_pairs(n: int) -> torch.Tensor:
    """int64 ``[n]``: number of ordered index pairs in ``[0, n)^2`` at each distance ``|i - j|``."""
    d = torch.arange(n)
    return torch.where(d == 0, torch.full_like(d, n), 2 * (n - d))


def reduce_block_mass(mass: torch.Tensor, layout: VideoLayout,
                      q_blocks=None, row_weight: Optional[torch.Tensor] = None):
    """Reduce block-mass maps to relative-offset statistics (float64, on ``mass``'s device).

    Args:
        mass: ``[batch, heads, nq, NB]`` from ``block_attention_mass`` / ``ops.block_mass``: rows are the
            global query blocks ``q_blocks`` (a ``(start, stop)`` range or an int tensor of ids, default
            all), columns all blocks of ``layout``.
        layout: the global layout.
        row_weight: optional float ``[nq]`` weight per row (``ops.row_weight``: rows that several ranks
            hold count on one of them only).

    Returns:
        ``(rel [heads, nt, nh, nw], text [heads], total [heads])`` summed over the batch, each query
        block row weighted by its valid tokens (see the module docstring).
    """
    if not isinstance(mass, torch.Tensor) or mass.dim() != 4:
        raise ValueError(f"mass must be [batch, heads, q_blocks, k_blocks], got "
                         f"{tuple(mass.shape) if isinstance(mass, torch.Tensor) else type(mass).__name__}")
    NB = layout.num_blocks
    dev = mass.device
    # the row bookkeeping stays on the host (no device syncs); the map is reduced where it lies
    if q_blocks is None:
        ids = torch.arange(NB)
    elif isinstance(q_blocks, tuple):
        r0, r1 = q_blocks
        if not 0 <= r0 <= r1 <= NB:
            raise ValueError(f"query blocks [{r0}, {r1}) out of range for {NB} blocks")
        ids = torch.arange(r0, r1)
    else:
        ids = torch.as_tensor(q_blocks).long().cpu()
    if mass.shape[2] != ids.numel() or mass.shape[3] != NB:
        raise ValueError(f"mass {tuple(mass.shape)} does not match {ids.numel()} query blocks x {NB} key blocks "
                         f"of {layout}")
    H = mass.shape[1]
    nt, nh, nw = real_tile_grid(layout)
    nbv = nt * nh * nw
    w = layout.block_valid()[ids].to(torch.float64)
    if row_weight is not None:
        w = w * torch.as_tensor(row_weight).cpu().to(torch.float64)
    w = w.to(dev).view(-1, 1)
    vid = (ids < nbv).nonzero().squeeze(1)  # local rows that are (non-padding-slab) video blocks
    bins = relative_bins(layout, dev)[ids[vid].to(dev)].reshape(-1)
    vid = vid.to(dev)
    total = torch.zeros(H, dtype=torch.float64, device=dev)
    rel = torch.zeros(H, nbv, dtype=torch.float64, device=dev)
    for h in range(H):  # one head at a time: the float64 copy of a map stays NB x NB
        m = mass[:, h].sum(0, dtype=torch.float64).mul_(w)  # [nq, NB]
        total[h] = m.sum()
        rel[h].index_add_(0, bins, m[vid, :nbv].reshape(-1))
    text = total - rel.sum(1)
    return rel.view(H, nt, nh, nw), text, total


class MassStore:
    """Relative-offset block-mass statistics per (layer, head) of one shape (see module docstring).

    Args:
        num_layers, num_heads: model size (global head count).
        grid: latent grid ``(T, H, W)``; tile: ``(t, h, w)``; text_tokens: text tokens per sample.
        model: model name, carried into the searched config.
    """

    def __init__(self, num_layers: int, num_heads: int, grid: Tuple[int, int, int], tile: Tuple[int, int, int],
                 text_tokens: int = 0, model: str = ""):
        for name, v in (("num_layers", num_layers), ("num_heads", num_heads)):
            if not is_int(v) or v < 1:
                raise ValueError(f"MassStore.{name} must be a positive int, got {v!r}")
        if not isinstance(model, str):
            raise ValueError(f"MassStore.model must be a string, got {model!r}")
        # validates grid / tile / text the same way the layout does
        layout = VideoLayout(*tuple(grid), tile=tuple(tile), text_tokens=text_tokens)
        self.num_layers, self.num_heads, self.model = num_layers, num_heads, model
        self.grid, self.tile, self.text_tokens = layout.grid, layout.tile, text_tokens
        self.tile_grid = real_tile_grid(layout)
        L, H = num_layers, num_heads
        self.rel = torch.zeros(L, H, *self.tile_grid, dtype=torch.float64)
        self.text = torch.zeros(L, H, dtype=torch.float64)
        self.total = torch.zeros(L, H, dtype=torch.float64)
        self.samples = torch.zeros(L, dtype=torch.int64)

    @classmethod
    def for_layout(cls, layout: VideoLayout, num_layers: int, num_heads: int, model: str = "") -> "MassStore":
        return cls(num_layers, num_heads, layout.grid, layout.tile, layout.text_tokens, model)

    # ---------------------------------------------------------------- layout facts
    def layout(self) -> VideoLayout:
        """A layout of the captured shape (text after the video, no padding slabs)."""
        return VideoLayout(*self.grid, tile=self.tile, text_tokens=self.text_tokens)

    def check_layout(self, layout: VideoLayout) -> None:
        if (layout.grid, layout.tile, layout.text_tokens) != (self.grid, self.tile, self.text_tokens):
            raise ValueError(
                f"layout {layout} does not match this MassStore (grid {self.grid}, tile {self.tile}, "
                f"text {self.text_tokens}); use one store per shape"
            )

    def pairs(self) -> torch.Tensor:
        """float64 ``[nt, nh, nw]``: (query block, key block) pairs at each relative offset (the cost)."""
        nt, nh, nw = self.tile_grid
        return (axis_pairs(nt).view(-1, 1, 1) * axis_pairs(nh).view(1, -1, 1) * axis_pairs(nw).view(1, 1, -1)).double()

    def block_counts(self) -> Tuple[int, int]:
        """``(text_pairs, total_pairs)``: block pairs with a text row or column, and all block pairs."""
        lay = self.layout()
        nbv, nb = lay.num_video_blocks, lay.num_blocks
        return nb * nb - nbv * nbv, nb * nb

    @property
    def captured(self) -> torch.Tensor:
        """bool ``[L]``: layers with at least one captured map."""
        return self.samples > 0

    # ---------------------------------------------------------------- accumulate
    def add(self, layer: int, rel: torch.Tensor, text: torch.Tensor, total: torch.Tensor, samples: int = 1) -> None:
        """Add reduced statistics ``rel [H, nt, nh, nw]``, ``text [H]``, ``total [H]`` to ``layer``."""
        if not (isinstance(layer, int) and 0 <= layer < self.num_layers):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        H = self.num_heads
        if tuple(rel.shape) != (H, *self.tile_grid) or tuple(text.shape) != (H,) or tuple(total.shape) != (H,):
            raise ValueError(f"MassStore.add: expected rel {(H, *self.tile_grid)}, text/total ({H},); got "
                             f"{tuple(rel.shape)}, {tuple(text.shape)}, {tuple(total.shape)}")
        self.rel[layer] += rel.detach().to("cpu", torch.float64)
        self.text[layer] += text.detach().to("cpu", torch.float64)
        self.total[layer] += total.detach().to("cpu", torch.float64)
        self.samples[layer] += int(samples)

    def add_block_mass(self, layer: int, mass: torch.Tensor, layout: VideoLayout) -> None:
        """Single-device helper: reduce a full ``[B, H, NB, NB]`` block-mass map and add it."""
        self.check_layout(layout)
        self.add(layer, *reduce_block_mass(mass, layout), samples=mass.shape[0])

    def merged(self, other: "MassStore") -> "MassStore":
        """Sum of two stores of the same shape (e.g. several prompts searched as one average)."""
        if not isinstance(other, MassStore):
            raise TypeError(f"can only merge MassStore objects, got {type(other).__name__}")
        keys = ("num_layers", "num_heads", "grid", "tile", "text_tokens")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            raise ValueError(f"cannot merge stores of different shapes: {self!r} vs {other!r}")
        if self.model and other.model and self.model != other.model:
            raise ValueError(f"cannot merge stores of different models: {self.model!r} vs {other.model!r}")
        out = MassStore(self.num_layers, self.num_heads, self.grid, self.tile, self.text_tokens,
                        self.model or other.model)
        for k in ("rel", "text", "total", "samples"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    # ---------------------------------------------------------------- files
    def state_dict(self) -> dict:
        return {
            "format": MASS_FORMAT, "model": self.model, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "grid": list(self.grid), "tile": list(self.tile),
            "text_tokens": self.text_tokens, "rel": self.rel, "text": self.text, "total": self.total,
            "samples": self.samples,
        }

    def save(self, path: Union[str, pathlib.Path]) -> None:
        """Write the store (tensors + metadata, loadable with ``weights_only=True``): the whole file or,
        on a failure, nothing (written under a temporary name beside ``path``, then renamed)."""
        path = str(path)
        folder, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(folder, f".{name[:200]}.{os.getpid()}.tmp")
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: Union[str, pathlib.Path]) -> "MassStore":
        """Read a file written by :meth:`save`; anything else (another file, a damaged or edited one) is one
        ValueError naming the file and what is wrong, before any memory is sized from its metadata."""
        try:
            d = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a non-torch file
            raise ValueError(f"{path}: not a dist_compact mass file ({_load_failure(e)})") from None
        if not isinstance(d, dict) or d.get("format") != MASS_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{path}: not a dist_compact mass file of format {MASS_FORMAT!r} (got {got!r})")
        _check_state(path, d)
        out = cls(d["num_layers"], d["num_heads"], tuple(d["grid"]), tuple(d["tile"]), d["text_tokens"], d["model"])
        for k in _TENSORS:
            setattr(out, k, d[k].to(getattr(out, k).dtype))
        return out

    def __repr__(self) -> str:
        return (f"MassStore(model={self.model!r}, layers={self.num_layers}, heads={self.num_heads}, "
                f"grid={self.grid}, tile={self.tile}, text={self.text_tokens}, tile_grid={self.tile_grid}, "
                f"samples/layer={self.samples.tolist() if self.num_layers <= 8 else int(self.samples.sum())})")


class CaptureAttention(AttentionLayer):
    """Attention entry point that runs dense attention and records block mass into a :class:`MassStore`.

    ``out = attn(q, k, v, ctx)`` with this rank's q, k, v ``[batch, seq_local, heads_local, head_dim]``
    (block order) returns the dense output, so the model runs unchanged. On the steps in ``steps``
    (``None``: every step) it also computes the LSE, ``ctx.ops.block_mass`` and adds the reduced
    statistics of all heads to ``store[layer]`` (gathered over ranks).
    """

    def __init__(self, layer: int, store: MassStore, steps: Optional[Iterable[int]] = None):
        if not isinstance(store, MassStore):
            raise TypeError(f"store must be a MassStore, got {type(store).__name__}")
        if not (isinstance(layer, int) and 0 <= layer < store.num_layers):
            raise ValueError(f"layer must be an int in [0, {store.num_layers}), got {layer!r}")
        self.layer, self.store = layer, store
        self.steps = None if steps is None else frozenset(int(s) for s in steps)

    def captures(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        ops, layout = ctx.ops, ctx.layout
        if not self.captures(ctx.step):
            return ops.dense(q, k, v, layout, scale=ctx.scale)
        self.store.check_layout(layout)
        out, lse = ops.dense(q, k, v, layout, return_lse=True, scale=ctx.scale)
        mass = ops.block_mass(q, k, lse, layout, scale=ctx.scale)
        rel, text, total = reduce_block_mass(mass, layout, ops.q_blocks(layout), ops.row_weight(layout))
        H = rel.shape[0]
        packed = torch.cat([rel.reshape(H, -1), text.view(H, 1), total.view(H, 1)], dim=1)
        packed = global_head_stats(packed, ops)
        if packed.shape[0] != self.store.num_heads:
            raise ValueError(f"CaptureAttention: the model has {packed.shape[0]} heads but the store was made "
                             f"for {self.store.num_heads}")
        self.store.add(self.layer, packed[:, :-2].reshape(-1, *self.store.tile_grid), packed[:, -2],
                       packed[:, -1], samples=q.shape[0])
        return out

    def __repr__(self) -> str:
        steps = "all" if self.steps is None else sorted(self.steps)
        return f"CaptureAttention(layer={self.layer}, steps={steps})"
