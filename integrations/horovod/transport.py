"""Transports under Horovod, which has no point-to-point send/recv.

- :func:`communicator_for` (the default, used by ``hvd.Butterfly`` and the partitioner): a side channel per
  Horovod process set. The set's first rank opens a TCPStore and ``hvd.broadcast_object`` tells the others
  where it is — the only Horovod call — then the ranks exchange through shared memory when they share a host,
  else through a gloo (CPU) / NCCL (CUDA) group built from that store
  (:mod:`hybrid_ext.comm.transports.side_channel`); CUDA tensors take gloo with staging where NCCL cannot
  serve the set (no NCCL, or ranks sharing a GPU that their NCCL refuses). Set up lazily, on a set's first
  Butterfly reduction, which every member makes together; nothing to configure under plain ``horovodrun``.
- :class:`HorovodAlltoallTransport`: each exchange is one ``hvd.alltoall`` with splits that send only to the
  partner. Every step goes through Horovod's negotiation cycle (milliseconds per step), which is why it is
  not the default — see the measurements in the README (``python -m hybrid_ext.integrations.horovod.bench``).

Horovod's own allreduce (:class:`HorovodNativeCollectives`) is a candidate of ``auto`` on every such communicator:
it runs through Horovod's engine (matched by name, so it keeps out of the way of the job's own Horovod ops).

Side channels, communicators and the partitioner's grids belong to one Horovod session:
:func:`~hybrid_ext.integrations.horovod.session.reset` forgets them, and ``hvd.shutdown`` (wrapped by
:func:`~hybrid_ext.integrations.horovod.register`) calls it — which is what ``hvd.elastic.run`` does before it
re-initializes Horovod for the ranks left after a host is lost (or joined). The next Butterfly reduction then opens
a side channel among the new ranks. A cached channel whose rank or size no longer matches Horovod's is replaced as
well (Horovod re-initialized without the wrapper).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from hybrid_ext.comm import Communicator
from hybrid_ext.comm.transports.contract import HasNative, PeerError
from hybrid_ext.comm.transports.side_channel import SideChannel, open_side_channel
from hybrid_ext.comm.transports.torch_p2p import DEFAULT_TIMEOUT

_lock = threading.Lock()
_channels: dict[int, SideChannel] = {}
_communicators: dict[tuple[int, str], Communicator] = {}


def _hvd():
    import horovod.torch as hvd

    return hvd


def set_ranks(process_set: Any) -> list[int]:
    """Global ranks of a process set (the global set lists none until asked)."""
    hvd = _hvd()
    ranks = process_set.ranks
    return list(range(hvd.size())) if ranks is None else sorted(ranks)


def process_set_for(ranks: list[int]) -> Any:
    """The Horovod process set of ``ranks``: added (a collective over all ranks), or the one that exists.

    Args:
        ranks (list[int]): the members, in any order.

    Returns:
        the ``hvd.ProcessSet`` of those ranks.
    """
    hvd = _hvd()
    ranks = sorted(ranks)
    try:
        return hvd.add_process_set(ranks)
    except ValueError:
        # Horovod refuses a second set with the same ranks and offers no public lookup: find it by its ranks.
        from horovod.common.process_sets import _temp_process_set_object

        for set_id, members in hvd.mpi_ops._basics._get_process_set_ids_and_ranks().items():
            if sorted(members) == ranks:
                existing = _temp_process_set_object(set_id)
                existing.ranks = ranks
                return existing
        raise


def side_channel(process_set: Any = None, timeout: float = DEFAULT_TIMEOUT) -> SideChannel:
    """The side channel of ``process_set``: the connections hybrid-ext's reductions travel on beside Horovod's.

    Its members call this together the first time; later calls return the same channel.

    Args:
        process_set: an ``hvd.ProcessSet`` (default: the global one, all ranks).
        timeout (float): seconds to wait for a peer.

    Returns:
        SideChannel: the channel, made on first use.

    Raises:
        RuntimeError: Horovod is not initialized.
        ValueError: ``process_set`` is not registered with Horovod.
    """
    hvd = _hvd()
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialized: call hvd.init() first")
    process_set = hvd.global_process_set if process_set is None else process_set
    key = process_set.process_set_id
    if key is None:
        raise ValueError(f"{process_set} is not registered with Horovod (hvd.add_process_set / hvd.init)")
    ranks = set_ranks(process_set)
    with _lock:
        channel = _channels.get(key)
        if channel is not None and not _matches(channel, ranks, hvd.rank()):
            # Made before Horovod was re-initialized with other ranks: its peers are not these.
            stale = _channels.pop(key)
            for comm_key in [k for k in _communicators if k[0] == key]:
                del _communicators[comm_key]
            stale.close()
            channel = None
        if channel is None:

            def share(obj):
                return hvd.broadcast_object(
                    obj, root_rank=ranks[0], name=f"hybrid_ext.side_channel.{key}", process_set=process_set
                )

            channel = open_side_channel(ranks.index(hvd.rank()), len(ranks), share, timeout, name=f"horovod-ps{key}")
            _channels[key] = channel
        return channel


def _matches(channel: SideChannel | Communicator, ranks: list[int], rank: int) -> bool:
    return channel.size == len(ranks) and rank in ranks and channel.rank == ranks.index(rank)


def communicator_for(process_set: Any, device: torch.device) -> Communicator:
    """The communicator that runs Butterfly reductions over ``process_set`` for tensors on ``device``.

    Args:
        process_set: an ``hvd.ProcessSet``; its members call this together the first time.
        device (torch.device): where the reduced tensors live.

    Returns:
        Communicator: made on first use (with its side channel), then reused.
    """
    key = (process_set.process_set_id, "cuda" if device.type == "cuda" else "cpu")
    with _lock:
        comm = _communicators.get(key)
    if comm is not None and _matches(comm, set_ranks(process_set), _hvd().rank()):
        return comm
    channel = side_channel(process_set)
    with _lock:
        comm = _communicators.get(key)
        if comm is None:
            comm = Communicator(channel.transport(device), device, HorovodNativeCollectives(process_set))
            _communicators[key] = comm
        return comm


def forget_channels() -> None:
    """Forget every side channel and communicator made so far, and close the channels (see
    :func:`~hybrid_ext.integrations.horovod.session.reset`, which also forgets the partitioner's grids)."""
    with _lock:
        channels = list(_channels.values())
        _channels.clear()
        _communicators.clear()
    for channel in channels:
        channel.close()


class HorovodNativeCollectives:
    """Horovod's allreduce over a process set, as the communicator's native candidate.

    Each call gets a name of its own from a counter that advances alike on every member (the communicator issues
    in the same order everywhere): Horovod matches operations across ranks by name.
    """

    name = "horovod"

    def __init__(self, process_set: Any) -> None:
        self.process_set = process_set
        self._calls = 0

    def allreduce(self, tensor: torch.Tensor, op: str) -> None:
        hvd = _hvd()
        reduce_op = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max}[op]
        self._calls += 1
        name = f"hybrid_ext.native.{self.process_set.process_set_id}.{self._calls}"
        try:
            hvd.allreduce_(tensor, op=reduce_op, name=name, process_set=self.process_set)
        except Exception as exc:  # HorovodInternalError: a peer is gone
            raise PeerError(f"Horovod's allreduce {name} failed: {exc}") from exc


