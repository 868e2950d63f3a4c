"""Video token layout: the map between a DiT's token order and the block (tile) order of the kernels.

A video DiT flattens its latent grid of ``frames x height x width`` tokens in raster order
(frame-major) and may join text tokens before or after them. The block-sparse kernels want one
kernel block to be one spatio-temporal tile, so that a window in (frame, row, col) becomes a set of
whole blocks. :class:`VideoLayout` owns that reordering:

* the grid is cut into tiles of ``tile = (t, h, w)`` tokens, ``t*h*w == block_size``;
* tiles are ordered t-major (all tiles of the first temporal slab, then the next slab, ...), so a
  contiguous range of blocks is a range of whole frame slabs: sequence shards line up with
  temporal windows;
* tiles at the ragged edges of the grid (T, H or W not a multiple of the tile) hold fewer tokens;
  they are padded to ``block_size`` with their valid tokens first, and ``block_valid`` gives the
  number of valid tokens per block, so kernels mask padded keys and drop padded queries;
* the number of temporal slabs can be padded to a multiple of ``slab_multiple`` (a ring degree)
  with empty slabs (``block_valid == 0``), so every shard holds the same number of whole slabs;
* text tokens, wherever the model puts them, go to their own blocks after all video blocks.

Block order is therefore ``[video tile blocks ..., text blocks ...]`` of ``num_blocks * block_size``
positions; :meth:`to_blocks` / :meth:`from_blocks` move tensors between the two orders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Tuple

import torch

from ._util import as_int, cdiv

__all__ = ["VideoLayout", "SUPPORTED_BLOCK_SIZES"]

#: Block sizes the kernels accept: tl.dot needs at least 16 rows; 64 and 128 are the ones used on GPUs.
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

#: most block-order positions a layout may have (its maps and the kernels' offsets are int32-sized)
MAX_TOKENS = (1 << 31) - 1


@dataclass(frozen=True)
class VideoLayout:
    """Latent grid + text tokens + tile shape, and the permutation to block order.

    Args:
        frames, height, width: latent token grid (after patchify), any positive sizes.
        tile: tile shape ``(t, h, w)`` in tokens; ``t*h*w`` is the kernel block size
            (one of ``SUPPORTED_BLOCK_SIZES``).
        text_tokens: number of text tokens joined to the video tokens (0 for none).
        text_position: ``"before"`` or ``"after"`` the video tokens in the *model* order.
        slab_multiple: pad the number of temporal tile slabs to a multiple of this (e.g. the ring
            degree); the padding slabs are empty blocks with ``block_valid == 0``.

    Token order of the model: ``[text, video]`` or ``[video, text]``, video raster ``(f, r, c)``.
    Block order: video tiles t-major ``(slab, tile_row, tile_col)``; inside a tile the valid tokens
    in raster order first, then padding; then the text tokens, padded to whole blocks.
    """

    frames: int
    height: int
    width: int
    tile: Tuple[int, int, int] = (4, 4, 4)
    text_tokens: int = 0
    text_position: str = "after"
    slab_multiple: int = 1
    _device_cache: Dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # ints (NumPy integer scalars are converted; a bool is no int), checked before anything is built
        for name, least in (("frames", 1), ("height", 1), ("width", 1), ("text_tokens", 0), ("slab_multiple", 1)):
            val = getattr(self, name)
            v = as_int(val)
            if v is None or v < least:
                what = "a positive int" if least else "an int >= 0"
                raise ValueError(f"VideoLayout.{name} must be {what}, got {val!r}")
            object.__setattr__(self, name, v)
        try:
            tile = tuple(as_int(t) for t in self.tile)
        except TypeError:
            tile = ()
        if len(tile) != 3 or not all(t is not None and t >= 1 for t in tile):
            raise ValueError(f"VideoLayout.tile must be three positive ints (t, h, w), got {self.tile!r}")
        object.__setattr__(self, "tile", tile)
        bs = tile[0] * tile[1] * tile[2]
        if bs not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"VideoLayout.tile {tile} has volume {bs}; the block size must be one of "
                f"{SUPPORTED_BLOCK_SIZES}"
            )
        if not isinstance(self.text_position, str) or self.text_position not in ("before", "after"):
            raise ValueError(
                f"VideoLayout.text_position must be 'before' or 'after', got {self.text_position!r}"
            )
        if self.padded_len > MAX_TOKENS:
            raise ValueError(
                f"VideoLayout: {self.frames}x{self.height}x{self.width} video + {self.text_tokens} text tokens in "
                f"tiles {tile} give {self.padded_len} block-order positions, more than 2**31 - 1; use a smaller "
                f"grid (or fewer text tokens)"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def block_size(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def grid(self) -> Tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tile_grid(self) -> Tuple[int, int, int]:
        """Number of tiles along (t, h, w); t includes the empty padding slabs."""
        nt = cdiv(self.frames, self.tile[0])
        nt = cdiv(nt, self.slab_multiple) * self.slab_multiple
        return (nt, cdiv(self.height, self.tile[1]), cdiv(self.width, self.tile[2]))

    @property
    def num_slabs(self) -> int:
        """Temporal tile slabs (each ``tile[0]`` frames), padding slabs included."""
        return self.tile_grid[0]

    @property
    def blocks_per_slab(self) -> int:
        return self.tile_grid[1] * self.tile_grid[2]

    @property
    def num_video_blocks(self) -> int:
        return self.num_slabs * self.blocks_per_slab

    @property
    def num_text_blocks(self) -> int:
        return cdiv(self.text_tokens, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Tokens in the model order (video + text)."""
        return self.video_tokens + self.text_tokens

    @property
    def padded_len(self) -> int:
        """Positions in the block order (``num_blocks * block_size``)."""
        return self.num_blocks * self.block_size

    @property
    def video_padded_len(self) -> int:
        return self.num_video_blocks * self.block_size

    @cached_property
    def has_padding(self) -> bool:
        """True if some block holds fewer than ``block_size`` tokens (ragged tiles, padding slabs or
        a short text block); kernels skip all masking work when False."""
        T, H, W = self.grid
        tt, th, tw = self.tile
        return bool(T % tt or H % th or W % tw or self.num_slabs * tt != cdiv(T, tt) * tt
                    or self.text_tokens % self.block_size)

    @property
    def text_offset(self) -> int:
        """Index of the first video token in the model order."""
        return self.text_tokens if self.text_position == "before" else 0

    def with_(self, **changes) -> "VideoLayout":
        """A copy with some fields changed (e.g. ``slab_multiple`` for a ring degree)."""
        kw = dict(
            frames=self.frames, height=self.height, width=self.width, tile=self.tile,
            text_tokens=self.text_tokens, text_position=self.text_position,
            slab_multiple=self.slab_multiple,
        )
        kw.update(changes)
        return VideoLayout(**kw)

    # ------------------------------------------------------------------ maps (CPU, cached)
    @cached_property
    def _perm(self) -> torch.Tensor:
        """int64 [seq_len]: block-order position of each model-order token."""
        T, H, W = self.grid
        tt, th, tw = self.tile
        _, nh, nw = self.tile_grid
        f = torch.arange(T).view(T, 1, 1).expand(T, H, W)
        r = torch.arange(H).view(1, H, 1).expand(T, H, W)
        c = torch.arange(W).view(1, 1, W).expand(T, H, W)
        bt, bh, bw = f // tt, r // th, c // tw
        # valid extent of the tile each token is in (ragged at the far edges)
        eh = torch.clamp(H - bh * th, max=th)
        ew = torch.clamp(W - bw * tw, max=tw)
        rank = ((f - bt * tt) * eh + (r - bh * th)) * ew + (c - bw * tw)
        block = (bt * nh + bh) * nw + bw
        video_pos = (block * self.block_size + rank).reshape(-1)
        text_pos = self.video_padded_len + torch.arange(self.text_tokens)
        if self.text_position == "before":
            return torch.cat([text_pos, video_pos])
        return torch.cat([video_pos, text_pos])

    @cached_property
    def _block_valid(self) -> torch.Tensor:
        T, H, W = self.grid
        tt, th, tw = self.tile
        nt, nh, nw = self.tile_grid
        et = torch.clamp(T - torch.arange(nt) * tt, min=0, max=tt)
        eh = torch.clamp(H - torch.arange(nh) * th, min=0, max=th)
        ew = torch.clamp(W - torch.arange(nw) * tw, min=0, max=tw)
        video = (et.view(-1, 1, 1) * eh.view(1, -1, 1) * ew.view(1, 1, -1)).reshape(-1)
        n_text = self.num_text_blocks
        text = torch.clamp(self.text_tokens - torch.arange(n_text) * self.block_size, max=self.block_size)
        return torch.cat([video, text]).to(torch.int32)

    @cached_property
    def _positions(self) -> torch.Tensor:
        pos = torch.full((self.padded_len, 3), -1, dtype=torch.int64)
        T, H, W = self.grid
        f = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
        r = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
        c = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
        vid = self._perm[self.text_offset: self.text_offset + self.video_tokens]
        pos[vid] = torch.stack([f, r, c], dim=1)
        return pos

    def cached(self, key, build):
        """A value derived from this layout alone (with ``key`` naming what else it depends on, e.g. a
        device), built by ``build()`` on the first call and kept with the layout."""
        hit = self._device_cache.get(key)
        if hit is None:
            hit = self._device_cache[key] = build()
        return hit

    def _on(self, name: str, device) -> torch.Tensor:
        device = torch.device(device)
        return self.cached((name, str(device)), lambda: getattr(self, name).to(device))

    def permutation(self, device="cpu") -> torch.Tensor:
        """int64 [seq_len]: position in block order of each token of the model order."""
        return self._on("_perm", device)

    def block_valid(self, device="cpu") -> torch.Tensor:
        """int32 [num_blocks]: valid tokens at the start of each block (0 for empty padding slabs)."""
        return self._on("_block_valid", device)

    def token_positions(self, device="cpu") -> torch.Tensor:
        """int64 [padded_len, 3]: (frame, row, col) of each block-order position; -1 for text/padding."""
        return self._on("_positions", device)

    def token_valid(self, device="cpu") -> torch.Tensor:
        """bool [padded_len]: which block-order positions hold a real token."""
        bv = self.block_valid(device)
        off = torch.arange(self.block_size, device=device)
        return (off.view(1, -1) < bv.view(-1, 1).to(off.dtype)).reshape(-1)

    # ------------------------------------------------------------------ tiles
    def tile_coords(self) -> torch.Tensor:
        """int64 [num_video_blocks, 3]: tile index (slab, tile_row, tile_col) of each video block."""
        nt, nh, nw = self.tile_grid
        b = torch.arange(self.num_video_blocks)
        return torch.stack([b // (nh * nw), (b // nw) % nh, b % nw], dim=1)

    def tile_origin(self) -> torch.Tensor:
        """int64 [num_video_blocks, 3]: (frame, row, col) of the first token of each video tile."""
        return self.tile_coords() * torch.tensor(self.tile)

    def is_text_block(self) -> torch.Tensor:
        """bool [num_blocks]."""
        out = torch.zeros(self.num_blocks, dtype=torch.bool)
        out[self.num_video_blocks:] = True
        return out

    def slab_of_block(self) -> torch.Tensor:
        """int64 [num_blocks]: temporal slab of each block; -1 for text blocks."""
        out = torch.full((self.num_blocks,), -1, dtype=torch.int64)
        out[: self.num_video_blocks] = torch.arange(self.num_video_blocks) // self.blocks_per_slab
        return out

    # ------------------------------------------------------------------ permute tensors
    def _check_len(self, x: torch.Tensor, dim: int, expected: int, what: str) -> int:
        dim = dim % x.dim()
        if x.shape[dim] != expected:
            raise ValueError(
                f"{what}: expected {expected} tokens along dim {dim} for {self}, got shape {tuple(x.shape)}"
            )
        return dim

    def to_blocks(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Model order -> block order along ``dim`` (``seq_len`` -> ``padded_len``, zeros in padding)."""
        dim = self._check_len(x, dim, self.seq_len, "VideoLayout.to_blocks")
        shape = list(x.shape)
        shape[dim] = self.padded_len
        out = x.new_zeros(shape)
        out.index_copy_(dim, self.permutation(x.device), x)
        return out

    def from_blocks(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Block order -> model order along ``dim`` (padding dropped)."""
        dim = self._check_len(y, dim, self.padded_len, "VideoLayout.from_blocks")
        return y.index_select(dim, self.permutation(y.device))

    def __repr__(self) -> str:
        text = f", text={self.text_tokens} {self.text_position}" if self.text_tokens else ""
        slab = f", slab_multiple={self.slab_multiple}" if self.slab_multiple > 1 else ""
        return (
            f"VideoLayout(grid={self.frames}x{self.height}x{self.width}, tile={self.tile}{text}{slab}; "
            f"blocks={self.num_video_blocks}+{self.num_text_blocks} of {self.block_size}, "
            f"tokens={self.seq_len}, padded={self.padded_len})"
        )
