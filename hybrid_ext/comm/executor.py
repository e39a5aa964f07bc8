"""Runs one rank's plan (:mod:`hybrid_ext.comm.schedule`) over a transport, step by step, on a flat buffer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_ext.comm.schedule import Plan
from hybrid_ext.comm.transport import PeerError, Transport

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
