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

**All-gather and reduce-scatter** of per-rank blocks (the hybrid FC layers' activations and their gradients) on
hosts with equal rank counts (:func:`plan_hierarchical_allgather`, :func:`plan_hierarchical_reduce_scatter`):
lane peers — local rank i of every host — exchange blocks between hosts, and ranks of one host exchange what
they hold, so each block leaves its host once, (H-1)/H of the vector per host; the flat recursive doubling
sends a host's blocks across once per partner that needs them (twice the bound at 2 x 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from hybrid_ext.comm.schedule import (
    ALGORITHMS,
    Plan,
    Range,
    Step,
    _offsets,
    block_bounds,
    plan_allgather,
    plan_allreduce,
    plan_reduce_scatter,
)

INTRA_SCATTER = "recursive_halving"
INTRA_GATHER = "recursive_doubling"


def _moved(plan: Plan, members: Callable[[int], int], offset: int, prefix: str) -> list[Step]:
    """``plan``'s steps with each rank r renamed ``members(r)`` and its ranges shifted by ``offset``."""

    def rank(r: int | None) -> int | None:
        return None if r is None else members(r)

    def shifted(span: Range | None) -> Range | None:
        return None if span is None else (span[0] + offset, span[1] + offset)

    return [
        Step(prefix + s.phase, rank(s.send_to), shifted(s.send), rank(s.recv_from), shifted(s.recv), s.reduce)
        for s in plan.steps
    ]


def host_layout(hosts: Sequence[int]) -> Mapping[int, tuple[int, ...]]:
    """Group ranks per host, in rank order, for hosts in order of their first rank (one answer per layout, shared
    by every rank of a large group planned at once: read-only)."""
    return _host_layout(tuple(hosts))


@functools.lru_cache(maxsize=64)
def _host_layout(hosts: tuple[int, ...]) -> Mapping[int, tuple[int, ...]]:
    members: dict[int, list[int]] = {}
    for rank, host in enumerate(hosts):
        members.setdefault(host, []).append(rank)
    return MappingProxyType({host: tuple(ranks) for host, ranks in members.items()})


@dataclass(frozen=True)
class _Layout:
    """What every rank's plan reads of one layout, worked out once for it (a rank's plan then costs its own steps,
    not a pass over every host: a planner asks for each of a thousand ranks)."""

    members: Mapping[int, tuple[int, ...]]  # host -> its group ranks
    order: tuple[int, ...]  # the hosts, by first rank
    position: Mapping[int, int]  # host -> its index in order
    local: tuple[int, ...]  # group rank -> its index among its host's ranks
    lanes: int  # the most ranks on one host


@functools.lru_cache(maxsize=64)
def _layout(hosts: tuple[int, ...]) -> _Layout:
    members = host_layout(hosts)
    local = [0] * len(hosts)
    for ranks in members.values():
        for index, rank in enumerate(ranks):
            local[rank] = index
    order = tuple(members)
    position = MappingProxyType({host: index for index, host in enumerate(order)})
    return _Layout(members, order, position, tuple(local), max(len(m) for m in members.values()))


