"""``bench train --repeats``: runs interleaved, each repeat's step kept; ``plan --compare`` treats strategies whose
repeats overlap as tied."""

from __future__ import annotations

import pytest

from hybrid_ext.bench import train
from hybrid_ext.plan_command import compare

pytestmark = pytest.mark.timeout(60)


def test_repeats_interleave_the_runs_and_keep_each_repeats_median(monkeypatch):
    calls = []

    def fake_spawn(fn, world, model, strategy, grad_algorithm, *args, **kwargs):
        calls.append(strategy)
        base = {"dp": 0.100, "hybrid": 0.050}[strategy]
        slow = 1 + 0.1 * (len(calls) - 1)  # the machine slows down as the benchmark goes on
        # rank 1 is the slower in every step: a step lasts as long as its slowest rank
        return [
            {"times": [base * slow, base * slow * 3, base * slow], "bytes": [8.0], "messages": [2.0]},
            {"times": [base * slow * 2, base * slow * 3, base * slow * 2], "bytes": [8.0], "messages": [2.0]},
        ]

    monkeypatch.setattr(train, "spawn", fake_spawn)
    runs = [("dp-butterfly", "dp", "butterfly"), ("hybrid-butterfly", "hybrid", "butterfly")]
    rows = train.run_train_bench("digits_alexnet", 2, runs, micro_batch=4, size=16, steps=3, repeats=3)
    assert calls == ["dp", "hybrid"] * 3  # A B A B A B, not A A A B B B
    dp, hybrid = rows
    assert [round(ms, 6) for ms in dp.step_ms_runs] == [200.0, 240.0, 280.0]  # per step max over ranks, median
    assert [round(ms, 6) for ms in hybrid.step_ms_runs] == [110.0, 130.0, 150.0]
    assert dp.step_ms == pytest.approx(240.0) and hybrid.step_ms == pytest.approx(130.0)
    assert dp.samples_per_sec == pytest.approx(2 * 4 / 0.240)
    assert dp.bytes_per_step == 8.0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        train.run_train_bench("digits_alexnet", 2, runs, micro_batch=4, size=16, steps=3, repeats=0)


def test_across_hosts_each_run_and_repeat_is_its_own_job_and_the_repeats_merge(monkeypatch):
    """``--hosts``: one torchrun job per run and repeat (fresh processes, as a user's job), interleaved; the rows merge
    as one job's repeats would."""
    import argparse
    import contextlib

    from hybrid_ext import launch
    from hybrid_ext.launch import cluster

    jobs = []

    def fake_torchrun(command, np, **kwargs):
        label = command[command.index("--runs") + 1]
        assert command[command.index("--repeats") + 1] == "1"
        jobs.append(label)
        ms = {"dp-butterfly": 200.0, "auto-butterfly": 100.0}[label] * (1 + 0.1 * (len(jobs) - 1))
        phases = {"forward": ms / 4, "backward": ms / 2}
        row = {"run": label, "world": np, "samples_per_sec": np * 4 / ms * 1e3, "step_ms": ms, "bytes_per_step": 8.0,
               "messages_per_step": 2.0, "step_ms_runs": [ms], "mp_size": 1, "phases_ms": phases,
               "chose": "dp" if label.startswith("auto") else None,
               "chose_runs": ["dp"] if label.startswith("auto") else []}  # fmt: skip
        return [[row]] * np  # every rank reports rank 0's rows

    monkeypatch.setattr(cluster, "emulated_cluster", lambda *a: contextlib.nullcontext(["node0", "node1"]))
    monkeypatch.setattr(launch, "run_torchrun", fake_torchrun)
    args = argparse.Namespace(model="digits_alexnet", runs="dp-butterfly,auto-butterfly", micro_batch=4, size=16,
                              steps=3, device="cpu", repeats=3, mp_size=None, hosts=2, nic="1gbit", cpus_per_host=1,
                              np=4)  # fmt: skip
    dp, auto = train._run_on_emulated_cluster(args)
    assert jobs == ["dp-butterfly", "auto-butterfly"] * 3  # A B A B A B, each its own job
    assert [round(ms, 6) for ms in dp.step_ms_runs] == [200.0, 240.0, 280.0]
    assert dp.step_ms == pytest.approx(240.0) and dp.samples_per_sec == pytest.approx(4 * 4 / 0.240)
    assert dp.phases_ms == pytest.approx({"forward": 60.0, "backward": 120.0})
    assert auto.step_ms == pytest.approx(130.0) and auto.chose_runs == ["dp"] * 3 and auto.chose == "dp"
    assert dp.bytes_per_step == 8.0 and dp.world == 4


def _plan(dp: float, hybrid: float, mp: float) -> dict:
    return {
        "strategies": [
            {"strategy": "dp", "step_ms": dp, "mp_size": 1},
            {"strategy": "hybrid", "step_ms": hybrid, "mp_size": 4},
            {"strategy": "mp", "step_ms": mp, "mp_size": 4},
            {"strategy": "auto", "step_ms": hybrid, "mp_size": 4, "chose": "hybrid"},
        ]
    }


def _measured(dp_runs, hybrid_runs, mp_runs) -> list[dict]:
    rows = []
    for name, runs in (("dp", dp_runs), ("hybrid", hybrid_runs), ("mp", mp_runs)):
        ordered = sorted(runs)
        rows.append({"run": f"{name}-butterfly", "step_ms": ordered[len(ordered) // 2], "step_ms_runs": runs})
    return rows


def test_strategies_whose_repeats_overlap_are_tied():
    # predicted hybrid < dp < mp; measured dp (100) < hybrid (102) < mp, but dp's and hybrid's repeats overlap
    result = compare(_plan(100, 90, 200), _measured([95, 100, 105], [98, 102, 110], [190, 200, 210]), "butterfly")
    assert result["ranking_right"] and not result["ranking_exact"]
    assert result["ties"] == [["dp", "hybrid"]]
    assert result["repeats"] == {"dp": 3, "hybrid": 3, "mp": 3}
    assert result["auto_over_fastest"] == pytest.approx(102 / 100)


def test_an_order_the_repeats_separate_is_not_a_tie():
    result = compare(_plan(100, 90, 200), _measured([95, 100, 105], [106, 108, 110], [190, 200, 210]), "butterfly")
    assert not result["ranking_right"] and result["ties"] == []
    # one run each: no spread measured, so no ties
    single = [{"run": r["run"], "step_ms": r["step_ms"]} for r in _measured([100], [102], [200])]
    result = compare(_plan(100, 90, 200), single, "butterfly")
    assert not result["ranking_right"] and result["repeats"] == {"dp": 1, "hybrid": 1, "mp": 1}
