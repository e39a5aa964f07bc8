"""The real stack: 2- and 3-rank horovodrun and deepspeed jobs, checked against single-process references."""

from __future__ import annotations

import sys

import pytest
import torch

from hybrid_ext.tools.smoke import check_gloo


def _reference_weight(world_size: int) -> torch.Tensor:
    """One SGD step of Linear(4, 2) on the ranks' inputs, gradients averaged over ranks (lr 0.1)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    loss = sum(model(torch.full((8, 4), float(r + 1))).sum() for r in range(world_size)) / world_size
    loss.backward()
    with torch.no_grad():
        return model.weight - 0.1 * model.weight.grad


@pytest.mark.multiprocess
def test_gloo_smoke():
    assert "= 3" in check_gloo(2)


@pytest.mark.parametrize("np", [2, 3])
def test_horovodrun_job(horovodrun, np):
    results = horovodrun([sys.executable, "-m", "hybrid_ext.tools.smoke_horovod_worker"], np)
    expected_sum = np * (np + 1) / 2
    reference = _reference_weight(np)
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["size"] == np
        assert result["allreduce"] == [expected_sum] * 3
        # Rank s sends (j + 1) elements of value s to rank j: rank r gets r + 1 copies of each sender's rank.
        assert result["alltoall"] == [float(s) for s in range(np) for _ in range(rank + 1)]
        assert result["alltoall_splits"] == [rank + 1] * np
        torch.testing.assert_close(result["weight"], reference, rtol=1e-6, atol=1e-6)


def test_deepspeed_launcher_job(deepspeed_job):
    np = 2
    results = deepspeed_job(["--module", "hybrid_ext.tools.smoke_deepspeed_worker"], np)
    reference = _reference_weight(np)
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["size"] == np
        assert result["allreduce"] == [3.0] * 3
        torch.testing.assert_close(result["weight"], reference, rtol=1e-6, atol=1e-6)
