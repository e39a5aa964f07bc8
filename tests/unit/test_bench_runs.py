"""``bench train --runs``: a run's own model-parallel group size (``hybrid-butterfly@2``), recorded in its row, and
``plan --compare`` measuring auto's choice by the row at auto's mp_size."""

from __future__ import annotations

import argparse

import pytest

from hybrid_ext.bench import train
from hybrid_ext.plan_command import compare, comparison_text

pytestmark = pytest.mark.timeout(60)


def test_runs_parse_with_and_without_their_own_mp_size():
    runs = train.parse_runs("dp-native, hybrid-butterfly@2,mp-butterfly@4,hybrid,compute-only,compute-only@2,ddp", 4)
    assert runs == [
        ("dp-native", "dp", "native", None),
        ("hybrid-butterfly@2", "hybrid", "butterfly", 2),
        ("mp-butterfly@4", "mp", "butterfly", 4),
        ("hybrid", "hybrid", "butterfly", None),
        ("compute-only", "hybrid", "butterfly", None),
        ("compute-only@2", "hybrid", "butterfly", 2),  # hybrid's work at mp_size 2, its messages skipped
        ("ddp", "ddp", "native", None),  # torch's DistributedDataParallel, the peer
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dp-butterfly@2", "'dp-butterfly@2': dp has no model-parallel groups"),
        ("ddp@2", "'ddp@2': ddp has no model-parallel groups"),
        ("hybrid-butterfly@3", "'hybrid-butterfly@3': the mp_size after @ must divide the 4 ranks"),
        ("hybrid-butterfly@0", "must divide the 4 ranks"),
        ("hybrid-butterfly@two", "must divide the 4 ranks"),
        ("fsdp-butterfly", "unknown strategy in 'fsdp-butterfly'; expected dp, hybrid, mp or auto"),
        ("dp-foo", "unknown reducer in 'dp-foo'; expected one of butterfly, auto"),
    ],
)
def test_a_run_that_cannot_run_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        train.parse_runs(text, 4)


def test_the_command_refuses_a_bad_run_before_starting_ranks(capsys, monkeypatch):
    monkeypatch.setattr(train, "spawn", lambda *a, **k: pytest.fail("no rank may start"))
    args = argparse.Namespace(runs="dp-butterfly,hybrid-butterfly@3", np=4, hosts=None)
    assert train.main(args) == 2
    assert "--runs: 'hybrid-butterfly@3': the mp_size after @ must divide the 4 ranks" in capsys.readouterr().err


def test_each_run_trains_at_its_own_mp_size_and_its_row_says_which(monkeypatch):
    calls = []

    mirrors = []

    def fake_spawn(fn, world, model, strategy, grad_algorithm, mp_size, steps, warmup, batch, size, mirror, *args,
                   **kwargs):  # fmt: skip
        calls.append((strategy, mp_size))
        mirrors.append(mirror)
        return [{"times": [0.1], "bytes": [8.0], "messages": [2.0]}] * world

    monkeypatch.setattr(train, "spawn", fake_spawn)
    runs = train.parse_runs("dp-butterfly,hybrid-butterfly,hybrid-butterfly@2,mp-butterfly", 4)
    rows = train.run_train_bench("digits_alexnet", 4, runs, micro_batch=4, size=16, steps=1)
    assert calls == [("dp", None), ("hybrid", None), ("hybrid", 2), ("mp", None)]
    assert [(r.run, r.mp_size) for r in rows] == [
        ("dp-butterfly", 1),
        ("hybrid-butterfly", 4),
        ("hybrid-butterfly@2", 2),
        ("mp-butterfly", 4),
    ]
    # --mp-size is every run's default; a run's own @ wins
    calls.clear()
    rows = train.run_train_bench("digits_alexnet", 4, runs, micro_batch=4, size=16, steps=1, mp_size=4)
    assert calls == [("dp", 4), ("hybrid", 4), ("hybrid", 2), ("mp", 4)]
    assert [r.mp_size for r in rows] == [1, 4, 2, 4]
    # compute-only at its own mp_size: hybrid's work on groups of 2, every message skipped
    calls.clear()
    mirrors.clear()
    (row,) = train.run_train_bench("digits_alexnet", 4, train.parse_runs("compute-only@2", 4), 4, 16, 1)
    assert calls == [("hybrid", 2)] and mirrors == [True] and row.mp_size == 2


