"""Coordinator: one rank decides, every rank agrees (configs, cached indices, global statistics).

* :meth:`Coordinator.broadcast_object`: the source rank loads (e.g. the sparsity config file) and
  broadcasts the object; a load error is broadcast too, so every rank raises it instead of hanging.
* :meth:`Coordinator.check_same` / :meth:`check_config` / :meth:`check_indices`: every rank hashes
  what it holds (:func:`config_digest`, :meth:`BlockIndex.digest`) and all-gathers the hashes; any
  difference raises the same :class:`ParallelMismatchError` on every rank, naming the ranks.
* :meth:`Coordinator.broadcast_index`: a cached :class:`BlockIndex` from the rank that searched it.
* :func:`gather_index`: the global index from the local ones every rank searched (its heads and
  query rows), through the ops' ``reduce_rows`` / ``gather_heads`` only, so it works for one
  device, Ulysses, ring and hybrid alike.
* :func:`global_head_stats`: contract 5 of docs/design.md (sum over rows, then all heads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..sparsity.attention_ops import AttentionOps, global_head_stats
from ..block_index import BlockIndex
from ..layout import VideoLayout

__all__ = ["Coordinator", "ParallelLoadError", "ParallelMismatchError", "config_digest", "gather_index", "global_head_stats"]


class ParallelMismatchError(RuntimeError):
    """Ranks hold different configs or indices (they would compute different things)."""


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, BlockIndex):
        return {"__BlockIndex__": obj.digest()}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": [str(t.dtype), list(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()]}
    if isinstance(obj, float):
        return repr(obj)  # exact, and the same text on every rank
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    return repr(obj)


def _leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a.b": value}`` of a plain config (:func:`_plain`); lists are leaves."""
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            if k != "__type__":
                out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: obj}


def _differing_keys(configs: List[Any], limit: int = 3) -> List[str]:
    """``"<key>: ranks [0]: <value>; ranks [1]: <value>"`` for the first ``limit`` keys whose values differ
    between the ranks' plain configs (values shown up to 40 characters)."""
    leaves = [_leaves(c) for c in configs]
    out = []
    for key in sorted(set().union(*leaves)):
        groups: Dict[str, List[int]] = {}
        for r, lv in enumerate(leaves):
            text = json.dumps(lv.get(key, "<missing>"), sort_keys=True)
            groups.setdefault(text[:40] + ("..." if len(text) > 40 else ""), []).append(r)
        if len(groups) > 1:
            out.append(f"{key} differs: " + ", ".join(f"ranks {rs}: {v}" for v, rs in
                                                     sorted(groups.items(), key=lambda kv: kv[1])))
        if len(out) == limit:
            break
    return out


