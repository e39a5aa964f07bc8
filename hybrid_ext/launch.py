"""Start several ranks on this machine and collect what each one returns — with a hard timeout.

Three ways to start ranks, used by the CLI (demo, bench) and by the tests:

- :func:`spawn` runs a Python function on N local processes joined in a torch.distributed process group
  (gloo by default). No launcher needed.
- :func:`run_horovodrun` runs a real ``horovodrun -np N -H localhost:N --gloo ...`` job.
- :func:`run_deepspeed` runs a real ``deepspeed --num_gpus N ...`` job (on CPU: ``DS_ACCELERATOR=cpu``, gloo).

In the launcher-based jobs each rank hands back its result with :func:`report_result`.

Whatever goes wrong — a rank raises, a rank dies, the job hangs — the caller gets a :class:`LaunchError`
(:class:`LaunchTimeout` for a hang) carrying every rank's traceback and the tail of its output, and no
process is left behind. On a hang, :func:`spawn` also shows where each rank was: every thread's Python stack
(faulthandler, on ``SIGUSR1``; a thread shown with no Python frame is native code holding a Python thread state,
e.g. a gloo worker waiting for the GIL).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

RESULT_DIR_ENV = "HYBRID_EXT_RESULT_DIR"
LOG_TAIL_CHARS = 4000
STACKS_SIGNAL = getattr(signal, "SIGUSR1", None)  # a hung rank dumps every thread's Python stack on it
STACKS_WAIT = 2.0  # seconds the ranks get to write their stacks before they are killed


class LaunchError(RuntimeError):
    """A multi-rank job failed; the message holds each failing rank's traceback and output tail."""


class LaunchTimeout(LaunchError):
    """A multi-rank job did not finish within its timeout (a hang); every rank was killed."""