class HorovodAlltoallTransport(HasNative):
    """Each exchange is one ``hvd.alltoall`` whose splits send only to the partner.

    An alltoall is collective over the process set, so every member must call :meth:`exchange` at every
    step of a schedule: true of the power-of-two schedules (no fold steps), which is all this transport
    accepts. Messages cost Horovod's negotiation cycle each; kept as a measured alternative.
    """

    def __init__(self, process_set: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        hvd = _hvd()
        self.process_set = hvd.global_process_set if process_set is None else process_set
        ranks = set_ranks(self.process_set)
        self.rank, self.size = ranks.index(hvd.rank()), len(ranks)
        if self.size & (self.size - 1):
            raise ValueError(
                f"the alltoall transport needs every rank in every step: a power-of-two set, not {self.size} ranks"
            )
        self.timeout = float(timeout)
        self.name = "horovod-alltoall"
        self.native = HorovodNativeCollectives(self.process_set)
        self._step = 0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        hvd = _hvd()
        payload = send if send is not None else torch.empty(0, dtype=recv.dtype, device=recv.device)
        splits = torch.zeros(self.size, dtype=torch.int32)
        if send is not None:
            splits[send_to] = send.numel()
        self._step += 1
        try:
            received, _ = hvd.alltoall(
                payload, splits=splits, name=f"hybrid_ext.a2a.{self._step}", process_set=self.process_set
            )
        except Exception as exc:  # HorovodInternalError: a peer is gone
            raise PeerError(f"rank {self.rank}: alltoall step with rank {send_to}/{recv_from} failed: {exc}") from exc
        if recv is not None:
            if received.numel() != recv.numel():
                raise PeerError(
                    f"rank {self.rank}: expected {recv.numel()} elements from rank {recv_from}, got {received.numel()}"
                )
            recv.copy_(received)
