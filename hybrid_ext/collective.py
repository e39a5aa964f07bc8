"""The butterfly collective: ``allreduce`` over any transport — planned once, then executed step by step.

    import hybrid_ext
    hybrid_ext.allreduce(t)                                  # in place, sum, algorithm chosen by the cost model
    hybrid_ext.allreduce(t, op="avg", algorithm="rabenseifner", group=pg)
    handle = hybrid_ext.allreduce_async(t); ...; handle.wait()
    hybrid_ext.allreduce_coalesced([g1, g2, g3], op="avg")   # one flat buffer, one collective (gradient buckets)

``group`` is a torch.distributed process group (None: the default group), or any object implementing the
transport contract (:mod:`hybrid_ext.transport`). Each group gets a :class:`Communicator`: one worker thread
that runs the group's collectives one at a time in the order they were issued — the order every rank issues
them in, so ranks always agree on which collective a message belongs to (as Horovod's background thread and
a CUDA stream do). A blocking call with nothing queued runs directly on the caller's thread.

Semantics: ops ``sum``, ``avg``, ``min``, ``max``; dtypes float32/float64/float16/bfloat16 and int32/int64 (ints:
sum, min, max). 16-bit inputs are reduced in a float32 working buffer (partial sums travel as float32, so they
are exact to float32; the result is rounded once at the end). Every rank ends with bitwise-identical results:
each element's final value is computed on one rank and copied (see :mod:`hybrid_ext.schedule`), and ``avg``
divides identical sums. Memory: a contiguous tensor of the reduction dtype is reduced in place; otherwise one
working buffer holds the flat vector; plus one receive buffer of at most the largest reducing step, reused
across calls.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybrid_ext import consistency, cost_model, metrics
from hybrid_ext.schedule import Plan, plan_allgather, plan_allreduce, plan_reduce_scatter
from hybrid_ext.transport import LoopbackTransport, PeerError, Transport

OPS = ("sum", "avg", "min", "max")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
WIDENED = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _reduce_sum(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.add_(src)


def _reduce_min(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.minimum(dst, src, out=dst)


def _reduce_max(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.maximum(dst, src, out=dst)


REDUCERS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "sum": _reduce_sum,
    "avg": _reduce_sum,  # divided by the group size once at the end
    "min": _reduce_min,
    "max": _reduce_max,
}


def execute(plan: Plan, buffer: torch.Tensor, scratch: torch.Tensor, transport: Transport, op: str) -> None:
    """Run one rank's plan on a flat contiguous ``buffer``; ``scratch`` holds >= ``plan.scratch_elements``."""
    reduce = REDUCERS[op]
    for index, step in enumerate(plan.steps):
        send = buffer[step.send[0] : step.send[1]] if step.send is not None else None
        recv = None
        # Reduce straight out of the transport's buffers when it can and the send does not read what is being
        # reduced (recursive doubling sends and reduces the same range: it needs the receive copy).
        fused = (
            step.reduce
            and hasattr(transport, "exchange_reduce")
            and (step.send is None or step.send[1] <= step.recv[0] or step.recv[1] <= step.send[0])
        )
        if step.recv is not None:
            start, stop = step.recv
            recv = scratch[: stop - start] if step.reduce and not fused else buffer[start:stop]
        try:
            if fused:
                transport.exchange_reduce(send, step.send_to, recv, step.recv_from, reduce)
                continue
            transport.exchange(send, step.send_to, recv, step.recv_from)
        except PeerError as exc:
            raise PeerError(
                f"{plan.algorithm} allreduce of {plan.count} elements, step {index} ({step.phase}) on rank "
                f"{plan.rank} of {plan.world_size}: {exc}"
            ) from exc
        if step.reduce:
            reduce(buffer[step.recv[0] : step.recv[1]], recv)


