"""Device tensors over a transport that carries host tensors only: every message copied through host buffers.

What gloo groups get for CUDA tensors (see :mod:`~hybrid_ext.comm.transports.device_route`): the host transport
underneath is the one host tensors of the group take — shared memory between the ranks of one host, the group's
send/recv to the others — so staging adds no route of its own. A message travels in chunks through a few pinned host
slots: the device→host copies of the first chunks are queued at once, and each chunk goes out as soon as its own
copy is done, while the copy engine fills the next slots; each received chunk's host→device copy is queued as it
lands and runs while the next chunk is on the wire. Pinned memory needs CUDA; elsewhere the slots are plain host
memory and the copies synchronous (how the CPU tests drive this path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_ext.comm.buffers import ScratchPool
from hybrid_ext.comm.transports.contract import FusedReduce, HostRoutes, Transport

# A chunk is large enough that its copy and per-exchange overhead are small beside its wire time (4 MiB takes
# ~0.1 ms over PCIe, milliseconds over a socket), and small enough that copies overlap the wire from the first one.
STAGE_CHUNK_BYTES = 4 << 20
# Host slots per direction: chunks whose device→host copy may be queued ahead of the wire (memory: 2 x 4 x 4 MiB).
STAGE_SLOTS = 4


class StagedTransport(FusedReduce):
    """The transport contract for tensors on ``device`` over ``host``, a transport that takes host tensors only.

    Over a host transport that routes by host (:class:`~hybrid_ext.comm.transports.contract.HostRoutes`), the
    instance is a :class:`StagedRoutedTransport`, which keeps the ranks' hosts for the hierarchical plans.
    """

    def __new__(cls, host: Transport, device: torch.device, chunk_bytes: int | None = None) -> StagedTransport:
        if cls is StagedTransport and isinstance(host, HostRoutes):
            cls = StagedRoutedTransport
        return super().__new__(cls)

    def __init__(self, host: Transport, device: torch.device, chunk_bytes: int | None = None) -> None:
        self.host = host
        self.device = torch.device(device)
        self.rank, self.size = host.rank, host.size
        # The name keeps the host transport's last: the cost model reads the route that bounds the time there.
        self.name = f"{self.device.type}-staged+{host.name}"
        self.chunk_bytes = chunk_bytes or STAGE_CHUNK_BYTES
        self._pool = ScratchPool()

    @property
    def timeout(self) -> float:
        return self.host.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.host.timeout = value

    def exchange(self, send, send_to, recv, recv_from) -> None:
        self._staged(send, send_to, recv, recv_from, None)

    def exchange_reduce(self, send, send_to, target, recv_from, reduce) -> None:
        """Like :meth:`exchange`, ``reduce(dst, src)`` each received chunk into ``target`` once it is on the device."""
        self._staged(send, send_to, target, recv_from, reduce)

    def _staged(self, send, send_to, recv, recv_from, reduce: Callable | None) -> None:
        tensor = send if send is not None else recv
        if tensor is None:
            return
        # CUDA copies are queued on the tensor's device's current stream (where the collective runs) and waited
        # for by events; other devices copy synchronously.
        stream = torch.cuda.current_stream(tensor.device) if tensor.is_cuda else None
        send_chunks, recv_chunks = self._split(send), self._split(recv)
        send_slots, recv_slots = self._slots(send, "send", stream), self._slots(recv, "recv", stream)
        landing = self._slots(recv, "landing", stream, on_device=True) if reduce is not None else []
        copied: list = [None] * len(send_chunks)  # when each send chunk's device->host copy is done
        freed: list = [None] * STAGE_SLOTS  # when each receive slot's host->device copy is done
        try:
            for index in range(min(STAGE_SLOTS, len(send_chunks))):
                copied[index] = _copy(send_slots[index], send_chunks[index], stream)
            for index in range(max(len(send_chunks), len(recv_chunks))):
                slot = index % STAGE_SLOTS
                out = into = None
                if index < len(send_chunks):
                    _wait(copied[index])
                    out = send_slots[slot][: send_chunks[index].numel()]
                if index < len(recv_chunks):
                    _wait(freed[slot])  # the chunk before has left this slot
                    into = recv_slots[slot][: recv_chunks[index].numel()]
                self.host.exchange(
                    out, send_to if out is not None else None, into, recv_from if into is not None else None
                )
                ahead = index + STAGE_SLOTS
                if out is not None and ahead < len(send_chunks):  # the slot has been sent: fill it again
                    copied[ahead] = _copy(send_slots[slot], send_chunks[ahead], stream)
                if into is not None and reduce is None:
                    freed[slot] = _copy(recv_chunks[index], into, stream)
                elif into is not None:  # land on the device, then reduce there; stream order guards the landing slot
                    arrived = landing[slot][: into.numel()]
                    freed[slot] = _copy(arrived, into, stream)
                    reduce(recv_chunks[index], arrived)
        finally:
            # Copies still queued read slots that the next exchange writes: all are done before this returns.
            _wait(_marker(stream))

    def _split(self, tensor: torch.Tensor | None) -> list[torch.Tensor]:
        """``tensor`` in chunks of :attr:`chunk_bytes`; a peer splits its side of the message the same way."""
        if tensor is None:
            return []
        flat = tensor.view(-1)
        step = self._step(tensor)
        return [flat[i : i + step] for i in range(0, flat.numel(), step)] or [flat]

    def _step(self, tensor: torch.Tensor) -> int:
        return max(self.chunk_bytes // tensor.element_size(), 1)

    def _slots(self, like: torch.Tensor | None, role: str, stream, on_device: bool = False) -> list[torch.Tensor]:
        """:data:`STAGE_SLOTS` buffers of a chunk each (or of the whole message, where it is smaller) for ``like``'s
        dtype, kept between calls: host memory, pinned where CUDA copies from it, or on ``like``'s device."""
        if like is None:
            return []
        size = min(self._step(like), max(like.numel(), 1))
        device = like.device if on_device else torch.device("cpu")
        pinned = stream is not None and not on_device
        buffer = self._pool.get(STAGE_SLOTS * size, like.dtype, device, f"stage-{role}", pinned=pinned)
        return [buffer[i * size : (i + 1) * size] for i in range(STAGE_SLOTS)]


class StagedRoutedTransport(StagedTransport, HostRoutes):
    """Staging over a transport that routes by host: the ranks' hosts are the host transport's.

    Every message, to a host-mate or across the network, is staged through this transport, so it is its own
    ``network`` (the cost model reads the staged route's name) and exposes no separate ``local`` stage: the pipelined
    segments overlap a shared-memory stage of host tensors, which staged messages do not have.
    """

    local: Transport | None = None

    def __init__(self, host: Transport, device: torch.device, chunk_bytes: int | None = None) -> None:
        super().__init__(host, device, chunk_bytes)
        self.hosts = host.hosts
        self.network = self


def _copy(dst: torch.Tensor, src: torch.Tensor, stream):
    """Copy ``src`` into the front of ``dst``; return when that is done (None: already, as on the host)."""
    dst[: src.numel()].copy_(src, non_blocking=stream is not None)
    return _marker(stream)


def _marker(stream):
    """An event after everything queued so far on ``stream`` (None without one: copies were synchronous)."""
    return None if stream is None else stream.record_event()


def _wait(marker) -> None:
    if marker is not None:
        marker.synchronize()
