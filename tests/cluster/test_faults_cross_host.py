"""Faults across the hosts of the emulated cluster (2 hosts x 2 ranks under ``torchrun --nnodes 2``: shared memory
within each host, gloo between them), and a ``/dev/shm`` too small for the shared-memory transport.

- **Dead rank on another host**: node1's first rank SIGKILLs itself entering a recursive-doubling allreduce.
  Every other rank — its host-mate, the rank on node0 that exchanges with it, and the one that never does —
  raises :class:`hybrid_ext.PeerError` naming it and its host within the group timeout; no shared-memory file
  of ours is left on either host.
- **Dead rank in each phase across hosts**: a rank SIGKILLed entering each phase of the hierarchical allreduce
  (reduce-scatter within a host, the exchanges between hosts, all-gather within a host) and of the flat schedules
  whose steps cross hosts (the non-power-of-two fold and unfold, the ring), on the world (2 + 2 ranks) and on a
  3-rank group split 1 + 2 over the hosts (so the fold's whole-vector exchange crosses them): every other rank of
  the group raises ``PeerError`` naming the dead rank and its host within the group timeout, even a rank that
  only ever waits on a survivor; no shared-memory file of ours left. The same for a rank killed mid-way through
  a segmented hierarchical allreduce (network and shared-memory stages on two threads). ``--soak`` repeats the
  matrix (54 jobs).
- **Cut link**: node1's ``eth0`` is taken down while every rank runs allreduces. The ranks on both hosts raise
  ``PeerError`` naming the other host within the group timeout (plus the time a host-mate takes to notice). The
  link is always brought back up (and a watchdog inside node1 brings it up should this process die), and the
  test checks that the cluster answers again, with its routes and queueing discipline as they were.
- **Small /dev/shm**: two ranks in a mount namespace of their own whose ``/dev/shm`` is a 1 MiB tmpfs reduce
  4 MiB: set-up falls back to gloo (never a SIGBUS), the result is exact; with ``HYBRID_EXT_TRANSPORT=shm`` set-up
  fails with a message that says why.

The jobs use node0 and node1 only (a view of the cluster with its first two hosts, so that cleaning up after a
job never touches the processes of other hosts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hybrid_ext.comm.transports import shm as shm_transport
from hybrid_ext.launch import LaunchError, launcher_path, run_torchrun
from hybrid_ext.launch.cluster import Cluster

from helpers import HELPERS
from helpers.fault_injection import phases

pytestmark = pytest.mark.multiprocess

WORKER = str(HELPERS / "cross_host_fault_worker.py")
NP = 4
VICTIM = 2  # as in the worker: node1's first rank
COUNT = 1 << 16  # as in the worker
GROUP_TIMEOUT = 20.0
JOB_TIMEOUT = 150.0
ENV = {"HX_FAULT_GROUP_TIMEOUT": str(GROUP_TIMEOUT)}


class _FirstHosts(Cluster):
    """The emulated cluster seen as its first ``count`` hosts only."""

    def __init__(self, cluster: Cluster, count: int) -> None:
        super().__init__(cluster.state_dir)
        self.count = count

    @property
    def hosts(self):
        return super().hosts[: self.count]


@pytest.fixture
def two_hosts(cluster) -> Cluster:
    return _FirstHosts(cluster, 2)


def _read(directory: Path, suffix: str) -> dict[int, dict]:
    return {r: json.loads(p.read_text()) for r in range(NP) if (p := directory / f"rank{r}{suffix}").exists()}


def _our_files_on(cluster: Cluster, infos: dict[int, dict]) -> list[str]:
    """Our shared-memory files left in any host's /dev/shm by the job's ranks (names carry the creator's pid)."""
    left = []
    for host in cluster.names:
        listing = cluster.run(host, ["ls", "-1", str(shm_transport.SHM_DIR)], capture_output=True, text=True)
        pids = [info["pid"] for info in infos.values() if info["host"] == host]
        left += [
            f"{host}:{name}"
            for name in listing.stdout.split()
            if name.startswith(shm_transport.FILE_PREFIX) and any(f"-{pid}-" in name for pid in pids)
        ]
    return left


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_rank_killed_on_another_host_is_named_with_its_host_by_every_other_rank(two_hosts, tmp_path):
    with pytest.raises(LaunchError, match="exited with"):  # the victim's host failed
        run_torchrun([WORKER, "kill", str(tmp_path)], NP, cluster=two_hosts, env=ENV, timeout=JOB_TIMEOUT)
    infos, outcomes = _read(tmp_path, ".info"), _read(tmp_path, ".json")
    assert [infos[r]["host"] for r in range(NP)] == ["node0", "node0", "node1", "node1"], infos
    assert VICTIM not in outcomes, "the victim was not killed"
    for rank in range(NP):
        if rank == VICTIM:
            continue
        outcome = outcomes[rank]
        assert outcome["error"] == "PeerError", f"rank {rank}: {outcome}"
        message = outcome["message"]
        assert f"rank {VICTIM} " in message and "node1" in message, f"rank {rank}: {message}"
        assert outcome["seconds"] < GROUP_TIMEOUT, f"rank {rank}: {outcome}"
    assert _our_files_on(two_hosts, infos) == [], "shared-memory files left behind"


HOSTS = ("node0", "node0", "node1", "node1")  # the world rank's host: torchrun gives node0 the first ranks
WORLD = (0, 1, 2, 3)
SPLIT = (0, 2, 3)  # one rank on node0, two on node1: unequal hosts, and the fold pairs group ranks 0 and 1 across
# (members, algorithm, victim's group rank, phase it dies entering): every phase of the hierarchical schedules,
# and the flat phases whose messages cross hosts, with victims on both hosts.
PHASE_CASES = [
    (WORLD, "hierarchical/rabenseifner", 1, "host reduce_scatter"),
    (WORLD, "hierarchical/rabenseifner", 2, "hosts reduce_scatter"),
    (WORLD, "hierarchical/rabenseifner", 3, "hosts allgather"),
    (WORLD, "hierarchical/ring", 0, "host allgather"),
    (WORLD, "hierarchical/recursive_doubling", 1, "hosts exchange"),
    (SPLIT, "hierarchical/ring", 0, "hosts allgather"),
    (SPLIT, "rabenseifner", 0, "fold"),
    (SPLIT, "rabenseifner", 1, "unfold"),
    (SPLIT, "ring", 2, "reduce_scatter"),
]
SOAK_ROUNDS = 6  # x 9 cases = 54 jobs


def _case_id(case) -> str:
    members, algorithm, victim, phase = case
    return f"{'world' if members == WORLD else 'split'}-{algorithm}-r{victim}-{phase}".replace(" ", "_").replace(
        "/", "-"
    )


def test_the_cross_host_kill_cases_cover_every_phase_of_the_hierarchical_schedules():
    hosts = tuple(int(h[-1]) for h in HOSTS)
    every = {
        p for inter in ("recursive_doubling", "rabenseifner", "ring") for r in WORLD
        for p in phases(f"hierarchical/{inter}", r, len(WORLD), COUNT, hosts)
    }  # fmt: skip
    assert every == {"host reduce_scatter", "hosts exchange", "hosts reduce_scatter", "hosts allgather",
                     "host allgather"}  # fmt: skip
    assert every <= {p for members, _, _, p in PHASE_CASES if members == WORLD}
    for members, algorithm, victim, phase in PHASE_CASES:
        layout = tuple(int(HOSTS[m][-1]) for m in members)
        assert phase in phases(algorithm, victim, len(members), COUNT, layout), (algorithm, victim, phase)
    assert HOSTS[SPLIT[0]] != HOSTS[SPLIT[1]]  # the fold's and unfold's partners are on different hosts


def run_phase_case(cluster: Cluster, outdir: Path, case, env: dict[str, str] | None = None) -> dict:
    """One job: the case's victim dies entering its phase; check every other group rank's outcome."""
    members, algorithm, victim, phase = case
    outdir.mkdir(parents=True, exist_ok=True)
    argv = [WORKER, "phase", str(outdir), algorithm, str(victim), phase, ",".join(map(str, members))]
    with pytest.raises(LaunchError, match="exited with"):  # the victim's host failed
        run_torchrun(argv, NP, cluster=cluster, env={**ENV, **(env or {})}, timeout=JOB_TIMEOUT)
    infos, outcomes = _read(outdir, ".info"), _read(outdir, ".json")
    assert tuple(infos[r]["host"] for r in range(NP)) == HOSTS, infos
    dead = members[victim]
    assert dead not in outcomes, f"the victim was not killed: {outcomes.get(dead)}"
    survivors = {}
    for rank in (r for r in members if r != dead):
        outcome = outcomes[rank]
        assert outcome["error"] == "PeerError", f"rank {rank}: {outcome}"
        message = outcome["message"]
        assert f"rank {victim} " in message and HOSTS[dead] in message, f"rank {rank} ({_case_id(case)}): {message}"
        assert outcome["seconds"] < GROUP_TIMEOUT, f"rank {rank}: {outcome}"
        survivors[rank] = outcome
    assert _our_files_on(cluster, infos) == [], "shared-memory files left behind"
    return survivors


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("case", PHASE_CASES, ids=_case_id)
def test_a_rank_killed_in_any_phase_across_hosts_is_named_with_its_host(two_hosts, tmp_path, case):
    run_phase_case(two_hosts, tmp_path, case)


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("victim, call", [(1, 20), (2, 7)], ids=["node0-late", "node1-early"])
def test_a_rank_killed_mid_segmented_allreduce_is_named_on_both_threads(two_hosts, tmp_path, victim, call):
    # 16 KiB segments: the 256 KiB allreduce runs as 16 segments, its network stages on a helper thread while the
    # shared-memory stages run on the caller's; the victim dies at its call-th exchange, on either thread.
    case = (WORLD, "hierarchical/rabenseifner", victim, f"call:{call}")
    run_phase_case(two_hosts, tmp_path, case, env={"HYBRID_EXT_SEGMENT_BYTES": "16384"})


@pytest.mark.timeout(7200)
def test_soak_killed_ranks_across_hosts_leave_no_hang_and_no_file(two_hosts, tmp_path, soak):
    if not soak:
        pytest.skip("the long version of the cross-host killed-rank tests: pytest --soak (tox -e soak)")
    jobs, survivors, slowest = 0, 0, 0.0
    for round_ in range(SOAK_ROUNDS):
        for case in PHASE_CASES:
            outcomes = run_phase_case(two_hosts, tmp_path / f"{round_}-{_case_id(case)}", case)
            jobs += 1
            survivors += len(outcomes)
            slowest = max([slowest, *(o["seconds"] for o in outcomes.values())])
    print(
        f"cross-host killed-rank soak: {jobs} jobs on 2 hosts, {jobs} ranks killed, {survivors} survivors raised "
        f"PeerError naming the dead rank and its host (slowest {slowest:.1f}s), 0 hangs, 0 files left in /dev/shm"
    )


def _host_network(cluster: Cluster, host: str) -> str:
    """What the link cut must leave as it was: the host's addresses, routes and queueing discipline."""
    shown = [cluster.run(host, argv, capture_output=True, text=True, check=True).stdout
             for argv in (["ip", "-4", "addr", "show", "dev", cluster.interface], ["ip", "route"],
                          ["tc", "qdisc", "show", "dev", cluster.interface])]  # fmt: skip
    return "\n".join(line for line in "".join(shown).splitlines() if "valid_lft" not in line)


def _answers(cluster: Cluster, src: str, dst: str, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = cluster.run(src, ["ssh", dst, "hostname"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip() == dst:
            return True
        time.sleep(0.5)
    return False


def _wait_for(paths: list[Path], deadline: float, job: threading.Thread) -> bool:
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return True
        if not job.is_alive():
            return all(p.exists() for p in paths)
        time.sleep(0.1)
    return False


@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_a_cut_link_is_named_on_both_sides_and_the_cluster_works_again(two_hosts, tmp_path):
    cluster, cut = two_hosts, "node1"
    before = _host_network(cluster, cut)
    job: dict = {}

    def run_job() -> None:
        try:
            job["result"] = run_torchrun([WORKER, "cut", str(tmp_path)], NP, cluster=cluster, env=ENV,
                                         timeout=JOB_TIMEOUT)  # fmt: skip
        except LaunchError as exc:  # torchrun's agents may disagree about a job whose ranks all failed
            job["error"] = exc

    thread = threading.Thread(target=run_job, daemon=True)
    thread.start()
    looping = [tmp_path / f"rank{r}.looping" for r in range(NP)]
    assert _wait_for(looping, time.monotonic() + JOB_TIMEOUT, thread), f"the ranks never ran: {job}"
    # Should this process die before its `finally`, a watchdog inside the host brings the link back anyway.
    watchdog = cluster.popen(cut, ["sh", "-c", f"sleep {GROUP_TIMEOUT + 60:.0f}; ip link set {cluster.interface} up"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        cluster.run(cut, ["ip", "link", "set", cluster.interface, "down"], check=True)
        cut_at = time.monotonic()
        outcomes_written = [tmp_path / f"rank{r}.json" for r in range(NP)]
        _wait_for(outcomes_written, cut_at + GROUP_TIMEOUT + 30, thread)
        waited = time.monotonic() - cut_at
    finally:
        cluster.run(cut, ["ip", "link", "set", cluster.interface, "up"], check=True)
        watchdog.kill()
        watchdog.wait()
    thread.join(JOB_TIMEOUT)
    assert not thread.is_alive(), "the job did not end"
    infos, outcomes = _read(tmp_path, ".info"), _read(tmp_path, ".json")
    assert sorted(outcomes) == list(range(NP)), f"ranks without an outcome {waited:.0f}s after the cut: {job}"
    for rank, outcome in outcomes.items():
        other = "node0" if infos[rank]["host"] == cut else cut
        assert outcome["error"] == "PeerError", f"rank {rank}: {outcome}"
        assert other in outcome["message"], f"rank {rank} does not name {other}: {outcome['message']}"
        # A rank waiting on the network raises at the timeout; a host-mate waiting on it within about a second.
        assert outcome["seconds"] < GROUP_TIMEOUT + 5, f"rank {rank}: {outcome}"
    assert _our_files_on(cluster, infos) == [], "shared-memory files left behind"
    # The cluster works again: as it was, and both ways.
    assert _host_network(cluster, cut) == before
    assert _answers(cluster, "node0", cut) and _answers(cluster, cut, "node0")


def _small_shm_job(tmp_path: Path, transport: str) -> subprocess.CompletedProcess:
    """Two ranks under torchrun in a mount namespace whose /dev/shm is a 1 MiB tmpfs."""
    out = tmp_path / transport
    out.mkdir()
    torchrun = [launcher_path("torchrun"), "--standalone", "--nproc-per-node", "2"]
    script = 'mount -t tmpfs -o size=1m,mode=1777 tmpfs /dev/shm && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            *torchrun, WORKER, "small-shm", str(out)]  # fmt: skip
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "HYBRID_EXT_TRANSPORT": transport}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HELPERS.parent), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)


@pytest.mark.timeout(2 * JOB_TIMEOUT + 30)
def test_a_dev_shm_too_small_falls_back_to_the_network_or_fails_at_set_up_never_sigbus(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small /dev/shm in a namespace of its own")
    if not shm_transport.shm_supported():
        pytest.skip("no shared-memory transport on this machine")
    done = _small_shm_job(tmp_path, "auto")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcomes = [json.loads((tmp_path / "auto" / f"rank{r}.json").read_text()) for r in range(2)]
    for outcome in outcomes:
        assert outcome["error"] is None and outcome["exact"], outcome
        assert outcome["transport"] == "torch-gloo", outcome
    assert "shared memory unavailable" in done.stdout + done.stderr and "cannot hold" in done.stdout + done.stderr

    forced = _small_shm_job(tmp_path, "shm")  # shared memory insisted on: a clear error at set-up
    outcomes = [json.loads((tmp_path / "shm" / f"rank{r}.json").read_text()) for r in range(2)]
    for outcome in outcomes:
        assert outcome["error"] == "RuntimeError", outcome
        assert "HYBRID_EXT_TRANSPORT=shm" in outcome["message"] and "cannot hold" in outcome["message"], outcome
    assert "SIGBUS" not in forced.stdout + forced.stderr
