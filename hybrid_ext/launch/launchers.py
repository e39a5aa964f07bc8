"""Run real launcher jobs — ``horovodrun``, ``deepspeed``, ``torchrun`` — on this host or across the hosts of an
emulated cluster (:mod:`hybrid_ext.launch.cluster`), with a hard timeout.

Each rank hands back its result with :func:`~hybrid_ext.launch.results.report_result`; a failure or hang
raises :class:`~hybrid_ext.launch.errors.LaunchError` / :class:`~hybrid_ext.launch.errors.LaunchTimeout` with the
job's output tail, and no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_ext.launch.errors import LOG_TAIL_CHARS, LaunchError, LaunchTimeout
from hybrid_ext.launch.results import RESULT_DIR_ENV, load_result

if TYPE_CHECKING:
    from hybrid_ext.launch.cluster import Cluster

MASTER_PORT = 29500  # the rendezvous port on an emulated cluster's first host (its namespace has no other use)
# What a DeepSpeed job forwards to the other hosts besides the job's own variables (DeepSpeed itself forwards
# PYTHON*, NCCL_* and a few more).
_FORWARDED = ("PATH", "OMP_NUM_THREADS", RESULT_DIR_ENV, "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


def run_horovodrun(
    command: Sequence[str],
    np: int,
    *,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    cluster: Cluster | None = None,
    nodes: int | None = None,
) -> list[Any]:
    """Run ``horovodrun -np N -H localhost:N --gloo <command>``; return each rank's reported result.

    With ``cluster`` (an emulated cluster, :mod:`hybrid_ext.launch.cluster`): ``horovodrun -np N -H
    node0:k,node1:k --gloo --network-interface eth0 <command>`` over its first ``nodes`` hosts (default: all),
    started on node0 as on a real cluster's first node; Horovod reaches the other hosts over ssh.
    """
    if cluster is None:
        launcher = [launcher_path("horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    else:
        hosts = ",".join(f"{name}:{per_host}" for name, per_host in _spread(np, cluster, nodes))
        launcher = [launcher_path("horovodrun"), "-np", str(np), "-H", hosts, "--gloo",
                    "--network-interface", cluster.interface]  # fmt: skip
    used = [name for name, _ in _spread(np, cluster, nodes)] if cluster is not None else None
    return _run_launcher(lambda workdir, job_env: [launcher + list(command)], np, timeout, env, cluster, hosts=used)


def run_deepspeed(
    command: Sequence[str],
    np: int,
    *,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    cluster: Cluster | None = None,
    nodes: int | None = None,
) -> list[Any]:
    """Run ``deepspeed --num_gpus N <command>`` on CPU (gloo); return each rank's reported result.

    ``command`` is what follows the launcher's own options: ``["script.py", "--arg"]`` or
    ``["--module", "package.module", "--arg"]``. The launcher adds ``--local_rank=N`` to the script's
    arguments. With ``cluster``: ``deepspeed --hostfile HOSTFILE --master_addr node0 <command>`` started on node0
    (DeepSpeed's multi-node launch: pdsh over ssh); the job's environment reaches the other hosts through the
    file DeepSpeed reads for that (``DS_ENV_FILE``, a ``.deepspeed_env``).
    """
    port = free_port() if cluster is None else MASTER_PORT
    job_env = {"DS_ACCELERATOR": "cpu", **(env or {})}

    def commands(workdir: Path, full_env: dict[str, str]) -> list[list[str]]:
        if cluster is None:
            return [[launcher_path("deepspeed"), "--num_gpus", str(np), "--master_port", str(port), *command]]
        hostfile = workdir / "hostfile"
        hostfile.write_text("".join(f"{name} slots={n}\n" for name, n in _spread(np, cluster, nodes)))
        env_file = workdir / "deepspeed_env"
        forwarded = {
            k: v for k, v in full_env.items() if k in job_env or k in _FORWARDED or k.startswith("HYBRID_EXT_")
        }
        env_file.write_text("".join(f"{k}={v}\n" for k, v in forwarded.items()))
        full_env["DS_ENV_FILE"] = str(env_file)
        master = cluster.names[0]
        return [[launcher_path("deepspeed"), "--hostfile", str(hostfile), "--master_addr", master,
                 "--master_port", str(port), *command]]  # fmt: skip

    try:
        used = [name for name, _ in _spread(np, cluster, nodes)] if cluster is not None else None
        return _run_launcher(commands, np, timeout, job_env, cluster, hosts=used)
    finally:
        # DeepSpeed's CPU accelerator maps a ~70 MB buffer per rank in /dev/shm and never unlinks it, so every
        # job would leave its buffers behind in RAM; they are named after the job's master port.
        pattern = f"deepspeed_allreduce_buffer_*_{port}_*"
        if cluster is None:
            for leftover in Path("/dev/shm").glob(pattern):
                leftover.unlink(missing_ok=True)
        else:
            for name in cluster.names:
                cluster.run(name, ["sh", "-c", f"rm -f /dev/shm/{pattern}"], capture_output=True)


def run_torchrun(
    command: Sequence[str],
    np: int,
    *,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    cluster: Cluster | None = None,
    nodes: int | None = None,
    rendezvous: str = "static",
    launcher_args: Sequence[str] = (),
    log: str | os.PathLike | None = None,
) -> list[Any]:
    """Run ``torchrun --nproc_per_node N --master_port P <command>``; return each rank's reported result.

    ``launcher_args`` go to torchrun before the command (``["--max-restarts", "1"]``); ``log``: a file that gets
    the launcher's whole output (torchrun's own lines included), kept after the job.

    With ``cluster``: one torchrun per host, as on a real cluster — ``rendezvous="static"``: ``torchrun --nnodes
    H --nproc-per-node k --node-rank i --master-addr node0 --master-port 29500``; ``"c10d"``: ``torchrun
    --nnodes H --nproc-per-node k --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id ID``, the same
    command on every host.
    """
    if cluster is None:
        launcher = [launcher_path("torchrun"), "--nproc_per_node", str(np), "--master_port", str(free_port())]
        launcher += list(launcher_args)
        return _run_launcher(lambda workdir, job_env: [launcher + list(command)], np, timeout, env, None, log=log)
    if rendezvous not in ("static", "c10d"):
        raise ValueError(f"rendezvous must be 'static' or 'c10d', got {rendezvous!r}")
    spread = _spread(np, cluster, nodes)
    master = spread[0][0]

    def commands(workdir: Path, job_env: dict[str, str]) -> list[list[str]]:
        per_host = []
        for node_rank, (name, n) in enumerate(spread):
            launcher = [launcher_path("torchrun"), "--nnodes", str(len(spread)), "--nproc-per-node", str(n)]
            if rendezvous == "static":
                launcher += ["--node-rank", str(node_rank), "--master-addr", master, "--master-port", str(MASTER_PORT)]
            else:
                launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master}:{MASTER_PORT}",
                             "--rdzv-id", workdir.name]  # fmt: skip
            per_host.append(cluster.command(name, launcher + list(launcher_args) + list(command)))
        return per_host

    used = [name for name, _ in spread]
    return _run_launcher(commands, np, timeout, env, cluster, on_host=False, log=log, hosts=used)


def free_port() -> int:
    """A TCP port free right now (for launchers that bind it themselves; a small race is unavoidable)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_path(name: str) -> str:
    # Prefer the launcher installed next to this interpreter (a venv's bin/), then PATH.
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _spread(np: int, cluster: Cluster, nodes: int | None) -> list[tuple[str, int]]:
    """(host, ranks on it) for ``np`` ranks spread over the cluster's first ``nodes`` hosts: evenly, or with one
    more rank on each of the first hosts where ``np`` does not divide (5 over 2: 3 + 2, as unequal nodes are)."""
    names = cluster.names[: nodes or len(cluster.names)]
    if nodes is not None and nodes > len(cluster.names):
        raise ValueError(f"{nodes} nodes asked for, but the cluster has {len(cluster.names)}: {', '.join(names)}")
    if np < len(names):
        raise ValueError(f"{np} ranks cannot fill {len(names)} hosts ({', '.join(names)}): give each at least one")
    return list(zip(names, ranks_per_host(np, len(names))))


