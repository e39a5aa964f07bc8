"""Deterministic faults for the tests: a transport that SIGKILLs its own process before a chosen step.

Like TorchFT's failure injector and Horovod's exit schedule (a (rank, step) table consulted by the training loop),
but at the level of one collective: the victim wraps its group's transport, and the wrapper kills the process
when the executor is about to run the chosen step of the plan — so a test names the phase (fold, exchange,
reduce_scatter, allgather, unfold) and the kill lands there on every run.
"""

from __future__ import annotations

import os
import signal

from hybrid_ext.comm import consistency
from hybrid_ext.comm.cost_model import HIERARCHICAL_PREFIX
from hybrid_ext.comm.hierarchy import plan_hierarchical
from hybrid_ext.comm.schedule import Plan, plan_allreduce

# What the communicator reads off a group's transport to plan for hosts (a group that spans them has these).
_LAYOUT_ATTRIBUTES = ("hosts", "local", "network", "local_ranks")


class KillBeforeStep:
    """The transport contract over ``inner``; the ``kill_at``-th exchange (0-based, once armed) kills the process."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rank, self.size, self.timeout = inner.rank, inner.size, inner.timeout
        self.name = inner.name
        self.kill_at: int | None = None
        self.partial = False
        self.calls = 0

    def arm(self, kill_at: int, partial: bool = False) -> None:
        """Die at the ``kill_at``-th exchange; ``partial``: after sending the first quarter of its message."""
        self.kill_at, self.partial, self.calls = kill_at, partial, 0

    def _count(self, send, send_to) -> None:
        if self.kill_at is not None and self.calls == self.kill_at:
            if self.partial and send is not None:  # the peer receives the start of the message, then nothing
                self.inner.exchange(send[: max(send.numel() // 4, 1)], send_to, None, None)
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1

    def exchange(self, send, send_to, recv, recv_from) -> None:
        self._count(send, send_to)
        self.inner.exchange(send, send_to, recv, recv_from)

    def __getattr__(self, name: str):
        # The inner transport's host layout (so hierarchical plans are made as for the real group) and its fused
        # receive-and-reduce, only where it has them (the HostRoutes and FusedReduce capabilities are checked by their
        # members on an instance like this one).
        if name in _LAYOUT_ATTRIBUTES:
            return getattr(self.inner, name)
        if name != "exchange_reduce":
            raise AttributeError(name)
        inner = getattr(self.inner, name)

        def exchange_reduce(send, send_to, target, recv_from, reduce):
            self._count(send, send_to)
            inner(send, send_to, target, recv_from, reduce)

        return exchange_reduce


def plan_for(algorithm: str, rank: int, size: int, count: int, hosts: tuple[int, ...] | None = None) -> Plan:
    """The plan ``rank`` runs for ``algorithm`` (``hierarchical/<inter>`` needs every group rank's host)."""
    if algorithm.startswith(HIERARCHICAL_PREFIX):
        if hosts is None or len(hosts) != size:
            raise ValueError(f"{algorithm} needs the host of each of the {size} ranks, got {hosts}")
        return plan_hierarchical(algorithm.removeprefix(HIERARCHICAL_PREFIX), rank, tuple(hosts), count)
    return plan_allreduce(algorithm, rank, size, count)


def kill_index(
    algorithm: str, rank: int, size: int, count: int, phase: str, hosts: tuple[int, ...] | None = None
) -> int:
    """The exchange call at which to kill ``rank`` so that it dies on entering ``phase`` of this allreduce.

    The first step of ``phase`` in which the rank sends (its peers then wait for something it never sends);
    check mode's fingerprint exchange runs first over the same transport, so its steps are counted in.
    ``hosts``: every group rank's host, for the hierarchical plans (whose phases read ``host <phase>`` within a
    host and ``hosts <phase>`` between hosts).
    """
    steps = plan_for(algorithm, rank, size, count, hosts).steps
    index = next(i for i, s in enumerate(steps) if s.phase == phase and s.send is not None)
    if consistency.check_enabled():
        index += len(plan_allreduce("recursive_doubling", rank, size, size * len(consistency.FIELDS)).steps)
    return index


def phases(algorithm: str, rank: int, size: int, count: int, hosts: tuple[int, ...] | None = None) -> list[str]:
    """The phases in which ``rank`` sends something, in plan order (what :func:`kill_index` can target)."""
    seen: list[str] = []
    for step in plan_for(algorithm, rank, size, count, hosts).steps:
        if step.send is not None and step.phase not in seen:
            seen.append(step.phase)
    return seen
