"""All-gather and reduce-scatter along dim 0 on real processes (the partitioner's batch collectives)."""

from __future__ import annotations

import pytest
import torch

import hybrid_ext


def _rows(rank: int) -> int:
    return 2 + rank % 3  # uneven micro-batches


def _block(rank: int, rows: int) -> torch.Tensor:
    return torch.arange(rows * 6, dtype=torch.float32).view(rows, 2, 3) + 100 * rank


def _gather_scatter_rank(rank: int, p: int) -> dict:
    counts = tuple(_rows(r) for r in range(p))
    mine = _block(rank, counts[rank])
    out = {}
    for algorithm in ("recursive_doubling", "ring"):
        out[f"gather-{algorithm}"] = hybrid_ext.allgather(mine, algorithm=algorithm)
    out["gather-counts-given"] = hybrid_ext.allgather(mine, counts=counts)
    full = torch.cat([_block(r, counts[r]) for r in range(p)]) * (rank + 1)
    for algorithm in ("recursive_halving", "ring"):
        out[f"scatter-{algorithm}"] = hybrid_ext.reduce_scatter(full, counts=counts, algorithm=algorithm)
    out["scatter-avg-bf16"] = hybrid_ext.reduce_scatter(full.to(torch.bfloat16), counts=counts, op="avg")
    return out


@pytest.mark.parametrize(("transport", "p"), [("shm", 2), ("shm", 3), ("shm", 5), ("torch", 3), ("torch", 4)])
def test_allgather_and_reduce_scatter_match_the_reference(spawn_ranks, transport, p):
    results = spawn_ranks(_gather_scatter_rank, p, env={"HYBRID_EXT_TRANSPORT": transport})
    counts = [_rows(r) for r in range(p)]
    gathered = torch.cat([_block(r, counts[r]) for r in range(p)])
    scale = sum(range(1, p + 1))
    for rank, out in enumerate(results):
        for key in ("gather-recursive_doubling", "gather-ring", "gather-counts-given"):
            assert torch.equal(out[key], gathered), key
        first = sum(counts[:rank])
        expected = gathered[first : first + counts[rank]] * scale
        for key in ("scatter-recursive_halving", "scatter-ring"):
            assert torch.equal(out[key], expected), key
        assert out["scatter-avg-bf16"].dtype == torch.bfloat16
        torch.testing.assert_close(out["scatter-avg-bf16"].float(), expected / p, rtol=1e-2, atol=1e-2)
