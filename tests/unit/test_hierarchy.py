"""The hierarchical allreduce's plan, simulated for every rank in one process: exact, deadlock-free, and each
host's link carries the bound 2(H-1)/H of the vector (Rabenseifner or the ring between hosts)."""

from __future__ import annotations

import pytest

from hybrid_ext.comm.hierarchy import (
    equal_hosts,
    hierarchical_traffic,
    host_layout,
    plan_hierarchical,
    plan_hierarchical_allgather,
    plan_hierarchical_reduce_scatter,
    plan_hierarchical_segments,
)
from hybrid_ext.comm.schedule import Plan, block_bounds

from helpers.schedule_sim import simulate

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


@pytest.mark.parametrize("hosts", [*LAYOUTS, (2, 2, 0, 0, 1, 1), (0, 0, 1, 1, 2)], ids=str)
@pytest.mark.parametrize("inter", ["recursive_doubling", "rabenseifner", "ring"])
def test_the_traffic_sums_are_the_plans(hosts, inter):
    """hierarchical_traffic counts what plan_hierarchical's steps send, without building them: every rank, every
    size, what leaves the host apart."""
    for rank in range(len(hosts)):
        for count in (0, 1, 5, 37, 1000):
            plan = plan_hierarchical(inter, rank, hosts, count)
            remote = [s for s in plan.steps if s.send_to is not None and hosts[s.send_to] != hosts[rank]]
            sums = hierarchical_traffic(inter, rank, hosts, count)
            assert (sums.elements_sent, sums.messages, sums.elements_reduced) == (
                plan.elements_sent,
                plan.messages_sent,
                sum(s.recv_count for s in plan.steps if s.reduce),
            )
            assert (sums.remote_elements, sums.remote_messages) == (sum(s.send_count for s in remote), len(remote))
    with pytest.raises(ValueError, match="unknown algorithm between hosts 'nope'"):
        hierarchical_traffic("nope", 0, hosts, 10)
    with pytest.raises(ValueError, match=f"rank {len(hosts)} is not in a group of {len(hosts)}"):
        hierarchical_traffic(inter, len(hosts), hosts, 10)


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


def _serialized(segments, pipelined: bool) -> Plan:
    """One rank's segments as one plan: stage after stage, or in the order the two threads of
    hybrid_ext.comm.pipelined can take them (W(t+1) before X(t) before G(t))."""
    order = []
    for t, segment in enumerate(segments):
        if not pipelined:
            order += [segment.within, segment.between, segment.gather]
            continue
        order.append(segment.within)
        if t > 0:
            order += [segments[t - 1].between, segments[t - 1].gather]
    if pipelined:
        order += [segments[-1].between, segments[-1].gather]
    first = segments[0].within
    return Plan(first.algorithm, first.rank, first.world_size, first.count, tuple(s for p in order for s in p.steps))


@pytest.mark.parametrize("hosts", LAYOUTS, ids=str)
@pytest.mark.parametrize("inter", ["recursive_doubling", "rabenseifner", "ring"])
@pytest.mark.parametrize(("count", "segments"), [(0, 2), (5, 3), (37, 4), (1000, 7), (64, 16)])
@pytest.mark.parametrize("pipelined", [False, True], ids=["in-turn", "overlapped"])
def test_segments_reduce_every_contribution_exactly_once_in_either_order(hosts, inter, count, segments, pipelined):
    p = len(hosts)
    plans = [_serialized(plan_hierarchical_segments(inter, r, hosts, count, segments), pipelined) for r in range(p)]
    everyone = (1 << p) - 1
    for rank, buffer in enumerate(simulate(plans)):
        assert all(v == everyone for v in buffer), f"rank {rank}: {[bin(v) for v in buffer[:8]]}"


def test_segments_send_what_the_whole_plan_sends_and_keep_their_stages_apart():
    hosts, n = (0, 0, 1, 1), 1 << 16
    for rank in range(len(hosts)):
        segments = plan_hierarchical_segments("rabenseifner", rank, hosts, n, 8)
        whole = plan_hierarchical("rabenseifner", rank, hosts, n)
        assert sum(s.within.elements_sent + s.between.elements_sent + s.gather.elements_sent for s in segments) == (
            whole.elements_sent
        )
        for segment in segments:  # the network stage crosses hosts only, the others stay inside the host
            assert all(hosts[s.send_to] != hosts[rank] for s in segment.between.steps if s.send is not None)
            for stage in (segment.within, segment.gather):
                assert all(hosts[s.send_to] == hosts[rank] for s in stage.steps if s.send is not None)
    with pytest.raises(ValueError, match="segments must be at least 1"):
        plan_hierarchical_segments("ring", 0, hosts, 10, 0)


@pytest.mark.parametrize("hosts", LAYOUTS, ids=str)
@pytest.mark.parametrize("inter", ["recursive_doubling", "rabenseifner", "ring"])
def test_each_segment_touches_only_its_own_block_so_copies_can_run_per_segment(hosts, inter):
    # The communicator fills segment t's block of the working buffer just before W(t) and copies it out just after
    # G(t), while other segments are on the wire: right only if no stage of t reads or writes outside its block.
    count, segments = 1003, 5
    bounds = block_bounds(count, segments)
    for rank in range(len(hosts)):
        for t, segment in enumerate(plan_hierarchical_segments(inter, rank, hosts, count, segments)):
            for stage in (segment.within, segment.between, segment.gather):
                for step in stage.steps:
                    for span in (step.send, step.recv):
                        if span is not None:
                            assert bounds[t] <= span[0] <= span[1] <= bounds[t + 1], (rank, t, step)


