"""Restarts: ``torchrun --max-restarts`` resuming from a checkpoint, and Horovod elastic losing a host.

- torchrun (one host, 2 ranks): a rank SIGKILLs itself mid-epoch on the first attempt; torchrun restarts the
  group, which resumes from the last checkpoint and ends with exactly the weights of an uninterrupted run with
  the same data order (tests/restart_worker.py).
- Horovod: a reset (what ``hvd.elastic.run`` does between attempts: ``hvd.shutdown(); hvd.init()``) drops the
  side channels, communicators and partitioner groups cached for the old ranks; ``hvd.Butterfly`` then works
  over fresh ones (tests/horovod_elastic_worker.py under plain ``horovodrun``).
- Horovod elastic on the emulated cluster (node0, node1; 2 ranks each): the host-discovery script drops node1
  mid-training and node1's ranks die; the two ranks on node0 restore the last commit and finish with
  ``hvd.Butterfly`` over a side channel rebuilt for the two of them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from hybrid_ext.launch import run_torchrun

TESTS = Path(__file__).resolve().parent
SHM = Path("/dev/shm")


def _our_shm_files(pids: set[int]) -> list[str]:
    """Our shared-memory files (``hybrid-ext-<pid namespace>-<pid>-<random>-r<rank>``) made by any of ``pids``."""
    found = []
    for path in SHM.glob("hybrid-ext-*"):
        match = re.match(r"hybrid-ext-[^-]+-(\d+)-", path.name)
        if match and int(match[1]) in pids:
            found.append(path.name)
    return found


# ------------------------------------------------------------------ torchrun --max-restarts

# torchrun's static rendezvous (and c10d's by default) hands the restarted workers the same store the first attempt
# used, with its keys still in it: a restarted rank can read the dead attempt's gloo address and fail with
# "Connection refused" (seen here once in three runs; pytorch/pytorch#135712). A c10d rendezvous that does not
# share its store gives every attempt a fresh one.
RESTARTABLE = ["--standalone", "--max-restarts", "1"]
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
KILL_STEP = 9  # epoch 1 (steps 6-11), its 4th step; checkpoints after steps 4 and 8: resumes from 8
EVERY = 4


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_torchrun_restart_resumes_from_the_checkpoint_and_ends_with_the_uninterrupted_weights(tmp_path):
    worker = str(TESTS / "restart_worker.py")
    runs = {}
    for name, kill in (("uninterrupted", []), ("killed", ["--kill-step", str(KILL_STEP), "--kill-rank", "1"])):
        ckpt = tmp_path / name
        ckpt.mkdir()
        log = tmp_path / f"{name}.log"
        results = run_torchrun(
            [worker, str(ckpt), "--every", str(EVERY), *kill],
            2,
            launcher_args=RESTARTABLE,
            env=NO_SHARED_STORE,
            log=log,
            timeout=180,
        )
        runs[name] = (results, ckpt, log.read_text())

    results, ckpt, log = runs["killed"]
    # The first attempt really died: the victim's mark, torchrun's restart, and the second attempt's ranks.
    assert (ckpt / "killed").read_text().startswith(f"rank 1 step {KILL_STEP} pid ")
    assert sorted(p.name for p in ckpt.glob("attempt*.pid")) == [
        "attempt0-rank0.pid", "attempt0-rank1.pid", "attempt1-rank0.pid", "attempt1-rank1.pid",
    ]  # fmt: skip
    assert "TORCHELASTIC_RESTART_COUNT=1" in log and "resumed from the checkpoint of step 8" in log, log[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in log, log[-3000:]  # torchrun saw the SIGKILL
    for rank, result in enumerate(results):
        assert result["attempt"] == 1 and result["start"] == 8, (rank, result["attempt"], result["start"])
        assert sorted(result["losses"]) == [8, 9, 10, 11]

    # Bit for bit: the same data in the same order, the same reductions in the same order on the same 2 ranks,
    # and a checkpoint that holds the exact float32 weights and momentum: nothing to round differently.
    reference, _, reference_log = runs["uninterrupted"]
    assert "TORCHELASTIC_RESTART_COUNT=0" in reference_log and "resumed" not in reference_log
    for rank in range(2):
        for key, expected in reference[rank]["state"].items():
            assert torch.equal(results[rank]["state"][key], expected), f"rank {rank}: {key} differs"
        for index, entries in reference[rank]["optimizer"]["state"].items():
            got = results[rank]["optimizer"]["state"][index]["momentum_buffer"]
            assert torch.equal(got, entries["momentum_buffer"]), f"rank {rank}: momentum {index} differs"
        for step in (8, 9, 10, 11):
            assert results[rank]["losses"][step] == reference[rank]["losses"][step], (rank, step)

    pids = {int(p.read_text()) for run in runs.values() for p in run[1].glob("attempt*.pid")}
    assert len(pids) == 6
    assert _our_shm_files(pids) == []


# ------------------------------------------------------------------ Horovod: a reset drops the side channels


@pytest.mark.timeout(200)
def test_a_horovod_reset_makes_new_side_channels_for_the_new_ranks(horovodrun):
    """What ``hvd.elastic.run`` does between attempts — ``hvd.shutdown(); hvd.init()`` — must not leave
    ``hvd.Butterfly`` on the side channel of the ranks before: after a host is lost, that channel leads to dead
    peers (and to a world of the old size)."""
    pytest.importorskip("horovod.torch")
    results = horovodrun([sys.executable, str(TESTS / "horovod_elastic_worker.py"), "reset"], 2, timeout=150)
    for rank, result in enumerate(results):
        for how, after in result.items():
            assert after["new_channel"] and after["new_communicator"] and after["new_groups"], (rank, how, after)
            assert after["old_channel_closed"], (rank, how)
            assert after["error"] <= 1e-6, (rank, how, after["error"])