class Handle:
    """The result of an async collective: ``wait()`` blocks until it is done and returns the reduced tensor(s)."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

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
            else:
                future.set_result(value)

        self.add_done_callback(finish)
        return future


class Communicator:
    """Runs one group's collectives in issue order over its transport (see the module docstring)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.rank, self.size = transport.rank, transport.size
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._state_lock = threading.Lock()  # guards _pending and the executor's creation
        self._run_lock = threading.Lock()  # held by whichever thread is executing a collective
        self._pending = 0
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # ---------------------------------------------------------------- ordering
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

    def submit(self, job: Callable[[], Any]) -> Handle:
        """Queue ``job`` behind every collective issued before it; return its handle."""
        with self._state_lock:
            self._pending += 1
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hybrid-ext-comm")
        return Handle(self._executor.submit(self._run_queued, job))

    def _run_queued(self, job: Callable[[], Any]) -> Any:
        try:
            with self._run_lock:
                return job()
        finally:
            self._pending_decrement()

    def _pending_decrement(self) -> None:
        with self._state_lock:
            self._pending -= 1

    # ---------------------------------------------------------------- buffers
    def scratch(self, elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < elements:
            buf = torch.empty(elements, dtype=dtype, device=device)
            self._scratch[key] = buf
        return buf

    # ---------------------------------------------------------------- collectives (run on the ordered thread)
    def check_consistency(self, collective: str, op: str, tensors: Sequence[torch.Tensor]) -> None:
        if self.size == 1:
            return
        device = tensors[0].device if tensors else torch.device("cpu")
        row = consistency.fingerprint(collective, op, tensors)
        table = torch.zeros(self.size, len(row), dtype=torch.int64, device=device)
        table[self.rank] = torch.tensor(row, dtype=torch.int64)
        flat = table.view(-1)
        plan = plan_allreduce("recursive_doubling", self.rank, self.size, flat.numel())
        execute(plan, flat, torch.empty_like(flat), self.transport, "sum")
        consistency.verify(table.cpu(), ";".join(str(tuple(t.shape)) for t in tensors))

    def allreduce_now(self, tensors: Sequence[torch.Tensor], op: str, algorithm: str) -> None:
        """Reduce ``tensors`` in place as one flat vector (call through :meth:`run` / :meth:`submit`)."""
        start = time.perf_counter()
        if consistency.check_enabled():
            self.check_consistency("allreduce", op, tensors)
        if self.size == 1:
            return
        dtype, device = tensors[0].dtype, tensors[0].device
        wide = WIDENED.get(dtype, dtype)
        count = sum(t.numel() for t in tensors)
        in_place = len(tensors) == 1 and tensors[0].is_contiguous() and wide == dtype
        if in_place:
            buffer = tensors[0].view(-1)
        else:
            buffer = torch.empty(count, dtype=wide, device=device)
            offset = 0
            for t in tensors:
                buffer[offset : offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()
        element_size = buffer.element_size()
        chosen = cost_model.resolve(algorithm, count * element_size, self.size, self.transport.name)
        plan = plan_allreduce(chosen, self.rank, self.size, count)
        execute(plan, buffer, self.scratch(plan.scratch_elements, wide, device), self.transport, op)
        if op == "avg":
            buffer.div_(self.size)
        if not in_place:
            offset = 0
            for t in tensors:
                t.copy_(buffer[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
        metrics.record(
            metrics.CollectiveRecord(
                collective="allreduce",
                algorithm=chosen,
                transport=self.transport.name,
                rank=self.rank,
                world_size=self.size,
                elements=count,
                dtype=str(wide).removeprefix("torch."),
                bytes_sent=plan.elements_sent * element_size,
                bytes_received=plan.elements_received * element_size,
                messages_sent=plan.messages_sent,
                seconds=time.perf_counter() - start,
            )
        )

    def block_counts(self, rows: int, device: torch.device) -> tuple[int, ...]:
        """Every rank's number of rows (one small all-gather of integers)."""
        table = torch.zeros(self.size, dtype=torch.int64, device=device)
        table[self.rank] = rows
        plan = plan_allgather("recursive_doubling", self.rank, (1,) * self.size)
        execute(plan, table, table[:0], self.transport, "sum")
        return tuple(int(v) for v in table.tolist())

    def allgather_now(self, tensor: torch.Tensor, counts: tuple[int, ...] | None, algorithm: str) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 (ranks may hold different numbers of rows)."""
        start = time.perf_counter()
        if consistency.check_enabled():
            self.check_consistency("allgather", "cat", [tensor[:0]])  # same trailing shape and dtype
        if self.size == 1:
            return tensor.clone()
        if counts is None:
            counts = self.block_counts(tensor.shape[0], tensor.device)
        if counts[self.rank] != tensor.shape[0]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows, but counts say {counts[self.rank]}")
        row = math.prod(tensor.shape[1:])  # elements per row
        out = torch.empty((sum(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        flat = out.view(-1)
        offset = sum(counts[: self.rank]) * row
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        plan = plan_allgather(algorithm, self.rank, tuple(c * row for c in counts))
        execute(plan, flat, flat[:0], self.transport, "sum")
        self._record("allgather", plan, out.element_size(), start, str(out.dtype))
        return out

    def reduce_scatter_now(
        self, tensor: torch.Tensor, counts: tuple[int, ...], op: str, algorithm: str
    ) -> torch.Tensor:
        """Reduce ``tensor`` (all ranks' rows) over the group; return this rank's ``counts[rank]`` rows."""
        start = time.perf_counter()
        if consistency.check_enabled():
            self.check_consistency("reduce_scatter", op, [tensor])
        if sum(counts) != tensor.shape[0] or len(counts) != self.size:
            raise ValueError(f"counts {list(counts)} do not split {tensor.shape[0]} rows over {self.size} ranks")
        first = sum(counts[: self.rank])
        if self.size == 1:
            return tensor.clone()
        wide = WIDENED.get(tensor.dtype, tensor.dtype)
        buffer = torch.empty(tensor.numel(), dtype=wide, device=tensor.device)  # the one working buffer
        buffer.view(tensor.shape).copy_(tensor)  # one copy, whatever the input's dtype and strides
        row = math.prod(tensor.shape[1:])
        plan = plan_reduce_scatter(algorithm, self.rank, tuple(c * row for c in counts))
        execute(plan, buffer, self.scratch(plan.scratch_elements, wide, tensor.device), self.transport, op)
        mine = buffer[first * row : (first + counts[self.rank]) * row].view(counts[self.rank], *tensor.shape[1:])
        if op == "avg":
            mine.div_(self.size)
        self._record("reduce_scatter", plan, buffer.element_size(), start, str(wide))
        return mine.to(tensor.dtype).clone() if wide != tensor.dtype else mine.clone()

    def _record(self, collective_name: str, plan: Plan, element_size: int, start: float, dtype: str) -> None:
        metrics.record(
            metrics.CollectiveRecord(
                collective=collective_name,
                algorithm=plan.algorithm,
                transport=self.transport.name,
                rank=self.rank,
                world_size=self.size,
                elements=plan.count,
                dtype=dtype.removeprefix("torch."),
                bytes_sent=plan.elements_sent * element_size,
                bytes_received=plan.elements_received * element_size,
                messages_sent=plan.messages_sent,
                seconds=time.perf_counter() - start,
            )
        )


# -------------------------------------------------------------------------------------------------- registry

_communicators: dict[int, tuple[Any, Communicator]] = {}
_registry_lock = threading.Lock()


def communicator(group: Any = None, device: torch.device | None = None) -> Communicator:
    """The communicator of a torch process group (None: the default group) or of a transport object."""
    if isinstance(group, Communicator):
        return group
    if group is None or not isinstance(group, Transport):
        from hybrid_ext.integrations.torch.transport import resolve_group

        group = resolve_group(group)
        # The butterfly backend's own communicator: its dist.all_reduce calls and ours share one order.
        if hasattr(group, "butterfly_communicator"):
            return group.butterfly_communicator(device or torch.device("cpu"))
    device = device or torch.device("cpu")
    key = (id(group), device.type)
    with _registry_lock:
        entry = _communicators.get(key)
        if entry is None or entry[0] is not group:
            entry = (group, Communicator(_as_transport(group, device)))
            _communicators[key] = entry
        return entry[1]


def _as_transport(group: Any, device: torch.device) -> Transport:
    if isinstance(group, Transport):
        return group
    from hybrid_ext.integrations.torch.transport import transport_for

    return transport_for(group, device)


def forget_group(group: Any) -> None:
    """Drop the communicator of a group that is being destroyed."""
    with _registry_lock:
        for key in [k for k in _communicators if k[0] == id(group)]:
            del _communicators[key]


# -------------------------------------------------------------------------------------------------- public API


def _validate(tensors: Sequence[torch.Tensor], op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unsupported op {op!r}; choose one of {', '.join(OPS)}")
    if not tensors:
        return
    first = tensors[0]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected tensors, got {type(t).__name__}")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(
                f"all tensors of one call must share dtype and device; got {first.dtype} on {first.device} "
                f"and {t.dtype} on {t.device}"
            )
    if first.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"unsupported dtype {first.dtype}; supported: {names}")
    if op == "avg" and not first.dtype.is_floating_point:
        raise TypeError(f"op 'avg' needs a floating-point tensor, got {first.dtype} (use 'sum' and divide)")


def allreduce_coalesced_async(
    tensors: Sequence[torch.Tensor], op: str = "sum", algorithm: str = "auto", group: Any = None
) -> Handle:
    """Start reducing ``tensors`` in place as one flat buffer; ``handle.wait()`` returns the list."""
    tensors = list(tensors)
    _validate(tensors, op)
    cost_model.resolve(algorithm, 0, 1)  # reject a bad algorithm name now, not on the worker thread
    comm = communicator(group, tensors[0].device if tensors else None)
    return comm.submit(lambda: (comm.allreduce_now(tensors, op, algorithm), tensors)[1])


def allreduce_coalesced(
    tensors: Sequence[torch.Tensor], op: str = "sum", algorithm: str = "auto", group: Any = None
) -> list[torch.Tensor]:
    """Reduce ``tensors`` in place through one flat buffer (one collective for all of them); return them."""
    tensors = list(tensors)
    _validate(tensors, op)
    cost_model.resolve(algorithm, 0, 1)
    comm = communicator(group, tensors[0].device if tensors else None)
    comm.run(lambda: comm.allreduce_now(tensors, op, algorithm))
    return tensors


def allreduce_async(tensor: torch.Tensor, op: str = "sum", algorithm: str = "auto", group: Any = None) -> Handle:
    """Start an in-place allreduce; ``handle.wait()`` returns ``tensor`` once it holds the result."""
    handle = allreduce_coalesced_async([tensor], op, algorithm, group)
    return _MappedHandle(handle, lambda tensors: tensors[0])


def allreduce(tensor: torch.Tensor, op: str = "sum", algorithm: str = "auto", group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` in place across the group and return it (see the module docstring)."""
    allreduce_coalesced([tensor], op, algorithm, group)
    return tensor


def allgather(
    tensor: torch.Tensor,
    group: Any = None,
    counts: tuple[int, ...] | None = None,
    algorithm: str = "recursive_doubling",
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; ranks may hold different numbers of rows.

    ``counts`` (rows per rank), when the caller knows them, saves one small exchange. ``algorithm``:
    ``recursive_doubling`` (log2 P messages) or ``ring``.
    """
    comm = communicator(group, tensor.device)
    return comm.run(lambda: comm.allgather_now(tensor, tuple(counts) if counts is not None else None, algorithm))


def reduce_scatter(
    tensor: torch.Tensor,
    counts: tuple[int, ...],
    op: str = "sum",
    group: Any = None,
    algorithm: str = "recursive_halving",
) -> torch.Tensor:
    """Reduce ``tensor`` over the group and return this rank's block of ``counts[rank]`` rows (dim 0).

    The dual of :func:`allgather`: the gradient of an all-gather is a reduce-scatter of the same blocks.
    ``algorithm``: ``recursive_halving`` (log2 P messages) or ``ring``.
    """
    _validate([tensor], op)
    comm = communicator(group, tensor.device)
    return comm.run(lambda: comm.reduce_scatter_now(tensor, tuple(counts), op, algorithm))


class _MappedHandle(Handle):
    def __init__(self, inner: Handle, fn: Callable[[Any], Any]) -> None:
        super().__init__(inner._future)
        self._fn = fn

    def wait(self, timeout: float | None = None) -> Any:
        return self._fn(super().wait(timeout))


__all__ = [
    "OPS",
    "Communicator",
    "Handle",
    "LoopbackTransport",
    "allgather",
    "allreduce",
    "allreduce_async",
    "allreduce_coalesced",
    "allreduce_coalesced_async",
    "communicator",
    "execute",
    "reduce_scatter",
]
