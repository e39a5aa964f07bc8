"""The partitioner's groups under ``horovodrun``: ``hybrid_ext.parallelize(model, groups=horovod_groups(...))``.

World, model-parallel and data-parallel communicators all run over side channels (see :mod:`.transport`):
the world's is the one ``hvd.Butterfly`` uses; the mp / dp groups are subgroups of it, created by their
members only. ``reducer="native"`` reduces with ``hvd.allreduce`` instead — over the global process set, or
over a process set per mp / dp group, which Horovod allows only with ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` (or
sets declared at ``hvd.init``); you get a clear error saying so otherwise.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import torch

from hybrid_ext.comm import Communicator, Handle, metrics
from hybrid_ext.integrations.horovod.transport import _hvd, communicator_for, process_set_for, side_channel
from hybrid_ext.parallel.dims import Groups, ParallelDims

_cache: dict[tuple[int, str], Groups] = {}


def horovod_groups(mp_size: int | None = None, device: torch.device | None = None) -> Groups:
    """The world / mp / dp communicators of this rank's grid, for ``hybrid_ext.parallelize(groups=...)``.

    Every rank calls this, in the same order. One set per (mp_size, device type), reused by later calls: models
    parallelized alike share them.

    Args:
        mp_size (int or None): ranks per model-parallel group (default: all ranks).
        device (torch.device or None): where the tensors they reduce live (default: CPU).

    Returns:
        Groups: the grid's communicators over Horovod's ranks.

    Raises:
        RuntimeError: Horovod is not initialized.
        ValueError: ``mp_size`` does not divide the number of ranks.
    """
    hvd = _hvd()
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialized: call hvd.init() first")
    device = device or torch.device("cpu")
    world, rank = hvd.size(), hvd.rank()
    dims = ParallelDims(world, world if mp_size is None else mp_size)
    key = (dims.mp, "cuda" if device.type == "cuda" else "cpu")
    if key not in _cache:
        _cache[key] = _create(dims, rank, device)
    return _cache[key]


def forget() -> None:
    """Drop the cached grids (a Horovod reset: :func:`~hybrid_ext.integrations.horovod.session.reset`)."""
    _cache.clear()


def _create(dims: ParallelDims, rank: int, device: torch.device) -> Groups:
    hvd = _hvd()
    world = dims.world
    world_comm = communicator_for(hvd.global_process_set, device)
    channel = side_channel(hvd.global_process_set)
    comms: dict[str, Communicator] = {}
    for kind, members in (("mp", dims.mp_group_of(rank)), ("dp", dims.dp_group_of(rank))):
        # A model-parallel group of every rank still gets its own communicator (its own issue order): the layers'
        # exchanges in backward must not queue behind the world's gradient buckets in flight.
        if len(members) == world and (kind == "dp" or world == 1):
            comms[kind] = world_comm
        else:
            index = members[0] if kind == "mp" else rank % dims.mp
            comms[kind] = Communicator(channel.subgroup(f"{kind}{index}", members).transport(device), device)
    groups = Groups(dims=dims, rank=rank, world=world_comm, mp=comms["mp"], dp=comms["dp"])
    groups.native = _native_factory(groups)
    return groups


def _native_factory(groups: Groups):
    """``native(kind)``: ``hvd.allreduce`` over the kind's ranks, as a handle the gradient reducer waits on."""
    hvd = _hvd()
    dims = groups.dims
    members = {
        "world": list(range(dims.world)),
        "mp": dims.mp_group_of(groups.rank),
        "dp": dims.dp_group_of(groups.rank),
    }

    sets: dict[str, Any] = {}

    def process_set(kind: str) -> Any:
        if kind not in sets:
            sets[kind] = _add_process_sets(kind)
        return sets[kind]

    def _add_process_sets(kind: str) -> Any:
        ranks = members[kind]
        if len(ranks) in (1, dims.world):
            return hvd.global_process_set if len(ranks) == dims.world else None
        # Every rank adds every set of this kind, in the same order: add_process_set is collective.
        layout = dims.mp_groups() if kind == "mp" else dims.dp_groups()
        mine = None
        for group in layout:
            try:
                created = process_set_for(group)
            except (ValueError, RuntimeError) as exc:
                raise RuntimeError(
                    f'reducer="native" with mp_size={dims.mp} of {dims.world} ranks needs a Horovod process set per '
                    f"{kind} group, and Horovod refused to add one ({exc}). Run with HOROVOD_DYNAMIC_PROCESS_SETS=1, "
                    "or use a butterfly reducer (it needs no process sets)."
                ) from exc
            if group == ranks:
                mine = created
        return mine

    def native(kind: str):
        pset = process_set(kind)
        size = len(members[kind])

        def reduce(tensors: list[torch.Tensor], op: str) -> Handle:
            future: concurrent.futures.Future = concurrent.futures.Future()
            if pset is None:  # a group of one: nothing to combine
                future.set_result(tensors)
                return Handle(future)
            flat = torch.cat([t.reshape(-1) for t in tensors])
            start = time.perf_counter()
            hvd_op = hvd.Average if op == "avg" else hvd.Sum
            handle = hvd.allreduce_async_(flat, op=hvd_op, process_set=pset)
            return _HorovodHandle(handle, flat, tensors, size, groups.rank, start, future)

        return reduce

    return native


class _HorovodHandle(Handle):
    """A Horovod handle seen as a hybrid-ext one: waiting synchronizes, then copies the flat result back."""

    def __init__(self, handle, flat, tensors, size, rank, start, future) -> None:
        super().__init__(future)
        self._hvd_handle, self._flat, self._tensors = handle, flat, tensors
        self._size, self._rank, self._start = size, rank, start

    def wait(self, timeout: float | None = None):
        if not self._future.done():
            _hvd().synchronize(self._hvd_handle)
            offset = 0
            for t in self._tensors:
                t.copy_(self._flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            metrics.record_native_allreduce(
                "horovod", self._rank, self._size, self._flat, time.perf_counter() - self._start
            )
            self._future.set_result(self._tensors)
        return self._future.result()

    def is_completed(self) -> bool:
        return self._future.done() or _hvd().poll(self._hvd_handle)
