"""Run a Python function on N local processes joined in a torch.distributed process group — with a hard timeout.

Whatever goes wrong — a rank raises, a rank dies, the job hangs — the caller gets a
:class:`~hybrid_ext.launch.errors.LaunchError` (:class:`~hybrid_ext.launch.errors.LaunchTimeout` for a hang)
carrying every rank's traceback and the tail of its output, and no process is left behind. On a hang it also
shows where each rank was: every thread's Python stack (faulthandler, on ``SIGUSR1``; a thread shown with no
Python frame is native code holding a Python thread state, e.g. a gloo worker waiting for the GIL).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from hybrid_ext.launch.errors import LOG_TAIL_CHARS, LaunchError, LaunchTimeout
from hybrid_ext.launch.results import load_result, save_result

STACKS_SIGNAL = getattr(signal, "SIGUSR1", None)  # a hung rank dumps every thread's Python stack on it
STACKS_WAIT = 2.0  # seconds the ranks get to write their stacks before they are killed


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
        return [load_result(workdir, rank) for rank in range(world_size)]


class _RankSpec:
    def __init__(self, fn, args, world_size, backend, port, pg_timeout, threads, env):
        self.fn, self.args, self.world_size, self.backend = fn, args, world_size, backend
        self.port, self.pg_timeout, self.threads, self.env = port, pg_timeout, threads, env


def leave_process_group() -> None:
    """Destroy this process's default group before the interpreter exits, dropping hybrid-ext's communicators first.

    Their transports hold the group: destroying it alone freed nothing, and gloo went down with the interpreter,
    where now and then a rank aborted ("terminate called without an active exception", SIGABRT) after its results
    were in — a benchmark's launched ranks under torchrun, and a spawned test rank in a full ``tox`` run.
    """
    import gc

    import torch.distributed as dist

    from hybrid_ext.comm import registry

    registry.forget_all()
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


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
        if torch.cuda.is_available():  # one GPU per rank, as torchrun users set it (NCCL refuses shared GPUs)
            torch.cuda.set_device(rank % torch.cuda.device_count())
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
        save_result(out / f"rank{rank}.result", result)
        if spec.backend and dist.is_initialized():
            leave_process_group()
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
