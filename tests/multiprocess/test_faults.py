"""Faults on one host: a rank SIGKILLed in each phase of each algorithm, over shared memory and over gloo.

Every other rank must raise :class:`hybrid_ext.PeerError` naming the dead rank within the group's timeout (no
hang), and no shared-memory file of ours may be left in ``/dev/shm``. ``--soak`` repeats the matrix (50 jobs or
more). Faults across hosts (a rank killed on another host, a cut link) run on the emulated cluster:
tests/cluster/test_faults_cross_host.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import hybrid_ext
from hybrid_ext.comm.registry import communicator
from hybrid_ext.comm.transports import shm as shm_transport
from hybrid_ext.launch import LaunchError

from helpers.fault_injection import KillBeforeStep, kill_index, phases

pytestmark = pytest.mark.multiprocess

WORLD = 3  # a non-power of two: the fold runs, and every butterfly phase too
COUNT = 1 << 16
GROUP_TIMEOUT = 20.0  # the process group's timeout: every survivor must have raised well within it
# (algorithm, victim rank, phase it dies entering): every phase in which some rank sends, at 3 ranks.
KILL_CASES = [
    ("recursive_doubling", 0, "fold"),
    ("recursive_doubling", 2, "exchange"),
    ("recursive_doubling", 1, "unfold"),
    ("rabenseifner", 0, "fold"),
    ("rabenseifner", 1, "reduce_scatter"),
    ("rabenseifner", 2, "allgather"),
    ("rabenseifner", 1, "unfold"),
    ("ring", 1, "reduce_scatter"),
    ("ring", 2, "allgather"),
]


def test_the_kill_cases_cover_every_phase_of_every_algorithm():
    covered = {(algorithm, phase) for algorithm, _, phase in KILL_CASES}
    for algorithm in ("recursive_doubling", "rabenseifner", "ring"):
        for rank in range(WORLD):
            assert {(algorithm, p) for p in phases(algorithm, rank, WORLD, COUNT)} <= covered
    for algorithm, victim, phase in KILL_CASES:
        assert phase in phases(algorithm, victim, WORLD, COUNT)


def our_files(pids) -> list[str]:
    """Shared-memory files in /dev/shm created by any of ``pids`` (names carry the creator's pid)."""
    names = [n for n in os.listdir(shm_transport.SHM_DIR) if n.startswith(shm_transport.FILE_PREFIX)]
    return [n for n in names if any(f"-{pid}-" in n for pid in pids)]


def _killed_in_phase_rank(rank: int, p: int, algorithm: str, victim: int, phase: str, outdir: str) -> None:
    hybrid_ext.allreduce(torch.ones(8))  # sets up the group's transport (shared memory or gloo)
    faulty = KillBeforeStep(communicator(None, torch.device("cpu")).transport)
    hybrid_ext.allreduce(torch.ones(8), group=faulty)
    Path(outdir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == victim:
        faulty.arm(kill_index(algorithm, rank, p, COUNT, phase))
    start = time.monotonic()
    outcome = {"error": None}
    # A rank may finish the faulted collective before it needs the victim (a fold partner's hand-back): the
    # next one must fail then.
    for attempt in ("faulted", "next"):
        try:
            hybrid_ext.allreduce(torch.ones(COUNT), algorithm=algorithm, group=faulty)
        except Exception as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc), "attempt": attempt}
            break
    outcome["seconds"] = time.monotonic() - start
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(outcome))
    sys.stdout.flush()
    os._exit(0)  # a survivor leaves at once: its partners learn of the fault from the dead rank, not from it


