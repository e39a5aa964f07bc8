"""Metrics as data: records, running totals, capture blocks."""

from __future__ import annotations

import threading

from hybrid_ext.comm import metrics


def _record(algorithm: str = "rabenseifner", sent: int = 100) -> metrics.CollectiveRecord:
    return metrics.CollectiveRecord("allreduce", algorithm, "shm", 0, 4, 50, "float32", sent, sent, 4, 0.01)


def test_records_totals_and_reset():
    metrics.reset()
    metrics.record(_record(sent=100))
    metrics.record(_record(sent=50))
    metrics.record(_record("ring", sent=10))
    assert [r.bytes_sent for r in metrics.records()] == [100, 50, 10]
    assert metrics.last().algorithm == "ring"
    totals = metrics.totals()
    assert totals[("allreduce", "rabenseifner")].bytes_sent == 150
    assert totals[("allreduce", "rabenseifner")].calls == 2
    assert totals[("allreduce", "ring")].messages_sent == 4
    metrics.reset()
    assert metrics.records() == [] and metrics.totals() == {} and metrics.last() is None


def test_capture_sees_records_from_other_threads_only_inside_the_block():
    metrics.record(_record())
    with metrics.capture() as captured:
        worker = threading.Thread(target=metrics.record, args=(_record("ring"),))
        worker.start()
        worker.join()
    metrics.record(_record())
    assert [r.algorithm for r in captured] == ["ring"]
    assert captured[0].as_dict()["transport"] == "shm"
