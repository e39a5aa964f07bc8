"""The non-finite gradient guard: one rank's NaN makes every rank skip the step (never a split decision), alone and
with ``torch.amp.GradScaler``.

Each rank trains its own shard (different weights and data, as a model-parallel FC shard has), whose gradients
no allreduce mixes: only the guard tells the other ranks about a NaN.
"""

from __future__ import annotations

import pytest
import torch

import hybrid_ext
from hybrid_ext import launch

STEPS, BAD_STEP, BAD_RANK = 4, 1, 1


def _shard(rank: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(100 + rank)
    return torch.nn.Linear(4, 3), torch.randn(8, 4)


def _loss(model, x, rank: int, step: int, poison: float) -> torch.Tensor:
    loss = model(x).pow(2).mean()
    return loss * poison if (rank == BAD_RANK and step == BAD_STEP) else loss


def _plain(rank: int) -> dict:
    model, x = _shard(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = hybrid_ext.NonFiniteGuard()
    taken, weights = [], [model.weight.detach().clone()]
    for step in range(STEPS):
        optimizer.zero_grad()
        _loss(model, x, rank, step, float("nan")).backward()
        taken.append(guard.step(optimizer))
        weights.append(model.weight.detach().clone())
    return {"taken": taken, "skipped": guard.skipped, "weights": weights}


def _scaled(rank: int, use_guard: bool) -> dict:
    model, x = _shard(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    guard = hybrid_ext.NonFiniteGuard()
    scales, weights = [], [model.weight.detach().clone()]
    for step in range(STEPS):
        optimizer.zero_grad()
        scaler.scale(_loss(model, x, rank, step, float("inf"))).backward()
        if use_guard:
            guard.share(model.parameters())
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        weights.append(model.weight.detach().clone())
    return {"scales": scales, "weights": weights, "skipped": guard.skipped}


def _job_rank(rank: int, p: int) -> dict:
    hybrid_ext.set_check(True)
    return {"plain": _plain(rank), "scaled": _scaled(rank, True), "scaled_alone": _scaled(rank, False)}


@pytest.fixture(scope="module")
def job():
    return launch.spawn(_job_rank, 2, timeout=120)


def test_every_rank_skips_the_step_in_which_one_rank_saw_a_nan(job):
    for rank, result in enumerate(r["plain"] for r in job):
        assert result["taken"] == [step != BAD_STEP for step in range(STEPS)], f"rank {rank}"
        assert result["skipped"] == 1
        weights = result["weights"]
        assert torch.equal(weights[BAD_STEP + 1], weights[BAD_STEP])  # skipped: unchanged
        assert all(not torch.equal(weights[s + 1], weights[s]) for s in range(STEPS) if s != BAD_STEP)
        assert all(bool(torch.isfinite(w).all()) for w in weights)


def test_with_grad_scaler_every_rank_skips_and_the_scales_stay_equal(job):
    guarded = [r["scaled"] for r in job]
    assert guarded[0]["scales"] == guarded[1]["scales"]
    for result in guarded:
        assert result["skipped"] == 1
        weights = result["weights"]
        assert torch.equal(weights[BAD_STEP + 1], weights[BAD_STEP])
        assert all(bool(torch.isfinite(w).all()) for w in weights)
        # The scaler backed off (halved) in the skipped step, and grew (doubled) in the others.
        assert result["scales"][BAD_STEP] == result["scales"][BAD_STEP - 1] / 2


def test_without_the_guard_the_scaler_alone_decides_per_rank(job):
    # Why the guard: the scaler sees only this rank's gradients, so the ranks' decisions split.
    alone = [r["scaled_alone"] for r in job]
    assert alone[0]["scales"] != alone[1]["scales"]
    good = 1 - BAD_RANK
    assert not torch.equal(alone[good]["weights"][BAD_STEP + 1], alone[good]["weights"][BAD_STEP])
