"""The hierarchical allreduce's plan, simulated for every rank in one process: exact, deadlock-free, and each
host's link carries the bound 2(H-1)/H of the vector (Rabenseifner or the ring between hosts)."""

from __future__ import annotations

import pytest
from schedule_sim import simulate

from hybrid_ext.comm.hierarchy import host_layout, plan_hierarchical

LAYOUTS = [
    (0, 0, 1, 1),
    (0, 0, 1, 1, 2, 2),
    (0, 0, 0, 1, 1),  # unequal hosts
    (0, 1, 1),
    (0, 1, 0, 1),  # ranks of a host interleaved
    (0, 0, 0, 0),  # one host
    (0, 1, 2, 3, 4),  # one rank per host
    (0, 0, 1, 1, 1, 1, 2),
    (0, 0, 1, 1, 2, 2, 3, 3),
]


@pytest.mark.parametrize("hosts", LAYOUTS, ids=str)
@pytest.mark.parametrize("inter", ["recursive_doubling", "rabenseifner", "ring"])
@pytest.mark.parametrize("count", [0, 1, 5, 37, 1000])
def test_every_rank_gets_every_contribution_exactly_once(hosts, inter, count):
    p = len(hosts)
    plans = [plan_hierarchical(inter, r, hosts, count) for r in range(p)]
    everyone = (1 << p) - 1
    for rank, buffer in enumerate(simulate(plans)):
        assert all(v == everyone for v in buffer), f"rank {rank}: {[bin(v) for v in buffer[:8]]}"


def _bytes_out_of_each_host(hosts, inter, count):
    out = dict.fromkeys(hosts, 0)
    for rank in range(len(hosts)):
        for step in plan_hierarchical(inter, rank, hosts, count).steps:
            if step.send is not None and hosts[step.send_to] != hosts[rank]:
                out[hosts[rank]] += step.send_count
    return out


@pytest.mark.parametrize(
    "hosts", [(0, 0, 1, 1), (0, 0, 1, 1, 2, 2, 3, 3), (0, 0, 1, 1, 2, 2), (0, 0, 0, 1, 1)], ids=str
)
def test_each_host_link_carries_the_allreduce_bound(hosts):
    n = 1 << 20
    h = len(host_layout(hosts))
    bound = 2 * (h - 1) / h * n
    inter = "rabenseifner" if h & (h - 1) == 0 else "ring"  # the ring is bandwidth-optimal for any H
    for host, sent in _bytes_out_of_each_host(hosts, inter, n).items():
        assert sent == pytest.approx(bound, rel=0.02), f"host {host}: {sent / n:.3f} n, bound {bound / n:.3f} n"


def test_shared_memory_carries_the_rest_and_plans_are_checked():
    plan = plan_hierarchical("rabenseifner", 0, (0, 0, 1, 1), 1000)
    assert plan.algorithm == "hierarchical/rabenseifner"
    assert {s.phase.split()[0] for s in plan.steps} == {"host", "hosts"}
    with pytest.raises(ValueError, match="between hosts"):
        plan_hierarchical("bogus", 0, (0, 1), 10)
    with pytest.raises(ValueError, match="not in a group"):
        plan_hierarchical("ring", 5, (0, 1), 10)
