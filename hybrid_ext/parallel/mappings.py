"""Autograd functions that move activations between ranks, each named with its forward/backward dual.

Hybrid (data-parallel conv, model-parallel FC), within a model-parallel group of m ranks, rank r holding
b_r samples:

- :func:`gather_batch`   forward: all-gather along the batch   backward: reduce-scatter along the batch
- :func:`scatter_batch`  forward: reduce-scatter along the batch   backward: all-gather along the batch
- :func:`exchange_rows_for_features`  forward: all-to-all — every rank gets its own rows with every
  feature (or channel) shard    backward: the transposed all-to-all

Model parallelism alone (every rank holds the same batch and computes the same loss):

- :func:`copy_to_group`      forward: identity    backward: all-reduce (sum)
- :func:`reduce_from_group`  forward: all-reduce (sum)    backward: identity
- :func:`gather_dim`         forward: all-gather along a dim    backward: keep this rank's slice

Every helper is the identity for a group of one rank.
"""

from __future__ import annotations

import functools
import itertools

import torch

from hybrid_ext.comm import Communicator
from hybrid_ext.comm.schedule import block_bounds


def _allgather_rows(comm: Communicator, x: torch.Tensor, counts: tuple[int, ...], name: str) -> torch.Tensor:
    return comm.allgather(x.contiguous(), counts=counts, name=name)


def _reduce_scatter_rows(comm: Communicator, x: torch.Tensor, counts: tuple[int, ...], name: str) -> torch.Tensor:
    return comm.reduce_scatter(x.contiguous(), counts=counts, name=name)


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, counts: tuple[int, ...]):
        ctx.comm, ctx.counts = comm, counts
        return _allgather_rows(comm, x, counts, "gather batch")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(ctx.comm, grad, ctx.counts, "gather batch backward"), None, None


class _ScatterBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, counts: tuple[int, ...]):
        ctx.comm, ctx.counts = comm, counts
        return _reduce_scatter_rows(comm, x, counts, "scatter batch")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _allgather_rows(ctx.comm, grad, ctx.counts, "scatter batch backward"), None, None


def batch_counts(x: torch.Tensor, comm: Communicator) -> tuple[int, ...]:
    """Rows (samples) per rank of the group, exchanged once per forward."""
    return comm.row_counts(x.shape[0], device=x.device, name="batch counts") if comm.size > 1 else (x.shape[0],)


def gather_batch(x: torch.Tensor, comm: Communicator, counts: tuple[int, ...]) -> torch.Tensor:
    """forward: all-gather along the batch; backward: reduce-scatter along the batch."""
    return x if comm.size == 1 else _GatherBatch.apply(x, comm, counts)


def scatter_batch(x: torch.Tensor, comm: Communicator, counts: tuple[int, ...]) -> torch.Tensor:
    """forward: reduce-scatter (sum) along the batch; backward: all-gather along the batch."""
    return x if comm.size == 1 else _ScatterBatch.apply(x, comm, counts)


def _all_to_all(comm: Communicator, send: list[torch.Tensor], recv: list[torch.Tensor]) -> None:
    """Rank r sends ``send[t]`` to every rank t and receives ``recv[s]`` from every rank s (pairwise shifts)."""

    def job():
        recv[comm.rank].copy_(send[comm.rank])
        for shift in range(1, comm.size):
            to, frm = (comm.rank + shift) % comm.size, (comm.rank - shift) % comm.size
            out = send[to] if send[to].numel() else None
            into = recv[frm] if recv[frm].numel() else None
            if out is not None or into is not None:
                comm.transport.exchange(out, to if out is not None else None, into, frm if into is not None else None)

    comm.run(job)


class _ExchangeRowsForFeatures(torch.autograd.Function):
    """[all rows, my feature shard] -> [my rows, all features] (features along ``dim``); the transpose in backward."""

    @staticmethod
    def forward(ctx, x, comm: Communicator, counts: tuple[int, ...], features: tuple[int, ...], dim: int):
        ctx.comm, ctx.counts, ctx.features, ctx.dim = comm, counts, features, dim
        rows = _split(x, counts, dim=0)
        recv = [x.new_empty(_resized(x.shape, {0: counts[comm.rank], dim: f})) for f in features]
        _all_to_all(comm, [r.contiguous() for r in rows], recv)
        return torch.cat(recv, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        comm, counts, features, dim = ctx.comm, ctx.counts, ctx.features, ctx.dim
        cols = [c.contiguous() for c in _split(grad, features, dim=dim)]
        own = features[comm.rank]
        recv = [grad.new_empty(_resized(grad.shape, {0: c, dim: own})) for c in counts]
        _all_to_all(comm, cols, recv)
        return torch.cat(recv, dim=0), None, None, None, None


def _resized(shape: torch.Size, sizes: dict[int, int]) -> tuple[int, ...]:
    """``shape`` with the dims of ``sizes`` (negative counts from the end) set to their sizes."""
    out = list(shape)
    for dim, size in sizes.items():
        out[dim] = size
    return tuple(out)


def exchange_rows_for_features(
    x: torch.Tensor, comm: Communicator, counts: tuple[int, ...], features: tuple[int, ...], dim: int = -1
) -> torch.Tensor:
    """forward: all-to-all from [all rows, my features] to [my rows, all features], the features along ``dim`` (the
    last for a Linear's output, 1 for a convolution's channels); backward: its transpose."""
    if comm.size == 1:
        return x
    if dim % x.dim() == 0:
        raise ValueError("exchange_rows_for_features: the features cannot be along the rows' dim 0")
    return _ExchangeRowsForFeatures.apply(x, comm, counts, features, dim)


def _split(x: torch.Tensor, sizes: tuple[int, ...], dim: int) -> list[torch.Tensor]:
    return list(torch.split(x, list(sizes), dim=dim))


# ---------------------------------------------------------------------- model parallelism alone


def _allreduce_sum(comm: Communicator, x: torch.Tensor, name: str) -> torch.Tensor:
    out = x.contiguous().clone()
    comm.allreduce([out], name=name)
    return out


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Communicator):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _allreduce_sum(ctx.comm, grad, "copy to group backward"), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Communicator):
        return _allreduce_sum(comm, x, "reduce from group")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Communicator, dim: int, sizes: tuple[int, ...]):
        ctx.comm, ctx.dim, ctx.sizes = comm, dim, sizes
        moved = x.movedim(dim, 0).contiguous()
        gathered = _allgather_rows(comm, moved, sizes, f"gather dim {dim}")
        return gathered.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.comm.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.comm.rank]).contiguous(), None, None, None


def copy_to_group(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """forward: identity; backward: all-reduce (sum) — the input of a layer split across the group."""
    return x if comm.size == 1 else _CopyToGroup.apply(x, comm)


def reduce_from_group(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """forward: all-reduce (sum) of partial results; backward: identity."""
    return x if comm.size == 1 else _ReduceFromGroup.apply(x, comm)


def gather_dim(x: torch.Tensor, comm: Communicator, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """forward: all-gather along ``dim`` (shards of ``sizes``); backward: keep this rank's slice."""
    return x if comm.size == 1 else _GatherDim.apply(x, comm, dim, sizes)


@functools.lru_cache(maxsize=1024)  # a planner asks it of every layer for each of a thousand ranks
def shard_sizes(total: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``parts`` contiguous shards of ``total`` features, differing by at most one."""
    bounds = block_bounds(total, parts)
    return tuple(b - a for a, b in itertools.pairwise(bounds))
