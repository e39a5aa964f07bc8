"""A point-to-point side channel for host frameworks that have none (Horovod): a TCPStore, then shm / gloo / NCCL.

The host framework does one thing: tell every rank of a group where the group's store is — ``share(obj)``, a
broadcast from the group's first rank (Horovod: ``hvd.broadcast_object``). From there the ranks meet in the
store: ranks on one host exchange through shared memory (:mod:`hybrid_ext.comm.transports.shm`), ranks on
different hosts over a gloo (CPU tensors) or NCCL (CUDA tensors) group built from the same store, outside
torch.distributed's group registry, so a user's own ``init_process_group`` (or its absence) is untouched.
Where NCCL cannot serve the group (:func:`nccl_usable_for`: no NCCL, or ranks sharing a GPU that their NCCL
refuses), CUDA tensors are staged through host buffers over the same route CPU tensors take.

    channel = open_side_channel(rank, size, share=lambda obj: hvd.broadcast_object(obj, root_rank=0))
    comm = Communicator(channel.transport(tensor.device))
    pair = channel.subgroup("mp0", members=[0, 1])  # only the members call this, together
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext.comm.transports import device_route
from hybrid_ext.comm.transports.contract import Transport
from hybrid_ext.comm.transports.factory import compose, transport_choice
from hybrid_ext.comm.transports.network_address import advertised_address
from hybrid_ext.comm.transports.staged import StagedTransport
from hybrid_ext.comm.transports.torch_p2p import DEFAULT_TIMEOUT, TorchTransport


class StoreCollectives:
    """all_gather and barrier through a store, for set-up before any group can communicate."""

    def __init__(self, store: dist.Store, rank: int, size: int) -> None:
        self.store, self.rank, self.size, self.round = store, rank, size, 0

    def all_gather(self, obj: Any) -> list[Any]:
        self.round += 1
        self.store.set(f"gather{self.round}/{self.rank}", pickle.dumps(obj))
        return [pickle.loads(self.store.get(f"gather{self.round}/{r}")) for r in range(self.size)]

    def barrier(self) -> None:
        self.round += 1
        self.store.set(f"barrier{self.round}/{self.rank}", b"1")
        self.store.wait([f"barrier{self.round}/{r}" for r in range(self.size)])


def this_rank_gpu_facts() -> dict[str, Any]:
    """What decides whether NCCL can serve a group, as this rank sees it (:func:`nccl_usable_for` gathers them).

    ``torch.cuda.device_count`` and the NCCL version are read without creating a CUDA context.
    """
    cuda = torch.cuda.is_available()
    nccl = cuda and dist.is_nccl_available()
    version = torch.cuda.nccl.version() if nccl else None
    return {
        "host": socket.gethostname(),
        "cuda": cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "nccl": nccl,
        "nccl_version": tuple(version) if isinstance(version, tuple) else None,  # old torch: an int code
        "switch": os.environ.get(device_route.NCCL_MULTI_RANK_ENV, "") == "1",
    }


def nccl_usable_for(all_gather: Callable[[Any], list[Any]]) -> tuple[bool, bool]:
    """(every rank has CUDA, NCCL can carry the group's CUDA tensors); every rank of the group calls this together.

    One answer for the whole group, from every rank's :func:`this_rank_gpu_facts`: an NCCL group must be built by
    all its ranks or none, and ranks share a GPU when their host has more of them than GPUs.
    """
    facts = all_gather(this_rank_gpu_facts())
    shared = device_route.ranks_share_gpus([(f["host"], f["gpus"]) for f in facts])
    usable = all(device_route.nccl_usable(f["cuda"], f["nccl"], f["nccl_version"], f["switch"], shared) for f in facts)
    return all(f["cuda"] for f in facts), usable


class SideChannel:
    """One group's meeting point: transports per device type, and subgroups, all from one store."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: float, name: str) -> None:
        self.store, self.rank, self.size, self.timeout, self.name = store, rank, size, float(timeout), name
        self._transports: dict[tuple[str, str], Transport] = {}
        # Times each (key, members) was opened: a reopened subgroup gets fresh store keys. The members are part of
        # the count's key, so a name reused for other members (a grid of another mp size) cannot make the ranks
        # of one subgroup count differently and wait on different keys.
        self._subgroups: dict[tuple[str, tuple[int, ...]], int] = {}
        self.backends: list[Any] = []  # gloo / NCCL groups, kept alive with the channel
        self.closed = False
        self._nccl_usable: bool | None = None  # asked of every rank on the first CUDA transport
        # The device staged CUDA transports are built for (CPU tests put the CPU here).
        self.cuda_device = torch.device("cuda")

    def transport(self, device: torch.device, choice: str | None = None) -> Transport:
        """This group's transport for tensors on ``device`` (every rank of the group calls this together once).

        ``choice``: ``auto`` / ``shm`` / ``torch`` (gloo or NCCL), as ``HYBRID_EXT_TRANSPORT``, which it overrides.
        """
        if self.closed:
            raise RuntimeError(
                f"the side channel {self.name} was closed (its host framework was reset, e.g. by elastic Horovod): "
                "open a new one among the ranks there are now"
            )
        kind = "cuda" if device.type == "cuda" else "cpu"
        choice = choice or transport_choice()
        if (kind, choice) not in self._transports:
            self._transports[kind, choice] = self._make_transport(kind, choice)
        return self._transports[kind, choice]

    def nccl_usable(self) -> bool:
        """Whether NCCL carries this group's CUDA tensors (every rank of the group calls this together once)."""
        if self._nccl_usable is None:
            setup = StoreCollectives(dist.PrefixStore("nccl-facts", self.store), self.rank, self.size)
            self._nccl_usable = nccl_usable_for(setup.all_gather)[1]
        return self._nccl_usable

    def _make_transport(self, kind: str, choice: str) -> Transport:
        if kind == "cuda" and not self.nccl_usable():
            # gloo with staging, over a host transport of its own: CPU and CUDA collectives never share messages.
            return StagedTransport(self._direct_transport("cpu", choice, f"cuda-staged/{choice}/"), self.cuda_device)
        return self._direct_transport(kind, choice, f"{kind}/{choice}/")

    def _direct_transport(self, kind: str, choice: str, prefix: str) -> Transport:
        """The transport for tensors on ``kind`` as they are: shared memory, gloo, or NCCL for CUDA."""
        setup = StoreCollectives(dist.PrefixStore(prefix + "setup", self.store), self.rank, self.size)

        def network() -> Transport:
            store = dist.PrefixStore(prefix + "p2p", self.store)
            wait = timedelta(seconds=self.timeout)
            if kind == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = wait
                backend = dist.ProcessGroupNCCL(store, self.rank, self.size, options)
            else:
                backend = dist.ProcessGroupGloo(store, self.rank, self.size, wait)
            self.backends.append(backend)
            return TorchTransport(backend, self.timeout, name=f"{self.name}-{'nccl' if kind == 'cuda' else 'gloo'}")

        return compose(
            network, self.rank, self.size, kind, choice, setup.all_gather, setup.barrier, self.timeout, self.name
        )

    def close(self) -> None:
        """Let go of this channel's transports and gloo / NCCL groups; it makes no new ones after this.

        For a group whose ranks are gone (an elastic reset): nothing is sent, so no peer has to answer, and
        collectives already running on its transports fail or finish by themselves.
        """
        self.closed = True
        self._transports.clear()
        self.backends.clear()

    def subgroup(self, key: str, members: Sequence[int]) -> SideChannel:
        """The side channel of ``members`` (ranks of this group); only they call this, together."""
        members = sorted(members)
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is not one of the members {members} of subgroup {key!r}")
        counted = (key, tuple(members))
        self._subgroups[counted] = opened = self._subgroups.get(counted, 0) + 1
        store = dist.PrefixStore(f"sub/{key}/{','.join(map(str, members))}/{opened}", self.store)
        return SideChannel(store, members.index(self.rank), len(members), self.timeout, f"{self.name}/{key}")


def open_side_channel(
    rank: int,
    size: int,
    share: Callable[[Any], Any],
    timeout: float = DEFAULT_TIMEOUT,
    name: str = "side-channel",
) -> SideChannel:
    """Every rank of a group calls this together; ``share(obj)`` returns rank 0's ``obj`` on every rank."""
    address = None
    server = None
    if rank == 0:
        # Port 0: the OS picks a free one, so there is no race with other jobs on the host.
        server = dist.TCPStore(
            "0.0.0.0", 0, size, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False
        )
        address = (socket.gethostname(), advertised_address(), server.port)
    host, ip, port = share(address)
    if rank == 0:
        store = server
    else:
        try:
            store = dist.TCPStore(ip, port, size, is_master=False, timeout=timedelta(seconds=timeout))
        except (RuntimeError, OSError) as exc:  # DistNetworkError and friends
            raise RuntimeError(
                f"rank {rank} of {name} could not reach the side channel of its first rank at {ip}:{port} (host "
                f"{host}) within {timeout:g}s: {exc}. If the hosts share another interface, name it with "
                "GLOO_SOCKET_IFNAME."
            ) from exc
    return SideChannel(store, rank, size, timeout, name)
