"""Check mode and ``name=``: equal-size collectives issued in different orders on different ranks are caught."""

from __future__ import annotations

import pytest
import torch

import hybrid_ext
from hybrid_ext import launch


def _swapped(rank: int, named: bool) -> dict:
    first, second = ("bucket.a", "bucket.b") if rank == 0 else ("bucket.b", "bucket.a")
    values = {"bucket.a": 1.0, "bucket.b": 100.0}
    out = {}
    try:
        for name in (first, second):
            t = torch.full((64,), values[name] * (rank + 1))
            hybrid_ext.allreduce(t, name=name if named else None)
            out[name] = t[0].item()
    except hybrid_ext.CollectiveMismatchError as exc:
        out["error"] = str(exc)
    return out


def _job_rank(rank: int, p: int) -> dict:
    """Every scenario of this module on one job (a mismatch is found by all ranks at once: they stay in step)."""
    hybrid_ext.set_check(True)
    return {"named": _swapped(rank, True), "unnamed": _swapped(rank, False), "forms": _named_forms(rank, p)}


@pytest.fixture(scope="module")
def job():
    return launch.spawn(_job_rank, 2, timeout=120)


def test_swapped_named_collectives_raise_naming_the_ranks_and_the_names(job):
    for result in (r["named"] for r in job):
        message = result["error"]
        assert "ranks [0]: allreduce(op=sum, name='bucket.a') of 1 tensor(s), 64 elements" in message
        assert "ranks [1]: allreduce(op=sum, name='bucket.b') of 1 tensor(s), 64 elements" in message
        assert "bucket.a" not in result and "bucket.b" not in result  # nothing was reduced


def test_without_names_a_swap_of_equal_sizes_goes_unnoticed(job):
    # Why name= exists: the fingerprint (shapes, dtype, op, sequence number) is the same for both calls.
    for result in (r["unnamed"] for r in job):
        assert "error" not in result
        assert result["bucket.a"] != 1.0 * 3  # each rank's "a" was summed with the other's "b"


def _named_forms(rank: int, p: int) -> dict:
    out = {}
    handle = hybrid_ext.allreduce_async(torch.ones(4), name="same")
    out["async"] = handle.wait(timeout=60).tolist()
    out["coalesced"] = [t.tolist() for t in hybrid_ext.allreduce_coalesced([torch.ones(2), torch.ones(3)], name="c")]
    out["gather"] = hybrid_ext.allgather(torch.full((1, 2), float(rank)), name="g").tolist()
    out["scatter"] = hybrid_ext.reduce_scatter(torch.ones(p, 2), counts=(1,) * p, name="s").tolist()
    try:
        hybrid_ext.allgather(torch.ones(1, 2), name=f"gather-{rank}")
    except hybrid_ext.CollectiveMismatchError as exc:
        out["gather_error"] = str(exc)
    return out


def test_names_on_every_collective_form(job):
    for result in (r["forms"] for r in job):
        assert result["async"] == [2.0] * 4
        assert result["coalesced"] == [[2.0] * 2, [2.0] * 3]
        assert result["gather"] == [[0.0, 0.0], [1.0, 1.0]]
        assert result["scatter"] == [[2.0, 2.0]]
        assert "name='gather-0'" in result["gather_error"] and "name='gather-1'" in result["gather_error"]


def test_a_name_that_is_not_a_string_is_refused_before_any_communication():
    with pytest.raises(TypeError, match="name must be a str or None, got int"):
        hybrid_ext.allreduce(torch.ones(2), name=3)


def _reducer_groups_swapped_rank(rank: int, p: int) -> dict:
    """Two reduce groups with equal-size buckets, their parameters swapped on rank 1 (a plan the ranks disagree on)."""
    from torch import nn

    from hybrid_ext.comm.registry import communicator
    from hybrid_ext.parallel.reducer import GradientReducer, ReduceGroup

    hybrid_ext.set_check(True)
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)  # equal sizes: without names the swap goes unnoticed
    mine = [first, second] if rank == 0 else [second, first]
    comm = communicator(None, torch.device("cpu"))
    groups = [ReduceGroup("conv", list(mine[0].parameters()), comm, "avg"),
              ReduceGroup("fc", list(mine[1].parameters()), comm, "avg")]  # fmt: skip
    order = [*first.parameters(), *second.parameters()]
    reducer = GradientReducer(groups, parameter_order=order)
    try:
        (first(torch.ones(2, 8)).sum() + second(torch.ones(2, 8)).sum()).backward()
        return {"error": None}
    except hybrid_ext.CollectiveMismatchError as exc:
        return {"error": str(exc)}
    finally:
        reducer.remove()


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_the_gradient_reducer_names_its_buckets_so_a_swap_between_groups_is_caught():
    results = launch.spawn(_reducer_groups_swapped_rank, 2, timeout=120)
    for result in results:
        message = result["error"]
        assert message is not None, "the swapped buckets were reduced together"
        assert "name='conv.bucket0'" in message and "name='fc.bucket0'" in message, message
