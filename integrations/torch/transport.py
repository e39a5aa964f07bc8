"""The torch.distributed transport: the transport contract over a process group's point-to-point ops.

Works with any process group whose backend has ``send``/``recv`` (gloo on CPU, NCCL on CUDA, MPI). Calls go
straight to the group object (group-local ranks, no per-call lookups in torch's Python layer) with a tag of
hybrid-ext's own, so they never match the user's point-to-point messages. Every wait has the transport's
timeout; a peer that dies or stops answering becomes a :class:`~hybrid_ext.transport.PeerError`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hybrid_ext.integrations.torch._c10d_private import backend_timeout_seconds
from hybrid_ext.transport import PeerError

# Tag for hybrid-ext's messages ("HX"), distinct from the default tag 0 of user send/recv.
TAG = 0x4858
DEFAULT_TIMEOUT = 300.0


def resolve_group(group: Any) -> Any:
    """The process group object hybrid-ext should talk over for ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group(...) first, "
            "or pass a transport as `group=`"
        )
    if group is None:
        group = dist.group.WORLD
    return group


class TorchTransport:
    """Transport over a torch.distributed ``ProcessGroup`` (or a backend object such as ``ProcessGroupGloo``)."""

    def __init__(self, group: Any, timeout: float | None = None, name: str | None = None) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        if timeout is None:
            timeout = backend_timeout_seconds(group) or DEFAULT_TIMEOUT
        self.timeout = float(timeout)
        self._wait_timeout = timedelta(seconds=self.timeout)
        self.name = name or f"torch-{_backend_name(group)}"

    def exchange(self, send, send_to, recv, recv_from) -> None:
        works = []
        try:
            if recv is not None:
                works.append((recv_from, "receive from", self.group.recv([recv], recv_from, TAG)))
            if send is not None:
                works.append((send_to, "send to", self.group.send([send], send_to, TAG)))
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: could not start an exchange: {exc}") from exc
        for peer, what, work in works:
            try:
                work.wait(self._wait_timeout)
            except RuntimeError as exc:  # DistBackendError, gloo timeouts, closed connections
                raise PeerError(
                    f"rank {self.rank} failed to {what} rank {peer} within {self.timeout:g}s: {exc}"
                ) from exc


def _backend_name(group: Any) -> str:
    try:
        return str(group.name())
    except Exception:
        return type(group).__name__.lower()
