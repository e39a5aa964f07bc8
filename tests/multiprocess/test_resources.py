"""Resources under load: file descriptors, threads and memory stay flat over a soak of mixed collectives, and
1,000 async allreduces in flight from 8 threads complete correctly (as torch's gloo stress test has them).

The main suite runs a short soak (``SHORT_SOAK`` collectives); ``pytest --soak`` (``tox -e soak``) runs
``LONG_SOAK`` over shared memory and over gloo.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hybrid_ext

SHORT_SOAK, LONG_SOAK = 500, 10_000
SIZES = (1, 7, 1000, 65_536, 300_001)  # elements: below the rank count, small, one slot, several slots
OPS = ("sum", "avg", "min", "max")
RSS_SLACK_MIB = 32  # the allocator's caches and metrics' bounded history (10,000 records) may grow this much


def usage() -> dict:
    """This process's open file descriptors, OS threads and resident memory (MiB)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(status["Threads"]),
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
    }


def _expected(op: str, values: list[float]) -> float:
    return {"sum": sum, "avg": lambda v: sum(v) / len(v), "min": min, "max": max}[op](values)


def _soak_rank(rank: int, p: int, count: int) -> dict:
    """``count`` collectives of mixed sizes, ops, forms and groups; usage after warm-up and at the end."""
    pair = dist.new_group([0, 1])  # a second group, which rank 2 is not in
    groups = [(None, list(range(p))), (pair, [0, 1])]
    failures: list[str] = []
    samples = []
    warm_up = count // 5
    for i in range(count):
        if i == warm_up:
            samples.append(usage())
        group, members = groups[i % 3 == 2]  # every third collective on the pair
        if rank not in members:
            continue
        n, op = SIZES[(i * 7) % len(SIZES)], OPS[i % len(OPS)]
        values = [float(r + 1 + i % 5) for r in members]
        mine = values[members.index(rank)]
        form = i % 4
        if form == 0:
            got = hybrid_ext.allreduce(torch.full((n,), mine), op=op, group=group)
        elif form == 1:
            got = hybrid_ext.allreduce_async(torch.full((n,), mine), op=op, group=group).wait(timeout=120)
        elif form == 2:
            parts = hybrid_ext.allreduce_coalesced([torch.full((n,), mine), torch.full((3,), mine)], op=op, group=group)
            got = torch.cat(parts)
        else:
            rows = torch.full((len(members), max(n // 1000, 1)), mine)
            op = op if op != "avg" else "sum"
            got = hybrid_ext.reduce_scatter(rows, counts=(1,) * len(members), op=op, group=group)
        want = _expected(op, values)
        if not bool(((got - want).abs() <= 1e-6 * abs(want)).all()):
            failures.append(f"collective {i}: {form=} {n=} {op}: {got.flatten()[:3].tolist()} != {want}")
    samples.append(usage())
    return {"failures": failures[:10], "samples": samples}


@pytest.mark.timeout(3600)
def test_soak_keeps_fds_threads_and_memory_flat(spawn_ranks, soak):
    for transport in ("shm", "torch") if soak else ("shm",):
        count = LONG_SOAK if soak else SHORT_SOAK
        results = spawn_ranks(
            _soak_rank, 3, count, timeout=1500 if soak else 300, env={"HYBRID_EXT_TRANSPORT": transport}
        )
        for rank, result in enumerate(results):
            assert result["failures"] == [], f"{transport} rank {rank}: {result['failures']}"
            after_warm_up, end = result["samples"]
            print(f"{transport} rank {rank}, {count} collectives: {after_warm_up} -> {end}")
            assert end["fds"] == after_warm_up["fds"], f"{transport} rank {rank}: file descriptors leak"
            assert end["threads"] == after_warm_up["threads"], f"{transport} rank {rank}: threads leak"
            assert end["rss_mib"] - after_warm_up["rss_mib"] < RSS_SLACK_MIB, f"{transport} rank {rank}: memory"


THREADS, PER_THREAD = 8, 125  # 1,000 allreduces in flight


def _in_flight_rank(rank: int, p: int) -> dict:
    # Each thread issues on its own group: ranks agree on the order of a group's collectives, and one group's
    # order is one thread's order (a group shared by threads would need the threads themselves ordered).
    groups = [dist.new_group(list(range(p))) for _ in range(THREADS)]
    handles: list[list] = [[] for _ in range(THREADS)]
    inputs = [[torch.tensor([float(t * PER_THREAD + i + rank)]) for i in range(PER_THREAD)] for t in range(THREADS)]
    start = threading.Barrier(THREADS)

    def issue(t: int) -> None:
        start.wait()  # all threads issue at once
        handles[t] = [hybrid_ext.allreduce_async(x, group=groups[t]) for x in inputs[t]]

    threads = [threading.Thread(target=issue, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    mismatches = []
    for t in range(THREADS):
        for i, handle in enumerate(handles[t]):
            got = handle.wait(timeout=120).item()
            k = t * PER_THREAD + i
            if got != k * p + p * (p - 1) / 2:  # torch's gloo stress test's expected value
                mismatches.append((t, i, got))
    # And the same 1,000 on one group from one thread: every one queued behind the first.
    single = [hybrid_ext.allreduce_async(torch.tensor([float(k + rank)])) for k in range(THREADS * PER_THREAD)]
    for k, handle in enumerate(single):
        if handle.wait(timeout=120).item() != k * p + p * (p - 1) / 2:
            mismatches.append(("single", k))
    return {"issued": sum(len(h) for h in handles) + len(single), "mismatches": mismatches[:10]}


@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_a_thousand_async_allreduces_in_flight_from_eight_threads(spawn_ranks, transport):
    # Below pytest's own timeout, so that a hang is reported with every rank's stacks.
    results = spawn_ranks(_in_flight_rank, 2, timeout=400, env={"HYBRID_EXT_TRANSPORT": transport})
    for result in results:
        assert result["issued"] == 2 * THREADS * PER_THREAD
        assert result["mismatches"] == []


BIG_LAYER = 4096  # three 4096 × 4096 Linear layers: 192 MiB of float32 weights
SYNC_BUCKET_MB = 8.0


def _sync_rank(rank: int, p: int) -> dict:
    from hybrid_ext.comm import metrics

    torch.manual_seed(rank)  # different weights on every rank: the first rank's must win
    wide = [layer for _ in range(3) for layer in (torch.nn.Linear(BIG_LAYER, BIG_LAYER), torch.nn.ReLU())]
    model = torch.nn.Sequential(*wide, torch.nn.Linear(BIG_LAYER, 10))
    hybrid_ext.parallelize(torch.nn.Linear(4, 4), strategy="dp")  # the communicators and their threads, first
    before = usage()["rss_mib"]
    with metrics.capture() as records:
        wrapped = hybrid_ext.parallelize(model, strategy="dp", bucket_mb=SYNC_BUCKET_MB)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    sums = [float(t.double().sum()) for t in wrapped.module.parameters()]
    return {
        "grew_mib": usage()["rss_mib"] - before,
        "peak_over_mib": int(status["VmHWM"].split()[0]) / 1024 - before,
        "largest_collective": max(r.elements * 4 for r in records),
        "sums": sums,
    }


def test_initial_sync_holds_no_copy_of_the_model(spawn_ranks):
    """The first rank's weights reach every rank in collectives no larger than a gradient bucket: a communicator's
    receive buffers keep the size of the largest collective it ran, so one collective of the whole model would
    hold copies of it for the rest of training (2 GB on each rank of VGG-11)."""
    model_mib = 3 * BIG_LAYER * BIG_LAYER * 4 / (1 << 20)
    results = spawn_ranks(_sync_rank, 2, timeout=240)
    assert results[1]["sums"] == results[0]["sums"], "the ranks' weights differ after parallelize"
    for rank, result in enumerate(results):
        print(f"rank {rank}: {result}")
        assert result["largest_collective"] <= SYNC_BUCKET_MB * (1 << 20), f"rank {rank}: {result}"
        assert result["grew_mib"] < model_mib / 4, f"rank {rank} keeps {result['grew_mib']:.0f} MiB more after sync"
        assert result["peak_over_mib"] < model_mib / 4, f"rank {rank} peaked {result['peak_over_mib']:.0f} MiB higher"
