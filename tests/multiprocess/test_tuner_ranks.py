"""The online tuner on real ranks: they tune together, save and reuse their choice, keep the group's native
allreduce where it is fastest and a schedule where it is not, and reduce correctly throughout (trials included).
The tuner's logic on ranks as threads: tests/unit/test_tuner.py."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_ext.comm.tuner import trials_for

CANDIDATES = ("recursive_doubling", "rabenseifner", "ring")


# ------------------------------------------------------------------ real ranks


def _sum_calls(rank: int, world: int, calls: int, count: int) -> tuple[list, bool, torch.Tensor]:
    """``calls`` sum-allreduces of known vectors: each call's last metrics record, whether every result was exact,
    and the last result."""
    import hybrid_ext
    from hybrid_ext.comm import metrics

    last, exact = [], True
    for i in range(calls):
        x = torch.arange(count, dtype=torch.float32) * (rank + 1) + i
        expected = torch.arange(count, dtype=torch.float32) * sum(range(1, world + 1)) + i * world
        with metrics.capture() as records:
            hybrid_ext.allreduce(x)
        last.append(records[-1])
        exact = exact and torch.equal(x, expected)
    return last, exact, x


def _tuned_rank(rank: int, world: int, calls: int, count: int) -> dict:
    last, exact, _ = _sum_calls(rank, world, calls, count)
    return {"ran": [r.algorithm for r in last], "exact": exact}


@pytest.mark.timeout(180)
def test_real_ranks_tune_together_save_and_reuse_their_choice(spawn_ranks, tmp_path):
    # The built-in cost model (no saved calibration) finds all three plausible for 20 KB at 3 ranks; the group's
    # native allreduce and, on one host's shared memory, the direct one are always tried.
    env = {
        "HYBRID_EXT_TUNE": "on",
        "HYBRID_EXT_TUNED": str(tmp_path / "tuned.json"),
        "HYBRID_EXT_COST_MODEL": str(tmp_path / "no-calibration.json"),
    }
    candidates = (*CANDIDATES, "direct", "native")
    calls = trials_for(20_000) * len(candidates) + 4
    first = spawn_ranks(_tuned_rank, 3, calls, 5000, env=env)
    assert all(r["exact"] for r in first)
    assert len({tuple(r["ran"]) for r in first}) == 1, [r["ran"] for r in first]
    ran = first[0]["ran"]
    trials = trials_for(20_000) * len(candidates)
    assert sorted(set(ran[:trials])) == sorted(candidates)
    assert len(set(ran[trials:])) == 1
    choice = ran[-1]
    assert set(json.loads((tmp_path / "tuned.json").read_text()).values()) == {choice}

    second = spawn_ranks(_tuned_rank, 3, 3, 5000, env=env)
    assert all(r["exact"] and r["ran"] == [choice] * 3 for r in second)


# ------------------------------------------------------------------ real ranks: native against the schedules


class _DelayedTransport:
    """Every exchange of the wrapped transport takes ``delay`` seconds longer: the schedules made slow."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.rank, self.size, self.timeout, self.name = inner.rank, inner.size, inner.timeout, inner.name

    def exchange(self, send, send_to, recv, recv_from) -> None:
        import time

        time.sleep(self.delay)
        self.inner.exchange(send, send_to, recv, recv_from)


class _DelayedNative:
    """The wrapped native allreduce, ``delay`` seconds slower."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, inner.name

    def allreduce(self, tensor, op) -> None:
        import time

        time.sleep(self.delay)
        self.inner.allreduce(tensor, op)


def _native_against_schedules_rank(rank: int, world: int, slowed: str, calls: int, count: int) -> dict:
    import hybrid_ext
    from hybrid_ext.comm import communicator

    comm = communicator()
    comm.direct = None  # native against the schedules alone (the one-host direct allreduce has tests of its own)
    if slowed == "schedules":
        comm.transport = _DelayedTransport(comm.transport, 0.02)
    else:
        comm.native = _DelayedNative(comm.native, 0.05)
    last, exact, x = _sum_calls(rank, world, calls, count)
    ran = [r.algorithm for r in last]
    transports = {(r.algorithm, r.transport) for r in last}
    avg = torch.full((count,), float(rank))
    hybrid_ext.allreduce(avg, op="avg")
    exact = exact and torch.equal(avg, torch.full((count,), sum(range(world)) / world))
    return {"ran": ran, "exact": exact, "transports": sorted(transports), "result": x.tolist()}


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.parametrize("slowed", ["schedules", "native"])
def test_real_ranks_keep_native_when_it_is_fastest_and_a_schedule_when_it_is_not(spawn_ranks, tmp_path, slowed):
    env = {
        "HYBRID_EXT_TUNE": "fresh",
        "HYBRID_EXT_TUNED": str(tmp_path / "tuned.json"),
        "HYBRID_EXT_COST_MODEL": str(tmp_path / "no-calibration.json"),
    }
    count = 1000
    calls = trials_for(4 * count) * (len(CANDIDATES) + 1) + 4
    results = spawn_ranks(_native_against_schedules_rank, 2, slowed, calls, count, env=env)
    assert all(r["exact"] for r in results)
    assert len({tuple(r["ran"]) for r in results}) == 1, [r["ran"] for r in results]
    assert results[0]["result"] == results[1]["result"]
    ran = results[0]["ran"]
    assert "native" in ran[: calls - 4]  # tried in the trials
    assert ("native", "torch-gloo") in results[0]["transports"]  # metrics say what ran, and over what
    if slowed == "schedules":
        assert ran[-4:] == ["native"] * 4
    else:
        assert "native" not in ran[-4:] and len(set(ran[-4:])) == 1
