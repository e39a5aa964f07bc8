"""``hybrid-ext bench train``: runs every kind of run and counts each byte once."""

from __future__ import annotations

import pytest

from hybrid_ext.bench.train import _on_any_rank, build_model, run_train_bench, warm_up
from hybrid_ext.launch import spawn


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_native_and_butterfly_dp_send_the_same_bytes_counted_once():
    runs = [
        ("dp-native", "dp", "native"),
        ("dp-butterfly", "dp", "butterfly"),
        ("compute-only", "hybrid", "butterfly"),
        ("ddp", "ddp", "native"),
    ]
    rows = {row.run: row for row in run_train_bench("digits_alexnet", 2, runs, micro_batch=4, size=32, steps=1)}
    params = sum(p.numel() * p.element_size() for p in build_model("digits_alexnet").parameters())
    # Two ranks: every algorithm sends the whole gradient once per step (ring: 2(p-1)/p·n = n); torch's DDP too.
    assert rows["dp-native"].bytes_per_step == pytest.approx(params, rel=1e-6)
    assert rows["dp-butterfly"].bytes_per_step == pytest.approx(params, rel=1e-6)
    assert rows["ddp"].bytes_per_step == pytest.approx(params, rel=1e-6)
    assert rows["ddp"].mp_size == 1 and rows["ddp"].messages_per_step >= 2
    assert all(row.samples_per_sec > 0 for row in rows.values())
    # where the step went: every phase timed; the butterfly's allreduces recorded with their time, DDP's not
    phases = rows["dp-butterfly"].phases_ms
    assert set(phases) == {"forward", "backward", "optimizer", "collectives"} and min(phases.values()) > 0
    assert max(phases["forward"], phases["backward"], phases["optimizer"]) < rows["dp-butterfly"].step_ms
    assert set(rows["ddp"].phases_ms) == {"forward", "backward", "optimizer"}  # DDP's allreduces are not timed


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_a_run_at_its_own_mp_size_trains_on_groups_of_that_size():
    from hybrid_ext.bench.train import parse_runs

    runs = parse_runs("hybrid-butterfly,hybrid-butterfly@2", 4)
    whole, halves = run_train_bench("digits_alexnet", 4, runs, micro_batch=4, size=32, steps=1)
    assert (whole.mp_size, halves.mp_size) == (4, 2)
    # Groups of 2 gather half the activations of groups of 4, and all-reduce the FC shards' gradients between the
    # two groups, which groups of 4 have none of: they send different bytes.
    assert halves.bytes_per_step != whole.bytes_per_step and halves.samples_per_sec > 0


def _warm_up_with_trials_until(rank, world, last_trial_step):
    import torch
    import torch.distributed as dist

    steps, calls = [], [0]

    def one_step():  # a collective per step: ranks that stop at different steps would wait for each other
        dist.all_reduce(torch.ones(1))
        if len(steps) <= last_trial_step[rank]:
            calls[0] += 1  # this rank's groups tried a schedule in this step
        steps.append(len(steps))

    return warm_up(one_step, 2, lambda: calls[0], _on_any_rank)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_warm_up_ends_at_the_same_step_on_every_rank_whatever_each_rank_tried():
    # rank 0's groups stop trying after step 1, rank 1's after step 3: both warm up 5 steps (steps 0-3 tried somewhere)
    assert spawn(_warm_up_with_trials_until, 2, [1, 3], timeout=60) == [5, 5]
    # no trials anywhere: the minimum
    assert spawn(_warm_up_with_trials_until, 2, [-1, -1], timeout=60) == [2, 2]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_an_auto_run_trains_what_parallelize_chose_and_names_it():
    from hybrid_ext.bench.train import parse_runs

    (row,) = run_train_bench("digits_alexnet", 2, parse_runs("auto-butterfly", 2), micro_batch=4, size=32, steps=1)
    assert row.chose and row.samples_per_sec > 0 and row.chose_runs == [row.chose]
    # the row's mp_size is the one the ranks' plan names (dp: 1)
    assert row.mp_size == 1 if row.chose == "dp" else f"mp_size={row.mp_size}," in row.chose