# --------------------------------------------------------------------------------------------------
# spawn: a function on N local processes


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str | None = "gloo",
    pg_timeout: float | None = None,
    threads: int | None = 1,
    env: dict[str, str] | None = None,
    capture_output: bool = True,
    failure_grace: float = 5.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return their results by rank.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level). With ``backend`` set, each rank
    joins a process group of that backend before ``fn`` runs (and leaves it after); the rendezvous store is
    held by this process on a port the OS picked, so no port can be taken between choosing and binding it.
    ``pg_timeout`` (default: ``timeout``) is the process group's own timeout for collectives.
    ``threads`` sets each rank's torch intra-op threads (one compute thread each by default, so that N ranks
    on N cores do not oversubscribe). Once one rank fails, the others get ``failure_grace`` seconds to finish
    or fail before they are killed.
    """
    import multiprocessing

    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="hybrid-ext-spawn-") as tmp:
        workdir = Path(tmp)
        spec = _RankSpec(fn, args, world_size, backend, store.port, pg_timeout or timeout, threads, env or {})
        procs = [
            ctx.Process(target=_rank_main, args=(spec, rank, str(workdir), capture_output), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait_for_ranks(procs, workdir, timeout, failure_grace)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
            del store
        return [_load_result(workdir, rank) for rank in range(world_size)]


class _RankSpec:
    def __init__(self, fn, args, world_size, backend, port, pg_timeout, threads, env):
        self.fn, self.args, self.world_size, self.backend = fn, args, world_size, backend
        self.port, self.pg_timeout, self.threads, self.env = port, pg_timeout, threads, env


def _rank_main(spec: _RankSpec, rank: int, workdir: str, capture_output: bool) -> None:
    out = Path(workdir)
    if capture_output:
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - lives as long as the process
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if STACKS_SIGNAL is not None:  # on a timeout, spawn asks for every thread's stack (see _dump_stacks)
        stacks = open(out / f"rank{rank}.stacks", "w")  # noqa: SIM115 - lives as long as the process
        faulthandler.register(STACKS_SIGNAL, file=stacks, all_threads=True)
    os.environ.update(spec.env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec.world_size), LOCAL_WORLD_SIZE=str(spec.world_size)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.port))
    try:
        import torch
        import torch.distributed as dist

        if spec.threads:
            torch.set_num_threads(spec.threads)
        if spec.backend:
            store = dist.TCPStore("127.0.0.1", spec.port, is_master=False, timeout=timedelta(seconds=spec.pg_timeout))
            dist.init_process_group(
                spec.backend,
                store=store,
                rank=rank,
                world_size=spec.world_size,
                timeout=timedelta(seconds=spec.pg_timeout),
            )
        result = spec.fn(rank, spec.world_size, *spec.args)
        _save(out / f"rank{rank}.result", result)
        if spec.backend and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip atexit handlers that could block on a dead peer
    sys.stdout.flush()
    sys.stderr.flush()


def _wait_for_ranks(procs, workdir: Path, timeout: float, failure_grace: float) -> None:
    deadline = time.monotonic() + timeout
    failed_in_order: list[int] = []  # the first rank to fail is usually the cause; the others follow it
    first_failure = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        for rank, proc in enumerate(procs):
            if proc.exitcode not in (None, 0) and rank not in failed_in_order:
                failed_in_order.append(rank)
        if failed_in_order and first_failure is None:
            first_failure = now
        if first_failure is not None and now - first_failure > failure_grace:
            break
        if now > deadline:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            _dump_stacks(procs, workdir)
            raise LaunchTimeout(
                f"{len(hung)} of {len(procs)} ranks still running after {timeout:.0f}s "
                f"(ranks {hung}): killed.\n" + _describe_ranks(procs, workdir)
            )
        time.sleep(0.02)
    failed_in_order += [r for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in failed_in_order]
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    if failed_in_order or alive:
        summary = f"rank {failed_in_order[0]} failed first" if failed_in_order else "a rank failed"
        if len(failed_in_order) > 1:
            summary += f", then ranks {failed_in_order[1:]}"
        if alive:
            summary += f"; ranks {alive} were still running and were killed"
        raise LaunchError(summary + "\n" + _describe_ranks(procs, workdir))


def _dump_stacks(procs, workdir: Path) -> None:
    """Ask every rank still running to write each thread's Python stack (``rank<N>.stacks``)."""
    if STACKS_SIGNAL is None:
        return
    asked = []
    for rank, proc in enumerate(procs):
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, STACKS_SIGNAL)
                asked.append(workdir / f"rank{rank}.stacks")
    deadline = time.monotonic() + STACKS_WAIT
    while time.monotonic() < deadline and not all(p.exists() and p.stat().st_size for p in asked):
        time.sleep(0.05)
    time.sleep(0.1)  # let the last thread's frames land


def _describe_ranks(procs, workdir: Path) -> str:
    parts = []
    for rank, proc in enumerate(procs):
        state = "running" if proc.is_alive() else f"exit code {proc.exitcode}"
        if STACKS_SIGNAL is not None and proc.exitcode == -STACKS_SIGNAL:
            state += ": killed by the stack-dump request, so it had no handler: still starting up or shutting down"
        parts.append(f"--- rank {rank} ({state}) ---")
        error = workdir / f"rank{rank}.error"
        if error.exists():
            parts.append(error.read_text().rstrip())
        stacks = workdir / f"rank{rank}.stacks"
        if proc.is_alive() and stacks.exists() and stacks.stat().st_size:
            parts.append("stacks at the timeout:\n" + stacks.read_text(errors="replace")[: 2 * LOG_TAIL_CHARS].rstrip())
        log = workdir / f"rank{rank}.log"
        if log.exists() and log.stat().st_size:
            parts.append("output (tail):\n" + log.read_text(errors="replace")[-LOG_TAIL_CHARS:].rstrip())
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# launcher jobs: horovodrun and deepspeed


