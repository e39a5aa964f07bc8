"""One factory builds a group's transport: shared memory between the ranks of a host, the network to the others.

:func:`transport_for` builds it for a torch.distributed process group; the side channel
(:mod:`~hybrid_ext.comm.transports.side_channel`) for a group that meets in a store. Both go through
:func:`compose`, which sets shared memory up among the ranks that share a host and puts the network transport
beside it (:class:`~hybrid_ext.comm.transports.routed.RoutedTransport` when both occur). ``HYBRID_EXT_TRANSPORT``
(:data:`TRANSPORT_ENV`) forces send/recv everywhere (``torch``) or insists on shared memory everywhere (``shm``).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext import config
from hybrid_ext.comm.transports import device_route
from hybrid_ext.comm.transports import shm as shm_transport
from hybrid_ext.comm.transports._c10d_private import backend_name
from hybrid_ext.comm.transports.contract import Transport
from hybrid_ext.comm.transports.fault_notes import FaultNotes
from hybrid_ext.comm.transports.network_address import advertised_address
from hybrid_ext.comm.transports.routed import RoutedTransport
from hybrid_ext.comm.transports.staged import StagedTransport
from hybrid_ext.comm.transports.torch_p2p import TorchTransport

TRANSPORT_ENV = "HYBRID_EXT_TRANSPORT"  # auto (default) | shm | torch


def transport_choice() -> str:
    return config.get(TRANSPORT_ENV)


def transport_for(group: Any, device: torch.device, all_gather=None, barrier=None) -> Transport:
    """The fastest transport for ``group`` on ``device``; all ranks of the group call this together.

    CPU tensors go through shared memory between ranks that share a host's ``/dev/shm``
    (:mod:`hybrid_ext.comm.transports.shm`), as NCCL and MPI do within a node, and through the group's own
    send/recv to ranks on other hosts (:func:`compose`). Device tensors take the group's own send/recv where its
    backend sends them (CUDA on NCCL); where it sends host tensors only (CUDA on gloo) they are staged through host
    buffers (:class:`~hybrid_ext.comm.transports.staged.StagedTransport`) over the transport CPU tensors of the
    group take, shared memory included; where they cannot travel at all this raises, before anything is sent
    (:mod:`~hybrid_ext.comm.transports.device_route`).
    """
    device = torch.device(device)
    if device.type != "cpu" and group.size() > 1:
        how = device_route.route(device.type, backend_name(group, device), rank=group.rank())
        if how == device_route.STAGE:
            host = _direct_transport(group, torch.device("cpu"), all_gather, barrier)
            return _announced(StagedTransport(host, device))
    return _announced(_direct_transport(group, device, all_gather, barrier))


def _direct_transport(group: Any, device: torch.device, all_gather, barrier) -> Transport:
    """The transport for tensors on ``device`` as they are, no staging (see :func:`transport_for`)."""
    choice = transport_choice()
    backend = backend_name(group, device)
    base = TorchTransport(group)
    if all_gather is None:

        def all_gather(obj):
            out = [None] * base.size
            dist.all_gather_object(out, obj, group=group)
            return out

    if base.size > 1 and device.type == "cpu":
        # Which ranks share this host, and their pids: a failed wait then names a rank that died here.
        peers = all_gather((shm_transport.shm_domain(), os.getpid(), *_this_host()))
        base.local_pids = {r: pid for r, (domain, pid, *_) in enumerate(peers) if domain == peers[base.rank][0]}
        base.remote_hosts = {r: (h, a) for r, (domain, _, h, a) in enumerate(peers) if domain != peers[base.rank][0]}
        if base.remote_hosts:  # the group spans hosts, as every rank of it sees: all take this exchange
            base.notes = _fault_notes(base, peers[base.rank][3], all_gather)
    shm = _shm_usable(device.type, base.size, choice)
    if base.size > 1:  # host tensors on an NCCL group travel only where shared memory carries every message
        device_route.route(device.type, backend, one_host=shm and not base.remote_hosts, rank=base.rank)
    if barrier is None:

        def barrier():
            dist.barrier(group=group)

    return compose(lambda: base, base.rank, base.size, device.type, choice, all_gather, barrier, base.timeout)


def compose(
    network: Callable[[], Transport],
    rank: int,
    size: int,
    device_type: str,
    choice: str,
    all_gather: Callable[[Any], list[Any]],
    barrier: Callable[[], None],
    timeout: float,
    group_name: str = "this group",
) -> Transport:
    """A group's transport for host tensors (``device_type`` ``cpu``) or device tensors its network sends as they are.

    Shared memory among the ranks that share a host (set up with ``all_gather`` and ``barrier``, every rank of the
    group calling this together), ``network()`` to the others: the network transport is made only where some
    peer is beyond shared memory (a side channel then builds no gloo group for ranks of one host).
    """
    if not _shm_usable(device_type, size, choice):
        if choice == "shm" and device_type == "cpu" and size > 1:
            raise RuntimeError(f"{TRANSPORT_ENV}=shm, but shared memory is not supported on this machine")
        return network()  # device tensors, a group of one, or send/recv asked for
    found = shm_transport.create(rank, size, all_gather, barrier, timeout)
    if found.transport is not None and len(found.local_ranks) == size:
        return found.transport
    if choice == "shm":
        raise RuntimeError(_no_shm_reason(found, group_name))
    if found.transport is None and len(set(found.hosts)) == size:
        return network()  # one rank per host: nothing to route
    return RoutedTransport(found.transport, found.local_ranks, network(), found.hosts)


def _shm_usable(device_type: str, size: int, choice: str) -> bool:
    return device_type == "cpu" and size > 1 and choice != "torch" and shm_transport.shm_supported()


def _fault_notes(base: TorchTransport, address: str, all_gather) -> FaultNotes | None:
    """Open this rank's mailbox for notes from other hosts and learn theirs (:mod:`~.fault_notes`)."""
    try:
        notes = FaultNotes(base.rank, address)
    except OSError:  # no address to listen on: errors then name only what this rank saw itself
        notes = None
    mailboxes = all_gather(None if notes is None else (notes.address, notes.port))
    if notes is not None:
        notes.connect({r: tuple(m) for r, m in enumerate(mailboxes) if m is not None and r in base.remote_hosts})
        weakref.finalize(base, notes.close)  # the mailbox lives as long as the transport: no socket left behind
    return notes


