"""DeepSpeed's own data path under hybrid (real ``deepspeed`` launcher, 4 ranks, mp_size 2): ``training_data=``
and ``train_batch_size`` keep their DeepSpeed meaning — one global batch over all ranks, every rank its own
samples — with gradient accumulation, gradient clipping and an LR scheduler on, equal to the single-process
step on the global batch and to the same script under plain DeepSpeed data parallelism.
"""

from __future__ import annotations

import pytest
import torch

from helpers import HELPERS
from helpers.deepspeed_reference import DATA_GAS, DATA_STEPS, MICRO_BATCH, TOL, data_path_indices, data_path_reference

pytest.importorskip("deepspeed")

LAUNCH_TIMEOUT = 420.0  # one launcher job, three engines; slow on a loaded 2-core machine
WORKER = str(HELPERS / "deepspeed_worker.py")
WORLD = 4


@pytest.fixture(scope="module")
def job():
    from hybrid_ext.launch import run_deepspeed

    return run_deepspeed([WORKER, "data-path"], WORLD, timeout=LAUNCH_TIMEOUT)


@pytest.mark.multiprocess
@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_deepspeeds_loader_accumulation_clipping_and_scheduler_under_hybrid_equal_the_reference(job):
    expected = data_path_reference(WORLD)
    per_rank = data_path_indices(WORLD)
    for rank, result in enumerate(job):
        for run in ("dp", "hybrid-zero0", "hybrid-zero2"):
            out = result[run]
            assert "error" not in out, f"rank {rank} {run}: {out.get('error')}"
            # Every rank its own samples, in DeepSpeed's sampler order over all ranks (not over world / mp_size).
            assert out["samples"] == per_rank[rank][: DATA_STEPS * DATA_GAS * MICRO_BATCH], f"rank {rank} {run}"
            assert out["accumulation"] == DATA_GAS and out["micro_batch"] == MICRO_BATCH, f"rank {rank} {run}"
            assert out["lr"] == job[0]["dp"]["lr"], f"rank {rank} {run}"
            assert set(out["state"]) == set(expected), run
            for name, value in expected.items():
                torch.testing.assert_close(out["state"][name], value, **TOL, msg=f"rank {rank} {run}: {name}")


def test_batch_settings_keep_their_meaning_over_all_ranks():
    from hybrid_ext.integrations.deepspeed.batch import batch_settings_for_hybrid

    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    # 8 ranks, mp_size 2: DeepSpeed counts dp = 4 "GPUs"; the user's numbers count all 8.
    for given, micro, accumulation in [
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, 2),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 4, 2),
        ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, 2),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, 2),
        ({"train_batch_size": 32}, 4, 1),
        ({"train_micro_batch_size_per_gpu": 4}, 4, 1),
    ]:
        out = batch_settings_for_hybrid({**given, "steps_per_print": 5}, world=8, dp=4)
        assert [out[k] for k in keys] == [micro * accumulation * 4, micro, accumulation], given
        assert out["steps_per_print"] == 5
    with pytest.raises(ValueError, match=r"\(48\) must equal .* \(4\) × .* \(2\) × the 8 ranks"):
        batch_settings_for_hybrid({"train_batch_size": 48, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}, world=8, dp=4)  # fmt: skip
