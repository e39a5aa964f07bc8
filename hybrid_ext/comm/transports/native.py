"""A torch.distributed group's own allreduce as :class:`~hybrid_ext.comm.transports.contract.NativeCollectives`.

What ``dist.all_reduce`` runs — gloo's ring on CPU tensors, NCCL's kernels on CUDA ones — called on the group
itself (group-local ranks, no lookups in torch's Python layer), with the group's timeout on the wait.

It runs on the group, not on a backend of hybrid-ext's own beside it: a second gloo context on the same ranks took
about twice ``dist.all_reduce``'s time at 1 KiB-1 MiB on a 2-core host (its threads wake cold), which would make
``auto`` lose to the very collective it should match. The price: gloo pairs collectives by the order they were
issued on a group, so while a hybrid-ext collective is in flight (``allreduce_async``), a caller must not issue its
own collectives on the same group from another thread — or set ``HYBRID_EXT_NATIVE=off``
(:func:`~hybrid_ext.comm.cost_model.native_enabled`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext.comm.transports._c10d_private import backend_name, backend_timeout_seconds
from hybrid_ext.comm.transports.contract import NATIVE_OPS, PeerError

DEFAULT_TIMEOUT = 300.0
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class TorchNativeCollectives:
    """The allreduce of a ``ProcessGroup`` (or of a backend object such as ``ProcessGroupGloo``)."""

    def __init__(self, group: Any, device: torch.device, timeout: float | None = None) -> None:
        self.group = group
        self.rank = group.rank()
        self.name = f"torch-{backend_name(group, device)}"
        self.timeout = float(timeout if timeout is not None else backend_timeout_seconds(group) or DEFAULT_TIMEOUT)

    def allreduce(self, tensor: torch.Tensor, op: str) -> None:
        if op not in NATIVE_OPS:
            raise ValueError(f"the native allreduce takes {', '.join(NATIVE_OPS)}, not {op!r}")
        options = dist.AllreduceOptions()
        options.reduceOp = _REDUCE_OPS[op]
        if hasattr(options, "asyncOp"):  # waited on at once, as dist.all_reduce(async_op=False) says to gloo
            options.asyncOp = False
        try:
            self.group.allreduce([tensor], options).wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:  # DistBackendError, gloo timeouts, closed connections
            raise PeerError(
                f"rank {self.rank}: the {self.name} allreduce failed within {self.timeout:g}s: {exc}"
            ) from exc
