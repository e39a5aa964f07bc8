"""The partitioner: one training step under dp / mp / hybrid equals the single-process step on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybrid_ext
from hybrid_ext.parallel import make_plan

from helpers.parallel_reference import MICRO_BATCH, MODELS, alexnet, reference, small_cnn, step_rank, token_mlp

CASES = [
    ("dp", 2, None),
    ("hybrid", 2, None),
    ("mp", 2, None),
    ("hybrid", 3, None),
    ("mp", 3, None),
    ("dp", 4, None),
    ("hybrid", 4, None),
    ("hybrid", 4, 2),
    ("mp", 4, 2),
]


@pytest.mark.parametrize(("strategy", "world"), [("hybrid", 2), ("hybrid", 3), ("mp", 2)])
def test_sharded_linear_on_3d_activations_equals_the_reference(spawn_ranks, strategy, world):
    _check_step(spawn_ranks, "token_mlp", strategy, world, None)


def test_params_per_flop_keeps_a_per_position_linear_data_parallel():
    example = torch.randn(2, 6, 8)
    assert make_plan(token_mlp(), "hybrid").styles == {"0": "column_last", "3": "column_last"}
    measured = make_plan(token_mlp(), "hybrid", example_input=example)
    assert measured.styles == {"0": "dp", "3": "column_last"}  # used at 6 positions: 1/6 < 0.25
    cnn = make_plan(small_cnn(), "hybrid", example_input=torch.randn(2, 3, 16, 16))
    assert cnn.styles["7"] == "column" and cnn.styles["0"] == "dp"


TORCHVISION_CASES = [
    ("alexnet", "hybrid", 2, None),
    ("alexnet", "hybrid", 3, None),
    ("alexnet", "hybrid", 4, 2),
    ("alexnet", "dp", 2, None),
    ("alexnet", "mp", 2, None),
    ("vgg11", "hybrid", 2, None),
]


@pytest.mark.parametrize(("strategy", "world", "mp_size"), CASES)
def test_one_step_equals_the_single_process_reference(spawn_ranks, strategy, world, mp_size):
    _check_step(spawn_ranks, "small_cnn", strategy, world, mp_size)


@pytest.mark.parametrize(("model_name", "strategy", "world", "mp_size"), TORCHVISION_CASES)
def test_torchvision_cnns_step_equals_the_reference(spawn_ranks, model_name, strategy, world, mp_size):
    _check_step(spawn_ranks, model_name, strategy, world, mp_size)


# Hybrid with convolutions split by output channels as well (a rule's "mp"; strategy="auto" may choose them).
CHANNEL_CASES = [
    ("small_cnn", 2, None, {"3": "mp"}),
    ("small_cnn", 3, None, {"0": "mp", "3": "mp"}),  # 8 and 12 channels over 3: uneven shards
    ("small_cnn", 4, 2, {"3": "mp", "7": "dp", "10": "dp", "12": "dp"}),  # a conv sharded, the FC head replicated
    ("alexnet", 4, 2, {"features.6": "mp", "features.10": "mp"}),
]


@pytest.mark.parametrize(("model_name", "world", "mp_size", "rules"), CHANNEL_CASES)
def test_hybrid_with_channel_split_convolutions_equals_the_reference(spawn_ranks, model_name, world, mp_size, rules):
    plan = make_plan(MODELS[model_name][0](), "hybrid", rules)
    assert {p for p, style in plan.styles.items() if style == "channel"} == {p for p, r in rules.items() if r == "mp"}
    _check_step(spawn_ranks, model_name, "hybrid", world, mp_size, rules)


@pytest.mark.parametrize(("strategy", "world", "mp_size"), [("dp", 2, None), ("hybrid", 2, None), ("hybrid", 4, 2)])
def test_torch_distributeds_own_allreduce_as_the_reducer_equals_the_reference(spawn_ranks, strategy, world, mp_size):
    # reducer="native": gloo's allreduce reduces each bucket in place (and, at 4@2, the FC shards over their replicas)
    _check_step(spawn_ranks, "small_cnn", strategy, world, mp_size, reducer="native")


def _check_step(spawn_ranks, model_name, strategy, world, mp_size, rules=None, reducer="butterfly"):
    loss, grads, state = reference(model_name, world)
    results = spawn_ranks(step_rank, world, model_name, strategy, mp_size, reducer, None, rules, timeout=300)
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(loss, rel=1e-5), f"rank {rank}"
        for name, expected in grads.items():
            torch.testing.assert_close(result["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=f"grad {name}")
        assert set(result["state"]) == set(state)
        for name, expected in state.items():
            torch.testing.assert_close(result["state"][name], expected, rtol=1e-5, atol=1e-6, msg=f"weight {name}")


def test_plan_is_printable_and_alternates_column_row():
    plan = make_plan(small_cnn(), "hybrid")
    assert plan.styles == {
        "0": "dp",
        "3": "dp",
        "7": "column",
        "10": "row",
        "12": "column_last",
    }
    text = str(plan)
    assert "column_last" in text and "sharded:" in text
    assert make_plan(small_cnn(), "mp").styles["0"] == "channel"
    assert set(make_plan(small_cnn(), "dp").styles.values()) == {"dp"}
    assert make_plan(small_cnn(), "hybrid", rules={"12": "dp"}).styles["10"] == "row"


def test_bad_rules_and_mp_sizes_are_explained():
    with pytest.raises(ValueError, match=r"only nn\.Linear layers can be split"):
        make_plan(small_cnn(), "hybrid", rules={"0": "column"})
    with pytest.raises(ValueError, match="matches no module"):
        make_plan(small_cnn(), "hybrid", rules={"classifier.*": "dp"})
    with pytest.raises(ValueError, match="unknown strategy"):
        make_plan(small_cnn(), "tensor")
    with pytest.raises(ValueError, match="mp_size=3 does not divide the world size 4"):
        hybrid_ext.parallel.ParallelDims(4, 3)


# ------------------------------------------------------------------ checkpoints


def _train(model, optimizer, world, rank, steps, strategy, start_step=0):
    for step in range(start_step, start_step + steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(world * MICRO_BATCH, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (world * MICRO_BATCH,), generator=g)
        if strategy != "mp":
            x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _checkpoint_rank(rank: int, world: int, first: str, second: str) -> dict:
    # Uninterrupted: 3 steps under `first`.
    straight = hybrid_ext.parallelize(small_cnn(), strategy=first)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-3)
    _train(straight, opt, world, rank, 3, first)
    expected = hybrid_ext.full_state_dict(straight)
    # Interrupted: 1 step under `first`, checkpoint, restore into a fresh model under `second`, 2 more steps.
    model = hybrid_ext.parallelize(small_cnn(), strategy=first)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, world, rank, 1, first)
    weights, optim_state = hybrid_ext.full_state_dict(model), hybrid_ext.full_optimizer_state_dict(model, opt)
    torch.manual_seed(99)  # the fresh model starts elsewhere: everything must come from the checkpoint
    fresh = nn.Sequential(*[m for m in small_cnn()])
    for p in fresh.parameters():
        nn.init.normal_(p)
    resumed = hybrid_ext.parallelize(fresh, strategy=second)
    hybrid_ext.load_full_state_dict(resumed, weights)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    hybrid_ext.load_full_optimizer_state_dict(resumed, opt2, optim_state)
    _train(resumed, opt2, world, rank, 2, second, start_step=1)
    plain = small_cnn()
    plain.load_state_dict(weights, strict=True)  # loads into the unwrapped model as is
    return {"expected": expected, "resumed": hybrid_ext.full_state_dict(resumed), "optim_keys": sorted(optim_state)}


def test_checkpoint_resume_continues_bit_identically(spawn_ranks):
    for result in spawn_ranks(_checkpoint_rank, 2, "hybrid", "hybrid", timeout=180):
        assert result["optim_keys"] == ["param_groups", "state"]
        for name, expected in result["expected"].items():
            assert torch.equal(result["resumed"][name], expected), name


def test_dp_checkpoint_resumes_under_hybrid(spawn_ranks):
    # Different reduction orders: equal to float32 rounding, not bit for bit.
    for result in spawn_ranks(_checkpoint_rank, 2, "dp", "hybrid", timeout=180):
        for name, expected in result["expected"].items():
            torch.testing.assert_close(result["resumed"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def _memory_rank(rank: int, world: int, mp_size: int) -> dict:
    model = hybrid_ext.parallelize(alexnet(), strategy="hybrid", mp_size=mp_size)
    fc = [
        m
        for m in model.module.modules()
        if isinstance(
            m,
            nn.Linear | hybrid_ext.parallel.layers.ColumnParallelLinear | hybrid_ext.parallel.layers.RowParallelLinear,
        )
    ]
    return {"fc_bytes": sum(p.numel() * p.element_size() for m in fc for p in m.parameters())}


@pytest.mark.parametrize(("world", "mp_size"), [(2, 2), (4, 2)])
def test_fc_parameter_memory_is_one_mp_th(spawn_ranks, world, mp_size):
    full = alexnet().classifier
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    row_biases = 4096 * 4  # the row-parallel bias stays whole on every rank
    for result in spawn_ranks(_memory_rank, world, mp_size, timeout=180):
        # One row of imbalance at most per layer, plus the replicated row-parallel bias.
        assert abs(result["fc_bytes"] - full_bytes / mp_size) <= row_biases + 3 * 9216 * 4


def _overlap_rank(rank: int, world: int) -> dict:
    model = hybrid_ext.parallelize(small_cnn(), strategy="dp", bucket_mb=0.001)
    x = torch.randn(MICRO_BATCH, 3, 16, 16)
    F.cross_entropy(model(x), torch.zeros(MICRO_BATCH, dtype=torch.long)).backward()
    grads_equal_after_backward = [p.grad.clone() for p in model.parameters()]
    return {
        "buckets": len(model.reducer.buckets),
        "early": model.reducer.launched_during_backward,
        "grads": grads_equal_after_backward,
    }


def test_gradient_buckets_are_reduced_during_backward(spawn_ranks):
    results = spawn_ranks(_overlap_rank, 2)
    for result in results:
        assert result["buckets"] >= 5
        assert result["early"] == result["buckets"]  # every bucket started before backward returned
        for mine, first in zip(result["grads"], results[0]["grads"]):
            assert torch.equal(mine, first)  # and all of them finished by then, identical on every rank


def test_mirror_transport_keeps_shapes_and_moves_nothing():
    from hybrid_ext.bench.mirror_transport import MirrorTransport

    t = MirrorTransport(1, 4)
    recv = torch.full((3,), 7.0)
    t.exchange(torch.ones(3), 2, recv, 0)
    assert recv.tolist() == [1.0, 1.0, 1.0]
    t.exchange(torch.ones(2), 2, recv, 0)
    assert recv.tolist() == [0.0, 0.0, 0.0]


def _split_device_rank(rank: int, world: int) -> str:
    model = small_cnn()
    model[0].to("meta")  # one layer elsewhere
    try:
        hybrid_ext.parallelize(model)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_model_on_several_devices_is_refused(spawn_ranks):
    for message in spawn_ranks(_split_device_rank, 2):
        assert "on several devices" in message and "meta" in message


def _exchange_while_world_busy(rank: int, world: int) -> tuple[float, bool]:
    import time

    from hybrid_ext.parallel.dims import ParallelDims, torch_groups

    groups = torch_groups(ParallelDims(world, world))  # mp_size = world: the group has every rank
    in_flight = groups.world.submit(lambda: time.sleep(2.0))  # a gradient bucket on the wire
    start = time.perf_counter()
    groups.mp.row_counts(rank + 1, device="cpu", name="batch counts")  # a split layer's exchange in backward
    waited = time.perf_counter() - start
    in_flight.wait()
    return waited, groups.mp is groups.world


def test_a_layers_exchange_does_not_wait_behind_a_gradient_bucket_when_mp_spans_the_world(spawn_ranks):
    # The model-parallel group of every rank has its own communicator (its own issue order), even with every rank
    # in it: backward's blocking exchanges of a split convolution must not queue behind the world's buckets.
    for waited, same in spawn_ranks(_exchange_while_world_busy, 2, timeout=60):
        assert not same and waited < 1.0, waited


def _own_mp_group(rank: int, world: int) -> dict[str, bool]:
    out = {}
    for strategy in ("dp", "hybrid"):
        model = hybrid_ext.parallelize(small_cnn(), strategy=strategy)  # mp_size: every rank
        out[strategy] = model.groups.mp is not model.groups.world
    return out


def test_only_a_plan_that_splits_layers_builds_a_model_parallel_group_of_its_own(spawn_ranks):
    for result in spawn_ranks(_own_mp_group, 2, timeout=60):
        assert result == {"dp": False, "hybrid": True}


def _bucketed_shards(rank: int, world: int, mp_size: int) -> int:
    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid", mp_size=mp_size)
    return sum(hasattr(p, "shard_dim") for bucket in model.reducer.buckets for p in bucket.params)


@pytest.mark.parametrize(("world", "mp_size", "bucketed"), [(2, 2, 0), (4, 2, 5)])
def test_fc_shards_no_other_rank_holds_take_no_bucket(spawn_ranks, world, mp_size, bucketed):
    # At mp_size = world each shard is only scaled (one pass over its gradient); where another rank replicates it,
    # it is summed over them through a bucket (small_cnn's three FC layers: five shards, the row layer's bias whole).
    assert spawn_ranks(_bucketed_shards, world, mp_size, timeout=60) == [bucketed] * world
