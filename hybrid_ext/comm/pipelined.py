"""Run a segmented hierarchical allreduce with the network and shared memory busy at once.

The plan (:func:`~hybrid_ext.comm.hierarchy.plan_hierarchical_segments`) cuts the vector into segments, each with
three stages: reduce-scatter inside the host (W), allreduce between hosts (X), all-gather inside the host (G).
Run one after another, the host's link idles while its ranks copy through shared memory. Here two threads share
the work:

- this thread runs the shared-memory stages in the order W0, W1, G0, W2, G1, ..., G(S-1), waiting before G(t)
  for X(t);
- a helper thread runs X0, X1, ..., each once W(t) is done, over the network.

Every rank of a host runs the same W/G order and every lane owner the same X order, so messages still pair up
in order on each route. X(t) needs only W(t) of every host, which never waits on the network, so no wait can
close a cycle. A failure on either thread fails the collective at once; the other thread stops at its next
stage (its current message fails or times out on its own, the group being broken).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hybrid_ext import config
from hybrid_ext.comm.executor import execute
from hybrid_ext.comm.hierarchy import Segment
from hybrid_ext.comm.transports.contract import PeerError, Transport

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

SEGMENT_BYTES_ENV = "HYBRID_EXT_SEGMENT_BYTES"  # bytes per segment; 0 runs the stages one after another
# By default a segment is as large as keeps each message between hosts at least this long: a segment's network
# stage sends about segment / (lanes x hosts) per message, and shorter messages pay their latency more often
# than overlap saves (measured on the emulated cluster: 2 MiB segments at 2 x 2, 3-4 MiB at 3 x 2).
MIN_NETWORK_MESSAGE_BYTES = 512 << 10
MAX_SEGMENTS = 16  # more adds messages (each X stage's latency) and saves little


def segment_count(nbytes: int, lanes: int, hosts: int) -> int:
    """How many segments an allreduce of ``nbytes`` is cut into over ``hosts`` hosts of up to ``lanes`` ranks."""
    per_segment = config.get(SEGMENT_BYTES_ENV)
    if per_segment is None:
        per_segment = MIN_NETWORK_MESSAGE_BYTES * max(lanes, 1) * max(hosts, 1)
    if per_segment == 0:
        return 1
    return max(1, min(MAX_SEGMENTS, nbytes // per_segment))


class _Aborted(Exception):
    """The collective failed on the other thread: this stage does not run."""


class NetworkStages:
    """The helper thread a communicator keeps for the network stages of its segmented allreduces."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, job: Callable[[], None]) -> Future:
        if self._pool is None:  # made (and concurrent.futures imported) on first use: most groups never span hosts
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-ext-network")
        return self._pool.submit(job)


def execute_segments(
    segments: Sequence[Segment],
    buffer: torch.Tensor,
    transport: Transport,
    op: str,
    scratch: Callable[[int, str], torch.Tensor],
    network: NetworkStages,
    prepare: Callable[[int], None] | None = None,
    finish: Callable[[int], None] | None = None,
) -> None:
    """Run ``segments`` on ``buffer`` (see the module docstring); ``scratch(elements, role)`` gives receive buffers.

    Both threads use ``transport``: the shared-memory steps and the network steps take different routes of it
    (a :class:`~hybrid_ext.comm.transports.routed.RoutedTransport`), each used from one thread only.
    ``prepare(t)`` runs on this thread just before segment t's first stage (to fill its part of ``buffer``),
    ``finish(t)`` just after its last (to copy its result out), so that copies too overlap the network.
    """
    local_scratch = scratch(max(max(s.within.scratch_elements, s.gather.scratch_elements) for s in segments), "local")
    network_scratch = scratch(max(s.between.scratch_elements for s in segments), "network")
    reduced = [threading.Event() for _ in segments]  # W(t) done
    failed = threading.Event()

    def between(index: int) -> None:
        while not reduced[index].wait(0.05):
            if failed.is_set():
                raise _Aborted
        if failed.is_set():
            raise _Aborted
        stage(index, "between", network_scratch)

    def stage(index: int, name: str, scratch: torch.Tensor) -> None:
        try:
            execute(getattr(segments[index], name), buffer, scratch, transport, op)
        except PeerError as exc:  # the step's message says which step of the stage: say which segment too
            raise PeerError(f"segment {index + 1} of {len(segments)}: {exc}") from exc

    def gather(index: int) -> None:
        exchanged[index].result()  # the network stage's error, if it failed, is this collective's
        stage(index, "gather", local_scratch)
        if finish is not None:
            finish(index)

    exchanged: list[Future] = []
    try:
        for index in range(len(segments)):
            exchanged.append(network.submit(lambda index=index: between(index)))
            if prepare is not None:
                prepare(index)
            stage(index, "within", local_scratch)
            reduced[index].set()
            if index > 0:
                gather(index - 1)
        gather(len(segments) - 1)
    except BaseException:
        failed.set()
        raise
