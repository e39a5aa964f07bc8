"""The transport contract: the one interface every host framework implements for hybrid-ext.

Schedules (:mod:`hybrid_ext.comm.schedule`) say which rank sends which slice to whom; a transport moves the bytes.
Everything hybrid-ext communicates — allreduce steps, the partitioner's all-gathers and reduce-scatters —
is a sequence of :meth:`Transport.exchange` calls, so a framework needs only this to run all of it.

A transport is an object with:

``rank: int`` and ``size: int``
    This process's rank in the transport's group and the group's size. Ranks in :meth:`exchange` are ranks
    in this group (0 .. size-1), not global ranks.

``timeout: float``
    Seconds a blocking call may wait for a peer before it raises :class:`PeerError`. Never infinite: a dead
    or stuck peer must surface as an error, not a hang.

``exchange(send, send_to, recv, recv_from) -> None``
    Send the tensor ``send`` to rank ``send_to`` while receiving into the tensor ``recv`` from rank
    ``recv_from``, and return when both are complete. Either side may be ``None`` (send only, receive only).
    Both tensors are contiguous, on the same device, and not aliased with each other; ``recv`` is written in
    place and its size fixes how many elements arrive (the schedule guarantees the peer sends exactly that
    many, of the same dtype). The send and the receive must proceed concurrently — two peers that exchange
    with each other both call ``exchange`` at once, so a transport that finished the send before starting
    the receive could deadlock on large messages. Messages between the same pair of ranks are delivered in
    the order they were sent. On failure (peer died, connection lost, timeout) it raises :class:`PeerError`
    naming the peer.

``name: str``
    Short name for metrics and error messages (``"torch-gloo"``, ``"horovod"``...).

``native: NativeCollectives | None`` (optional)
    The collectives of the group the transport runs over, where it has its own (gloo's, NCCL's, Horovod's
    allreduce): the communicator makes them a candidate of ``auto`` beside its schedules, so ``auto`` never
    runs slower than the backend would alone. A transport without a group of its own (shared memory) leaves
    it out; whoever builds that transport's communicator may pass the group's (``Communicator(native=...)``).

A transport is used by one collective at a time, from one thread (the group's executor, see
:mod:`hybrid_ext.comm.ordering`); it need not be thread-safe.

Implementations: :class:`~hybrid_ext.comm.torch_transport.TorchTransport` (any torch.distributed process group
with point-to-point support: gloo, NCCL, MPI), :class:`~hybrid_ext.comm.shm_transport.ShmTransport` (ranks on
one host), and the Horovod side-channel transports in ``hybrid_ext.integrations.horovod.transport``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class PeerError(RuntimeError):
    """A peer did not answer within the timeout, or the connection to it failed."""


@runtime_checkable
class Transport(Protocol):
    rank: int
    size: int
    timeout: float
    name: str

    def exchange(
        self,
        send: torch.Tensor | None,
        send_to: int | None,
        recv: torch.Tensor | None,
        recv_from: int | None,
    ) -> None: ...


NATIVE_OPS = ("sum", "min", "max")  # what every backend's allreduce takes (avg: a sum, divided by the caller)


@runtime_checkable
class NativeCollectives(Protocol):
    """A group's own collectives, run as one call each (the backend chooses its algorithm).

    ``allreduce(tensor, op)`` reduces the contiguous ``tensor`` in place over the group with ``op`` (one of
    :data:`NATIVE_OPS`), every rank calling it at the same point of its collective sequence, and returns when the
    result is in place; a peer that fails or stays away for longer than the group's timeout raises
    :class:`PeerError`. Every rank must end with bitwise-identical values (gloo's and NCCL's rings do: each
    element is reduced on one rank, then copied). ``name`` says what ran, in metrics (``"torch-gloo"``,
    ``"horovod"``...).
    """

    name: str

    def allreduce(self, tensor: torch.Tensor, op: str) -> None: ...