def ranks_per_host(np: int, hosts: int) -> list[int]:
    """How many of ``np`` ranks each of ``hosts`` hosts runs: evenly, or one more on each of the first hosts."""
    base, extra = divmod(np, hosts)
    return [base + (index < extra) for index in range(hosts)]


def _run_launcher(
    commands: Callable[[Path, dict[str, str]], list[list[str]]],
    np: int,
    timeout: float,
    env: dict[str, str] | None,
    cluster: Cluster | None,
    *,
    on_host: bool = True,
    log: str | os.PathLike | None = None,
    hosts: Sequence[str] | None = None,
) -> list[Any]:
    """Run the launcher command(s) ``commands(workdir, job_env)`` gives, side by side; collect ``np`` results.

    With ``cluster`` and ``on_host``, the (single) command runs on the cluster's first host. Once one command
    fails, the others get a short grace and are killed. ``log``: where to copy the commands' whole output.
    ``hosts``: the cluster hosts the job runs on; what it leaves running there is killed afterwards (only there:
    other jobs may use the other hosts).
    """
    with tempfile.TemporaryDirectory(prefix="hybrid-ext-job-") as tmp:
        workdir = Path(tmp)
        job_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), RESULT_DIR_ENV: tmp}
        job_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{job_env.get('PATH', '')}"
        argvs = commands(workdir, job_env)
        if cluster is not None and on_host:
            argvs = [cluster.command(cluster.names[0], argv) for argv in argvs]
        described = " & ".join(" ".join(argv) for argv in argvs)
        logs = [workdir / f"launcher{i}.log" for i in range(len(argvs))]
        procs = []
        try:
            for argv, path in zip(argvs, logs):
                with open(path, "w") as out:
                    procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=job_env,
                                                  text=True, start_new_session=True))  # fmt: skip
            timed_out = not _wait_all(procs, time.monotonic() + timeout)
        finally:
            for proc in procs:
                _kill_tree(proc)
                proc.wait()
            if cluster is not None:
                cluster.kill_strays(hosts)  # ranks the launcher started over ssh on other hosts
        if log is not None:
            Path(log).write_text("\n".join(path.read_text(errors="replace") for path in logs))
        output = "\n".join(path.read_text(errors="replace")[-LOG_TAIL_CHARS:] for path in logs)
        if timed_out:
            raise LaunchTimeout(
                f"`{described}` did not finish within {timeout:.0f}s: killed.\noutput (tail):\n{output}"
            )
        missing = [r for r in range(np) if not (workdir / f"rank{r}.result").exists()]
        codes = [proc.returncode for proc in procs]
        if any(codes) or missing:
            raise LaunchError(
                f"`{described}` exited with {codes if len(codes) > 1 else codes[0]}; ranks without a result: "
                f"{missing}\noutput (tail):\n{output}"
            )
        return [load_result(workdir, rank) for rank in range(np)]


def _wait_all(procs: list[subprocess.Popen], deadline: float, grace: float = 20.0) -> bool:
    """Wait for every process; False on the deadline. After a failure the rest get ``grace`` seconds."""
    # Poll every process on each round (``any`` over a generator would stop at the first still running, and a
    # later one's failure would go unseen until the deadline).
    while [p.poll() for p in procs].count(None):
        now = time.monotonic()
        if now > deadline:
            return False
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, now + grace)
        time.sleep(0.05)
    return True


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher and everything it started, including ranks in sessions of their own."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
