"""A shared-memory transport for ranks on one host: the transport contract without sockets or kernel copies.

Why: on a host whose ranks share few cores, a message over gloo's TCP transport costs two kernel copies, a
dozen system calls and a wake-up of gloo's event-loop thread, then of the waiting thread — ~0.25 ms of CPU
per message on the 2-core machines this project is measured on — and the wake-ups queue behind other ranks
for a core. Here a message is one copy into a mapped file and one copy (or a reduction) out of it, with no
system call on the fast path.

Layout. Each rank creates one file in ``/dev/shm`` with one channel per destination rank; every rank maps
every file. A channel is a single-producer single-consumer ring of ``SLOTS`` slots of ``slot_bytes`` each,
with two 64-bit counters on separate cache lines: ``published`` (written only by the sender) and ``consumed``
(written only by the receiver). The sender writes a slot, then advances ``published``; the receiver reads
a slot, then advances ``consumed``. Messages longer than a slot travel as consecutive chunks; both sides
know a message's length from the schedule, so no header is needed. :meth:`ShmTransport.exchange` moves its
send and its receive forward together, chunk by chunk, so two peers exchanging large messages never wait
on each other.

Ordering. This relies on x86-64's total store order (a store is never seen before an earlier store by the
same core): data is written before the counter that publishes it. On other architectures
:func:`shm_supported` is False and callers use the torch transport instead.

Waiting. A rank with nothing to do yields its core (``sched_yield``) so that the rank it waits for can run,
and falls back to short sleeps after a while so an idle wait does not burn a core. Every wait checks the
transport's deadline and whether every process of the group still exists: a dead rank raises
:class:`~hybrid_ext.comm.transports.contract.PeerError` naming it within ``PEER_CHECK_SECONDS`` — on every waiting rank,
also on those whose own partner is alive but gave up — and a stuck one at the timeout. A rank that gives up on
the network (a group spanning hosts: a rank on another host died, a link was cut) leaves a note saying why in
its file (:meth:`ShmTransport.note`); host-mates waiting on it raise with that reason at their next check.

Files. Each file is named ``hybrid-ext-<pid namespace>-<pid>-<random>-r<rank>`` and unlinked as soon as every
rank has mapped it (the mappings keep the memory until the processes exit). A rank killed during set-up, before
the unlink, would leave its file behind: every later set-up on the host removes files whose creator, in this
pid namespace, no longer runs (:func:`remove_orphans`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_ext.comm.transports import shm_allreduce
from hybrid_ext.comm.transports.contract import FusedReduce, HasDirect, PeerError

SHM_DIR = Path("/dev/shm")
SLOTS = 4
DEFAULT_SLOT_BYTES = 1 << 20
COUNTER_STRIDE = 8  # int64s per counter: one 64-byte cache line each
HEADER_BYTES = 2 * COUNTER_STRIDE * 8
YIELD_SPINS = 20  # sched_yield rounds before sleeping on the doorbell
FUTEX_WAIT_SECONDS = 0.002
PEER_CHECK_SECONDS = 0.5


def shm_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir() and hasattr(os, "sched_yield")


class _Channel:
    """One direction between two ranks, inside the sender's file."""

    __slots__ = ("counters", "slot_bytes", "slots")

    def __init__(self, buffer: mmap.mmap, offset: int, slot_bytes: int) -> None:
        self.counters = np.frombuffer(buffer, dtype=np.int64, count=2 * COUNTER_STRIDE, offset=offset)
        data = torch.frombuffer(buffer, dtype=torch.uint8, count=SLOTS * slot_bytes, offset=offset + HEADER_BYTES)
        self.slots = [data[i * slot_bytes : (i + 1) * slot_bytes] for i in range(SLOTS)]
        self.slot_bytes = slot_bytes

    # counters[0] = published (sender), counters[COUNTER_STRIDE] = consumed (receiver)
    def can_write(self) -> bool:
        return int(self.counters[0]) - int(self.counters[COUNTER_STRIDE]) < SLOTS

    def can_read(self) -> bool:
        return int(self.counters[0]) > int(self.counters[COUNTER_STRIDE])

    def write(self, chunk: torch.Tensor) -> None:
        published = int(self.counters[0])
        self.slots[published % SLOTS][: chunk.numel()].copy_(chunk)
        self.counters[0] = published + 1  # after the data (total store order)

    def reduce_into(self, out: torch.Tensor, reduce) -> None:
        consumed = int(self.counters[COUNTER_STRIDE])
        nbytes = out.numel() * out.element_size()
        reduce(out, self.slots[consumed % SLOTS][:nbytes].view(out.dtype))
        self.counters[COUNTER_STRIDE] = consumed + 1

    def read_into(self, out: torch.Tensor) -> None:
        consumed = int(self.counters[COUNTER_STRIDE])
        out.copy_(self.slots[consumed % SLOTS][: out.numel()])
        self.counters[COUNTER_STRIDE] = consumed + 1


