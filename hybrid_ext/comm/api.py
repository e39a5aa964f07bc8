"""The public collectives: ``allreduce`` & co. over any transport — planned once, then executed step by step.

    import hybrid_ext
    hybrid_ext.allreduce(t)                                  # in place, sum, algorithm chosen by the cost model
    hybrid_ext.allreduce(t, op="avg", algorithm="rabenseifner", group=pg)   # arguments after the tensor by keyword
    handle = hybrid_ext.allreduce_async(t); ...; handle.wait()
    hybrid_ext.allreduce_coalesced([g1, g2, g3], op="avg")   # one flat buffer, one collective (gradient buckets)

``group`` is a torch.distributed process group (None: the default group), or any object implementing the
transport contract (:mod:`hybrid_ext.comm.transports.contract`). Each group gets a communicator
(:mod:`hybrid_ext.comm.communicator`) that runs the group's collectives one at a time in issue order
(:mod:`hybrid_ext.comm.ordering`).

Semantics and memory: :mod:`hybrid_ext.comm.communicator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hybrid_ext.comm import cost_model
from hybrid_ext.comm.communicator import GATHER_CHOICES, SCATTER_CHOICES
from hybrid_ext.comm.executor import OPS, SUPPORTED_DTYPES, wire_dtype_for
from hybrid_ext.comm.ordering import Handle, MappedHandle
from hybrid_ext.comm.registry import communicator, existing_cpu


def _check_name(name: str | None) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")


DEVICE_TYPES = ("cpu", "cuda")


def _check_tensor(t: Any, what: str = "tensor") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{what} is {t.layout}: only dense (strided) tensors can be reduced")
    if t.device.type not in DEVICE_TYPES:
        raise TypeError(f"{what} is on {t.device}: hybrid-ext's collectives take CPU or CUDA tensors")


def _check_blocks(counts: Any, size: int, what: str) -> tuple[int, ...]:
    """``counts`` as a tuple of one non-negative row count per rank of a group of ``size``."""
    if isinstance(counts, (str, bytes)) or not hasattr(counts, "__len__"):
        raise TypeError(f"counts must be a sequence of row counts, one per rank, got {type(counts).__name__}")
    if len(counts) != size or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"counts={list(counts)}: {what} needs {size} non-negative row counts, one per rank")
    return tuple(counts)


def _validate(tensors: Sequence[torch.Tensor], op: str, wire_dtype: torch.dtype | str | None = None) -> None:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"unsupported op {op!r}; choose one of {', '.join(OPS)}")
    if not tensors:
        return
    first = tensors[0]
    for index, t in enumerate(tensors):
        _check_tensor(t, "tensor" if len(tensors) == 1 else f"tensors[{index}]")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(
                f"all tensors of one call must share dtype and device; got {first.dtype} on {first.device} "
                f"and {t.dtype} on {t.device}"
            )
    if first.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"unsupported dtype {first.dtype}; supported: {names}")
    if op == "avg" and not first.dtype.is_floating_point:
        raise TypeError(f"op 'avg' needs a floating-point tensor, got {first.dtype} (use 'sum' and divide)")
    wire_dtype_for(first.dtype, wire_dtype)  # a bad wire dtype fails here, not on the worker thread


def _checked_comm(tensors, op, algorithm, group, wire_dtype, name):
    """Check every argument on the caller's thread (not on the worker), then the list and its group's communicator
    (shared by the blocking and async forms)."""
    tensors = list(tensors)
    _validate(tensors, op, wire_dtype)
    _check_name(name)
    if algorithm not in cost_model.CHOICES:  # a bad algorithm name fails here, not on the worker thread
        cost_model.resolve(algorithm, 0, 1)
    comm = communicator(group, tensors[0].device if tensors else None)
    return tensors, comm


def allreduce_coalesced_async(
    tensors: Sequence[torch.Tensor],
    *,
    op: str = "sum",
    algorithm: str = "auto",
    group: Any = None,
    wire_dtype: torch.dtype | str | None = None,
    name: str | None = None,
) -> Handle:
    """Start reducing ``tensors`` in place as one flat buffer (one collective for all of them).

    Every argument is checked on the calling thread; the reduction runs on the group's communicator thread, after
    the group's earlier collectives.

    Args:
        tensors (sequence of torch.Tensor): dense CPU or CUDA tensors of one dtype and device; each rank passes
            tensors of the same shapes. Reduced in place.
        op (str): ``"sum"`` (default), ``"avg"`` (floating point only), ``"min"`` or ``"max"``.
        algorithm (str): the schedule. ``"auto"`` (default) lets the cost model and the tuner choose;
            ``"butterfly"`` chooses between the butterflies only (``recursive_doubling``, ``rabenseifner``);
            ``"ring"``, ``"hierarchical"`` (``hierarchical/<schedule>`` to name the schedule between hosts) and
            ``"native"`` (the group's own allreduce) name one. ``HYBRID_EXT_ALGO`` overrides ``auto`` and
            ``butterfly``.
        group: a torch.distributed process group (default: the default group), or any object implementing the
            transport contract (:mod:`hybrid_ext.comm.transports.contract`).
        wire_dtype (torch.dtype, str or None): the dtype messages travel in. ``None`` (default): the input's —
            16-bit gradients travel as 16-bit and are accumulated in float32 on every rank; ``torch.float32`` sends
            full-precision partial sums; a 16-bit dtype compresses float32 inputs. ``HYBRID_EXT_WIRE_DTYPE``
            sets the process-wide default.
        name (str or None): what this collective is (a gradient bucket's name, say). In check mode ranks compare
            names too, so two collectives of equal size issued in different orders on different ranks raise
            :class:`~hybrid_ext.CollectiveMismatchError` naming both, instead of silently mixing their data.

    Returns:
        Handle: ``handle.wait()`` returns the list of ``tensors`` once they hold the result.

    Raises:
        TypeError: a tensor that is not dense, not on CPU or CUDA, of an unsupported dtype, or tensors of
            different dtypes or devices; ``op="avg"`` on integers; a ``name`` that is not a str.
        ValueError: an unknown ``op``, ``algorithm`` or ``wire_dtype``.
        PeerError: (from ``wait()``) a peer did not answer within the timeout.
        CollectiveMismatchError: (from ``wait()``, in check mode) ranks issued different collectives.
    """
    tensors, comm = _checked_comm(tensors, op, algorithm, group, wire_dtype, name)
    return comm.allreduce(tensors, op=op, algorithm=algorithm, wire_dtype=wire_dtype, name=name, async_op=True)


def allreduce_coalesced(
    tensors: Sequence[torch.Tensor],
    *,
    op: str = "sum",
    algorithm: str = "auto",
    group: Any = None,
    wire_dtype: torch.dtype | str | None = None,
    name: str | None = None,
) -> list[torch.Tensor]:
    """Reduce ``tensors`` in place through one flat buffer (one collective for all of them) and wait for it.

    Args:
        tensors, op, algorithm, group, wire_dtype, name: as for :func:`allreduce_coalesced_async`.

    Returns:
        list[torch.Tensor]: ``tensors``, holding the result.

    Raises:
        TypeError, ValueError, PeerError, CollectiveMismatchError: as for :func:`allreduce_coalesced_async`.
    """
    tensors, comm = _checked_comm(tensors, op, algorithm, group, wire_dtype, name)
    comm.allreduce(tensors, op=op, algorithm=algorithm, wire_dtype=wire_dtype, name=name)
    return tensors


def allreduce_async(
    tensor: torch.Tensor,
    *,
    op: str = "sum",
    algorithm: str = "auto",
    group: Any = None,
    wire_dtype: torch.dtype | str | None = None,
    name: str | None = None,
) -> Handle:
    """Start reducing ``tensor`` in place across the group.

    Args:
        tensor (torch.Tensor): a dense CPU or CUDA tensor, of the same shape on every rank.
        op, algorithm, group, wire_dtype, name: as for :func:`allreduce_coalesced_async`.

    Returns:
        Handle: ``handle.wait()`` returns ``tensor`` once it holds the result.

    Raises:
        TypeError, ValueError, PeerError, CollectiveMismatchError: as for :func:`allreduce_coalesced_async`.
    """
    handle = allreduce_coalesced_async(
        [tensor], op=op, algorithm=algorithm, group=group, wire_dtype=wire_dtype, name=name
    )
    return MappedHandle(handle, lambda tensors: tensors[0])


def allreduce(
    tensor: torch.Tensor,
    *,
    op: str = "sum",
    algorithm: str = "auto",
    group: Any = None,
    wire_dtype: torch.dtype | str | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Reduce ``tensor`` in place across the group and wait for it (see the module docstring).

    Args:
        tensor (torch.Tensor): a dense CPU or CUDA tensor, of the same shape on every rank.
        op, algorithm, group, wire_dtype, name: as for :func:`allreduce_coalesced_async`.

    Returns:
        torch.Tensor: ``tensor``, holding the result.

    Raises:
        TypeError, ValueError, PeerError, CollectiveMismatchError: as for :func:`allreduce_coalesced_async`.
    """
    # The common call, once the group's choice for its size is made: straight to the one-host direct allreduce.
    if wire_dtype is None and type(tensor) is torch.Tensor and tensor.is_cpu and (name is None or type(name) is str):
        comm = existing_cpu(group)
        if comm is not None and comm.try_direct(tensor, op, algorithm):
            return tensor
    allreduce_coalesced([tensor], op=op, algorithm=algorithm, group=group, wire_dtype=wire_dtype, name=name)
    return tensor


def allgather(
    tensor: torch.Tensor,
    *,
    counts: tuple[int, ...] | None = None,
    algorithm: str = "auto",
    group: Any = None,
    name: str | None = None,
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; ranks may hold different numbers of rows.

    Args:
        tensor (torch.Tensor): this rank's rows; every rank's has the same shape after dim 0.
        counts (sequence of int or None): rows per rank, when the caller knows them; saves one small exchange.
        algorithm (str): ``"recursive_doubling"`` (log2 P messages), ``"ring"``, ``"hierarchical"`` (on a group
            spanning hosts with equal rank counts: each block leaves its host once — lane peers across hosts, then
            within each host) or ``"auto"`` (default: hierarchical there from 64 KiB, else recursive doubling).
        group: as for :func:`allreduce_coalesced_async`.
        name (str or None): compared across ranks in check mode.

    Returns:
        torch.Tensor: a new tensor of ``sum(counts)`` rows, rank 0's first.

    Raises:
        TypeError: ``tensor`` is not a dense CPU or CUDA tensor, or ``counts`` is not a sequence.
        ValueError: a 0-dimensional ``tensor``, an unknown ``algorithm``, or ``counts`` that do not give one
            non-negative row count per rank, this rank's matching ``tensor``.
        PeerError, CollectiveMismatchError: as for :func:`allreduce_coalesced_async`.
    """
    _check_name(name)
    _check_tensor(tensor)
    if tensor.dim() == 0:
        raise ValueError("allgather concatenates along dim 0: tensor must have at least one dimension")
    if algorithm not in GATHER_CHOICES:
        raise ValueError(f"unknown allgather algorithm {algorithm!r}; choose one of {', '.join(GATHER_CHOICES)}")
    comm = communicator(group, tensor.device)
    if counts is not None:
        counts = _check_blocks(counts, comm.size, "allgather")
        if counts[comm.rank] != tensor.shape[0]:
            raise ValueError(
                f"counts={list(counts)} gives rank {comm.rank} {counts[comm.rank]} rows; it holds {tensor.shape[0]}"
            )
    return comm.allgather(tensor, counts=counts, algorithm=algorithm, name=name)


def reduce_scatter(
    tensor: torch.Tensor,
    *,
    counts: tuple[int, ...],
    op: str = "sum",
    algorithm: str = "auto",
    group: Any = None,
    wire_dtype: torch.dtype | str | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Reduce ``tensor`` over the group and return this rank's block of ``counts[rank]`` rows (dim 0).

    The dual of :func:`allgather`: the gradient of an all-gather is a reduce-scatter of the same blocks.

    Args:
        tensor (torch.Tensor): ``sum(counts)`` rows, of the same shape on every rank.
        counts (sequence of int): rows of each rank's block, one per rank.
        op (str): as for :func:`allreduce_coalesced_async`.
        algorithm (str): ``"recursive_halving"`` (log2 P messages), ``"ring"``, ``"hierarchical"`` or ``"auto"``
            (as for :func:`allgather`).
        group, wire_dtype, name: as for :func:`allreduce_coalesced_async`.

    Returns:
        torch.Tensor: this rank's block, reduced over the group.

    Raises:
        TypeError: as for :func:`allreduce_coalesced_async`, or ``counts`` is not a sequence.
        ValueError: a 0-dimensional ``tensor``, an unknown ``op``, ``algorithm`` or ``wire_dtype``, or ``counts``
            that do not give one non-negative row count per rank adding up to ``tensor``'s rows.
        PeerError, CollectiveMismatchError: as for :func:`allreduce_coalesced_async`.
    """
    _validate([tensor], op, wire_dtype)
    _check_name(name)
    if tensor.dim() == 0:
        raise ValueError("reduce_scatter splits along dim 0: tensor must have at least one dimension")
    if algorithm not in SCATTER_CHOICES:
        raise ValueError(f"unknown reduce_scatter algorithm {algorithm!r}; choose one of {', '.join(SCATTER_CHOICES)}")
    comm = communicator(group, tensor.device)
    counts = _check_blocks(counts, comm.size, "reduce_scatter")
    if sum(counts) != tensor.shape[0]:
        raise ValueError(f"counts={list(counts)} add up to {sum(counts)} rows; tensor has {tensor.shape[0]}")
    return comm.reduce_scatter(tensor, counts=counts, op=op, algorithm=algorithm, wire_dtype=wire_dtype, name=name)
