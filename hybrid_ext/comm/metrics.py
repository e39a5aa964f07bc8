"""Metrics as data: every collective hybrid-ext runs leaves a record; this module hands them out.

Records stay in memory (the most recent ``MAX_RECORDS``), with running totals per (collective, algorithm) that
never drop anything. Recipes log them to TensorBoard; tests check traffic against the cost formulas.

    import hybrid_ext
    with hybrid_ext.metrics.capture() as records:
        hybrid_ext.allreduce(t)
    records[0].bytes_sent, records[0].messages_sent, records[0].seconds
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

MAX_RECORDS = 10_000


@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One collective on one rank."""

    collective: str  # "allreduce", "allgather", "reduce_scatter"...
    algorithm: str  # the schedule that ran ("rabenseifner", "recursive_doubling", "ring", ...)
    transport: str  # the transport's name ("torch-gloo", "horovod", ...)
    rank: int
    world_size: int
    elements: int  # elements reduced (the whole vector)
    dtype: str  # dtype on the wire
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    seconds: float  # wall time from start to the result being in place on this rank

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class Totals:
    calls: int = 0
    elements: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    seconds: float = 0.0


@dataclass
class MetricsRecorder:
    records: deque = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    totals: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _captures: list = field(default_factory=list)

    def record(self, rec: CollectiveRecord) -> None:
        with self._lock:
            self.records.append(rec)
            t = self.totals.setdefault((rec.collective, rec.algorithm), Totals())
            t.calls += 1
            t.elements += rec.elements
            t.bytes_sent += rec.bytes_sent
            t.bytes_received += rec.bytes_received
            t.messages_sent += rec.messages_sent
            t.seconds += rec.seconds
            for sink in self._captures:
                sink.append(rec)


_recorder = MetricsRecorder()


def record(rec: CollectiveRecord) -> None:
    _recorder.record(rec)


def record_native_allreduce(transport: str, rank: int, size: int, flat, seconds: float) -> None:
    """Record a host framework's allreduce of the flat tensor ``flat`` (:func:`native_allreduce_record`)."""
    record(native_allreduce_record(transport, rank, size, flat.numel(), flat.dtype, seconds))


def native_allreduce_record(
    transport: str, rank: int, size: int, elements: int, dtype, seconds: float
) -> CollectiveRecord:
    """A host framework's allreduce of ``elements`` of the torch ``dtype``. Gloo, NCCL and Horovod do not report
    traffic: this is a ring allreduce's, their algorithm for large buffers."""
    nbytes = int(2 * (size - 1) / size * elements * dtype.itemsize)
    name = str(dtype).removeprefix("torch.")
    return CollectiveRecord(
        "allreduce", "native", transport, rank, size, elements, name, nbytes, nbytes, 2 * (size - 1), seconds
    )


_DTYPE_NAMES: dict = {}


def record_direct_allreduce(rank: int, size: int, count: int, dtype, seconds: float) -> None:
    """Record a one-host allreduce on shared memory (:mod:`~hybrid_ext.comm.transports.shm_allreduce`): no messages;
    the bytes are those its reduce-scatter and all-gather read from other ranks' buffers, 2(P-1)/P of the vector."""
    nbytes = int(2 * (size - 1) / size * count * dtype.itemsize)
    name = _DTYPE_NAMES.get(dtype) or _DTYPE_NAMES.setdefault(dtype, str(dtype).removeprefix("torch."))
    record(CollectiveRecord("allreduce", "direct", "shm", rank, size, count, name, nbytes, nbytes, 0, seconds))


def records() -> list[CollectiveRecord]:
    """The most recent records, oldest first."""
    with _recorder._lock:
        return list(_recorder.records)


def last() -> CollectiveRecord | None:
    with _recorder._lock:
        return _recorder.records[-1] if _recorder.records else None


def totals() -> dict[tuple[str, str], Totals]:
    """Running totals per (collective, algorithm) since the last :func:`reset`."""
    with _recorder._lock:
        return {k: Totals(**asdict(v)) for k, v in _recorder.totals.items()}


def reset() -> None:
    with _recorder._lock:
        _recorder.records.clear()
        _recorder.totals.clear()


@contextlib.contextmanager
def capture() -> Iterator[list[CollectiveRecord]]:
    """Collect the records of the collectives that finish inside the ``with`` block (from any thread)."""
    sink: list[CollectiveRecord] = []
    with _recorder._lock:
        _recorder._captures.append(sink)
    try:
        yield sink
    finally:
        with _recorder._lock:
            _recorder._captures.remove(sink)
