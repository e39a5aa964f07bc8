"""The partitioner's exactness reference: test models, the global batch, the single-process step, one rank's step.

Shared by tests/multiprocess/test_parallel.py and tests/multiprocess/test_training_modes.py (spawned gloo ranks) and
tests/helpers/horovod_worker.py (ranks under horovodrun).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import hybrid_ext
from hybrid_ext.parallel import full_grads

MICRO_BATCH = 4
ACCUMULATION_STEPS = 2


def small_cnn() -> nn.Module:
    """Conv features, then a 3-layer FC head (column, row, column_last) with elementwise layers between."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(12 * 16, 100),  # 100 features: not divisible by 3 or 8 on purpose
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Linear(100, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def alexnet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet(num_classes=10, dropout=0.0)  # 64x64 input: its adaptive pool copes


def vgg11() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg11(num_classes=10, dropout=0.0)


def head_heavy_cnn() -> nn.Module:
    """A stem on a 32×32 map (few weights, large activations), then two convolutions of many weights on a 2×2 map,
    and a small classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(16),
        nn.Conv2d(16, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 1, groups=4),  # grouped: cannot be split by channels
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def token_mlp() -> nn.Module:
    """A Linear applied at every position of a sequence (3-D activations), then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 13), nn.GELU(), nn.Flatten(), nn.Linear(6 * 13, 10))


MODELS = {
    "small_cnn": (small_cnn, (3, 16, 16), 10),
    "token_mlp": (token_mlp, (6, 8), 10),
    "alexnet": (alexnet, (3, 64, 64), 10),
    "vgg11": (vgg11, (3, 32, 32), 10),
}


def global_batch(world: int, shape, classes):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(world * MICRO_BATCH, *shape, generator=g)
    y = torch.randint(0, classes, (world * MICRO_BATCH,), generator=g)
    return x, y


def reference(model_name: str, world: int):
    build, shape, classes = MODELS[model_name]
    model = build()
    x, y = global_batch(world, shape, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return loss.item(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def step_rank(
    rank: int, world: int, model_name: str, strategy: str, mp_size: int | None, reducer: str, groups=None, rules=None
):
    """One step on this rank; ``groups``: a host framework's (Horovod's), else torch.distributed's."""
    build, shape, classes = MODELS[model_name]
    model = hybrid_ext.parallelize(
        build(), strategy=strategy, reducer=reducer, mp_size=mp_size, groups=groups, rules=rules
    )
    x, y = global_batch(world, shape, classes)
    if strategy != "mp":  # each rank its own micro-batch
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with hybrid_ext.metrics.capture() as records:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    grads = full_grads(model)
    optimizer.step()
    total = loss.detach().clone()
    if strategy != "mp":
        hybrid_ext.allreduce(total, op="avg", group=model.groups.world)
    return {
        "loss": total.item(),
        "grads": grads,
        "state": hybrid_ext.full_state_dict(model),
        "bytes": sum(r.bytes_sent for r in records),
        "fc_params": sum(p.numel() for n, p in model.module.named_parameters() if hasattr(p, "shard_dim")),
        "transports": sorted({r.transport for r in records}),
    }


# ------------------------------------------------------------------ gradient accumulation


def accumulation_batches(world: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of each accumulation step (rank r's micro-batch: rows [r·MICRO_BATCH, (r+1)·MICRO_BATCH))."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(world * MICRO_BATCH, 3, 16, 16, generator=g),
            torch.randint(0, 10, (world * MICRO_BATCH,), generator=g),
        )
        for _ in range(steps)
    ]


def accumulation_reference(world: int) -> dict:
    """One SGD step on all accumulation steps' samples at once: the loss averaged over the whole global batch."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = accumulation_batches(world, ACCUMULATION_STEPS)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def accumulate_rank(
    rank: int, world: int, strategy: str, mp_size: int | None, mode: str, groups=None, wrap_optimizer=None
) -> dict:
    """ACCUMULATION_STEPS backward passes (each loss divided by their number, as with DDP), then one step.

    ``mode``: ``plain`` (every backward reduces), ``no_sync`` (all but the last inside ``model.no_sync()``) or
    ``discard`` (first a thrown-away pass inside ``no_sync()``, dropped with ``discard_pending()``, then plain);
    ``groups``: a host framework's (Horovod's), else torch.distributed's; ``wrap_optimizer(optimizer, model)``:
    the host framework's optimizer wrapper (Horovod's DistributedOptimizer)."""
    model = hybrid_ext.parallelize(small_cnn(), strategy=strategy, mp_size=mp_size, groups=groups, bucket_mb=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer, model)
    if mode == "discard":
        x = torch.randn(MICRO_BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
        with model.no_sync():
            (100 * model(x).square().mean()).backward()
        model.reducer.discard_pending()
        optimizer.zero_grad()
    inside_no_sync = []
    for step, (x, y) in enumerate(accumulation_batches(world, ACCUMULATION_STEPS)):
        if strategy != "mp":
            x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        last = step == ACCUMULATION_STEPS - 1
        if mode == "no_sync" and not last:
            with hybrid_ext.metrics.capture() as records, model.no_sync():
                (F.cross_entropy(model(x), y) / ACCUMULATION_STEPS).backward()
            inside_no_sync += [r for r in records if r.collective == "allreduce"]
        else:
            (F.cross_entropy(model(x), y) / ACCUMULATION_STEPS).backward()
    grads = full_grads(model)
    optimizer.step()
    return {"grads": grads, "state": hybrid_ext.full_state_dict(model), "no_sync_allreduces": len(inside_no_sync)}
