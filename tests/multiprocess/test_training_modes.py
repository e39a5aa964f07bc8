"""The partitioner as people train: gradient accumulation and ``no_sync()``, bucket order when gradients arrive in
different orders, BatchNorm (buffers, ``nn.SyncBatchNorm``), and bad input explained before anything runs.

Each spawned check compares against the unmodified model trained in one process on the whole global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hybrid_ext
from hybrid_ext.parallel import full_grads, make_plan

from helpers.parallel_reference import MICRO_BATCH, accumulate_rank, accumulation_reference, small_cnn

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **TOL, msg=f"{what}: {name}")


# ------------------------------------------------------------------ gradient accumulation


def _accumulate_rank(rank: int, world: int, strategy: str, mp_size: int | None) -> dict:
    return {mode: accumulate_rank(rank, world, strategy, mp_size, mode) for mode in ("plain", "no_sync", "discard")}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("strategy", "world", "mp_size"), [("dp", 2, None), ("mp", 2, None), ("hybrid", 4, 2)])
def test_gradient_accumulation_equals_one_step_on_the_global_batch(spawn_ranks, strategy, world, mp_size):
    expected = accumulation_reference(world)
    for rank, by_mode in enumerate(spawn_ranks(_accumulate_rank, world, strategy, mp_size, timeout=240)):
        for mode, result in by_mode.items():
            _assert_close(result["grads"], expected["grads"], f"{strategy} {mode} rank {rank} grads")
            _assert_close(result["state"], expected["state"], f"{strategy} {mode} rank {rank} weights")
            if strategy != "mp":  # (mp's all-reduces are of activations: it reduces no gradients at all)
                assert result["no_sync_allreduces"] == 0, "no_sync() must not reduce gradients"


# ------------------------------------------------------------------ bucket order


class RankDependentNet(nn.Module):
    """Gradients arrive in a different order on each rank (``flip``), and ``extra`` is used on some ranks only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.extra = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, flip: bool, use_extra: bool) -> torch.Tensor:
        h = self.a(torch.relu(self.b(x))) if flip else self.b(torch.relu(self.a(x)))
        if use_extra:
            h = h + self.extra(torch.tanh(h))
        return self.head(torch.relu(h))


def _branch_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(world * MICRO_BATCH, 6, generator=g), torch.randint(0, 4, (world * MICRO_BATCH,), generator=g)


def _flags(rank: int) -> tuple[bool, bool]:
    return rank % 2 == 1, rank == 0  # (flip, use_extra)


