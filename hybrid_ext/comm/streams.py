"""CUDA stream order for collectives that run on a communicator's own thread.

A collective is issued on the caller's thread, where its input was produced on the caller's current CUDA
stream, and runs later on the communicator's worker thread. Three rules keep that correct (what DDP's reducer
and Horovod's ready events do):

1. at issue, an event is recorded on the caller's current stream; the communicator's stream waits for it before
   touching the input, so a collective never reads a tensor whose producing kernels are still queued;
2. the collective's kernels and copies run on the communicator's own stream, and every tensor it uses is
   recorded on that stream (``record_stream``), so the caching allocator does not hand the memory to anyone
   else while queued work still uses it;
3. when the caller waits, its current stream waits for an event recorded at the collective's end, so the result
   is ready on the caller's stream without blocking the host on the GPU.

On CPU every step is a no-op (:class:`HostOrder`). :class:`CudaStreamOrder` implements them for one CUDA
device; tests exercise the protocol's call order on CPU with a stand-in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch


class StreamOrder(Protocol):
    def capture(self) -> Any:
        """On the caller's thread, at issue: a marker of everything queued so far on the caller's stream."""

    def run_after(self, ready: Any) -> contextlib.AbstractContextManager[Any]:
        """On the worker: run the body on the collective's stream after ``ready``; yields a box for the end."""

    def keep_alive(self, tensors: Sequence[torch.Tensor]) -> None:
        """The collective's stream uses ``tensors``: keep their memory until its queued work is done."""

    def consume(self, done: Any) -> None:
        """On the caller's thread, at wait: make the caller's stream wait for the collective's end."""

    def finish_on_host(self, done: Any) -> None:
        """Block this thread until the collective's queued work is done (for futures completed off-thread)."""


class HostOrder:
    """CPU tensors: work is done when the call returns; nothing to order."""

    def capture(self) -> None:
        return None

    @contextlib.contextmanager
    def run_after(self, ready: Any) -> Iterator[list]:
        yield [None]

    def keep_alive(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def consume(self, done: Any) -> None:
        pass

    def finish_on_host(self, done: Any) -> None:
        pass


class CudaStreamOrder:
    """One CUDA device: the collectives run on a stream of their own (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)

    def capture(self) -> torch.cuda.Event:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return ready

    @contextlib.contextmanager
    def run_after(self, ready: torch.cuda.Event | None) -> Iterator[list]:
        box: list = [None]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            yield box
            done = torch.cuda.Event()
            done.record(self.stream)
            box[0] = done

    def keep_alive(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if t.is_cuda:
                t.record_stream(self.stream)

    def consume(self, done: torch.cuda.Event | None) -> None:
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def finish_on_host(self, done: torch.cuda.Event | None) -> None:
        if done is not None:
            done.synchronize()


def stream_order_for(device: torch.device) -> StreamOrder:
    return CudaStreamOrder(device) if device.type == "cuda" else HostOrder()