def _check(inter_algorithm: str, rank: int, hosts: tuple[int, ...]) -> None:
    if inter_algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm between hosts {inter_algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is not in a group of {len(hosts)}")


def _round_counts(bounds: list[int], first: int, size: int, lanes: int) -> tuple[int, ...]:
    """The lanes from ``first`` a host of ``size`` ranks reduces in one round, one per local rank (0 past the last
    lane)."""
    own = [bounds[k + 1] - bounds[k] for k in range(first, min(first + size, lanes))]
    return tuple(own + [0] * (size - len(own)))


def _stages(
    inter_algorithm: str, rank: int, hosts: tuple[int, ...], count: int, offset: int = 0
) -> tuple[list[Step], ...]:
    """(reduce-scatter within the host, allreduce between hosts, all-gather within the host): rank's steps for
    the ``count`` elements from ``offset`` on."""
    _check(inter_algorithm, rank, hosts)
    layout = _layout(tuple(hosts))
    members, order = layout.members, layout.order
    mine = members[hosts[rank]]
    local, size, lanes = layout.local[rank], len(mine), layout.lanes
    bounds = block_bounds(count, lanes)
    rounds = range(0, lanes, size)

    def round_counts(first: int) -> tuple[int, ...]:
        return _round_counts(bounds, first, size, lanes)

    within: list[Step] = []
    between: list[Step] = []
    gather: list[Step] = []
    if count > 0 and len(hosts) > 1:
        for first in rounds:
            sub = plan_reduce_scatter(INTRA_SCATTER, local, round_counts(first))
            within += _moved(sub, mine.__getitem__, offset + bounds[first], "host ")
        host_index = layout.position[hosts[rank]]
        for lane in range(local, lanes, size):

            def owner(h: int, lane: int = lane) -> int:  # the lane's owner on the h-th host
                ranks = members[order[h]]
                return ranks[lane % len(ranks)]

            sub = plan_allreduce(inter_algorithm, host_index, len(order), bounds[lane + 1] - bounds[lane])
            between += _moved(sub, owner, offset + bounds[lane], "hosts ")
        for first in rounds:
            sub = plan_allgather(INTRA_GATHER, local, round_counts(first))
            gather += _moved(sub, mine.__getitem__, offset + bounds[first], "host ")
    return within, between, gather


@dataclass(frozen=True)
class Traffic:
    """What one rank sends and reduces in one collective, in elements (a plan's sums, without its steps)."""

    elements_sent: int
    messages: int
    elements_reduced: int  # received and reduced into its own
    remote_elements: int  # of elements_sent, to ranks on other hosts
    remote_messages: int  # of messages, to ranks on other hosts


@functools.lru_cache(maxsize=4096)
def _sums(planner, algorithm: str, rank: int, *shape) -> tuple[int, int, int]:
    """(elements sent, messages, elements reduced) of ``planner(algorithm, rank, *shape)``'s flat plan."""
    plan = planner(algorithm, rank, *shape)
    return plan.elements_sent, plan.messages_sent, sum(s.recv_count for s in plan.steps if s.reduce)


def hierarchical_traffic(inter_algorithm: str, rank: int, hosts: tuple[int, ...], count: int) -> Traffic:
    """The sums of ``plan_hierarchical(inter_algorithm, rank, hosts, count)``, from its stages' flat plans alone:
    no step is renamed or moved, so a planner can ask it of each of a thousand ranks. The exchange between hosts
    runs among one rank per host, so every message of it leaves the host; those inside a host stay."""
    _check(inter_algorithm, rank, hosts)
    layout = _layout(tuple(hosts))
    mine = layout.members[hosts[rank]]
    local, size, lanes = layout.local[rank], len(mine), layout.lanes
    if count <= 0 or len(hosts) == 1:
        return Traffic(0, 0, 0, 0, 0)
    bounds = block_bounds(count, lanes)
    near = [0, 0, 0]
    for first in range(0, lanes, size):
        counts = _round_counts(bounds, first, size, lanes)
        for sums in (_sums(plan_reduce_scatter, INTRA_SCATTER, local, counts),
                     _sums(plan_allgather, INTRA_GATHER, local, counts)):  # fmt: skip
            near = [a + b for a, b in zip(near, sums, strict=True)]
    far = [0, 0, 0]
    host_index = layout.position[hosts[rank]]
    for lane in range(local, lanes, size):
        sums = _sums(plan_allreduce, inter_algorithm, host_index, len(layout.order), bounds[lane + 1] - bounds[lane])
        far = [a + b for a, b in zip(far, sums, strict=True)]
    return Traffic(near[0] + far[0], near[1] + far[1], near[2] + far[2], far[0], far[1])


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


def equal_hosts(hosts: Sequence[int]) -> bool:
    """Whether the group spans several hosts, each with the same number of its ranks (what the hierarchical
    all-gather and reduce-scatter below need: a lane peer on every host)."""
    sizes = {len(m) for m in host_layout(hosts).values()}
    return len(set(hosts)) > 1 and len(sizes) == 1


def _lanes(rank: int, hosts: tuple[int, ...], counts: tuple[int, ...]):
    """(host order, members per host, this rank's host's ranks, its host index and lane, block range of a rank)
    for a block plan."""
    if len(counts) != len(hosts):
        raise ValueError(f"{len(counts)} block sizes for a group of {len(hosts)}")
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is not in a group of {len(hosts)}")
    if not equal_hosts(hosts):
        raise ValueError(f"hosts {list(hosts)}: the hierarchical all-gather / reduce-scatter needs equal hosts")
    offsets = _offsets(counts)  # refuses negative sizes
    layout = _layout(tuple(hosts))
    mine = layout.members[hosts[rank]]
    host_index, local = layout.position[hosts[rank]], layout.local[rank]
    return layout.order, layout.members, mine, host_index, local, lambda r: (offsets[r], offsets[r + 1])


def _step(phase: str, to: int, send: Range, frm: int, recv: Range, reduce: bool) -> list[Step]:
    """One step, with an empty half dropped on both sides alike (both sides know every block's size)."""
    send_to, send = (to, send) if send[1] > send[0] else (None, None)
    recv_from, recv = (frm, recv) if recv[1] > recv[0] else (None, None)
    if send is None and recv is None:
        return []
    return [Step(phase, send_to, send, recv_from, recv, reduce and recv is not None)]


@functools.lru_cache(maxsize=1024)
def plan_hierarchical_allgather(rank: int, hosts: tuple[int, ...], counts: tuple[int, ...]) -> Plan:
    """All-gather of blocks of sizes ``counts`` (one per rank) on a group of equal hosts, each host's blocks
    sent out of it once: every rank hands its own block to its lane peer on each other host (local rank i of
    every host), then ranks of one host hand each other what they hold. Each host sends (H-1)/H of the vector
    (its own blocks, once to each other host) — the least any all-gather can; recursive doubling sends each
    block across hosts once per rank of the receiving host that needs it through a partner on another host."""
    order, members, mine, h, i, block = _lanes(rank, hosts, counts)
    size, lanes = len(order), len(mine)
    steps: list[Step] = []
    for t in range(1, size):
        to, frm = members[order[(h + t) % size]][i], members[order[(h - t) % size]][i]
        steps += _step("hosts allgather", to, block(rank), frm, block(frm), False)
    for s in range(1, lanes):
        to, frm = mine[(i + s) % lanes], mine[(i - s) % lanes]
        for g in order:
            steps += _step("host allgather", to, block(members[g][i]), frm, block(members[g][(i - s) % lanes]), False)
    return Plan("hierarchical", rank, len(hosts), sum(counts), tuple(steps), collective="allgather")


@functools.lru_cache(maxsize=1024)
def plan_hierarchical_reduce_scatter(rank: int, hosts: tuple[int, ...], counts: tuple[int, ...]) -> Plan:
    """Reduce-scatter of blocks of sizes ``counts`` on a group of equal hosts, the dual of
    :func:`plan_hierarchical_allgather`: ranks of one host first sum, for each lane, the blocks of that lane's
    ranks on every host (each rank sends its own contributions to each host-mate), then each rank sends its
    host's partial sum of a lane peer's block to that peer — (H-1)/H of the vector out of each host."""
    order, members, mine, h, i, block = _lanes(rank, hosts, counts)
    size, lanes = len(order), len(mine)
    steps: list[Step] = []
    for s in range(1, lanes):
        to, frm = mine[(i + s) % lanes], mine[(i - s) % lanes]
        for g in order:
            steps += _step(
                "host reduce-scatter", to, block(members[g][(i + s) % lanes]), frm, block(members[g][i]), True
            )
    for t in range(1, size):
        to, frm = members[order[(h + t) % size]][i], members[order[(h - t) % size]][i]
        steps += _step("hosts reduce-scatter", to, block(to), frm, block(rank), True)
    return Plan("hierarchical", rank, len(hosts), sum(counts), tuple(steps), collective="reduce_scatter")
