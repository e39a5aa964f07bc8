"""Run real launcher jobs on this host — ``horovodrun``, ``deepspeed``, ``torchrun`` — with a hard timeout.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybrid_ext.launch.errors import LOG_TAIL_CHARS, LaunchError, LaunchTimeout
from hybrid_ext.launch.results import RESULT_DIR_ENV, load_result


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
        return [load_result(Path(tmp), rank) for rank in range(np)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher and everything it started, including ranks in sessions of their own."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
