"""The partitioner's autograd mappings on ranks as threads (the loopback transport): each forward and its dual
backward equal the same computation done in one process on every rank's tensors."""

from __future__ import annotations

import pytest
import torch

from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.transports.loopback import LoopbackTransport, RankError, run_ranks
from hybrid_ext.parallel.mappings import (
    batch_counts,
    copy_to_group,
    exchange_rows_for_features,
    gather_batch,
    gather_dim,
    reduce_from_group,
    scatter_batch,
    shard_sizes,
)

SIZES = [1, 2, 3, 4, 5]


def _rows(size: int) -> tuple[int, ...]:
    return tuple(1 + (rank * 2) % 3 for rank in range(size))  # uneven batches: 1, 3, 2, 1, 3


def _input(rank: int, *shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _weight(rank: int, *shape: int) -> torch.Tensor:
    """What rank ``rank``'s loss multiplies its output by: the gradient each rank sends back."""
    return _input(1000 + rank, *shape)


def _gather_batch(transport: LoopbackTransport) -> tuple:
    comm, rank = Communicator(transport), transport.rank
    counts = _rows(transport.size)
    x = _input(rank, counts[rank], 3).requires_grad_()
    assert batch_counts(x, comm) == counts
    y = gather_batch(x, comm, counts)
    (y * _weight(rank, sum(counts), 3)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("size", SIZES)
def test_gather_batch_is_an_allgather_forward_and_a_reduce_scatter_backward(size):
    counts = _rows(size)
    starts = [sum(counts[:rank]) for rank in range(size + 1)]
    whole = torch.cat([_input(rank, counts[rank], 3) for rank in range(size)])
    grads = sum(_weight(rank, sum(counts), 3) for rank in range(size))
    for rank, (y, grad) in enumerate(run_ranks(_gather_batch, size)):
        assert torch.equal(y, whole)
        assert torch.allclose(grad, grads[starts[rank] : starts[rank + 1]], rtol=0, atol=1e-12)


def _scatter_batch(transport: LoopbackTransport) -> tuple:
    comm, rank = Communicator(transport), transport.rank
    counts = _rows(transport.size)
    x = _input(rank, sum(counts), 2).requires_grad_()
    y = scatter_batch(x, comm, counts)
    (y * _weight(rank, counts[rank], 2)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("size", SIZES)
def test_scatter_batch_is_a_reduce_scatter_forward_and_an_allgather_backward(size):
    counts = _rows(size)
    starts = [sum(counts[:rank]) for rank in range(size + 1)]
    total = sum(_input(rank, sum(counts), 2) for rank in range(size))
    grad = torch.cat([_weight(rank, counts[rank], 2) for rank in range(size)])
    for rank, (y, x_grad) in enumerate(run_ranks(_scatter_batch, size)):
        assert torch.allclose(y, total[starts[rank] : starts[rank + 1]], rtol=0, atol=1e-12)
        assert torch.equal(x_grad, grad)


# Where the features are: a Linear's output over a sequence of 2 (the last dim), a convolution's channels over a
# 2x3 map (dim 1). A shape with the features' size as None.
FEATURE_LAYOUTS = {-1: (2, None), 1: (None, 2, 3)}


def _shape(rows: int, dim: int, features: int) -> tuple[int, ...]:
    return (rows, *(features if size is None else size for size in FEATURE_LAYOUTS[dim]))


def _exchange(transport: LoopbackTransport, features: tuple[int, ...], dim: int) -> tuple:
    comm, rank = Communicator(transport), transport.rank
    counts = _rows(transport.size)
    x = _input(rank, *_shape(sum(counts), dim, features[rank])).requires_grad_()  # all rows, my features
    y = exchange_rows_for_features(x, comm, counts, features, dim=dim)
    (y * _weight(rank, *_shape(counts[rank], dim, sum(features)))).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dim", FEATURE_LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
def test_exchange_rows_for_features_is_an_all_to_all_and_its_transpose(size, dim):
    """[all rows, my features] -> [my rows, all features]: a Linear's features, or a split convolution's channels."""
    counts, features = _rows(size), shard_sizes(7, size)
    rows = [sum(counts[:rank]) for rank in range(size + 1)]
    cols = [sum(features[:rank]) for rank in range(size + 1)]
    full = torch.cat([_input(rank, *_shape(sum(counts), dim, features[rank])) for rank in range(size)], dim=dim)
    grad = torch.cat([_weight(rank, *_shape(counts[rank], dim, sum(features))) for rank in range(size)])
    for rank, (y, x_grad) in enumerate(run_ranks(_exchange, size, features, dim)):
        assert torch.equal(y, full[rows[rank] : rows[rank + 1]])
        assert torch.equal(x_grad, grad.narrow(dim, cols[rank], features[rank]))


def test_exchange_refuses_features_along_the_rows():
    with pytest.raises(RankError) as raised:
        run_ranks(lambda t: exchange_rows_for_features(torch.ones(2, 3), Communicator(t), (1, 1), (2, 1), dim=0), 2)
    assert "dim 0" in str(raised.value.__cause__)


def _model_parallel(transport: LoopbackTransport) -> dict:
    comm, rank, size = Communicator(transport), transport.rank, transport.size
    out = {}
    x = _input(0, 4, 3).requires_grad_()  # model parallelism: every rank holds the same input
    (copy_to_group(x, comm) * _weight(rank, 4, 3)).sum().backward()
    out["copy"] = x.grad
    partial = _input(rank, 4, 3).requires_grad_()
    reduced = reduce_from_group(partial, comm)
    (reduced * _weight(0, 4, 3)).sum().backward()
    out["reduce"], out["reduce_grad"] = reduced.detach(), partial.grad
    sizes = shard_sizes(7, size)
    shard = _input(rank, 2, sizes[rank], 3).requires_grad_()
    gathered = gather_dim(shard, comm, 1, sizes)
    (gathered * _weight(0, 2, 7, 3)).sum().backward()
    out["gather"], out["gather_grad"] = gathered.detach(), shard.grad
    return out


@pytest.mark.parametrize("size", SIZES)
def test_copy_reduce_and_gather_dim_are_duals(size):
    sizes = shard_sizes(7, size)
    starts = [sum(sizes[:rank]) for rank in range(size + 1)]
    total = sum(_input(rank, 4, 3) for rank in range(size))
    copy_grad = sum(_weight(rank, 4, 3) for rank in range(size))
    gathered = torch.cat([_input(rank, 2, sizes[rank], 3) for rank in range(size)], dim=1)
    for rank, out in enumerate(run_ranks(_model_parallel, size)):
        assert torch.allclose(out["copy"], copy_grad, rtol=0, atol=1e-12)  # backward of a copy: the sum
        assert torch.allclose(out["reduce"], total, rtol=0, atol=1e-12)
        assert torch.equal(out["reduce_grad"], _weight(0, 4, 3))  # backward of the sum: identity
        assert torch.equal(out["gather"], gathered)
        assert torch.equal(out["gather_grad"], _weight(0, 2, 7, 3)[:, starts[rank] : starts[rank + 1]])
