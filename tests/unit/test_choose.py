"""The choice of schedules (hybrid_ext.comm.choose) over simulated topologies: no transports, no processes."""

from __future__ import annotations

import itertools

import pytest

from hybrid_ext import config
from hybrid_ext.comm import choose, cost_model
from hybrid_ext.comm.cost_model import ALGO_ENV, BUTTERFLIES, DIRECT, HIERARCHICAL_PREFIX, NATIVE
from hybrid_ext.comm.schedule import ALGORITHMS, GATHER_ALGORITHMS, SCATTER_ALGORITHMS
from hybrid_ext.comm.topology import Topology
from hybrid_ext.comm.tuner import TUNE_ENV

pytestmark = pytest.mark.usefixtures("isolated_cost_models")  # the built-in constants, whatever this machine saved

# (hosts of each rank, or None where the transport does not know them)
LAYOUTS = [
    None,
    (0, 0),
    (0, 0, 0, 0),
    (0, 1),
    (0, 0, 1, 1),
    (0, 0, 0, 1, 1, 1),
    (0, 1, 2, 3),
    (0, 0, 1),  # unequal hosts
    ("a", "a", "b", "b", "c", "c", "d", "d"),
    (0, 1, 0, 1, 0, 1),  # interleaved ranks
]
SIZES = (0, 4, 1000, 64 << 10, 1 << 20, 64 << 20)


def _topology(hosts, size: int = 4, transport: str = "tcp") -> Topology:
    if hosts is None:
        return Topology(size=size, transport=transport, hosts=None, local=None, network=transport)
    return Topology(size=len(hosts), transport="routed", hosts=tuple(hosts), local="shm", network=transport)


TOPOLOGIES = [_topology(hosts) for hosts in LAYOUTS]
IDS = [str(t.hosts) for t in TOPOLOGIES]


def test_named_requests_run_as_named_and_hierarchical_ones_flatten_on_one_host():
    one, two = _topology((0, 0, 0, 0)), _topology((0, 0, 1, 1))
    for name in ALGORITHMS:
        assert choose.allreduce(name, 4096, one) == choose.allreduce(name, 4096, two) == name
        assert choose.allreduce(HIERARCHICAL_PREFIX + name, 4096, one) == name
        assert choose.allreduce(HIERARCHICAL_PREFIX + name, 4096, two) == HIERARCHICAL_PREFIX + name


def test_native_and_direct_run_only_where_the_group_and_the_call_allow_them():
    topology = _topology(None)
    assert choose.allreduce(NATIVE, 64, topology, native="gloo") == NATIVE
    assert choose.allreduce(DIRECT, 64, topology, direct=True, direct_allowed=True) == DIRECT
    with pytest.raises(ValueError, match="no allreduce of its own"):
        choose.allreduce(NATIVE, 64, topology)
    with pytest.raises(ValueError, match="one host's shared memory"):
        choose.allreduce(DIRECT, 64, topology, direct=True, direct_allowed=False)


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
def test_tuned_requests_hand_the_tuner_every_schedule_that_may_run(topology):
    with config.override(**{TUNE_ENV: "on", ALGO_ENV: "auto"}):
        auto = choose.allreduce("auto", 4096, topology, native="gloo", direct=True, direct_allowed=True)
        butterfly = choose.allreduce("butterfly", 4096, topology, native="gloo")
        hierarchical = choose.allreduce("hierarchical", 4096, topology)
        narrowed = choose.allreduce("auto", 4096, topology, native="gloo", native_allowed=False, direct=True)
        empty = choose.allreduce("auto", 0, topology, native="gloo", direct=True, direct_allowed=True)
    stacked = tuple(HIERARCHICAL_PREFIX + a for a in ALGORITHMS) if topology.spans_hosts else ()
    assert auto == choose.Tune("auto", (*ALGORITHMS, *stacked, DIRECT, NATIVE))
    assert butterfly.request == "butterfly" and set(butterfly.candidates) >= set(BUTTERFLIES)
    assert NATIVE not in butterfly.candidates
    if topology.spans_hosts:
        assert hierarchical == choose.Tune("hierarchical", stacked)
    else:  # one host: the flat schedules are the hierarchy
        assert hierarchical == choose.Tune("auto", ALGORITHMS)
    # Calls that may not run what the group has are tuned apart, without it.
    assert narrowed == choose.Tune("auto|schedules", (*ALGORITHMS, *stacked))
    assert empty == choose.Tune("auto|schedules", (*ALGORITHMS, *stacked))


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
@pytest.mark.parametrize("nbytes", SIZES)
def test_untuned_choices_are_schedules_the_group_can_plan(topology, nbytes):
    with config.override(**{TUNE_ENV: "off", ALGO_ENV: "auto"}):
        assert not choose.tuned("auto")
        for request in ("auto", "butterfly", "hierarchical"):
            name = choose.allreduce(request, nbytes, topology)
            assert isinstance(name, str)
            if name.startswith(HIERARCHICAL_PREFIX):
                assert topology.spans_hosts and (request == "hierarchical" or nbytes >= choose.HIERARCHY_MIN_BYTES)
                name = name.removeprefix(HIERARCHICAL_PREFIX)
            else:
                assert not topology.spans_hosts or (request != "hierarchical" and nbytes < choose.HIERARCHY_MIN_BYTES)
            assert name in ALGORITHMS
            if request == "butterfly":
                assert name in BUTTERFLIES