def _branch_reference(world: int) -> dict:
    """The loss is the mean over ranks of each rank's loss, every rank's samples through its own branch."""
    model = RankDependentNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _branch_batch(world)
    losses = [
        F.cross_entropy(
            model(x[r * MICRO_BATCH : (r + 1) * MICRO_BATCH], *_flags(r)), y[r * MICRO_BATCH : (r + 1) * MICRO_BATCH]
        )
        for r in range(world)
    ]
    (sum(losses) / world).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _branch_rank(rank: int, world: int, strategy: str) -> dict:
    rules = {"a": "dp", "b": "dp", "extra": "dp"} if strategy == "hybrid" else None  # head: an FC shard
    # One bucket per parameter: every arrival order shows.
    model = hybrid_ext.parallelize(RankDependentNet(), strategy=strategy, rules=rules, bucket_mb=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _branch_batch(world)
    x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    F.cross_entropy(model(x, *_flags(rank)), y).backward()
    grads = full_grads(model)
    optimizer.step()
    return {"grads": grads, "state": hybrid_ext.full_state_dict(model), "buckets": len(model.reducer.buckets)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["dp", "hybrid"])
def test_buckets_are_reduced_in_one_order_whatever_order_gradients_arrive_in(spawn_ranks, strategy):
    expected = _branch_reference(2)
    for rank, result in enumerate(spawn_ranks(_branch_rank, 2, strategy, timeout=180)):
        assert result["buckets"] >= 6
        # `extra` gets no gradient on rank 1: it takes part as zeros, and rank 0's gradient is averaged with them.
        _assert_close(result["grads"], expected["grads"], f"{strategy} rank {rank} grads")
        _assert_close(result["state"], expected["state"], f"{strategy} rank {rank} weights")


# ------------------------------------------------------------------ BatchNorm


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def vgg11_bn() -> nn.Module:
    """torchvision's vgg11_bn with a small FC head of the same shape (Linear, ReLU, Dropout ×2, Linear)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=10)
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # 32×32 inputs end 1×1 anyway
    model.classifier = nn.Sequential(
        nn.Linear(512, 64), nn.ReLU(), nn.Dropout(0.0), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.0), nn.Linear(48, 10)
    )
    return model


BN_MODELS = {"resnet18": resnet18, "vgg11_bn": vgg11_bn}
BN_STEPS = 2
# Late convolutions split by output channels (hybrid's "mp" rule), each followed by its BatchNorm; ResNet's residual
# branch (downsample) too.
BN_SPLIT = {
    "resnet18": {"layer4.*.conv*": "mp", "layer4.0.downsample.0": "mp"},
    "vgg11_bn": {"features.22": "mp", "features.25": "mp"},
}
BN_VARIANTS = ((False, False), (True, False), (True, True))  # (SyncBatchNorm in float64, convolutions split)


def _bn_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(world * MICRO_BATCH, 3, 32, 32, generator=g),
            torch.randint(0, 10, (world * MICRO_BATCH,), generator=g),
        )
        for _ in range(BN_STEPS)
    ]


def _bn_reference(model_name: str, world: int) -> dict[str, torch.Tensor]:
    """Plain BatchNorm trained in one process on the global batches: what SyncBatchNorm on W ranks must give.

    In float64: BatchNorm over 8 samples of 1×1 maps is ill-conditioned enough that two float32 runs of the
    same math part by up to 4e-2 (measured: this reference in float32 against float64) — float64 checks the
    math to 1e-5."""
    model = BN_MODELS[model_name]().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in _bn_batches(world):
        optimizer.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_rank(rank: int, world: int) -> dict:
    out = {}
    for model_name, build in BN_MODELS.items():
        for sync, split in BN_VARIANTS:
            model = build()
            if sync:  # in float64, as the reference
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model).double()
            model = hybrid_ext.parallelize(model, strategy="hybrid", rules=BN_SPLIT[model_name] if split else None)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            for x, y in _bn_batches(world):
                x, y = (
                    x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH],
                    y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH],
                )
                optimizer.zero_grad()
                F.cross_entropy(model(x.double() if sync else x), y).backward()
                optimizer.step()
            out[(model_name, sync, split)] = {
                "split": [path for path, style in model.plan.styles.items() if style == "channel"],
                "buffers": {n: b.clone() for n, b in model.module.named_buffers()},
                "state": hybrid_ext.full_state_dict(model),
            }
    return out


@pytest.mark.timeout(300)
def test_batchnorm_buffers_agree_on_every_rank_and_syncbatchnorm_equals_the_reference(spawn_ranks):
    results = spawn_ranks(_bn_rank, 2, timeout=240)
    for model_name in BN_MODELS:
        expected = _bn_reference(model_name, 2)
        for sync, split in BN_VARIANTS:
            what = f"{model_name} {'SyncBatchNorm' if sync else 'BatchNorm'}{', convolutions split' * split}"
            first = results[0][(model_name, sync, split)]
            assert len(first["split"]) == split * {"resnet18": 5, "vgg11_bn": 2}[model_name], (what, first["split"])
            assert any("running_var" in n for n in first["buffers"]), what
            for rank, result in enumerate(results):
                run = result[(model_name, sync, split)]
                for name, buffer in run["buffers"].items():  # the replicas' own buffers, not only the checkpoint
                    assert torch.equal(buffer, first["buffers"][name]), f"{what}: rank {rank} {name} differs"
                for name, value in run["state"].items():
                    assert torch.equal(value, first["state"][name]), f"{what}: rank {rank} checkpoint {name} differs"
                if sync:  # statistics over all ranks' samples: the single-process step on the global batch
                    _assert_close(run["state"], expected, f"{what} rank {rank}")


def test_make_plan_leaves_batchnorm_statistics_and_the_rng_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 36, 5)
    )
    example = torch.randn(3, 3, 8, 8)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    plan = make_plan(model, "hybrid", example_input=example)
    assert plan.styles["5"] == "column_last"
    assert torch.equal(torch.get_rng_state(), rng), "make_plan consumed random numbers"
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"make_plan changed {name}"
    assert model.training and all(m.training for m in model.modules())  # modes restored


# ------------------------------------------------------------------ bad input, explained before anything runs


def _narrow_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 1))  # column_last: split by outputs


def _bad_input_rank(rank: int, world: int) -> dict:
    out = {}
    with hybrid_ext.metrics.capture() as records:
        try:
            hybrid_ext.parallelize(_narrow_head(), strategy="hybrid")  # 1 output feature over 2 ranks
            out["narrow"] = "no error"
        except ValueError as exc:
            out["narrow"] = str(exc)
    out["collectives_before_the_error"] = len(records)
    model = small_cnn()
    if rank == 1:
        model.to("meta")  # one device per rank, but not the same kind everywhere
    try:
        hybrid_ext.parallelize(model)
        out["devices"] = "no error"
    except ValueError as exc:
        out["devices"] = str(exc)
    return out


@pytest.mark.timeout(120)
def test_layers_that_cannot_be_sharded_and_mixed_devices_are_explained(spawn_ranks):
    for result in spawn_ranks(_bad_input_rank, 2):
        message = result["narrow"]
        assert "'2'" in message and "Linear" in message and "1 output feature" in message, message
        assert "mp_size=2" in message and "rules={'2': 'dp'}" in message, message
        assert result["collectives_before_the_error"] == 0
        assert "not on the same device type on every rank" in result["devices"], result["devices"]


def test_a_non_elementwise_layer_inside_a_forced_fc_chain_is_named():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"'2' .*follows '1' \(LayerNorm\).*not elementwise"):
        make_plan(model, "hybrid", rules={"0": "column", "2": "row"})
