"""The reducer's unshared groups (``comm=None``: parameters no other rank holds) on in-process ranks: scaled as each
gradient arrives, without a bucket, and held through ``no_sync()`` exactly as the bucketed groups' gradients are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_ext.comm import Communicator
from hybrid_ext.comm.transports.loopback import run_ranks
from hybrid_ext.parallel.reducer import GradientReducer, ReduceGroup

WORLD = 2
SCALE = 1.0 / WORLD


def _inputs(rank: int, passes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(10 * rank + 1)
    return [torch.randn(4, generator=generator) for _ in range(passes)]


def _shown(*params: nn.Parameter) -> list[float]:
    """What ``.grad`` shows of each parameter now (autograd accumulates the zeros a held gradient leaves)."""
    return [0.0 if p.grad is None else p.grad.abs().sum().item() for p in params]


def _run(transport, passes: int, mode: str) -> dict:
    """``passes`` backward passes; ``mode``: ``plain`` (each synchronises), ``no_sync`` (all but the last inside
    ``no_sync()``), ``discard`` (a pass inside ``no_sync()`` dropped with ``discard_pending()``, then plain)."""
    shared, own = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    groups = [
        ReduceGroup("replicated", [shared], Communicator(transport), "avg"),
        ReduceGroup("fc-shards", [own], None, "sum", SCALE),
    ]
    reducer = GradientReducer(groups, parameter_order=[shared, own])
    seen_inside = []
    try:
        if mode == "discard":
            with reducer.no_sync():
                ((shared + own) * 100.0).sum().backward()
            seen_inside += _shown(shared, own)
            reducer.discard_pending()
        for i, x in enumerate(_inputs(transport.rank, passes)):
            if mode == "no_sync" and i < passes - 1:
                with reducer.no_sync():
                    ((shared + own) * x).sum().backward()
                seen_inside += _shown(shared, own)
            else:
                ((shared + own) * x).sum().backward()
        return {
            "shared": shared.grad,
            "own": own.grad,
            "seen_inside": seen_inside,
            "bucketed": [p is own for b in reducer.buckets for p in b.params],
        }
    finally:
        reducer.remove()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["plain", "no_sync", "discard"])
def test_an_unshared_parameter_is_scaled_without_a_bucket_and_held_through_no_sync(mode):
    passes = 3
    results = run_ranks(_run, WORLD, passes, mode, timeout=50)
    summed = [torch.stack(_inputs(rank, passes)).sum(0) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["bucketed"] == [False]  # only the replicated parameter has a bucket
        torch.testing.assert_close(result["own"], summed[rank] * SCALE)
        torch.testing.assert_close(result["shared"], torch.stack(summed).mean(0))
        # Inside no_sync() neither gradient shows yet, and a discarded pass leaves nothing behind in either.
        assert len(result["seen_inside"]) == {"plain": 0, "no_sync": 4, "discard": 2}[mode]
        assert all(shown == 0.0 for shown in result["seen_inside"]), result["seen_inside"]