def test_a_forced_algorithm_is_never_tuned_and_wins_over_the_hierarchy():
    topology = _topology((0, 0, 1, 1))
    with config.override(**{TUNE_ENV: "on", ALGO_ENV: "ring"}):
        assert not choose.tuned("auto")
        assert choose.allreduce("auto", 64 << 20, topology) == "ring"
        assert choose.allreduce("hierarchical", 64 << 20, topology) == HIERARCHICAL_PREFIX + "ring"
    with config.override(**{TUNE_ENV: "on", ALGO_ENV: "butterfly"}):
        assert choose.candidates("auto", topology)[: len(BUTTERFLIES)] == BUTTERFLIES


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
@pytest.mark.parametrize("nbytes", SIZES)
def test_the_tuner_always_tries_the_models_best_and_what_the_model_cannot_judge(topology, nbytes):
    names = choose.candidates("auto", topology, native=True, direct=True)
    tried = choose.plausible(names, nbytes, topology)
    assert len(tried) == len(names)
    modelled = {n: choose.predicted(n, nbytes, topology) for n in names if n not in (NATIVE, DIRECT)}
    best = min(modelled, key=modelled.get)
    assert tried[names.index(best)]
    assert tried[names.index(NATIVE)] and tried[names.index(DIRECT)]
    for name, keep in zip(names, tried):
        if name in modelled:
            assert keep == (modelled[name] <= choose.TRIAL_WITHIN * modelled[best])


def test_a_hierarchical_prediction_adds_the_hosts_stage_to_the_networks_between_fewer_ranks():
    topology = _topology((0, 0, 0, 0, 1, 1, 1, 1))
    flat = choose.predicted("ring", 1 << 20, topology)
    stacked = choose.predicted(HIERARCHICAL_PREFIX + "ring", 1 << 20, topology)
    within = cost_model.default_model("shm").predict("ring", 1 << 20, 4)
    between = cost_model.network_model("tcp").predict("ring", (1 << 20) // 4, 2)
    assert stacked == pytest.approx(within + between)
    assert flat == cost_model.default_model("routed").predict("ring", 1 << 20, 8)  # every link the slowest


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
@pytest.mark.parametrize(("gather", "nbytes"), list(itertools.product((True, False), SIZES)))
def test_block_schedules_leave_each_host_once_only_on_equal_hosts_and_large_blocks(topology, gather, nbytes):
    flat = "recursive_doubling" if gather else "recursive_halving"
    hosts = topology.hosts
    equal = hosts is not None and len(set(hosts)) > 1 and len({hosts.count(h) for h in set(hosts)}) == 1
    auto = choose.block_schedule(gather, "auto", nbytes, topology)
    assert auto == (choose.HIERARCHICAL if equal and nbytes >= choose.HIERARCHY_MIN_BYTES else flat)
    assert choose.block_schedule(gather, "hierarchical", nbytes, topology) == (choose.HIERARCHICAL if equal else flat)
    for name in GATHER_ALGORITHMS if gather else SCATTER_ALGORITHMS:
        assert choose.block_schedule(gather, name, nbytes, topology) == name


def test_the_schedule_between_hosts_is_chosen_by_the_links_constants():
    """4 MiB over 4 hosts: the network transport's own constants take rabenseifner between the hosts (least bytes);
    a link calibrated as latency-bound (50 ms a message, bytes nearly free) takes recursive doubling (fewest
    messages)."""
    from hybrid_ext.comm.cost_model import CostModel

    topology = _topology((0, 0, 1, 1, 2, 2, 3, 3))
    assert choose.allreduce("auto", 4 << 20, topology, tune=False) == HIERARCHICAL_PREFIX + "rabenseifner"
    cost_model.save_model(cost_model.network_model_key(topology.network), CostModel(50e-3, 1e-12, 1e-12))
    assert choose.allreduce("auto", 4 << 20, topology, tune=False) == HIERARCHICAL_PREFIX + "recursive_doubling"
    assert cost_model.default_model(topology.network) == CostModel()  # the transport's own constants are kept
