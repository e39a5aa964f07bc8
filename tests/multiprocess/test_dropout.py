"""Dropout inside a sharded FC chain: no exact reference exists (each shard draws its own mask), so check the
statistics: the drop rate, and the expected output, which must equal the unsharded model's in expectation."""

from __future__ import annotations

import torch
from torch import nn

import hybrid_ext

P_DROP, PASSES, BATCH = 0.5, 400, 4


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 64), nn.ReLU(), nn.Dropout(P_DROP), nn.Linear(64, 32), nn.ReLU(),
        nn.Dropout(P_DROP), nn.Linear(32, 5),
    )  # fmt: skip


def _inputs(world: int) -> torch.Tensor:
    return torch.randn(world * BATCH, 3, 4, generator=torch.Generator().manual_seed(5))


def _dropout_rank(rank: int, world: int) -> dict:
    torch.manual_seed(1000 + rank)  # masks differ per rank, as they would
    model = hybrid_ext.parallelize(_mlp(), strategy="hybrid")
    x = _inputs(world)[rank * BATCH : (rank + 1) * BATCH]
    zeros, total = [0, 0], [0, 0]

    def count(index):
        def hook(module, inputs, output):
            zeros[index] += int((output == 0).sum() - (inputs[0] == 0).sum())
            total[index] += int((inputs[0] != 0).sum())

        return hook

    dropouts = [m for m in model.module.modules() if isinstance(m, nn.Dropout)]
    for index, module in enumerate(dropouts):
        module.register_forward_hook(count(index))
    with torch.no_grad():
        outputs = torch.stack([model(x) for _ in range(PASSES)])
    return {"mean": outputs.mean(0), "std": outputs.std(0), "drop_rates": [z / t for z, t in zip(zeros, total)]}


def test_dropout_in_a_sharded_chain_keeps_the_rate_and_the_expected_output(spawn_ranks):
    world = 2
    results = spawn_ranks(_dropout_rank, world, timeout=240)
    torch.manual_seed(7)
    model = _mlp().train()  # the unsharded model's own Monte-Carlo estimate of the same expectation
    for rank, result in enumerate(results):
        for rate in result["drop_rates"]:
            assert abs(rate - P_DROP) < 0.03, f"rank {rank}: dropped {rate:.3f} of the activations"
        x = _inputs(world)[rank * BATCH : (rank + 1) * BATCH]
        with torch.no_grad():
            single = torch.stack([model(x) for _ in range(PASSES)])
        # Two means of PASSES samples each: 5 standard errors of their difference.
        bound = 5 * ((result["std"] ** 2 + single.std(0) ** 2) / PASSES) ** 0.5
        gap = (result["mean"] - single.mean(0)).abs()
        assert bool((gap <= bound).all()), f"rank {rank}: {(gap / bound).max():.2f} bounds off"
