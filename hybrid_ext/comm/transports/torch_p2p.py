"""The torch.distributed transport: the transport contract over a process group's point-to-point ops.

Works with any process group whose backend has ``send``/``recv`` (gloo on CPU, NCCL on CUDA, MPI). Calls go
straight to the group object (group-local ranks, no per-call lookups in torch's Python layer) with a tag of
hybrid-ext's own, so they never match the user's point-to-point messages. A step's receive and send are posted
as one group (:func:`~hybrid_ext.comm.transports._c10d_private.post_grouped`): NCCL needs that, gloo takes the same
call. Every wait has the transport's timeout; a peer that dies or stops answering becomes a
:class:`~hybrid_ext.comm.transports.contract.PeerError`.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext.comm.buffers import ScratchPool
from hybrid_ext.comm.transports import device_route
from hybrid_ext.comm.transports._c10d_private import backend_name, backend_timeout_seconds, post_grouped
from hybrid_ext.comm.transports.contract import FusedReduce, PeerError
from hybrid_ext.comm.transports.fault_notes import FaultNotes
from hybrid_ext.comm.transports.shm import process_running

# Tag for hybrid-ext's messages ("HX"), distinct from the default tag 0 of user send/recv.
TAG = 0x4858
DEFAULT_TIMEOUT = 300.0
DEATH_CHECKS, DEATH_CHECK_SECONDS = 4, 0.05  # on a failed wait: how long to look for a local rank that died
_running = process_running


class TorchTransport(FusedReduce):
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
        self.local_pids: dict[int, int] = {}  # group rank -> pid, for the ranks on this host (see the factory)
        self._scratch = ScratchPool()  # where pipelined receives land before they are reduced
        self.remote_hosts: dict[int, tuple[str, str]] = {}  # group rank -> (host name, address), other hosts
        # Why ranks on other hosts gave up: a peer there that closed on this rank says why (see the factory).
        self.notes: FaultNotes | None = None
        self._refusals: dict[str, str | None] = {}  # device type -> why the backend cannot take it (None: it can)

    def _dead_ranks(self) -> str:
        """``"; rank 3 (pid 123, same host node1) has died"`` for each local rank that no longer runs, else ``""``."""
        dead: list[tuple[int, int]] = []
        for _ in range(DEATH_CHECKS):  # a peer's socket closes an instant before its process is gone
            dead = [(r, p) for r, p in sorted(self.local_pids.items()) if r != self.rank and not _running(p)]
            if dead or not self.local_pids:
                break
            time.sleep(DEATH_CHECK_SECONDS)
        host = socket.gethostname()  # named as the shared-memory transport names it: the message may travel
        return "".join(f"; rank {r} (pid {pid}, same host {host}) has died" for r, pid in dead)

    def _failure(self, message: str, remote: list[int]) -> PeerError:
        """The error for a failed step, with what its peers on other hosts said when they gave up (a peer that
        closed on this rank may have done so because a third rank died); left as this rank's own note too."""
        if self.notes is not None:
            heard = self.notes.read(remote) if remote else {}
            message += "".join(f"; rank {p} (host {self.remote_hosts[p][0]}) gave up: {n}" for p, n in heard.items())
            self.notes.leave(message)
        return PeerError(message)

    def leave_note(self, text: str) -> None:
        """Say, for the ranks on other hosts, why this rank gave up (a failure on another route)."""
        if self.notes is not None:
            self.notes.leave(text)

    def _where(self, *peers: int | None) -> str:
        """``" (rank 2 on host node1, 10.0.0.2)"`` for the peers on other hosts, else ``""``."""
        remote = [(p, *self.remote_hosts[p]) for p in dict.fromkeys(peers) if p in self.remote_hosts]
        return "".join(f" (rank {p} on host {host}, {address})" for p, host, address in remote)

    def exchange(self, send, send_to, recv, recv_from) -> None:
        self.finish(self.start(send, send_to, recv, recv_from))

    def exchange_reduce(self, send, send_to, target, recv_from, reduce) -> None:
        """Like :meth:`exchange`, but ``reduce(dst, src)`` each received chunk into ``target`` as it arrives, while
        the rest of the message is still on the wire (the executor's fused path; see :meth:`start`)."""
        self.finish(self.start(send, send_to, target, recv_from, reduce))

    def start(self, send, send_to, recv, recv_from, reduce=None) -> _Pending:
        """Post one step's receive and send (as one group); :meth:`finish` waits for them.

        Messages of at least two chunks (:data:`PIPELINE_CHUNK_BYTES`) travel as several, on backends that post
        each op as it comes (gloo): the receiver can reduce the first chunks while later ones arrive, and the
        sender's later chunks queue behind the first. Both ends split by the message's size alone, so any send
        matches its receive. With ``reduce``, ``recv`` is the target: chunks land in a buffer of this transport's
        and are reduced into it in :meth:`finish`.
        """
        device = (send if send is not None else recv).device
        self._check_devices(send, send_to, recv, recv_from)
        pipelined = self._pipelined(device)
        landing = self._landing(recv) if reduce is not None and recv is not None else recv
        recv_chunks = _chunks(landing, pipelined)
        send_chunks = _chunks(send, pipelined)

        def post():
            # The receives first: a peer's send can then complete into them at once.
            for chunk in recv_chunks:
                yield self.group.recv([chunk], recv_from, TAG)
            for chunk in send_chunks:
                yield self.group.send([chunk], send_to, TAG)

        peers = " and ".join(
            f"{what} rank {peer}"
            for what, peer, tensor in (("receive from", recv_from, recv), ("send to", send_to, send))
            if tensor is not None
        ) + self._where(recv_from if recv is not None else None, send_to if send is not None else None)
        remote = [p for p, t in ((recv_from, recv), (send_to, send)) if t is not None and p in self.remote_hosts]
        try:
            works = post_grouped(self.group, device, post)
        except RuntimeError as exc:
            raise self._failure(
                f"rank {self.rank}: could not start an exchange ({peers}){self._dead_ranks()}: {exc}", remote
            ) from exc
        reductions = []
        if reduce is not None and recv is not None:
            reductions = list(zip(_chunks(recv, pipelined), recv_chunks))
        # Per-chunk receive works come first where the backend returned one per op (gloo); otherwise wait for all.
        per_op = pipelined and len(works) == len(recv_chunks) + len(send_chunks)
        return _Pending(works, peers, remote, reductions if per_op else [], reduce, reductions if not per_op else [])

    def finish(self, pending: _Pending) -> None:
        for index, work in enumerate(pending.works):
            try:
                work.wait(self._wait_timeout)
            except RuntimeError as exc:  # DistBackendError, gloo timeouts, closed connections
                raise self._failure(
                    f"rank {self.rank} failed to {pending.peers} within {self.timeout:g}s{self._dead_ranks()}: {exc}",
                    pending.remote,
                ) from exc
            if index < len(pending.chunk_reductions):  # this receive chunk has landed: reduce it now
                dst, src = pending.chunk_reductions[index]
                pending.reduce(dst, src)
        for dst, src in pending.after_all:
            pending.reduce(dst, src)

    def _check_devices(self, send, send_to, recv, recv_from) -> None:
        """Raise before anything is posted if the backend cannot take these tensors as they are: gloo handed a
        CUDA tensor would write its device pointer to a socket and abort the process."""
        for tensor, what, peer in ((send, "send to", send_to), (recv, "receive from", recv_from)):
            if tensor is None:
                continue
            kind = tensor.device.type
            if kind not in self._refusals:
                self._refusals[kind] = self._refusal(tensor.device)
            if self._refusals[kind] is not None:
                raise device_route.DeviceRouteError(
                    f"rank {self.rank}: refusing to {what} rank {peer} a {tuple(tensor.shape)} {tensor.dtype} tensor "
                    f"on {tensor.device} over {self.name}: {self._refusals[kind]}"
                )

    def _refusal(self, device: torch.device) -> str | None:
        backend = backend_name(self.group, device)
        try:
            how = device_route.route(device.type, backend)
        except device_route.DeviceRouteError as exc:
            return str(exc)
        if how == device_route.STAGE:
            return (
                f"{backend} sends host tensors only, so {device.type} tensors must be staged through host memory "
                "first (transport_for stages them)"
            )
        return None

    def _pipelined(self, device: torch.device) -> bool:
        backend = self.group._get_backend(device) if isinstance(self.group, dist.ProcessGroup) else self.group
        return not getattr(backend, "supports_coalescing", False)  # NCCL pipelines inside its own kernels

    def _landing(self, like: torch.Tensor) -> torch.Tensor:
        """A receive buffer shaped like ``like`` (reused: one step at a time uses it)."""
        held = self._scratch.get(like.numel(), like.dtype, like.device, role="landing")
        return held[: like.numel()].view(like.shape)


# Messages of at least two chunks are pipelined (gloo): big enough that a chunk's overhead (one gloo op, tens of
# microseconds) is small beside its time on a 1-10 Gbit/s link, small enough that the first reduction starts early.
PIPELINE_CHUNK_BYTES = 1 << 20


def _chunks(tensor: torch.Tensor | None, pipelined: bool) -> list[torch.Tensor]:
    if tensor is None:
        return []
    flat = tensor.view(-1)
    step = max(PIPELINE_CHUNK_BYTES // max(flat.element_size(), 1), 1)
    if not pipelined or flat.numel() < 2 * step:
        return [flat]
    return [flat[i : i + step] for i in range(0, flat.numel(), step)]


class _Pending:
    """A posted step: its works, and the reductions to run as receive chunks land (or after all of them)."""

    __slots__ = ("after_all", "chunk_reductions", "peers", "reduce", "remote", "works")

    def __init__(self, works, peers, remote, chunk_reductions, reduce, after_all) -> None:
        self.works, self.peers, self.remote, self.reduce = works, peers, remote, reduce
        self.chunk_reductions, self.after_all = chunk_reductions, after_all


def _backend_name(group: Any) -> str:
    try:
        return str(group.name())
    except Exception:
        return type(group).__name__.lower()