def test_an_auto_run_trains_auto_and_its_row_says_what_auto_chose(monkeypatch):
    assert train.parse_runs("auto-butterfly,auto@2", 4) == [
        ("auto-butterfly", "auto", "butterfly", None),
        ("auto@2", "auto", "butterfly", 2),
    ]
    chose = "hybrid mp_size=2, sharded chains at classifier.1; convolutions split by channels at features.10"

    def fake_spawn(fn, world, model, strategy, grad_algorithm, mp_size, *args, **kwargs):
        assert strategy == "auto"
        return [{"times": [0.1], "bytes": [8.0], "messages": [2.0], "mp_size": 2, "chose": chose}] * world

    monkeypatch.setattr(train, "spawn", fake_spawn)
    (row,) = train.run_train_bench("alexnet", 4, train.parse_runs("auto-butterfly", 4), 4, 16, 1)
    assert (row.run, row.mp_size, row.chose) == ("auto-butterfly", 2, chose)
    assert f"auto-butterfly chose: {chose}" in train.format_markdown([row])
    assert row.chose_runs == [chose] and "chose differently" not in train.format_markdown([row])
    row.chose_runs = [chose, "dp"]  # each repeat decides anew: a different choice is shown
    assert f"auto-butterfly's repeats chose differently: {chose} | dp" in train.format_markdown([row])
    # auto chose dp: its row is at mp_size 1, whatever groups parallelize built
    monkeypatch.setattr(train, "spawn", lambda *a, **k: [{"times": [0.1], "bytes": [8.0], "messages": [2.0],
                                                         "mp_size": 4, "chose": "dp"}] * 4)  # fmt: skip
    (row,) = train.run_train_bench("alexnet", 4, train.parse_runs("auto-butterfly", 4), 4, 16, 1)
    assert row.mp_size == 1


def _plan(auto_mp_size: int) -> dict:
    return {
        "strategies": [
            {"strategy": "dp", "step_ms": 400.0, "mp_size": 1},
            {"strategy": "hybrid", "step_ms": 285.0, "mp_size": 4},
            {"strategy": "mp", "step_ms": 1000.0, "mp_size": 4},
            {"strategy": "auto", "step_ms": 265.0, "mp_size": auto_mp_size, "chose": "hybrid"},
        ]
    }


def _rows(hybrid_at_2: float | None) -> list[dict]:
    rows = [
        {"run": "dp-butterfly", "step_ms": 360.0, "mp_size": 1},
        {"run": "hybrid-butterfly", "step_ms": 250.0, "mp_size": 4},
        {"run": "mp-butterfly", "step_ms": 1100.0, "mp_size": 4},
    ]
    if hybrid_at_2 is not None:
        rows.append({"run": "hybrid-butterfly@2", "step_ms": hybrid_at_2, "mp_size": 2})
    return rows


def test_auto_at_another_mp_size_is_measured_by_that_run_and_only_that_run():
    # auto chose hybrid at mp_size 2; no run at 2: not measured (the mp_size 4 run is another plan)
    result = compare(_plan(2), _rows(None), "butterfly")
    assert result["auto_over_fastest"] is None and result["auto_measured_ms"] is None
    # the run at 2 measures it; it is not a row of the strategies' errors or ranking
    result = compare(_plan(2), _rows(255.0), "butterfly")
    assert result["auto_measured_ms"] == 255.0 and result["auto_over_fastest"] == pytest.approx(255 / 250)
    assert [r["strategy"] for r in result["rows"]] == ["dp", "hybrid", "mp"]
    assert {r["strategy"]: r["measured_ms"] for r in result["rows"]}["hybrid"] == 250.0
    # the fastest is over every run, other mp_sizes included
    result = compare(_plan(4), _rows(200.0), "butterfly")
    assert result["auto_measured_ms"] == 250.0 and result["auto_over_fastest"] == pytest.approx(250 / 200)


def test_a_ddp_row_is_measured_beside_the_strategies_not_as_one():
    # torch's DDP is the peer in the table, not a strategy the plan predicts, nor a run auto could have chosen
    rows = [*_rows(None), {"run": "ddp", "step_ms": 100.0, "mp_size": 1}]
    result = compare(_plan(4), rows, "butterfly")
    assert [r["strategy"] for r in result["rows"]] == ["dp", "hybrid", "mp"]
    assert result["auto_over_fastest"] == pytest.approx(1.0)


def test_rows_without_mp_size_are_at_the_plans():
    rows = [{k: v for k, v in row.items() if k != "mp_size"} for row in _rows(None)]
    result = compare(_plan(4), rows, "butterfly")
    assert result["auto_measured_ms"] == 250.0 and result["auto_over_fastest"] == pytest.approx(1.0)
    assert len(result["rows"]) == 3


def test_auto_whose_repeats_overlap_the_fastests_is_tied_with_it():
    rows = [*_rows(None), {"run": "hybrid-butterfly@2", "step_ms": 283.0, "mp_size": 2, "step_ms_runs": [232, 334]}]
    rows[1]["step_ms_runs"] = [248, 258]
    result = compare(_plan(2), rows, "butterfly")
    assert result["auto_over_fastest"] == pytest.approx(283 / 250) and result["auto_tied_with_fastest"]
    rows[-1]["step_ms_runs"] = [280, 286]  # apart: not tied
    assert not compare(_plan(2), rows, "butterfly")["auto_tied_with_fastest"]
    del rows[-1]["step_ms_runs"]  # one run: no spread measured, no tie
    assert not compare(_plan(2), rows, "butterfly")["auto_tied_with_fastest"]
    # auto's row the fastest itself: 1.0, and tied with nothing
    rows[-1].update(step_ms=240.0, step_ms_runs=[238, 242])
    result = compare(_plan(2), rows, "butterfly")
    assert result["auto_over_fastest"] == 1.0 and not result["auto_tied_with_fastest"]


