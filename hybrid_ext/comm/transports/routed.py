"""A group that spans hosts: shared memory between the ranks of one host, the network to the others.

A schedule step sends to one peer while receiving from another; each side takes the route its peer needs. When
the two routes differ, the network side is posted first and completes in the background (gloo's and NCCL's own
threads move it) while the shared-memory side runs on this thread, so neither waits on the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from hybrid_ext.comm.transports.contract import FusedReduce, HostRoutes, PeerError
from hybrid_ext.comm.transports.shm import ShmTransport
from hybrid_ext.comm.transports.torch_p2p import TorchTransport

LOCAL_GRACE_SECONDS = 5.0


class RoutedTransport(FusedReduce, HostRoutes):
    """The transport contract over two transports: ``local`` for ``local_ranks``, ``network`` for everyone else."""

    def __init__(
        self,
        local: ShmTransport | None,
        local_ranks: list[int],
        network: TorchTransport,
        hosts: tuple[int, ...],
    ) -> None:
        self.local, self.network = local, network
        self.rank, self.size = network.rank, network.size
        self.hosts = hosts  # every group rank's host: what the hierarchical allreduce plans with
        if local is None:  # no shared memory here (alone on the host, or none could be allocated)
            local_ranks = [self.rank]
        if local is not None:
            # A host-mate may wait on the network for up to its timeout before it leaves its note (see
            # _network_failures): a rank waiting on it over shared memory must outlast that, or it would time out
            # first and blame the host-mate instead of the far host.
            local.timeout = max(local.timeout, network.timeout + max(LOCAL_GRACE_SECONDS, 0.25 * network.timeout))
        self.timeout = max(local.timeout if local else 0.0, network.timeout)
        self.name = f"{local.name}+{network.name}" if local else network.name
        self._local_index = {rank: index for index, rank in enumerate(local_ranks)}
        self.local_ranks = tuple(local_ranks)

    def is_local(self, peer: int) -> bool:
        return self.local is not None and peer in self._local_index

    def exchange(
        self, send: torch.Tensor | None, send_to: int | None, recv: torch.Tensor | None, recv_from: int | None
    ) -> None:
        self._route(send, send_to, recv, recv_from, None)

    def exchange_reduce(self, send, send_to, target, recv_from, reduce) -> None:
        """Like :meth:`exchange`, reducing what arrives into ``target`` on the way (each route's fused path)."""
        self._route(send, send_to, target, recv_from, reduce)

    def _route(self, send, send_to, recv, recv_from, reduce) -> None:
        send_local = send is not None and self.is_local(send_to)
        recv_local = recv is not None and self.is_local(recv_from)
        if (send is None or send_local) and (recv is None or recv_local) and self.local is not None:
            self._local(send, send_to, recv, recv_from, reduce)
            return
        if not send_local and not recv_local:
            with self._network_failures():
                self.network.finish(self.network.start(send, send_to, recv, recv_from, reduce))
            return
        # One side local, the other across the network: post the network side, run the local one, then wait.
        # (A local failure propagates at once; the posted network side is abandoned with the broken group.)
        network_side = (None, None, recv, recv_from, reduce) if send_local else (send, send_to, None, None)
        with self._network_failures():
            pending = self.network.start(*network_side)
        if send_local:
            self._local(send, send_to, None, None, None)
        else:
            self._local(None, None, recv, recv_from, reduce)
        with self._network_failures():
            self.network.finish(pending)

    @contextlib.contextmanager
    def _network_failures(self) -> Iterator[None]:
        """A network failure is left as a note for this host's ranks, and their own notes join its message.

        A host-mate waiting on this rank over shared memory then raises with the reason (a rank on another host
        died, a link was cut) instead of waiting out its timeout and blaming this rank; and a rank whose own
        network peer merely gave up names what a host-mate saw (say, the rank that died).
        """
        try:
            yield
        except PeerError as exc:
            if self.local is None:
                raise
            others = self.local.notes()
            self.local.note(str(exc))
            if not others:
                raise
            seen = "; ".join(f"rank {self.local_ranks[r]} (same host) gave up: {n}" for r, n in others.items())
            combined = PeerError(f"{exc}; {seen}")
            self.network.leave_note(str(combined))
            raise combined from exc

    def _local(self, send, send_to, recv, recv_from, reduce) -> None:
        send_to, recv_from = self._local_index.get(send_to), self._local_index.get(recv_from)
        try:
            if reduce is None:
                self.local.exchange(send, send_to, recv, recv_from)
            else:
                self.local.exchange_reduce(send, send_to, recv, recv_from, reduce)
        except PeerError as exc:  # a host-mate died: ranks on other hosts waiting on this one learn it from the note
            self.network.leave_note(str(exc))
            raise


__all__ = ["PeerError", "RoutedTransport"]
