"""Restarts: ``torchrun --max-restarts`` resuming from a checkpoint, and Horovod elastic losing a host.

- torchrun (one host, 2 ranks): a rank SIGKILLs itself mid-epoch on the first attempt; torchrun restarts the
  group, which resumes from the last checkpoint and ends with exactly the weights of an uninterrupted run with
  the same data order (tests/helpers/restart_worker.py).
- Horovod: a reset (what ``hvd.elastic.run`` does between attempts: ``hvd.shutdown(); hvd.init()``) drops the
  side channels, communicators and partitioner groups cached for the old ranks; ``hvd.Butterfly`` then works
  over fresh ones (tests/helpers/horovod_elastic_worker.py under plain ``horovodrun``).
- Horovod elastic on the emulated cluster (node0, node1; 2 ranks each): the host-discovery script drops node1
  mid-training and node1's ranks die; the two ranks on node0 restore the last commit and finish with
  ``hvd.Butterfly`` over a side channel rebuilt for the two of them.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import pytest
import torch

from hybrid_ext.launch import run_torchrun

from helpers import HELPERS

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
    worker = str(HELPERS / "restart_worker.py")
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
    results = horovodrun([sys.executable, str(HELPERS / "horovod_elastic_worker.py"), "reset"], 2, timeout=150)
    for rank, result in enumerate(results):
        for how, after in result.items():
            assert after["new_channel"] and after["new_communicator"] and after["new_groups"], (rank, how, after)
            assert after["old_channel_closed"], (rank, how)
            assert after["error"] <= 1e-6, (rank, how, after["error"])


# ------------------------------------------------------------------ Horovod elastic on the emulated cluster

ELASTIC_TIMEOUT = 240.0
STEPS, REMOVE_AT = 12, 4
DISCOVERY = """#!/bin/sh
echo node0:2
[ -e {removed} ] || echo node1:2
"""


def _kill_ours(cluster, hosts, marker: str) -> None:
    """SIGKILL what is left of this job on ``hosts``: processes there whose command line names ``marker`` (the
    job's own directory) — not the hosts' other tenants."""
    import os
    import signal

    from hybrid_ext.launch import cluster as emulated

    for host in hosts:
        for pid in emulated._netns_pids(emulated._netns(host)):
            if marker in emulated._cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(ELASTIC_TIMEOUT + 60)
def test_horovod_elastic_loses_a_host_and_finishes_with_butterfly_on_the_rest(cluster, tmp_path):
    """``horovodrun`` elastic on node0 + node1 (2 ranks each): at step 4 node1 leaves the discovery script's output
    and its ranks die; node0's ranks restore the last commit, Horovod re-initializes them as a world of 2, and
    ``hvd.Butterfly`` goes on over a side channel opened for the two of them."""
    pytest.importorskip("horovod.torch")
    import os
    import subprocess

    import psutil

    from hybrid_ext.launch import launcher_path
    from hybrid_ext.launch.results import RESULT_DIR_ENV, load_result

    hosts = cluster.names[:2]
    discover = tmp_path / "discover.sh"
    discover.write_text(DISCOVERY.format(removed=tmp_path / "removed"))
    discover.chmod(0o755)
    command = [launcher_path("horovodrun"), "-np", "4", "--min-np", "2", "--max-np", "4",
               "--host-discovery-script", str(discover), "--gloo", "--network-interface", cluster.interface,
               sys.executable, str(HELPERS / "horovod_elastic_worker.py"), "elastic", str(tmp_path),
               str(STEPS), str(REMOVE_AT)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", RESULT_DIR_ENV: str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HELPERS.parent), os.environ.get("PYTHONPATH")) if p)
    log = tmp_path / "horovodrun.log"
    with open(log, "w") as out:
        proc = cluster.popen(hosts[0], command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=ELASTIC_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        proc.kill()
        proc.wait()
        _kill_ours(cluster, hosts, str(tmp_path))
    output = log.read_text(errors="replace")
    assert code == 0, (
        f"horovodrun exited with {code} (None: still running after {ELASTIC_TIMEOUT:.0f}s)\n{output[-6000:]}"
    )

    # node1 was taken out and its ranks died; node0's two ranks finished as ranks 0 and 1 of 2.
    assert (tmp_path / "removed").read_text() == f"node1 removed at step {REMOVE_AT}"
    assert sorted(p.name for p in tmp_path.glob("*.result")) == ["rank0.result", "rank1.result"]
    results = [load_result(tmp_path, rank) for rank in range(2)]
    for rank, result in enumerate(results):
        assert (result["host"], result["rank"], result["size"]) == ("node0", rank, 2)
        assert result["resets"] and set(result["resets"]) == {2}, result["resets"]
        # interrupted at the step node1 left (HorovodInternalError from hvd.Butterfly, or Horovod's notice that
        # the hosts changed, whichever came first), then back at it with the state of the last commit
        assert result["interruptions"] and result["interruptions"][0][1] == REMOVE_AT, result["interruptions"]
        assert result["channel_size"] == 2  # the side channel was opened anew for the two ranks left
        worlds = {world for world, _ in result["reductions"]}
        assert worlds == {4, 2}, result["reductions"]  # hvd.Butterfly before (4 ranks) and after (2)
        assert all(transport == "shm" for world, transport in result["reductions"] if world == 2)
        steps = result["losses"]
        assert sorted(steps) == list(range(STEPS)), sorted(steps)
        assert [steps[s][0] for s in range(STEPS)] == [4] * REMOVE_AT + [2] * (STEPS - REMOVE_AT)
        losses = [steps[s][1] for s in range(STEPS)]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        # the pool's loss before each step: lower after the host is lost than before, and lowest at the end
        assert losses[-1] < losses[REMOVE_AT] < losses[0] and losses[-1] == min(losses), losses
    for mine, first in zip(results[1]["params"], results[0]["params"]):
        assert torch.equal(mine, first), "the two remaining ranks ended with different weights"
    print(f"elastic: {results[0]['seconds']:.1f}s of training; interruptions: {results[0]['interruptions']}")

    # Nothing of ours left in either host's /dev/shm (each host has its own).
    for pid_file in tmp_path.glob("pid-*"):
        host, pid = pid_file.name.split("-")[1], int(pid_file.read_text())
        listing = cluster.run(host, ["ls", "/dev/shm"], capture_output=True, text=True).stdout.split()
        ours = [name for name in listing if re.match(rf"hybrid-ext-[^-]+-{pid}-", name)]
        assert ours == [], (host, ours)