def test_segment_count_keeps_network_messages_long_and_names_a_bad_setting(monkeypatch):
    from hybrid_ext.comm import pipelined

    monkeypatch.delenv(pipelined.SEGMENT_BYTES_ENV, raising=False)
    assert pipelined.segment_count(16 << 20, lanes=2, hosts=2) == 8  # 2 MiB segments: 512 KiB messages
    assert pipelined.segment_count(16 << 20, lanes=2, hosts=4) == 4
    assert pipelined.segment_count(1 << 20, lanes=2, hosts=2) == 1  # too small to cut
    assert pipelined.segment_count(1 << 30, lanes=2, hosts=2) == pipelined.MAX_SEGMENTS
    monkeypatch.setenv(pipelined.SEGMENT_BYTES_ENV, "0")
    assert pipelined.segment_count(1 << 30, lanes=2, hosts=2) == 1  # off
    monkeypatch.setenv(pipelined.SEGMENT_BYTES_ENV, "16384")
    assert pipelined.segment_count(65536, lanes=2, hosts=2) == 4
    for bad in ("-1", "2M", "lots"):
        monkeypatch.setenv(pipelined.SEGMENT_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=f"HYBRID_EXT_SEGMENT_BYTES='{bad}'"):
            pipelined.segment_count(1 << 20, lanes=2, hosts=2)


def _sent_out_of(host: int, hosts, plans) -> int:
    """Elements the ranks of ``host`` send to other hosts."""
    return sum(
        s.send_count
        for r, plan in enumerate(plans)
        if hosts[r] == host
        for s in plan.steps
        if s.send is not None and hosts[s.send_to] != host
    )


def _block_plans(planner, hosts, blocks):
    """(ranks, block sizes, block offsets, every rank's plan) — plans that keep the executor's contract (a
    reducing step receives something)."""
    p, counts = len(hosts), blocks(len(hosts))
    plans = [planner(r, hosts, counts) for r in range(p)]
    assert all(s.recv is not None or not s.reduce for plan in plans for s in plan.steps)
    return p, counts, [sum(counts[:r]) for r in range(p + 1)], plans


EQUAL_LAYOUTS = [(0, 0, 1, 1), (0, 1, 0, 1), (0, 0, 1, 1, 2, 2), (0, 0, 0, 1, 1, 1), (0, 1, 2, 3), (1, 0, 0, 1)]
BLOCKS = [lambda p: (3,) * p, lambda p: tuple(r % 3 for r in range(p)), lambda p: (0,) * (p - 1) + (5,)]


@pytest.mark.parametrize("hosts", EQUAL_LAYOUTS, ids=str)
@pytest.mark.parametrize("blocks", BLOCKS, ids=["equal", "uneven-with-empty", "one-block"])
def test_hierarchical_allgather_gives_every_rank_every_block_and_sends_each_block_out_of_its_host_once(hosts, blocks):
    p, counts, offsets, plans = _block_plans(plan_hierarchical_allgather, hosts, blocks)
    initial = [[1 << r if offsets[r] <= k < offsets[r + 1] else 0 for k in range(offsets[-1])] for r in range(p)]
    owner = [r for r in range(p) for _ in range(counts[r])]
    for rank, buffer in enumerate(simulate(plans, initial)):
        assert list(buffer) == [1 << o for o in owner], f"rank {rank}"
    host_count = len(set(hosts))
    for host in set(hosts):  # out of each host: its own blocks, once to each other host
        out = _sent_out_of(host, hosts, plans)
        assert out == (host_count - 1) * sum(counts[r] for r in range(p) if hosts[r] == host)


@pytest.mark.parametrize("hosts", EQUAL_LAYOUTS, ids=str)
@pytest.mark.parametrize("blocks", BLOCKS, ids=["equal", "uneven-with-empty", "one-block"])
def test_hierarchical_reduce_scatter_leaves_each_rank_its_block_summed_once_over_all(hosts, blocks):
    p, counts, offsets, plans = _block_plans(plan_hierarchical_reduce_scatter, hosts, blocks)
    everyone = (1 << p) - 1
    for rank, buffer in enumerate(simulate(plans)):
        assert all(v == everyone for v in buffer[offsets[rank] : offsets[rank + 1]]), f"rank {rank}"
    host_count = len(set(hosts))
    for host in set(hosts):
        out = _sent_out_of(host, hosts, plans)
        assert out == sum(counts[r] for r in range(p) if hosts[r] != host)  # each other rank's block once
    assert host_count > 1


def test_hierarchical_block_plans_refuse_unequal_hosts_and_bad_blocks():
    assert equal_hosts((0, 0, 1, 1)) and not equal_hosts((0, 0, 0, 1, 1)) and not equal_hosts((0, 0))
    with pytest.raises(ValueError, match="needs equal hosts"):
        plan_hierarchical_allgather(0, (0, 0, 0, 1, 1), (1,) * 5)
    with pytest.raises(ValueError, match="3 block sizes for a group of 4"):
        plan_hierarchical_reduce_scatter(0, (0, 0, 1, 1), (1, 1, 1))
