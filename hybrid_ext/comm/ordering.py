"""Issue order: a group's collectives run one at a time in the order this rank issued them.

Every rank issues a group's collectives in the same order, so running them in issue order lets ranks agree on
which collective a message belongs to without tagging messages (as Horovod's background thread and a CUDA
stream do). A blocking call with nothing queued runs directly on the caller's thread; anything issued while
another job is queued or running waits behind it on the group's one worker thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import torch

from hybrid_ext.comm.streams import StreamOrder


class Handle:
    """The result of an async collective: ``wait()`` blocks until it is done and returns the reduced tensor(s)."""

    def __init__(
        self, future: concurrent.futures.Future, streams: StreamOrder | None = None, done: list | None = None
    ) -> None:
        self._future = future
        self._streams, self._done = streams, done  # CUDA: the collective's end, for the caller's stream

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the collective is done; on CUDA, make the caller's current stream wait for it too.

        Args:
            timeout (float or None): seconds to wait at most (None: no limit).

        Returns:
            the collective's result: the reduced tensor, or the list of them.

        Raises:
            TimeoutError: not done within ``timeout``.
            PeerError, CollectiveMismatchError: the collective's own error.
        """
        result = self._future.result(timeout)
        if self._streams is not None:
            self._streams.consume(self._done[0])
        return result

    def is_completed(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[[Handle], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def as_torch_future(self, value: Any) -> torch.futures.Future:
        """A ``torch.futures.Future`` completed with ``value`` (or this handle's error) when this one is done."""
        future: torch.futures.Future = torch.futures.Future()

        def finish(done: Handle) -> None:
            error = done.exception()
            if error is not None:
                future.set_exception(error)
                return
            if self._streams is not None:  # completed on the worker: the queued GPU work must be done first
                self._streams.finish_on_host(self._done[0])
            future.set_result(value)

        self.add_done_callback(finish)
        return future


class MappedHandle(Handle):
    """A handle whose ``wait()`` passes the inner result through ``fn``."""

    def __init__(self, inner: Handle, fn: Callable[[Any], Any]) -> None:
        super().__init__(inner._future, inner._streams, inner._done)
        self._fn = fn

    def wait(self, timeout: float | None = None) -> Any:
        return self._fn(super().wait(timeout))


class IssueOrder:
    """Runs jobs one at a time in the order they were issued: inline when nothing is queued, else on a worker."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._state_lock = threading.Lock()  # guards _pending and the executor's creation
        self._run_lock = threading.Lock()  # held by whichever thread is executing a job
        self._pending = 0

    def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` now if nothing is queued (on this thread), else after everything queued."""
        with self._state_lock:
            idle = self._pending == 0
            self._pending += 1
        if not idle:
            self._pending_decrement()
            return self.submit(job).wait()
        try:
            with self._run_lock:
                return job()
        finally:
            self._pending_decrement()

    def submit(self, job: Callable[[], Any], streams: StreamOrder | None = None, done: list | None = None) -> Handle:
        """Queue ``job`` behind every job issued before it; return its handle."""
        with self._state_lock:
            self._pending += 1
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hybrid-ext-comm")
        return Handle(self._executor.submit(self._run_queued, job), streams, done)

    def _run_queued(self, job: Callable[[], Any]) -> Any:
        try:
            with self._run_lock:
                return job()
        finally:
            self._pending_decrement()

    def _pending_decrement(self) -> None:
        with self._state_lock:
            self._pending -= 1