def channel_bytes(slot_bytes: int) -> int:
    return HEADER_BYTES + SLOTS * slot_bytes


DOORBELL_BYTES = 64  # each rank's file starts with its doorbell: a 32-bit futex word on its own cache line
NOTE_BYTES = 1024  # then its note: why it gave up on the network (length, then UTF-8), for its host-mates
HEAD_BYTES = DOORBELL_BYTES + NOTE_BYTES  # the channels follow


class _Futex:
    """Linux futex wait / wake on a 32-bit word of shared memory, through ctypes (no compiled code)."""

    SYS_FUTEX = 202  # x86-64
    WAIT, WAKE = 0, 1

    class _Timespec(ctypes.Structure):
        _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))

    def __init__(self) -> None:
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long

    def wait(self, address: int, expected: int, seconds: float) -> None:
        """Sleep while the word at ``address`` equals ``expected``, at most ``seconds``."""
        timeout = self._Timespec(0, int(seconds * 1e9))
        self._syscall(
            self.SYS_FUTEX, ctypes.c_void_p(address), self.WAIT, ctypes.c_int(expected), ctypes.byref(timeout), None, 0
        )

    def wake(self, address: int) -> None:
        self._syscall(self.SYS_FUTEX, ctypes.c_void_p(address), self.WAKE, ctypes.c_int(1 << 30), None, None, 0)


def file_bytes(size: int, slot_bytes: int) -> int:
    """A rank's file: its doorbell and note, a channel to every rank, then its buffers for :mod:`shm_allreduce`."""
    return HEAD_BYTES + size * channel_bytes(slot_bytes) + shm_allreduce.region_bytes()


