"""The hierarchical allreduce for groups that span hosts: a pure plan, composed from the flat ones.

On a cluster each host's network link is the bottleneck; the ranks of one host share it and reach each other
through shared memory. So (``hosts[r]`` = the host of group rank r, any layout, hosts of unequal size):

1. **Reduce-scatter inside each host** (shared memory). The vector is cut into ``L`` lanes, L = the largest
   host's rank count; on a host of ``s`` ranks, lane k belongs to local rank ``k mod s``. Afterwards each lane's
   owner holds that lane summed over its host. A host with fewer ranks than lanes reduces them in rounds of s.
2. **Allreduce between hosts**, one lane at a time, among the lane's owners (one per host) with a flat schedule
   (recursive doubling, Rabenseifner, or the ring — any number of hosts). Every rank of a host carries its own
   lanes, so all of them drive the host's link at once, and each host sends 2(H-1)/H of the vector in all with
   Rabenseifner or the ring: the bound for any allreduce across H links.
3. **All-gather inside each host**: every rank gets every lane.

Each element's value is final on one rank per lane-allreduce (whose schedules already end bitwise identical on
its participants) and only copied after, so every rank ends bitwise identical. The sub-plans' steps are the
flat plans' own (:mod:`hybrid_ext.comm.schedule`), renumbered into group ranks and shifted to their lane.

**Segments** (:func:`plan_hierarchical_segments`): the vector cut into consecutive segments, each reduced by its
own hierarchical plan and kept as its three stages, so that an executor can run one segment's exchange between
hosts while the host's ranks reduce-scatter the next segment and all-gather the previous one through shared
memory (:mod:`hybrid_ext.comm.pipelined`): the network, the bottleneck, then rarely waits on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from hybrid_ext.comm.schedule import (
    ALGORITHMS,
    Plan,
    Range,
    Step,
    block_bounds,
    plan_allgather,
    plan_allreduce,
    plan_reduce_scatter,
)

INTRA_SCATTER = "recursive_halving"
INTRA_GATHER = "recursive_doubling"


def _moved(plan: Plan, members: Sequence[int], offset: int, prefix: str) -> list[Step]:
    """``plan``'s steps with its ranks renamed to ``members`` and its ranges shifted by ``offset``."""

    def rank(r: int | None) -> int | None:
        return None if r is None else members[r]

    def shifted(span: Range | None) -> Range | None:
        return None if span is None else (span[0] + offset, span[1] + offset)

    return [
        Step(prefix + s.phase, rank(s.send_to), shifted(s.send), rank(s.recv_from), shifted(s.recv), s.reduce)
        for s in plan.steps
    ]


def host_layout(hosts: Sequence[int]) -> dict[int, list[int]]:
    """Group ranks per host, in rank order, for hosts in order of their first rank."""
    members: dict[int, list[int]] = {}
    for rank, host in enumerate(hosts):
        members.setdefault(host, []).append(rank)
    return members


def _stages(
    inter_algorithm: str, rank: int, hosts: tuple[int, ...], count: int, offset: int = 0
) -> tuple[list[Step], ...]:
    """(reduce-scatter within the host, allreduce between hosts, all-gather within the host): rank's steps for
    the ``count`` elements from ``offset`` on."""
    if inter_algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm between hosts {inter_algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is not in a group of {len(hosts)}")
    members = host_layout(hosts)
    order = list(members)  # host order: by first rank
    mine = members[hosts[rank]]
    local, size = mine.index(rank), len(mine)
    lanes = max(len(m) for m in members.values())
    bounds = block_bounds(count, lanes)
    rounds = range(0, lanes, size)

    def round_counts(first: int) -> tuple[int, ...]:
        own = [bounds[k + 1] - bounds[k] for k in range(first, min(first + size, lanes))]
        return tuple(own + [0] * (size - len(own)))

    within: list[Step] = []
    between: list[Step] = []
    gather: list[Step] = []
    if count > 0 and len(hosts) > 1:
        for first in rounds:
            sub = plan_reduce_scatter(INTRA_SCATTER, local, round_counts(first))
            within += _moved(sub, mine, offset + bounds[first], "host ")
        for lane in range(local, lanes, size):
            owners = [members[h][lane % len(members[h])] for h in order]
            sub = plan_allreduce(inter_algorithm, order.index(hosts[rank]), len(order), bounds[lane + 1] - bounds[lane])
            between += _moved(sub, owners, offset + bounds[lane], "hosts ")
        for first in rounds:
            sub = plan_allgather(INTRA_GATHER, local, round_counts(first))
            gather += _moved(sub, mine, offset + bounds[first], "host ")
    return within, between, gather


@functools.lru_cache(maxsize=4096)
def plan_hierarchical(inter_algorithm: str, rank: int, hosts: tuple[int, ...], count: int) -> Plan:
    """Plan rank ``rank``'s part of a hierarchical allreduce of ``count`` elements (see the module docstring)."""
    within, between, gather = _stages(inter_algorithm, rank, hosts, count)
    return Plan(f"hierarchical/{inter_algorithm}", rank, len(hosts), count, tuple(within + between + gather))


@dataclass(frozen=True)
class Segment:
    """One segment of a segmented hierarchical allreduce: its three stages, each a plan over the whole vector."""

    within: Plan  # reduce-scatter inside the host (shared memory)
    between: Plan  # allreduce of this rank's lanes between hosts (the network)
    gather: Plan  # all-gather inside the host (shared memory)


@functools.lru_cache(maxsize=1024)
def plan_hierarchical_segments(
    inter_algorithm: str, rank: int, hosts: tuple[int, ...], count: int, segments: int
) -> tuple[Segment, ...]:
    """The hierarchical allreduce of ``count`` elements as ``segments`` consecutive segments, each planned as a
    whole hierarchical allreduce of its own elements (see the module docstring); ranges index the whole vector."""
    if segments < 1:
        raise ValueError(f"segments must be at least 1, got {segments}")
    name = f"hierarchical/{inter_algorithm}"
    bounds = block_bounds(count, segments)
    out = []
    for index in range(segments):
        offset, length = bounds[index], bounds[index + 1] - bounds[index]
        stages = _stages(inter_algorithm, rank, hosts, length, offset)
        plans = [Plan(name, rank, len(hosts), count, tuple(steps)) for steps in stages]
        out.append(Segment(*plans))
    return tuple(out)
