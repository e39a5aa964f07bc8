"""The multi-rank harness itself: results come back by rank, failures and hangs fail fast with diagnostics."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from hybrid_ext.launch import LaunchError, LaunchTimeout


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": t.item(), "threads": torch.get_num_threads()}


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # the others block here: the harness must still end the job
    return rank


def _hang(rank, world_size):
    time.sleep(3600)


def _die_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        print("about to die", flush=True)
        os._exit(7)
    dist.barrier()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_spawn_returns_each_ranks_result(spawn_ranks, world_size):
    results = spawn_ranks(_allreduce_rank, world_size)
    expected = world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world"] == world_size and r["sum"] == expected for r in results)
    assert all(r["threads"] == 1 for r in results)


def test_rank_exception_carries_its_traceback(spawn_ranks):
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        spawn_ranks(_raise_on_rank_one, 3, failure_grace=2.0)
    message = str(info.value)
    assert message.startswith("rank 1 failed first")
    assert "ValueError: boom from rank one" in message
    assert "_raise_on_rank_one" in message  # the traceback, not just the message
    assert time.monotonic() - start < 60


def test_hang_fails_within_timeout(spawn_ranks):
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match=r"still running after 5s"):
        spawn_ranks(_hang, 2, timeout=5)
    assert time.monotonic() - start < 30


def test_dead_rank_is_reported_with_its_output(spawn_ranks):
    with pytest.raises(LaunchError) as info:
        spawn_ranks(_die_on_last_rank, 2, failure_grace=2.0)
    assert "exit code 7" in str(info.value)
    assert "about to die" in str(info.value)
