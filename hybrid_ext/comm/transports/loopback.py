"""N ranks as N threads of one process: the transport contract over in-memory queues, and a runner for them.

    from hybrid_ext.comm.transports.loopback import run_ranks

    def rank_fn(transport):
        t = torch.full((4,), float(transport.rank))
        hybrid_ext.allreduce(t, group=Communicator(transport))
        return t

    results = run_ranks(rank_fn, 4)  # one result per rank, rank 0's first

What runs over it is exactly what runs over a real group (the communicator, the executor, the schedules, the
partitioner's mappings), with no process spawned and no port opened: the fast tests use it. Each rank's thread
needs its own :class:`~hybrid_ext.comm.communicator.Communicator` over its own endpoint, as each process would.

Messages: one FIFO queue per ordered pair of ranks. A send puts a copy of the tensor on the queue and returns (it
never waits for the receiver, so the send and the receive of one :meth:`LoopbackTransport.exchange` proceed
concurrently, and two ranks that exchange with each other cannot deadlock); a receive takes the pair's next
message, so messages between a pair arrive in the order they were sent. A receive that waits longer than the
timeout, or whose peer's thread has failed, raises :class:`~hybrid_ext.comm.transports.contract.PeerError` naming the
peer.

``hosts`` (optional) labels each rank with a host, so the communicator plans the hierarchical schedules (and their
segments) as it would on ranks spread over machines; both routes are then the same queues.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybrid_ext.comm.transports.contract import HostRoutes, PeerError

POLL_SECONDS = 0.05  # how often a waiting receive looks whether the group has failed
DEFAULT_TIMEOUT = 30.0


class LoopbackGroup:
    """The shared state of ``size`` in-process ranks: a queue per ordered pair, and whether a rank has failed."""

    def __init__(self, size: int, timeout: float = DEFAULT_TIMEOUT, hosts: Sequence[str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a group has at least one rank, got size={size}")
        if hosts is not None and len(hosts) != size:
            raise ValueError(f"hosts names {len(hosts)} ranks' hosts for a group of {size}")
        self.size = size
        self.timeout = timeout
        self.hosts = tuple(hosts) if hosts is not None else None
        self._queues = {(src, dst): queue.SimpleQueue() for src in range(size) for dst in range(size) if src != dst}
        self._failed: dict[int, BaseException] = {}
        self._lock = threading.Lock()

    def endpoint(self, rank: int) -> LoopbackTransport:
        """Rank ``rank``'s transport (one per rank; each used from its rank's thread)."""
        return LoopbackTransport(self, rank) if self.hosts is None else LoopbackHostsTransport(self, rank)

    def endpoints(self) -> list[LoopbackTransport]:
        return [self.endpoint(rank) for rank in range(self.size)]

    def fail(self, rank: int, error: BaseException) -> None:
        """Mark ``rank`` failed: peers waiting on it raise :class:`PeerError` instead of waiting out the timeout."""
        with self._lock:
            self._failed.setdefault(rank, error)

    def failure(self, rank: int) -> BaseException | None:
        with self._lock:
            return self._failed.get(rank)

    def put(self, src: int, dst: int, message: torch.Tensor) -> None:
        self._queues[(src, dst)].put(message)

    def take(self, src: int, dst: int, timeout: float) -> torch.Tensor:
        """The next message from ``src`` to ``dst``; :class:`PeerError` if ``src`` fails or ``timeout`` passes."""
        pending = self._queues[(src, dst)]
        deadline = time.monotonic() + timeout
        while True:
            try:
                return pending.get(timeout=min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                error = self.failure(src)
                if error is not None:
                    raise PeerError(f"rank {src} failed ({type(error).__name__}: {error})") from None
                if time.monotonic() >= deadline:
                    raise PeerError(f"rank {src} sent nothing to rank {dst} within {timeout:g} s") from None


class LoopbackTransport:
    """One rank's endpoint of a :class:`LoopbackGroup` (the transport contract:
    :mod:`hybrid_ext.comm.transports.contract`)."""

    name = "loopback"

    def __init__(self, group: LoopbackGroup, rank: int) -> None:
        if not 0 <= rank < group.size:
            raise ValueError(f"rank {rank} is outside a group of {group.size}")
        self.group = group
        self.rank, self.size = rank, group.size
        self.timeout = group.timeout

    def exchange(
        self,
        send: torch.Tensor | None,
        send_to: int | None,
        recv: torch.Tensor | None,
        recv_from: int | None,
    ) -> None:
        if send is not None:
            self._check_peer(send_to, "send_to")
            self.group.put(self.rank, send_to, send.detach().clone())  # the sender may reuse its buffer at once
        if recv is not None:
            self._check_peer(recv_from, "recv_from")
            message = self.group.take(recv_from, self.rank, self.timeout)
            if message.numel() != recv.numel() or message.dtype != recv.dtype:
                raise PeerError(
                    f"rank {recv_from} sent {message.numel()} {message.dtype} elements to rank {self.rank}, which "
                    f"expected {recv.numel()} {recv.dtype}: the ranks' schedules disagree"
                )
            recv.copy_(message.view(recv.shape))

    def _check_peer(self, peer: int | None, what: str) -> None:
        if peer is None or not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: {what}={peer} is not another rank of a group of {self.size}")

    def __repr__(self) -> str:
        return f"LoopbackTransport(rank={self.rank}, size={self.size})"


class LoopbackHostsTransport(LoopbackTransport, HostRoutes):
    """An endpoint of a group whose ranks are labelled with hosts: the communicator plans the hierarchical schedules
    (and their segments), with both routes over the same queues."""

    def __init__(self, group: LoopbackGroup, rank: int) -> None:
        super().__init__(group, rank)
        self.hosts = group.hosts
        self.local = self.network = self


class RankError(RuntimeError):
    """A rank's function raised: the first rank to fail is named and its error chained as the cause; ``errors``
    holds every failing rank's (peers of a failed rank fail too, with :class:`PeerError`)."""

    def __init__(self, rank: int, size: int, errors: dict[int, BaseException]) -> None:
        error = errors[rank]
        others = sorted(set(errors) - {rank})
        also = f" (ranks {others} failed too)" if others else ""
        super().__init__(f"rank {rank} of {size}: {type(error).__name__}: {error}{also}")
        self.rank = rank
        self.errors = errors


