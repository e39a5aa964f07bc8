"""A torch.distributed group's own allreduce as :class:`~hybrid_ext.comm.transport.NativeCollectives`.

What ``dist.all_reduce`` runs — gloo's ring on CPU tensors, NCCL's kernels on CUDA ones — called on a backend
object directly (group-local ranks, no lookups in torch's Python layer), with the group's timeout on the wait.

The communicator calls it from its own ordered thread. gloo matches collectives by the order they were issued on a
group, so a caller's own ``dist.all_reduce`` on the same group, issued from its thread while hybrid-ext's runs
from another, could pair up with the wrong one on some rank. :func:`native_for_group` therefore gives gloo groups a
gloo backend of hybrid-ext's own over the group's store (the same algorithm, its own order). NCCL groups are used
as they are: hybrid-ext's point-to-point steps already share their order.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext.comm._c10d_private import backend_timeout_seconds, group_store
from hybrid_ext.comm.transport import NATIVE_OPS, PeerError

DEFAULT_TIMEOUT = 300.0
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def backend_name(group: Any, device: torch.device) -> str:
    """The backend a group runs collectives of ``device`` tensors on (``"gloo"``, ``"nccl"``...)."""
    try:
        backend = group._get_backend(device) if isinstance(group, dist.ProcessGroup) else group
        return str(backend.name()).lower()
    except Exception:  # a backend object that does not say (or no backend for this device)
        return type(group).__name__.lower()


_opened: dict[str, int] = {}  # private gloo backends made per group name: fresh store keys each time
_owned: weakref.WeakSet[TorchNativeCollectives] = weakref.WeakSet()  # those holding a backend made here


def native_for_group(group: Any, device: torch.device) -> TorchNativeCollectives | None:
    """The native allreduce for ``device`` tensors of a torch.distributed ``group`` (every rank of the group calls this
    together, as it sets the group's transport up), or None where it cannot be had safely (a gloo group torch's
    registry does not know: no store to open a backend of hybrid-ext's own on)."""
    backend = backend_name(group, device)
    timeout = backend_timeout_seconds(group) or DEFAULT_TIMEOUT
    if backend != "gloo":
        return TorchNativeCollectives(group, device, timeout)
    store = group_store(group)
    if store is None:
        return None
    key = str(getattr(group, "group_name", "") or id(group))
    _opened[key] = opened = _opened.get(key, 0) + 1
    prefixed = dist.PrefixStore(f"hybrid_ext/native/{opened}", store)
    own = dist.ProcessGroupGloo(prefixed, group.rank(), group.size(), timedelta(seconds=timeout))
    native = TorchNativeCollectives(own, device, timeout)
    _owned.add(native)
    return native


@atexit.register
def _shut_down_owned() -> None:
    """Stop the gloo backends made here before the interpreter tears down: one destroyed there, its threads still
    running, aborts the process ("terminate called without an active exception") after its work is done."""
    for native in list(_owned):
        with contextlib.suppress(Exception):  # already gone, or a torch without shutdown(): nothing more to do
            native.group.shutdown()


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