def run_kill_case(spawn_ranks, outdir: Path, transport: str, algorithm: str, victim: int, phase: str) -> dict:
    """One job: kill ``victim`` entering ``phase``; return each survivor's outcome (and check its claims)."""
    outdir.mkdir(parents=True, exist_ok=True)
    env = {"HYBRID_EXT_TRANSPORT": transport}
    start = time.monotonic()
    with pytest.raises(LaunchError, match=f"rank {victim} failed first") as failure:
        spawn_ranks(
            _killed_in_phase_rank, WORLD, algorithm, victim, phase, str(outdir),
            pg_timeout=GROUP_TIMEOUT, timeout=120, failure_grace=GROUP_TIMEOUT + 30, env=env,
        )  # fmt: skip
    assert f"exit code {-signal.SIGKILL}" in str(failure.value)  # the victim died of the kill, not of an error
    outcomes = {}
    for rank in range(WORLD):
        if rank == victim:
            continue
        outcome = json.loads((outdir / f"rank{rank}.json").read_text())
        assert outcome["error"] == "PeerError", f"rank {rank}: {outcome}"
        assert f"rank {victim} (pid" in outcome["message"] and "has died" in outcome["message"], outcome
        assert outcome["seconds"] < GROUP_TIMEOUT, outcome
        outcomes[rank] = outcome
    pids = [int((outdir / f"rank{r}.pid").read_text()) for r in range(WORLD)]
    assert our_files(pids) == [], "shared-memory files left behind"
    return {"seconds": time.monotonic() - start, "outcomes": outcomes}


# Every phase over shared memory (what ranks of one host use); one case of each kind of phase over gloo. The soak
# (``--soak``) runs every case over both, several times.
MAIN_CASES = [("shm", *case) for case in KILL_CASES] + [
    ("torch", *case) for case in KILL_CASES if case[2] in ("fold", "exchange") or case[0] == "ring"
]


@pytest.mark.parametrize(("transport", "algorithm", "victim", "phase"), MAIN_CASES)
def test_a_rank_killed_in_any_phase_is_named_by_every_other_rank(
    spawn_ranks, tmp_path, transport, algorithm, victim, phase
):
    run_kill_case(spawn_ranks, tmp_path, transport, algorithm, victim, phase)


def _killed_in_setup_rank(rank: int, p: int, victim: int, outdir: str) -> None:
    Path(outdir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == victim:  # dies right after reserving its file, before anyone could unlink it
        allocate = shm_transport._allocate

        def allocate_then_die(path, nbytes):
            problem = allocate(path, nbytes)
            os.kill(os.getpid(), signal.SIGKILL)
            return problem

        shm_transport._allocate = allocate_then_die
    try:
        hybrid_ext.allreduce(torch.ones(8))
        outcome = "no error"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    Path(outdir, f"rank{rank}.txt").write_text(outcome)
    os._exit(0)


def _set_up_shm_rank(rank: int, p: int) -> float:
    return hybrid_ext.allreduce(torch.ones(4)).sum().item()


def test_a_rank_killed_during_set_up_leaves_no_file_after_the_next_set_up(spawn_ranks, tmp_path):
    env = {"HYBRID_EXT_TRANSPORT": "shm"}
    with pytest.raises(LaunchError, match="rank 1 failed first"):
        spawn_ranks(_killed_in_setup_rank, 2, 1, str(tmp_path), pg_timeout=15, timeout=90, failure_grace=40, env=env)
    victim = int((tmp_path / "rank1.pid").read_text())
    assert "Error" in (tmp_path / "rank0.txt").read_text()  # the survivor failed instead of hanging
    # The victim's file may outlive it (nobody learnt its name); the next set-up on this host removes it.
    assert spawn_ranks(_set_up_shm_rank, 2, env=env) == [8.0, 8.0]
    assert our_files([victim]) == []


def test_orphan_sweep_touches_only_files_of_dead_creators_in_this_pid_namespace(tmp_path):
    namespace = shm_transport._pid_namespace()
    if namespace is None:
        pytest.skip("no /proc/self/ns/pid")
    dead_pid = 2**22 + 12345  # above pid_max's default: never a running process
    orphan = tmp_path / f"hybrid-ext-{namespace}-{dead_pid}-{'a' * 32}-r0"
    alive = tmp_path / f"hybrid-ext-{namespace}-{os.getpid()}-{'b' * 32}-r1"
    foreign = tmp_path / f"hybrid-ext-{namespace + 1}-{dead_pid}-{'c' * 32}-r0"
    unrelated = tmp_path / "hybrid-ext-something-else"
    for path in (orphan, alive, foreign, unrelated):
        path.write_bytes(b"x")
    assert shm_transport.remove_orphans(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, foreign, unrelated))


