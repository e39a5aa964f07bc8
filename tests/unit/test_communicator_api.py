"""The communicator's collectives (allreduce, allgather, reduce_scatter and the small agreements) on ranks as
threads: blocking and async, inside a composite ordered job, and their names in check mode's mismatch errors."""

from __future__ import annotations

import pytest
import torch

from hybrid_ext import config
from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.consistency import CHECK_ENV, CollectiveMismatchError
from hybrid_ext.comm.ordering import Handle
from hybrid_ext.comm.transports.loopback import run_ranks


def _rows(rank: int) -> torch.Tensor:
    return torch.arange((rank + 1) * 2, dtype=torch.float32).view(rank + 1, 2) + 10 * rank


def _collectives(transport, async_op: bool) -> dict:
    comm = Communicator(transport)
    rank = comm.rank

    def done(result):
        if async_op:
            assert isinstance(result, Handle)
            return result.wait()
        return result

    x = torch.full((5,), float(rank + 1))
    reduced = done(comm.allreduce([x], op="avg", name="test avg", async_op=async_op))
    if async_op:
        assert reduced[0] is x  # wait() hands back the caller's tensors
    else:
        assert reduced is None
    counts = comm.row_counts(rank + 1, name="test rows")
    gathered = done(comm.allgather(_rows(rank), name="test gather", async_op=async_op))
    known = done(comm.allgather(_rows(rank), counts=counts, algorithm="ring", async_op=async_op))
    rows = torch.ones(sum(counts), 3) * (rank + 1)
    scattered = done(comm.reduce_scatter(rows, counts=counts, name="test scatter", async_op=async_op))
    maxima = comm.max_over_ranks([float(rank), -float(rank)], name="test max")
    medians = comm.median_over_ranks([float(rank), float(rank * rank)], name="test median")
    return {"x": x, "counts": counts, "gathered": gathered, "known": known, "scattered": scattered, "max": maxima,
            "median": medians}  # fmt: skip


@pytest.mark.parametrize("async_op", [False, True])
@pytest.mark.parametrize("size", [1, 3])
def test_the_collectives_give_every_rank_its_result_blocking_and_async(size, async_op):
    results = run_ranks(_collectives, size, async_op)
    every_row = torch.cat([_rows(r) for r in range(size)])
    total = sum(r + 1 for r in range(size))
    for rank, out in enumerate(results):
        assert torch.equal(out["x"], torch.full((5,), total / size))
        assert out["counts"] == tuple(r + 1 for r in range(size))
        assert torch.equal(out["gathered"], every_row) and torch.equal(out["known"], every_row)
        assert torch.equal(out["scattered"], torch.full((rank + 1, 3), float(total)))
        assert out["max"] == [float(size - 1), 0.0]
        assert out["median"] == [(size - 1) / 2, 1.0 if size == 3 else 0.0]  # of 0, 1, 4: 1 (their mean is 5/3)


def _composite(transport) -> tuple:
    comm = Communicator(transport)
    a, b = torch.ones(3), torch.full((3,), float(comm.rank))

    def job():  # two collectives and the work between them as one step of the order
        comm.allreduce([a], name="first")
        b.add_(a)
        handle = comm.allreduce([b], name="second", async_op=True)
        assert handle.is_completed()  # inside an ordered job a collective runs at once
        return handle.wait()

    handle = comm.submit(job)
    return handle.wait()[0], comm.run(lambda: comm.allgather(a.view(1, 3), name="third"))


def test_collectives_inside_an_ordered_job_run_in_its_place():
    for b, gathered in run_ranks(_composite, 2):
        assert torch.equal(b, torch.full((3,), 5.0))  # (0 + 2) + (1 + 2)
        assert torch.equal(gathered, torch.full((2, 3), 2.0))


def _mismatch(transport, call) -> str:
    comm = Communicator(transport)
    try:
        call(comm)
    except CollectiveMismatchError as exc:
        return str(exc)
    raise AssertionError(f"rank {transport.rank}: no CollectiveMismatchError")


CALLS = {
    "allreduce": lambda comm, name, async_op: comm.allreduce([torch.ones(4)], name=name, async_op=async_op),
    "allgather": lambda comm, name, async_op: comm.allgather(torch.ones(2, 3), name=name, async_op=async_op),
    "reduce_scatter": lambda comm, name, async_op: comm.reduce_scatter(
        torch.ones(4, 3), counts=(2, 2), name=name, async_op=async_op
    ),
}


@pytest.mark.parametrize("async_op", [False, True])
@pytest.mark.parametrize("collective", list(CALLS))
def test_check_mode_names_the_collectives_ranks_disagree_on(collective, async_op):
    def call(comm):
        name = "sync batchnorm stats" if comm.rank == 1 else "grad norm"
        result = CALLS[collective](comm, name, async_op)
        if async_op:
            result.wait()

    with config.override(**{CHECK_ENV: True}):
        errors = run_ranks(_mismatch, 2, call)
    for error in errors:
        assert f"ranks [1]: {collective}(" in error
        assert "name='sync batchnorm stats'" in error and "name='grad norm'" in error


def test_check_mode_names_the_small_agreements():
    def call(comm):
        if comm.rank == 0:
            comm.row_counts(3, name="batch counts")
        else:
            comm.max_over_ranks([1.0], name="auto plan layer times")

    with config.override(**{CHECK_ENV: True}):
        errors = run_ranks(_mismatch, 2, call)
    for error in errors:
        assert "name='batch counts'" in error and "name='auto plan layer times'" in error