def run_ranks(
    fn: Callable[..., Any],
    size: int,
    *args: Any,
    timeout: float = 60.0,
    peer_timeout: float = DEFAULT_TIMEOUT,
    hosts: Sequence[str] | None = None,
) -> list[Any]:
    """Run ``fn(transport, *args)`` on ``size`` ranks, one thread each, and return their results in rank order.

    Args:
        fn: called on each rank's thread with that rank's :class:`LoopbackTransport` (``transport.rank``).
        size: the number of ranks.
        timeout: seconds all ranks together may take; past it, :class:`TimeoutError` names the ranks still running.
        peer_timeout: the transports' timeout (a receive waiting longer raises :class:`PeerError`).
        hosts: each rank's host label, for hierarchical schedules (see :class:`LoopbackGroup`).

    Raises:
        RankError: a rank's ``fn`` raised; the first rank to fail is named and its error is the cause, every failing
            rank's is in ``errors``. Peers waiting on a failed rank fail at once rather than at their timeout.
        TimeoutError: a rank was still running after ``timeout``.
    """
    group = LoopbackGroup(size, peer_timeout, hosts)
    results: list[Any] = [None] * size
    errors: dict[int, BaseException] = {}  # in the order the ranks failed

    def body(rank: int) -> None:
        try:
            results[rank] = fn(group.endpoint(rank), *args)
        except BaseException as exc:  # reported by the caller's thread below
            errors[rank] = exc
            group.fail(rank, exc)

    threads = [
        threading.Thread(target=body, args=(rank,), name=f"loopback-rank-{rank}", daemon=True) for rank in range(size)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    running = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
    if running:
        raise TimeoutError(f"ranks {running} of {size} still running after {timeout:g} s")
    if errors:
        first = next(iter(errors))
        raise RankError(first, size, errors) from errors[first]
    return results