SOAK_ROUNDS = 3  # x 18 cases (9 phases x 2 transports) = 54 killed-rank jobs


@pytest.mark.timeout(7200)
def test_soak_many_killed_ranks_leave_no_hang_and_no_file(spawn_ranks, tmp_path, soak):
    if not soak:
        pytest.skip("the long version of the killed-rank tests: pytest --soak (tox -e soak)")
    jobs, survivors, slowest, pids = 0, 0, 0.0, []
    for round_ in range(SOAK_ROUNDS):
        for transport in ("shm", "torch"):
            for algorithm, victim, phase in KILL_CASES:
                outdir = tmp_path / f"{round_}-{transport}-{algorithm}-{victim}-{phase}"
                result = run_kill_case(spawn_ranks, outdir, transport, algorithm, victim, phase)
                jobs += 1
                survivors += len(result["outcomes"])
                slowest = max([slowest, *(o["seconds"] for o in result["outcomes"].values())])
                pids += [int((outdir / f"rank{r}.pid").read_text()) for r in range(WORLD)]
    assert our_files(pids) == []
    print(
        f"killed-rank soak: {jobs} jobs, {jobs} ranks killed, {survivors} survivors raised PeerError naming the dead "
        f"rank (slowest {slowest:.1f}s), 0 hangs, {len(our_files(pids))} files left in /dev/shm"
    )


def _first_step_fails_rank(rank: int, p: int, wire_dtype: str | None, outdir: str) -> None:
    hybrid_ext.allreduce(torch.ones(8))
    faulty = KillBeforeStep(communicator(None, torch.device("cpu")).transport)
    # 16 MiB: the first step's message spans several 1 MiB shared-memory slots, and its first quarter (what the
    # victim sends before it dies) is whole slots — a dying sender publishes whole chunks only.
    n = 1 << 22
    if rank == 1:
        faulty.arm(kill_index("rabenseifner", rank, p, n, "reduce_scatter"), partial=True)
    mine = torch.full((n,), 1.0 + 1e-3)  # not a bfloat16 value: rounding it for the wire would change it
    before = mine.clone()
    try:
        hybrid_ext.allreduce(mine, algorithm="rabenseifner", group=faulty, wire_dtype=wire_dtype)
        outcome = "no error"
    except hybrid_ext.PeerError:
        outcome = "unchanged" if torch.equal(mine, before) else "changed"
    Path(outdir, f"rank{rank}.txt").write_text(outcome)
    os._exit(0)


@pytest.mark.parametrize("wire_dtype", [None, "bfloat16"], ids=["fused-shm-reduction", "16-bit-wire"])
def test_a_collective_that_fails_in_its_first_step_leaves_the_callers_tensor_unchanged(
    spawn_ranks, tmp_path, wire_dtype
):
    # The peer dies a quarter into its first message: the shared-memory transport could already have reduced
    # that quarter into the caller's tensor, and a 16-bit wire could already have rounded it.
    with pytest.raises(LaunchError, match="rank 1 failed first"):
        spawn_ranks(
            _first_step_fails_rank, 2, wire_dtype, str(tmp_path), pg_timeout=GROUP_TIMEOUT, timeout=120,
            failure_grace=GROUP_TIMEOUT + 30, env={"HYBRID_EXT_TRANSPORT": "shm"},
        )  # fmt: skip
    assert (tmp_path / "rank0.txt").read_text() == "unchanged"
