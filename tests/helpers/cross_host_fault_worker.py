"""One rank of the cross-host fault jobs (tests/cluster/test_faults_cross_host.py):
``torchrun ... WORKER MODE OUTDIR [ARGS]``.

``kill``: rank ``VICTIM`` SIGKILLs itself entering the first exchange of a recursive-doubling allreduce (the
fault injector of tests/helpers/fault_injection.py); ``phase ALGORITHM VICTIM PHASE MEMBERS``: the group of the world
ranks MEMBERS (comma-separated) runs ALGORITHM (a flat schedule or ``hierarchical/<inter>``) and its group rank
VICTIM SIGKILLs itself entering PHASE, or at its N-th exchange for ``call:N`` (ranks outside the group only set
up and leave); ``cut``: every rank runs
allreduces until one fails (the test takes a host's link down meanwhile); ``small-shm``: one allreduce larger
than ``/dev/shm`` (the test mounts a tiny one).

Each rank writes ``rank<r>.info`` (host, pid) once set up and ``rank<r>.json`` (what it saw) at the end, into
OUTDIR, then leaves at once (``os._exit``, status 1 after an error) as a crashed training script would: its
partners learn of the fault from the network and its host-mates, not from an orderly shutdown. The ranks ignore
SIGTERM: torchrun's agent stops the other ranks of a host as soon as one of them dies, and the test wants to see
what they raise.
Nothing here asserts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from fault_injection import KillBeforeStep, kill_index

import hybrid_ext
from hybrid_ext.comm.registry import communicator

VICTIM = 2  # node1's first rank (2 hosts x 2 ranks)
ALGORITHM = "recursive_doubling"  # at 4 ranks: step 0 within a host (shared memory), step 1 across (gloo)
COUNT = 1 << 16
GROUP_TIMEOUT_ENV = "HX_FAULT_GROUP_TIMEOUT"


def _write(path: Path, data: dict) -> None:
    path.with_suffix(".partial").write_text(json.dumps(data))
    os.replace(path.with_suffix(".partial"), path)


def _failure(exc: BaseException, start: float, **extra) -> dict:
    return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start, **extra}


def _kill(rank: int, world: int, outdir: Path) -> dict:
    faulty = KillBeforeStep(communicator(None, torch.device("cpu")).transport)
    hybrid_ext.allreduce(torch.ones(8), group=faulty)
    if rank == VICTIM:
        faulty.arm(kill_index(ALGORITHM, rank, world, COUNT, "exchange"))
    start = time.monotonic()
    # A rank may finish the faulted collective before it needs the victim: the next one must fail then.
    for attempt in ("faulted", "next"):
        try:
            hybrid_ext.allreduce(torch.ones(COUNT), algorithm=ALGORITHM, group=faulty)
        except Exception as exc:
            return _failure(exc, start, attempt=attempt)
    return {"error": None, "seconds": time.monotonic() - start}


def _kill_in_phase(
    rank: int, world: int, timeout: float, algorithm: str, victim: int, phase: str, members: list[int]
) -> dict:
    whole = members == list(range(world))
    group = None if whole else dist.new_group(members, timeout=timedelta(seconds=timeout))  # every rank calls it
    if rank not in members:
        return {"error": None, "member": False}
    inner = communicator(group, torch.device("cpu")).transport
    faulty = KillBeforeStep(inner)
    hybrid_ext.allreduce(torch.ones(8), group=faulty)
    me = members.index(rank)
    if me == victim and phase.startswith("call:"):  # at its N-th exchange, whichever thread makes it
        faulty.arm(int(phase.removeprefix("call:")))
    elif me == victim:
        hosts = getattr(inner, "hosts", None)
        faulty.arm(kill_index(algorithm, me, len(members), COUNT, phase, None if hosts is None else tuple(hosts)))
    start = time.monotonic()
    for attempt in ("faulted", "next"):  # as in _kill: a rank done before it needs the victim fails next time
        try:
            hybrid_ext.allreduce(torch.ones(COUNT), algorithm=algorithm, group=faulty)
        except Exception as exc:
            return _failure(exc, start, attempt=attempt, group_rank=me, transport=inner.name)
    return {"error": None, "seconds": time.monotonic() - start, "group_rank": me}


def _cut(rank: int, world: int, outdir: Path, timeout: float) -> dict:
    done = 0
    start = time.monotonic()
    while time.monotonic() - start < 4 * timeout:  # bounded even if the link is never cut
        if done == 20:
            (outdir / f"rank{rank}.looping").write_text("")  # the test cuts the link once all ranks loop
        t = torch.ones(COUNT)
        began = time.monotonic()
        try:
            hybrid_ext.allreduce(t)
        except Exception as exc:
            return _failure(exc, began, completed=done)
        if not torch.equal(t, torch.full_like(t, float(world))):
            return {"error": "wrong result", "completed": done}
        done += 1
    return {"error": None, "completed": done}


def _small_shm(rank: int, world: int) -> dict:
    from hybrid_ext.comm.registry import communicator

    t = torch.arange(1 << 20, dtype=torch.float32) * (rank + 1)  # 4 MiB: more than the 1 MiB /dev/shm
    try:
        hybrid_ext.allreduce(t)
    except Exception as exc:
        return _failure(exc, time.monotonic())
    expected = torch.arange(1 << 20, dtype=torch.float32) * sum(range(1, world + 1))
    return {"error": None, "exact": torch.equal(t, expected), "transport": communicator(None).transport.name}


def main(mode: str, outdir: str, *args: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    timeout = float(os.environ.get(GROUP_TIMEOUT_ENV, "20"))
    out = Path(outdir)
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        if mode != "small-shm":
            hybrid_ext.allreduce(torch.ones(8))  # sets up the world's transport (shared memory + gloo)
            _write(out / f"rank{rank}.info", {"host": socket.gethostname(), "pid": os.getpid()})
    except Exception as exc:  # set-up failed: say so instead of leaving the test to guess
        rank = int(os.environ.get("RANK", "-1"))
        _write(out / f"rank{rank}.json", _failure(exc, time.monotonic(), setup=True))
        sys.stdout.flush()
        os._exit(1)
    if mode == "kill":
        outcome = _kill(rank, world, out)
    elif mode == "phase":
        algorithm, victim, phase, members = args
        outcome = _kill_in_phase(
            rank, world, timeout, algorithm, int(victim), phase, [int(m) for m in members.split(",")]
        )
    elif mode == "cut":
        outcome = _cut(rank, world, out, timeout)
    else:
        outcome = _small_shm(rank, world)
    outcome.update(host=socket.gethostname(), pid=os.getpid())
    _write(out / f"rank{rank}.json", outcome)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if outcome["error"] else 0)  # as a script that raised would: torchrun's agents stop at once


if __name__ == "__main__":
    main(*sys.argv[1:])
