"""strategy="auto": the plan with the least predicted step, the same on every rank.

In one process: auto shards AlexNet's and VGG's classifiers and keeps a model whose Linear layers are small next
to their activations data-parallel; bad input named. On 2 spawned ranks: one auto step equals the single-process
step, and ranks that profiled different times still agree on one plan (or, without the agreement, fail clearly).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import hybrid_ext
from hybrid_ext.parallel import full_grads, make_plan
from hybrid_ext.parallel.auto_plan import AutoPlan, choose_plan, convolution_candidates
from hybrid_ext.parallel.layer_profile import layer_shapes, profile_layers

from helpers.parallel_reference import (
    MICRO_BATCH,
    MODELS,
    alexnet,
    global_batch,
    reference,
    small_cnn,
    token_mlp,
    vgg11,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ranks run
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("build", "shape", "head"), [(alexnet, (3, 64, 64), ["1", "4", "6"]), (vgg11, (3, 32, 32), ["0", "3", "6"])]
)
def test_auto_shards_alexnet_and_vgg_classifiers(build, shape, head):
    plan = make_plan(build(), "auto", example_input=torch.randn(8, *shape), world=4)
    assert isinstance(plan, AutoPlan)
    assert plan.strategy == "hybrid" and plan.mp_size > 1
    assert [plan.styles[f"classifier.{i}"] for i in head] == ["column", "row", "column_last"]
    # the convolutions: the first, on the largest map, data-parallel; a later one split by channels only where
    # its weights outweigh the activations it would exchange
    features = {path: style for path, style in plan.styles.items() if path.startswith("features")}
    assert features["features.0"] == "dp" and set(features.values()) <= {"dp", "channel"}
    split = {path for path, style in features.items() if style == "channel"}
    assert split <= set(convolution_candidates(build(), layer_shapes(build(), torch.randn(8, *shape)), 8, plan.mp_size))
    assert tuple(sorted(split)) == plan.alternatives[0].convolutions
    text = str(plan)
    assert "predicted step" in text and "<- chosen" in text and "comm ms" in text
    assert any(c.strategy == "dp" for c in plan.alternatives)  # the alternatives are shown beside it
    assert plan.alternatives[0].step_s == min(c.step_s for c in plan.alternatives)


@pytest.mark.timeout(60)
def test_auto_keeps_small_linear_layers_data_parallel():
    plan = make_plan(token_mlp(), "auto", example_input=torch.randn(8, 6, 8), world=4)
    assert plan.strategy == "dp" and plan.mp_size == 1
    assert set(plan.styles.values()) == {"dp"}
    assert len(plan.alternatives) > 1


@pytest.mark.timeout(60)
def test_auto_bad_input_is_named():
    with pytest.raises(ValueError, match="needs example_input"):
        make_plan(small_cnn(), "auto", world=2)
    with pytest.raises(ValueError, match="needs world"):
        make_plan(small_cnn(), "auto", example_input=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="rules are not supported"):
        make_plan(small_cnn(), "auto", rules={"7": "dp"}, example_input=torch.randn(2, 3, 16, 16), world=2)
    with pytest.raises(ValueError, match="needs example_input"):  # before any collective
        hybrid_ext.parallelize(small_cnn(), strategy="auto")
    model = small_cnn()
    table = profile_layers(model, torch.randn(2, 3, 16, 16), steps=1)
    with pytest.raises(ValueError, match="mp_size=3 does not divide the world size 4"):
        choose_plan(model, table, 4, mp_sizes=[3])
    with pytest.raises(ValueError, match="world must be a positive integer"):
        choose_plan(model, table, 0)


def _skewed(rank: int, factor: float):
    """profile_layers with every layer ``factor`` times slower on rank 1 than measured (rank 0: as measured)."""
    from hybrid_ext.parallel import layer_profile

    def profile(model, example_input, steps=3):
        table = layer_profile.profile_layers(model, example_input, steps)
        scale = factor if rank else 1.0
        for path, record in table.layers.items():
            table.layers[path] = replace(
                record, forward_s=record.forward_s * scale, backward_s=record.backward_s * scale
            )
        table.copy_s_per_byte, table.bucket_s_per_byte = scale * 1e-9, scale * 2e-9  # the rates too
        table.scale_s_per_byte = scale * 3e-9
        return table

    return profile


def _auto_rank(rank: int, world: int, model_name: str, skew: float | None, diverge: bool) -> dict:
    from hybrid_ext.parallel import auto_plan

    if skew:
        auto_plan.profile_layers = _skewed(rank, skew)
    agreed = []
    agree = auto_plan.agree_on_times
    auto_plan.agree_on_times = lambda table, comm: agreed.append((table, agree(table, comm))) or agreed[-1][1]
    if diverge and rank == 1:  # as if this rank had decided from other figures
        choose = auto_plan.choose_plan
        auto_plan.choose_plan = lambda *args, **kw: replace(choose(*args, **kw), mp_size=7)
    build, shape, classes = MODELS[model_name]
    x, y = global_batch(world, shape, classes)
    x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    try:
        model = hybrid_ext.parallelize(build(), strategy="auto", example_input=x)
    except RuntimeError as exc:
        return {"error": str(exc)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = full_grads(model)
    optimizer.step()
    total = loss.detach().clone()
    hybrid_ext.allreduce(total, op="avg", group=model.groups.world)
    own, common = agreed[0]
    return {
        "loss": total.item(),
        "grads": grads,
        "state": hybrid_ext.full_state_dict(model),
        "fingerprint": model.plan.fingerprint(),
        "strategy": model.plan.strategy,
        "mp_size": model.plan.mp_size,
        "own_times": [(r.forward_s, r.backward_s) for r in own.layers.values()],
        "agreed_times": [(r.forward_s, r.backward_s) for r in common.layers.values()],
        "agreed_rates": (common.copy_s_per_byte, common.bucket_s_per_byte, common.scale_s_per_byte),
        "text": str(model.plan),
    }


def _check_against_reference(results, world, model_name="small_cnn"):
    loss, grads, state = reference(model_name, world)
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(loss, rel=1e-5), f"rank {rank}"
        for name, expected in grads.items():
            torch.testing.assert_close(result["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=f"grad {name}")
        for name, expected in state.items():
            torch.testing.assert_close(result["state"][name], expected, rtol=1e-5, atol=1e-6, msg=f"weight {name}")


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("model_name", "chosen"), [("small_cnn", ("dp", 1)), ("alexnet", ("hybrid", 2))])
def test_auto_step_equals_single_process(spawn_ranks, model_name, chosen):
    results = spawn_ranks(_auto_rank, 2, model_name, None, False, timeout=240)
    assert {(r["strategy"], r["mp_size"]) for r in results} == {chosen}
    assert len({r["fingerprint"] for r in results}) == 1
    assert "predicted step" in results[0]["text"]
    _check_against_reference(results, 2, model_name)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ranks_with_different_times_agree_on_one_plan(spawn_ranks):
    # Rank 1 profiles every layer 50x slower: both decide from the median of each layer's times (of two: the mean).
    results = spawn_ranks(_auto_rank, 2, "small_cnn", 50.0, False, timeout=180)
    assert results[0]["own_times"] != results[1]["own_times"]
    expected = [
        pytest.approx(tuple((x + y) / 2 for x, y in zip(a, b)))
        for a, b in zip(results[0]["own_times"], results[1]["own_times"])
    ]
    for result in results:
        assert result["agreed_times"] == expected
        assert result["agreed_rates"] == pytest.approx((25.5e-9, 51e-9, 76.5e-9))  # between rank 0's and rank 1's
    assert len({r["fingerprint"] for r in results}) == 1
    _check_against_reference(results, 2)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ranks_that_choose_different_plans_fail_clearly(spawn_ranks):
    # Rank 1 decides otherwise (its plan says mp_size 7): every rank stops before anything is sharded, named.
    for result in spawn_ranks(_auto_rank, 2, "small_cnn", None, True, timeout=180):
        assert "chose different plans on different ranks" in result["error"]