class ShmTransport(FusedReduce, HasDirect):
    """The transport contract over shared memory between processes of one host (see the module docstring).

    Build it with :func:`create` — every rank of the group must call it together — or from the torch
    integration (``TorchTransport`` groups whose ranks share a host get one automatically).
    """

    name = "shm"

    def __init__(
        self,
        rank: int,
        size: int,
        files: list[Path],
        pids: list[int],
        slot_bytes: int,
        timeout: float,
        group_ranks: list[int] | None = None,
    ) -> None:
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self._pids = pids
        self._label = group_ranks or list(range(size))  # how errors name ranks: their ranks in the whole group
        self._maps: list[mmap.mmap] = []
        self._out: list[_Channel | None] = [None] * size
        self._in: list[_Channel | None] = [None] * size
        stride = channel_bytes(slot_bytes)
        self._futex = _Futex()
        self._doorbells: list[np.ndarray] = []
        self._doorbell_addresses: list[int] = []
        regions: list[int] = []
        for owner, path in enumerate(files):
            with open(path, "r+b") as f:
                mm = mmap.mmap(f.fileno(), file_bytes(size, slot_bytes))
            self._maps.append(mm)
            bell = np.frombuffer(mm, dtype=np.int32, count=1, offset=0)
            self._doorbells.append(bell)
            self._doorbell_addresses.append(bell.ctypes.data)
            region = HEAD_BYTES + size * stride
            regions.append(np.frombuffer(mm, dtype=np.uint8, count=1, offset=region).ctypes.data)
            if owner == rank:
                self._out = [
                    _Channel(mm, HEAD_BYTES + dst * stride, slot_bytes) if dst != rank else None for dst in range(size)
                ]
            else:
                self._in[owner] = _Channel(mm, HEAD_BYTES + rank * stride, slot_bytes)
        # The group's allreduce in one pass over every rank's buffer (its own capability: the schedules use exchange).
        self.direct = shm_allreduce.DirectAllreduce(self, regions, self._doorbell_addresses)

    def label(self, rank: int) -> int:
        """How errors name a rank of this transport: its rank in the whole group."""
        return self._label[rank]

    def _ring(self, peer: int) -> None:
        """Tell ``peer`` that something it may wait for changed (a chunk arrived, or a slot was freed)."""
        bell = self._doorbells[peer]
        bell[0] = (int(bell[0]) + 1) & 0x7FFFFFFF
        self._futex.wake(self._doorbell_addresses[peer])

    def exchange(self, send, send_to, recv, recv_from) -> None:
        self._move(send, send_to, recv, recv_from, None)

    def exchange_reduce(self, send, send_to, target, recv_from, reduce) -> None:
        """Like :meth:`exchange`, but reduce each received chunk into ``target`` straight from shared memory.

        ``reduce(dst, src)`` combines ``src`` into ``dst`` in place. Saves the copy into a receive buffer.
        """
        self._move(send, send_to, target, recv_from, reduce)

    def _move(self, send, send_to, recv, recv_from, reduce) -> None:
        out = self._out[send_to] if send is not None else None
        inc = self._in[recv_from] if recv is not None else None
        send_bytes = send.view(-1).view(torch.uint8) if send is not None else None
        recv_bytes = recv.view(-1).view(torch.uint8) if recv is not None else None
        dtype = recv.dtype if recv is not None else None
        sent, sent_total = 0, (send_bytes.numel() if send_bytes is not None else 0)
        got, got_total = 0, (recv_bytes.numel() if recv_bytes is not None else 0)
        my_bell = self._doorbells[self.rank]
        idle = 0
        deadline = None
        next_peer_check = 0.0
        while sent < sent_total or got < got_total:
            bell = int(my_bell[0])  # read before checking, so a change after the check cancels the sleep
            progressed = False
            if sent < sent_total and out.can_write():
                step = min(out.slot_bytes, sent_total - sent)
                out.write(send_bytes[sent : sent + step])
                sent += step
                self._ring(send_to)
                progressed = True
            if got < got_total and inc.can_read():
                step = min(inc.slot_bytes, got_total - got)
                if reduce is None:
                    inc.read_into(recv_bytes[got : got + step])
                else:
                    inc.reduce_into(recv_bytes[got : got + step].view(dtype), reduce)
                got += step
                self._ring(recv_from)
                progressed = True
            if progressed:
                idle = 0
                continue
            idle += 1
            if idle <= YIELD_SPINS:
                os.sched_yield()
            else:
                # Sleep until a peer rings; the short timeout bounds a wake-up lost to a concurrent ring.
                self._futex.wait(self._doorbell_addresses[self.rank], bell, FUTEX_WAIT_SECONDS)
            if idle % 64 == 0:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout
                    next_peer_check = now + PEER_CHECK_SECONDS
                peer = send_to if sent < sent_total else recv_from
                if now > next_peer_check:
                    next_peer_check = now + PEER_CHECK_SECONDS
                    self.check_alive(peer)
                if now > deadline:
                    what = "send to" if sent < sent_total else "receive from"
                    raise PeerError(
                        f"rank {self._label[self.rank]} failed to {what} rank {self._label[peer]} (same host, "
                        f"shared memory) within {self.timeout:g}s"
                    )

    def check_alive(self, peer: int) -> None:
        """Raise if any rank of the group has died, naming each (and the ``peer`` this rank waited for).

        Checking every rank, not only the partner, names the rank that died on every waiting rank, also on one
        whose partner is alive but stopped when it saw the death (the partner would otherwise take the blame).
        """
        dead = [r for r in range(self.size) if r != self.rank and not process_running(self._pids[r])]
        notes = self.notes()  # read after the pid check: a rank that gave up wrote its note before it exited
        problems = []
        if dead:
            host = socket.gethostname()
            gone = "; ".join(f"rank {self._label[r]} (pid {self._pids[r]}, same host {host}) has died" for r in dead)
            problems.append(f"peer {gone}")
        # A host-mate that gave up on the network (a dead rank or a cut link on another host) says why; it may
        # have exited since, so its note goes with the news of its death.
        problems += [f"rank {self._label[r]} (same host) gave up: {note}" for r, note in notes.items()]
        if problems:
            raise PeerError(
                f"rank {self._label[self.rank]}, waiting for rank {self._label[peer]}: {'; '.join(problems)}"
            )

    def note(self, text: str) -> None:
        """Leave ``text`` (why this rank gave up on the group) where its host-mates look while they wait.

        A rank that waits on a host-mate over shared memory cannot see the network failure that host-mate ran
        into; without the note it would wait out its own timeout and then blame the host-mate.
        """
        data = text.encode(errors="replace")[: NOTE_BYTES - 8]
        area = np.frombuffer(self._maps[self.rank], dtype=np.uint8, count=NOTE_BYTES, offset=DOORBELL_BYTES)
        area[8 : 8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        area[:8].view(np.int64)[0] = len(data)  # after the text (total store order)
        for peer in range(self.size):
            if peer != self.rank:
                self._ring(peer)

    def notes(self) -> dict[int, str]:
        """The notes host-mates left (:meth:`note`), by local rank."""
        found = {}
        for r in range(self.size):
            if r == self.rank:
                continue
            area = np.frombuffer(self._maps[r], dtype=np.uint8, count=NOTE_BYTES, offset=DOORBELL_BYTES)
            length = int(area[:8].view(np.int64)[0])
            if 0 < length <= NOTE_BYTES - 8:
                found[r] = bytes(area[8 : 8 + length]).decode(errors="replace")
        return found


def process_running(pid: int) -> bool:
    """Whether a process with this pid runs (in this pid namespace): not gone, and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        # A killed process its parent has not reaped yet still answers kill(pid, 0): read its state.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to tell: trust kill()
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


FILE_PREFIX = "hybrid-ext-"
_FILE_NAME = re.compile(r"hybrid-ext-(\d+)-(\d+)-[0-9a-f]+-r\d+")


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def remove_orphans(directory: Path = SHM_DIR) -> list[Path]:
    """Delete set-up files whose creator (a process of this pid namespace) no longer runs; return them.

    Only files named by this module in this pid namespace are touched: a pid seen from another namespace (a
    container sharing ``/dev/shm``) means nothing here, and a live creator keeps its file.
    """
    namespace = _pid_namespace()
    removed: list[Path] = []
    if namespace is None:
        return removed
    try:
        names = [entry.name for entry in os.scandir(directory) if entry.name.startswith(FILE_PREFIX)]
    except OSError:
        return removed
    for name in names:
        match = _FILE_NAME.fullmatch(name)
        if match is None or int(match[1]) != namespace or process_running(int(match[2])):
            continue
        path = directory / name
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass  # removed by another rank in the meantime
    return removed


def shm_domain() -> str:
    """Identifies the shared-memory mount this process sees: ranks with equal ids can map each other's files.

    The kernel's boot id and the device number of ``/dev/shm`` itself (each tmpfs mount has its own): two
    containers with one hostname but separate ``/dev/shm`` differ, as do the emulated hosts of
    ``hybrid-ext cluster``; processes of one host (or of containers sharing its ``/dev/shm``) agree.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        mount = os.stat(SHM_DIR).st_dev
    except OSError:
        mount = -1
    return f"{boot}/{mount}"


@dataclass(frozen=True)
class HostShm:
    """What :func:`create` found: the shared-memory transport among this host's ranks, and every rank's host."""

    transport: ShmTransport | None  # None: no peer on this host, or shared memory could not be allocated
    local_ranks: list[int]  # the group ranks on this host, in order (the transport's ranks index this list)
    hosts: tuple[int, ...]  # host index of every group rank (hosts numbered by their first rank)
    problem: str | None = None  # why shared memory could not be allocated on this host, if it could not


def create(rank: int, size: int, all_gather, barrier, timeout: float, slot_bytes: int = DEFAULT_SLOT_BYTES) -> HostShm:
    """Set up a :class:`ShmTransport` among the ranks of the group that share this host's shared memory.

    Every rank of the group calls this together. The transport is None where this rank has no peer on its host,
    or shared memory cannot be allocated on some rank of the host (then every rank of that host gets None, and
    the host's first rank says why once).
    ``all_gather(obj) -> list`` and ``barrier()`` are the host framework's, used at set-up only. The files are
    unlinked as soon as everyone has mapped them, so nothing is left in /dev/shm, even if a process is killed.
    """
    domains = all_gather((shm_domain(), os.getpid()))
    local = [r for r, (domain, _) in enumerate(domains) if domain == domains[rank][0]]
    numbering: dict[str, int] = {}
    hosts = tuple(numbering.setdefault(domain, len(numbering)) for domain, _ in domains)
    path = SHM_DIR / f"{FILE_PREFIX}{_pid_namespace() or 0}-{os.getpid()}-{uuid.uuid4().hex}-r{rank}"
    problem = None
    files: list = []
    problems: list[str] = []
    if len(local) > 1:
        remove_orphans()
        problem = _allocate(path, file_bytes(len(local), slot_bytes))
    try:
        files = all_gather((str(path), problem))
        problems = [files[r][1] for r in local if files[r][1]]
        transport = None
        if len(local) > 1 and not problems:
            transport = ShmTransport(
                local.index(rank),
                len(local),
                [Path(files[r][0]) for r in local],
                [domains[r][1] for r in local],
                slot_bytes,
                timeout,
                group_ranks=local,
            )
        elif problems and rank == local[0]:
            print(f"hybrid-ext: shared memory unavailable ({problems[0]}); ranks on this host use the network")
        barrier()  # everyone has mapped what it needs before anyone deletes a file
    finally:
        # Every rank removes every local file it knows of: a rank that dies here leaves nothing behind.
        for other in [str(path)] + [files[r][0] for r in local if files]:
            Path(other).unlink(missing_ok=True)
    return HostShm(transport, local, hosts, problems[0] if problems else None)


def _allocate(path: Path, nbytes: int) -> str | None:
    """Create ``path`` with ``nbytes`` really reserved; the reason if /dev/shm cannot hold it.

    Reserving now (not a sparse file) turns a full ``/dev/shm`` — 64 MiB in a default container — into an error
    here, instead of a SIGBUS in the middle of a training step when a page is first touched.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    try:
        os.posix_fallocate(fd, 0, nbytes)  # zero-filled: all counters start at 0
    except OSError as exc:
        return f"{SHM_DIR} cannot hold {nbytes / 2**20:.0f} MiB more: {exc.strerror}"
    finally:
        os.close(fd)
    return None