def _no_shm_reason(found: shm_transport.HostShm | None, group_name: str = "this group") -> str:
    """Why ``HYBRID_EXT_TRANSPORT=shm`` cannot be had for this group."""
    if found is not None and found.problem:
        return f"{TRANSPORT_ENV}=shm, but shared memory could not be set up: {found.problem}"
    return f"{TRANSPORT_ENV}=shm, but the ranks of {group_name} are on several hosts"


# Set once the job's first transport has been described: the line is printed once per process.
_announcement = threading.Event()


def _announced(transport: Transport) -> Transport:
    """Say once per job, on its first rank, which route messages take (one line)."""
    if transport.size == 1:  # a group of one has no route to speak of
        return transport
    if not _announcement.is_set() and dist.is_available() and dist.is_initialized() and dist.get_rank() == 0:
        _announcement.set()
        print(f"hybrid-ext: transport {describe_routes(transport)}", file=sys.stderr, flush=True)
    return transport


def describe_routes(transport: Transport) -> str:
    """One line saying which route each kind of peer takes (what the start-up message prints)."""
    if isinstance(transport, StagedTransport):
        return f"{transport.device.type} tensors staged through host memory, then {describe_routes(transport.host)}"
    if isinstance(transport, RoutedTransport) and transport.local is not None:
        return (
            f"{transport.local.name} with the {len(transport.local_ranks) - 1} other rank(s) on this host, "
            f"{transport.network.name} to the {transport.size - len(transport.local_ranks)} rank(s) on other hosts"
        )
    return transport.name


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


def _this_host() -> tuple[str, str]:
    """(host name, address other hosts reach it at): how errors name a rank's host."""
    try:
        address = advertised_address()
    except Exception:  # a bad GLOO_SOCKET_IFNAME fails where gloo itself reads it; errors need no address
        address = "address unknown"
    return socket.gethostname(), address