def config_digest(obj: Any) -> str:
    """sha256 of a config (dataclasses, dicts, lists, scalars, tensors, BlockIndex): equal iff same content."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class ParallelLoadError(RuntimeError):
    """What a rank could not load, raised on the ranks that waited for it (the loading rank raises its
    own exception)."""


class _LoadError:
    def __init__(self, text: str):
        self.text = text


class Coordinator:
    """Agreement among the ranks of ``group`` (default: the world); ``src`` is a rank of ``group``.

    On one process (torch.distributed not initialised) every method works locally.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, src: int = 0):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        if not 0 <= src < self.world_size:
            raise ValueError(f"Coordinator: src {src} is not a rank of a group of {self.world_size}")
        self.src = src

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _device(self) -> torch.device:
        if self.active and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ broadcast
    def broadcast_object(self, obj: Any = None, *, load: Optional[Callable[[], Any]] = None,
                         src: Optional[int] = None) -> Any:
        """``obj`` (or ``load()``, called on the source rank only) from the source rank to all.

        A failing ``load()`` fails every rank: the loading rank raises its own exception, the others a
        :class:`ParallelLoadError` with its message (so no rank waits for an object that never comes)."""
        if not (self.active and self.world_size > 1):
            return load() if load is not None else obj
        src = self.src if src is None else src
        own = None
        if self.rank == src:
            if load is not None:
                try:
                    obj = load()
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                    own, obj = e, _LoadError(f"{type(e).__name__}: {e}")
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        obj = box[0]
        if own is not None:
            raise own
        if isinstance(obj, _LoadError):
            raise ParallelLoadError(f"loading on rank {src} failed: {obj.text}")
        return obj

    def broadcast_index(self, index: Optional[BlockIndex], src: Optional[int] = None,
                        device: Optional[Union[str, torch.device]] = None) -> BlockIndex:
        """A :class:`BlockIndex` held by the source rank (None elsewhere), on every rank."""
        src = self.src if src is None else src
        meta = None
        if self.rank == src:
            if not isinstance(index, BlockIndex):
                meta = _LoadError(f"broadcast_index: rank {src} has no BlockIndex (got {type(index).__name__})")
            else:
                meta = (tuple(index.counts.shape), index.max_count, index.block_size, index.num_k_blocks)
        meta = self.broadcast_object(meta, src=src)
        shape, width, bs, nk = meta
        comm = self._device()
        if self.rank == src:
            counts, indices = index.counts.to(comm), index.indices.to(comm)
        else:
            counts = torch.empty(shape, dtype=torch.int32, device=comm)
            indices = torch.empty((*shape, width), dtype=torch.int32, device=comm)
        if self.active and self.world_size > 1:
            dist.broadcast(counts, src=self._global(src), group=self.group)
            dist.broadcast(indices, src=self._global(src), group=self.group)
        out = BlockIndex(counts, indices, bs, nk)
        return out.to(device) if device is not None else out

    def decide(self, fn: Callable[..., Any], *args, src: Optional[int] = None, **kwargs) -> Any:
        """``fn(*args)`` computed on the source rank and broadcast (a decision taken once)."""
        src = self.src if src is None else src
        return self.broadcast_object(load=(lambda: fn(*args, **kwargs)), src=src)

    def gather_object(self, obj: Any) -> List[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` of the group, on every rank (``[obj]`` on one process)."""
        if not (self.active and self.world_size > 1):
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        """Wait for every rank of the group (nothing on one process)."""
        if self.active and self.world_size > 1:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------ agreement
    def check_same(self, what: str, digest: str) -> str:
        """All ranks must hold the same ``digest`` of ``what``; else one clear error on every rank."""
        if not (self.active and self.world_size > 1):
            return digest
        digests = self.gather_object(digest)
        if len(set(digests)) > 1:
            groups: Dict[str, List[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            desc = "; ".join(f"ranks {rs}: {d[:12]}" for d, rs in sorted(groups.items(), key=lambda kv: kv[1]))
            raise ParallelMismatchError(f"{what}: not the same on every rank ({desc}); every rank must hold the same one")
        return digest

    def check_config(self, config: Any, what: str = "sparsity config") -> str:
        """``check_same`` of the config's digest; a mismatch names the keys that differ and each rank's value."""
        try:
            return self.check_same(what, config_digest(config))
        except ParallelMismatchError as e:
            # every rank saw the same digests and is here: one more collective names the keys
            keys = _differing_keys(self.gather_object(_plain(config)))
            if not keys:
                raise
            raise ParallelMismatchError(f"{what}: not the same on every rank ({'; '.join(keys)}); every rank must hold "
                                        "the same one") from e

    def check_indices(self, indices: Union[Mapping[Any, BlockIndex], Sequence[BlockIndex]],
                      what: str = "cached block indices") -> str:
        """Hash of a set of global indices (e.g. ``{(layer, step): index}``), checked across ranks."""
        items = indices.items() if isinstance(indices, Mapping) else enumerate(indices)
        h = hashlib.sha256()
        for key, idx in sorted(((str(k), v) for k, v in items), key=lambda kv: kv[0]):
            if not isinstance(idx, BlockIndex):
                raise TypeError(f"check_indices: {key!r} is a {type(idx).__name__}, not a BlockIndex")
            h.update(key.encode())
            h.update(idx.digest().encode())
        return self.check_same(what, h.hexdigest())

    def __repr__(self) -> str:
        return f"Coordinator(rank={self.rank}, world_size={self.world_size}, src={self.src})"


def gather_index(local: BlockIndex, ops: AttentionOps, layout: VideoLayout) -> BlockIndex:
    """The global index ``[batch, all heads, num_blocks, num_blocks]`` from each rank's local one,
    in model head order (also under a balanced head order, ``ops.head_order``).

    Collective over the ops' groups. Rows held by several ranks (the ring's text rows) are taken
    from the rank whose ``row_weight`` is 1.
    """
    nb = layout.num_blocks
    rows, weight = ops.q_blocks(layout), ops.row_weight(layout)
    if local.num_q_blocks != len(rows) or local.num_k_blocks != nb:
        raise ValueError(f"gather_index: {local!r} is not this rank's local index for {layout}")
    dev = local.device
    rows, own = rows.to(dev), weight.to(dev) > 0
    # common width: a one-hot of each rank's width, summed (reduce_rows/gather_heads only sum/concat)
    hot = torch.zeros(1, nb + 2, dtype=torch.float64, device=dev)
    hot[0, local.max_count] = 1
    hot = global_head_stats(hot, ops).sum(0)
    width = int(hot.nonzero().max())
    B, Hl = local.batch, local.num_heads
    counts = torch.zeros(B, Hl, nb, dtype=torch.float64, device=dev)
    ind = torch.zeros(B, Hl, nb, width, dtype=torch.float64, device=dev)
    sel = rows[own]
    counts[:, :, sel] = local.counts[:, :, own].double()
    li = local.indices[:, :, own].double() + 1  # 0 = padding, so the sums over ranks stay exact
    ind[:, :, sel, : li.shape[-1]] = li
    counts = global_head_stats(counts, ops, dim=1)
    ind = global_head_stats(ind, ops, dim=1)
    out = BlockIndex(counts.round().to(torch.int32), (ind.round() - 1).to(torch.int32), local.block_size, nb)
    order = ops.head_order  # a balanced Ulysses plan gathers heads in its own order
    return out if order is None else out.select_heads(torch.argsort(order.to(dev)))
