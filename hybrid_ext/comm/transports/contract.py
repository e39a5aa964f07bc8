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

``native: NativeCollectives | None`` (optional, declared with :class:`HasNative`)
    The collectives of the group the transport runs over, where it has its own (gloo's, NCCL's, Horovod's
    allreduce): the communicator makes them a candidate of ``auto`` beside its schedules, so ``auto`` never
    runs slower than the backend would alone. A transport without a group of its own (shared memory) leaves
    it out; whoever builds that transport's communicator may pass the group's (``Communicator(native=...)``).

Optional capabilities are small protocols below, which a transport declares by subclassing them and the rest of
hybrid-ext checks with ``isinstance`` (a transport written elsewhere may also just have their members):
:class:`FusedReduce` (reduce straight out of its own buffers), :class:`HostRoutes` (which host each rank is on, and
the routes between and within hosts), :class:`HasNative` (the group's own collectives) and :class:`HasDirect` (the
one-pass allreduce over shared memory).

A transport is used by one collective at a time, from one thread (the group's executor, see
:mod:`hybrid_ext.comm.ordering`); it need not be thread-safe.

Implementations: :class:`~hybrid_ext.comm.transports.torch_p2p.TorchTransport` (any torch.distributed process group
with point-to-point support: gloo, NCCL, MPI), :class:`~hybrid_ext.comm.transports.shm.ShmTransport` (ranks on
one host), and the Horovod side-channel transports in ``hybrid_ext.integrations.horovod.transport``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from hybrid_ext.comm.transports.shm_allreduce import DirectAllreduce


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


@runtime_checkable
class FusedReduce(Protocol):
    """A transport that reduces what arrives straight out of its own buffers (no receive copy first).

    ``exchange_reduce(send, send_to, target, recv_from, reduce)`` is :meth:`Transport.exchange` with the received
    data handed to ``reduce(dst, src)`` into ``target`` (a contiguous tensor the size of the message) instead of
    copied into a receive tensor; the executor uses it where the plan's step reduces.
    """

    def exchange_reduce(
        self,
        send: torch.Tensor | None,
        send_to: int | None,
        target: torch.Tensor | None,
        recv_from: int | None,
        reduce: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None: ...


@runtime_checkable
class HostRoutes(Protocol):
    """A transport whose group spans hosts and that knows which host each rank is on.

    ``hosts`` labels every group rank with its host (what the hierarchical schedules plan with); ``local`` is the
    transport between the ranks of one host whose stage the pipelined segments overlap with the network, or None
    where there is no such separate route; ``network`` is the transport between hosts (whose name the cost model
    reads for the stage between hosts).
    """

    hosts: tuple[Hashable, ...]
    local: Transport | None
    network: Transport


@runtime_checkable
class HasNative(Protocol):
    """A transport that brings its group's own collectives (see :class:`NativeCollectives`): the communicator weighs
    them in ``auto`` unless it was given others (``Communicator(native=...)``). None: the group has none."""

    native: NativeCollectives | None


@runtime_checkable
class HasDirect(Protocol):
    """A transport whose ranks share memory and can allreduce in one pass over it
    (:class:`~hybrid_ext.comm.transports.shm_allreduce.DirectAllreduce`); None: not set up for this group."""

    direct: DirectAllreduce | None


@runtime_checkable
class OwnsCommunicator(Protocol):
    """A process group that brings its own communicator (the ``butterfly`` backend's): hybrid-ext's collectives on it
    then share one issue order with the group's own ``dist.all_reduce`` calls."""

    def butterfly_communicator(self, device: torch.device) -> Any: ...
