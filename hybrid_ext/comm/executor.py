"""Runs one rank's plan (:mod:`hybrid_ext.comm.schedule`) over a transport, step by step, on a flat buffer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_ext import config
from hybrid_ext.comm.schedule import Plan
from hybrid_ext.comm.transports.contract import FusedReduce, PeerError, Transport

OPS = ("sum", "avg", "min", "max")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
WIDENED = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
WIRE_DTYPE_ENV = "HYBRID_EXT_WIRE_DTYPE"  # input (default) | float32 | float16 | bfloat16
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_dtype_for(dtype: torch.dtype, requested: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype messages of a ``dtype`` reduction travel in.

    Default (``None`` / ``"input"``): the input's own dtype — 16-bit gradients travel as 16-bit, the bytes NCCL
    and gloo send, while every rank still accumulates in float32. ``float32`` sends 16-bit inputs' partial sums
    in full precision (twice the bytes, exact to float32); a 16-bit wire dtype for float32 inputs compresses them
    (Horovod's fp16 compression, with float32 accumulation). ``HYBRID_EXT_WIRE_DTYPE`` sets the process-wide
    default for 16-bit and float32 inputs; float64 and integers travel as themselves unless asked explicitly.
    """
    if not (requested is None or isinstance(requested, (str, torch.dtype))):
        raise TypeError(f"wire_dtype must be a torch.dtype, a dtype name or None, got {type(requested).__name__}")
    if requested is None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return dtype  # the process-wide default leaves float64 and integer reductions alone
        requested = config.get(WIRE_DTYPE_ENV)
    if isinstance(requested, str):
        if requested == "input":
            return dtype
        if requested not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype={requested!r}: choose input, {', '.join(WIRE_DTYPES)}")
        requested = WIRE_DTYPES[requested]
    if requested == dtype:
        return dtype
    if not (dtype.is_floating_point and requested.is_floating_point):
        raise TypeError(f"a {dtype} reduction cannot travel as {requested}: only floating types change wire dtype")
    if requested not in WIRE_DTYPES.values():
        names = ", ".join(WIRE_DTYPES)
        raise TypeError(f"wire dtype {requested} is not supported; choose the input's dtype or one of {names}")
    return requested


def _reduce_sum(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.add_(src)


def _reduce_min(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.minimum(dst, src, out=dst)


def _reduce_max(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.maximum(dst, src, out=dst)


REDUCE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "sum": _reduce_sum,
    "avg": _reduce_sum,  # divided by the group size once at the end
    "min": _reduce_min,
    "max": _reduce_max,
}


def execute(
    plan: Plan,
    buffer: torch.Tensor,
    scratch: torch.Tensor,
    transport: Transport,
    op: str,
    wire: WireStaging | None = None,
) -> None:
    """Run one rank's plan on a flat contiguous ``buffer``; ``scratch`` holds >= ``plan.scratch_elements``.

    With ``wire`` (a narrower dtype than the buffer's, e.g. 16-bit gradients reduced in a float32 buffer), every
    message travels in the wire dtype and is reduced into the buffer in the buffer's precision. Before a slice is
    sent it is rounded to the wire dtype in place, so sender and receiver hold the same value afterwards: every
    rank still ends with bitwise-identical results.

    Failure: a step that raises leaves the buffer as the steps before it left it; the first step never changes it
    before it has completed (its receive lands in ``scratch``, its rounding waits for the exchange), so a collective
    that fails in its first step leaves the caller's tensor as it was.
    """
    if wire is not None:
        _execute_narrow_wire(plan, buffer, transport, op, wire)
        return
    reduce = REDUCE_FNS[op]
    # The transport's class answers at once (the ABC machinery caches it); members forwarded by a wrapper instance
    # are looked up once per plan, not per step.
    fusable = issubclass(type(transport), FusedReduce) or isinstance(transport, FusedReduce)
    for index, step in enumerate(plan.steps):
        send = buffer[step.send[0] : step.send[1]] if step.send is not None else None
        recv = None
        # Reduce straight out of the transport's buffers when it can and the send does not read what is being
        # reduced (recursive doubling sends and reduces the same range: it needs the receive copy). Not in the
        # first step: a peer that fails half-way through its message would leave the caller's tensor half-reduced.
        fused = (
            step.reduce
            and index > 0
            and fusable
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
            raise _step_error(plan, index, exc) from exc
        if step.reduce:
            reduce(buffer[step.recv[0] : step.recv[1]], recv)


class WireStaging:
    """Send and receive buffers of the wire dtype, at least ``plan.largest_step_elements`` long each."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        if send.dtype != recv.dtype:
            raise ValueError(f"wire buffers disagree: {send.dtype} and {recv.dtype}")
        self.dtype = send.dtype
        self.send, self.recv = send, recv


def _execute_narrow_wire(plan: Plan, buffer: torch.Tensor, transport: Transport, op: str, wire: WireStaging) -> None:
    reduce = REDUCE_FNS[op]
    for index, step in enumerate(plan.steps):
        send = recv = None
        own = None
        if step.send is not None:
            own = buffer[step.send[0] : step.send[1]]
            send = wire.send[: own.numel()]
            send.copy_(own)  # rounds to the wire dtype
        if step.recv is not None:
            recv = wire.recv[: step.recv_count]
        try:
            transport.exchange(send, step.send_to, recv, step.recv_from)
        except PeerError as exc:
            raise _step_error(plan, index, exc) from exc
        if own is not None:
            own.copy_(send)  # keep what the peer got: both sides now hold the same value
        if recv is not None:
            target = buffer[step.recv[0] : step.recv[1]]
            if step.reduce:
                reduce(target, recv.to(buffer.dtype))
            else:
                target.copy_(recv)
    # A rank that computed a final value itself (the last reducing step, or a fold partner before the hand-back)
    # still holds it unrounded, while every copy it sent was rounded: round all, so every rank holds the same.
    buffer.copy_(buffer.to(wire.dtype))


def _step_error(plan: Plan, index: int, exc: PeerError) -> PeerError:
    step = plan.steps[index]
    return PeerError(
        f"{plan.algorithm} {plan.collective} of {plan.count} elements, step {index} ({step.phase}) on rank "
        f"{plan.rank} of {plan.world_size}: {exc}"
    )
