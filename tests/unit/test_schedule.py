"""Allreduce schedules, simulated for many ranks in one process (no processes, no transport)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_ext.comm.schedule import (
    ALGORITHMS,
    GATHER_ALGORITHMS,
    SCATTER_ALGORITHMS,
    block_bounds,
    largest_power_of_two_at_most,
    plan_allgather,
    plan_allreduce,
    plan_reduce_scatter,
)

from helpers.schedule_sim import SimulationError, simulate


def _check_allreduce(algorithm: str, p: int, n: int) -> None:
    plans = [plan_allreduce(algorithm, r, p, n) for r in range(p)]
    everyone = (1 << p) - 1
    for rank, buffer in enumerate(simulate(plans)):
        missing = [i for i, v in enumerate(buffer) if v != everyone]
        assert not missing, f"{algorithm} p={p} n={n}: rank {rank} lacks contributions at {missing[:5]}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("p", [*list(range(1, 17)), 24, 31, 32, 33, 48, 63, 64])
def test_every_rank_gets_every_contribution_exactly_once(algorithm, p):
    for n in sorted({0, 1, 2, p - 1, p, p + 1, 2 * p + 3, 97}):
        if n >= 0:
            _check_allreduce(algorithm, p, n)


@settings(max_examples=300, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), p=st.integers(1, 64), n=st.integers(0, 300))
def test_allreduce_plans_property(algorithm, p, n):
    _check_allreduce(algorithm, p, n)


@pytest.mark.parametrize("p", [2, 4, 8, 16, 32, 64])
def test_rabenseifner_traffic_is_optimal_for_powers_of_two(p):
    n = 1 << 20
    for rank in range(p):
        plan = plan_allreduce("rabenseifner", rank, p, n)
        assert plan.elements_sent == 2 * (p - 1) * n // p
        assert plan.messages_sent == 2 * int(math.log2(p))
        assert plan.scratch_elements == n // 2


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_recursive_doubling_sends_whole_vector_log_p_times(p):
    plan = plan_allreduce("recursive_doubling", 0, p, 1000)
    assert plan.messages_sent == int(math.log2(p))
    assert plan.elements_sent == 1000 * int(math.log2(p))


@pytest.mark.parametrize("p", [3, 5, 6, 7, 12])
def test_fold_costs_two_extra_messages_on_folded_pairs(p):
    p2 = largest_power_of_two_at_most(p)
    extra = p - p2
    n = 1024
    for rank in range(p):
        plan = plan_allreduce("rabenseifner", rank, p, n)
        if rank < 2 * extra and rank % 2 == 0:
            assert [s.phase for s in plan.steps] == ["fold", "unfold"]
            assert plan.elements_sent == n
        elif rank < 2 * extra:
            assert plan.steps[0].phase == "fold" and plan.steps[-1].phase == "unfold"
            assert plan.messages_sent == 2 * int(math.log2(p2)) + 1


@pytest.mark.parametrize("p", [2, 3, 5, 8])
def test_ring_traffic(p):
    n = 10 * p
    plan = plan_allreduce("ring", 0, p, n)
    assert plan.messages_sent == 2 * (p - 1)
    assert plan.elements_sent == 2 * (p - 1) * n // p


def test_fewer_elements_than_ranks_sends_no_empty_messages():
    for algorithm in ALGORITHMS:
        for rank in range(8):
            plan = plan_allreduce(algorithm, rank, 8, 3)
            assert all(s.send_count > 0 for s in plan.steps if s.send is not None)
            assert all(s.recv_count > 0 for s in plan.steps if s.recv is not None)


def test_one_rank_or_no_elements_means_no_steps():
    assert plan_allreduce("rabenseifner", 0, 1, 100).steps == ()
    assert plan_allreduce("ring", 3, 8, 0).steps == ()


def test_block_bounds_are_balanced():
    bounds = block_bounds(10, 4)
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert bounds[0] == 0 and bounds[-1] == 10 and max(sizes) - min(sizes) <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown allreduce algorithm 'tree'"):
        plan_allreduce("tree", 0, 2, 10)
    with pytest.raises(ValueError, match="rank 4 is not in a group of 4"):
        plan_allreduce("ring", 4, 4, 10)
    with pytest.raises(ValueError, match="element count"):
        plan_allreduce("ring", 0, 4, -1)


def test_simulator_catches_a_broken_plan():
    plans = [plan_allreduce("rabenseifner", r, 4, 8) for r in range(4)]
    broken = [*plans[:3], plan_allreduce("ring", 3, 4, 8)]
    with pytest.raises(SimulationError):
        simulate(broken)


# ------------------------------------------------------------------ all-gather and reduce-scatter


def _blocks(counts):
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return offsets


def _check_allgather(algorithm, counts):
    p, offsets = len(counts), _blocks(counts)
    owner = [r for r in range(p) for _ in range(counts[r])]
    initial = [[(1 << owner[i]) if owner[i] == r else 0 for i in range(offsets[-1])] for r in range(p)]
    plans = [plan_allgather(algorithm, r, tuple(counts)) for r in range(p)]
    for rank, buffer in enumerate(simulate(plans, initial)):
        wrong = [i for i, v in enumerate(buffer) if v != 1 << owner[i]]
        assert not wrong, f"allgather {algorithm} {counts}: rank {rank} wrong at {wrong[:5]}"


def _check_reduce_scatter(algorithm, counts):
    p, offsets = len(counts), _blocks(counts)
    plans = [plan_reduce_scatter(algorithm, r, tuple(counts)) for r in range(p)]
    everyone = (1 << p) - 1
    for rank, buffer in enumerate(simulate(plans)):
        own = buffer[offsets[rank] : offsets[rank + 1]]
        assert all(v == everyone for v in own), f"reduce_scatter {algorithm} {counts}: rank {rank} incomplete"


@settings(max_examples=300, deadline=None)
@given(
    algorithm=st.sampled_from(GATHER_ALGORITHMS),
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=40),
)
def test_allgather_plans_property(algorithm, counts):
    _check_allgather(algorithm, counts)


@settings(max_examples=300, deadline=None)
@given(
    algorithm=st.sampled_from(SCATTER_ALGORITHMS),
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=40),
)
def test_reduce_scatter_plans_property(algorithm, counts):
    _check_reduce_scatter(algorithm, counts)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 33, 64])
def test_allgather_and_reduce_scatter_with_equal_blocks(p):
    for algorithm in GATHER_ALGORITHMS:
        _check_allgather(algorithm, [3] * p)
    for algorithm in SCATTER_ALGORITHMS:
        _check_reduce_scatter(algorithm, [3] * p)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_butterfly_allgather_and_reduce_scatter_traffic(p):
    b = 10
    for rank in range(p):
        gather = plan_allgather("recursive_doubling", rank, (b,) * p)
        scatter = plan_reduce_scatter("recursive_halving", rank, (b,) * p)
        assert gather.messages_sent == scatter.messages_sent == int(math.log2(p))
        assert gather.elements_sent == scatter.elements_sent == (p - 1) * b
        assert gather.collective == "allgather" and scatter.collective == "reduce_scatter"