def report_result(result: Any, rank: int | None = None) -> None:
    """Hand this rank's result back to :func:`run_horovodrun` / :func:`run_deepspeed` (no-op outside them)."""
    directory = os.environ.get(RESULT_DIR_ENV)
    if not directory:
        return
    if rank is None:
        rank = current_rank()
    _save(Path(directory) / f"rank{rank}.result", result)


def current_rank() -> int:
    """This process's global rank as set by whichever launcher started it (Horovod, torchrun, DeepSpeed)."""
    for var in ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    raise RuntimeError("no launcher rank variable set (HOROVOD_RANK, RANK, OMPI_COMM_WORLD_RANK)")


def run_horovodrun(
    command: Sequence[str], np: int, *, timeout: float = 180.0, env: dict[str, str] | None = None
) -> list[Any]:
    """Run ``horovodrun -np N -H localhost:N --gloo <command>``; return each rank's reported result."""
    launcher = [launcher_path("horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    return _run_launcher(launcher + list(command), np, timeout=timeout, env=env)


def run_deepspeed(
    command: Sequence[str], np: int, *, timeout: float = 240.0, env: dict[str, str] | None = None
) -> list[Any]:
    """Run ``deepspeed --num_gpus N <command>`` on CPU (gloo); return each rank's reported result.

    ``command`` is what follows the launcher's own options: ``["script.py", "--arg"]`` or
    ``["--module", "package.module", "--arg"]``. The launcher adds ``--local_rank=N`` to the script's
    arguments.
    """
    port = free_port()
    launcher = [launcher_path("deepspeed"), "--num_gpus", str(np), "--master_port", str(port)]
    job_env = {"DS_ACCELERATOR": "cpu", **(env or {})}
    try:
        return _run_launcher(launcher + list(command), np, timeout=timeout, env=job_env)
    finally:
        # DeepSpeed's CPU accelerator maps a ~70 MB buffer per rank in /dev/shm and never unlinks it, so every
        # job would leave its buffers behind in RAM; they are named after the job's master port.
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)


def run_torchrun(
    command: Sequence[str], np: int, *, timeout: float = 240.0, env: dict[str, str] | None = None
) -> list[Any]:
    """Run ``torchrun --nproc_per_node N --master_port P <command>``; return each rank's reported result."""
    launcher = [launcher_path("torchrun"), "--nproc_per_node", str(np), "--master_port", str(free_port())]
    return _run_launcher(launcher + list(command), np, timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port free right now (for launchers that bind it themselves; a small race is unavoidable)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_path(name: str) -> str:
    # Prefer the launcher installed next to this interpreter (a venv's bin/), then PATH.
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _run_launcher(command: list[str], np: int, *, timeout: float, env: dict[str, str] | None) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="hybrid-ext-job-") as tmp:
        job_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), RESULT_DIR_ENV: tmp}
        job_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{job_env.get('PATH', '')}"
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=job_env, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            output, _ = proc.communicate()
            raise LaunchTimeout(
                f"`{' '.join(command)}` did not finish within {timeout:.0f}s: killed.\n"
                f"output (tail):\n{output[-LOG_TAIL_CHARS:]}"
            ) from None
        finally:
            _kill_tree(proc)
        missing = [r for r in range(np) if not (Path(tmp) / f"rank{r}.result").exists()]
        if proc.returncode != 0 or missing:
            raise LaunchError(
                f"`{' '.join(command)}` exited with {proc.returncode}; ranks without a result: {missing}\n"
                f"output (tail):\n{output[-LOG_TAIL_CHARS:]}"
            )
        return [_load_result(Path(tmp), rank) for rank in range(np)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher and everything it started, including ranks in sessions of their own."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# results on disk (torch.save: tensors and plain Python objects alike)


def _save(path: Path, obj: Any) -> None:
    import torch

    tmp = path.with_suffix(".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_result(workdir: Path, rank: int) -> Any:
    import torch

    return torch.load(workdir / f"rank{rank}.result", weights_only=False)
