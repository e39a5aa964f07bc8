"""CUDA stream order, checked on CPU: a stand-in stream order records where and when each rule is applied."""

from __future__ import annotations

import contextlib
import threading

import torch

from hybrid_ext.comm import Communicator
from hybrid_ext.comm.streams import CudaStreamOrder, HostOrder, stream_order_for


class _Alone:
    """A group of one rank: collectives run their bookkeeping and return."""

    name, rank, size, timeout = "alone", 0, 1, 5.0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        raise AssertionError("a group of one never exchanges")


class _RecordingOrder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def _log(self, what: str) -> None:
        self.events.append((what, "caller" if threading.current_thread() is threading.main_thread() else "worker"))

    def capture(self):
        self._log("capture")
        return "ready"

    @contextlib.contextmanager
    def run_after(self, ready):
        assert ready == "ready"
        self._log("wait for caller's stream")
        box = [None]
        yield box
        self._log("record end")
        box[0] = "done"

    def keep_alive(self, tensors) -> None:
        self._log(f"keep {len(tensors)} alive")

    def consume(self, done) -> None:
        assert done == "done"
        self._log("caller waits for end")

    def finish_on_host(self, done) -> None:
        assert done == "done"
        self._log("host waits for end")


def _communicator() -> tuple[Communicator, _RecordingOrder]:
    comm = Communicator(_Alone())
    comm.streams = order = _RecordingOrder()
    return comm, order


def test_an_async_collective_waits_for_the_callers_stream_and_hands_its_end_back():
    comm, order = _communicator()
    blocker = threading.Event()
    comm.submit(blocker.wait)  # keeps the worker busy, so the next collective really runs there
    t = torch.ones(3)
    handle = comm.allreduce([t], async_op=True)
    assert ("capture", "caller") in order.events  # recorded at issue, before the worker ran anything
    blocker.set()
    handle.wait()
    steps = [e for e in order.events if (e[0] != "capture" and "keep" not in e[0]) or e[0].startswith("keep")]
    assert steps[-4:] == [
        ("wait for caller's stream", "worker"),
        ("keep 1 alive", "worker"),
        ("record end", "worker"),
        ("caller waits for end", "caller"),
    ]


def test_a_blocking_collective_leaves_its_result_ready_on_the_callers_stream():
    comm, order = _communicator()
    comm.allreduce([torch.ones(2)])
    assert order.events == [
        ("capture", "caller"),
        ("wait for caller's stream", "caller"),
        ("keep 1 alive", "caller"),
        ("record end", "caller"),
        ("caller waits for end", "caller"),
    ]


def test_a_torch_future_completes_only_after_the_queued_work():
    comm, order = _communicator()
    future = comm.submit(lambda: None).as_torch_future("value")
    assert future.wait() == "value"
    names = [what for what, _ in order.events]
    assert names.index("record end") < names.index("host waits for end")  # wherever the callback ran


def test_cpu_needs_no_ordering_and_cuda_gets_its_own_stream_order():
    assert isinstance(stream_order_for(torch.device("cpu")), HostOrder)
    assert Communicator(_Alone()).streams.__class__ is HostOrder
    if torch.cuda.is_available():
        assert isinstance(stream_order_for(torch.device("cuda")), CudaStreamOrder)