def test_auto_that_split_only_some_layers_is_measured_by_its_own_run_only():
    plan = _plan(4)
    plan["strategies"][-1].update(same_as_strategy=False, plan="hybrid mp_size=4, ...; convolutions split at f.10")
    # hybrid-butterfly trains every Linear split and no convolution: not auto's plan, so auto is not measured
    result = compare(plan, _rows(None), "butterfly")
    assert result["auto_measured_ms"] is None and result["auto_chose"].endswith("convolutions split at f.10")
    # bench train's auto run measures it, and may be the fastest of all
    auto_row = {"run": "auto-butterfly", "step_ms": 240.0, "mp_size": 4, "chose": "what ranks chose"}
    rows = [*_rows(None), auto_row]
    result = compare(plan, rows, "butterfly")
    assert result["auto_measured_ms"] == 240.0 and result["auto_over_fastest"] == 1.0
    assert result["auto_run_chose"] == "what ranks chose" and not result["auto_run_choices_differ"]
    assert result["auto_error"] is None  # the ranks trained another plan than this one predicts
    # the measurement is said of the plan that ran, not of the plan's own choice
    text = comparison_text(result)
    expected = "auto chose hybrid mp_size=4, ...; convolutions split at f.10; bench train's auto run chose what ranks "
    assert expected in text
    assert text.endswith("chose what ranks chose, measured 1.000× the fastest")
    auto_row["chose_runs"] = ["what ranks chose", "something else"]  # each repeat decides anew
    assert compare(plan, rows, "butterfly")["auto_run_choices_differ"]
    # the ranks trained auto's own plan in every repeat: its prediction is checked against their step
    predicted_plan = plan["strategies"][-1]["plan"]
    same = {**auto_row, "chose": predicted_plan, "chose_runs": [predicted_plan] * 2}
    result = compare(plan, [*_rows(None), same], "butterfly")
    auto_ms = plan["strategies"][-1]["step_ms"]
    assert result["auto_predicted_ms"] == auto_ms and result["auto_error"] == pytest.approx((auto_ms - 240) / 240)
    assert f"predicted {auto_ms:.1f} ms" in comparison_text(result)
    assert (
        compare(plan, [*_rows(None), {**same, "chose_runs": [predicted_plan, "other"]}], "butterfly")["auto_error"]
        is None
    )
    with pytest.raises(ValueError, match="more than one auto run"):
        compare(plan, [*rows, {**auto_row, "run": "auto-butterfly@2", "mp_size": 2}], "butterfly")
    assert [r["strategy"] for r in result["rows"]] == ["dp", "hybrid", "mp"]  # auto is not a strategy's row
    rows[-1]["step_ms"] = 260.0
    assert compare(plan, rows, "butterfly")["auto_over_fastest"] == pytest.approx(260 / 250)
    # where auto's plan is the strategy's own, the strategy's run still measures it
    plan["strategies"][-1]["same_as_strategy"] = True
    assert compare(plan, _rows(None), "butterfly")["auto_measured_ms"] == 250.0


def test_a_rows_phases_are_the_slowest_ranks_per_step_then_medians_over_steps_and_repeats(monkeypatch):
    def phases(*forward_ms):  # one rank's steps; the other phases follow from forward
        return [
            {"forward": f / 1e3, "backward": 2 * f / 1e3, "optimizer": 0.001, "collectives": 0.0} for f in forward_ms
        ]

    repeats = iter([
        [{"times": [0.1] * 3, "bytes": [8.0], "messages": [2.0], "phases": phases(10, 30, 20)},
         {"times": [0.1] * 3, "bytes": [8.0], "messages": [2.0], "phases": phases(40, 10, 10)}],  # slowest: 40 30 20
        [{"times": [0.1] * 3, "bytes": [8.0], "messages": [2.0], "phases": phases(50, 50, 60)},
         {"times": [0.1] * 3, "bytes": [8.0], "messages": [2.0], "phases": phases(10, 70, 10)}],  # slowest: 50 70 60
    ])  # fmt: skip
    monkeypatch.setattr(train, "spawn", lambda *a, **k: next(repeats))
    (row,) = train.run_train_bench("alexnet", 2, train.parse_runs("dp-butterfly", 2), 4, 16, 3, repeats=2)
    # medians over steps: 30 and 60; over the two repeats: 45
    assert row.phases_ms == pytest.approx({"forward": 45.0, "backward": 90.0, "optimizer": 1.0, "collectives": 0.0})
    assert "dp-butterfly: forward 45, backward 90, optimizer 1, collectives 0" in train.format_markdown([row])
    # a GPU run times no phases (its host runs ahead of the kernels): none shown
    monkeypatch.setattr(train, "spawn", lambda *a, **k: [{"times": [0.1], "bytes": [8.0], "messages": [2.0],
                                                         "phases": []}] * 2)  # fmt: skip
    (row,) = train.run_train_bench("alexnet", 2, train.parse_runs("dp-butterfly", 2), 4, 16, 1)
    assert row.phases_ms is None and "where the step went" not in train.format_markdown([row])
