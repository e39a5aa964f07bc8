"""Why a rank gave up on a collective, pushed to the group's ranks on other hosts before it raises.

A rank that raises :class:`~hybrid_ext.comm.transports.contract.PeerError` leaves the collective, and usually the
job: its exit closes its connections, so a peer on another host that was waiting on it sees only "connection closed by
rank 0" — not that rank 0 gave up because rank 1 died. Host-mates pass such notes through shared memory
(:meth:`~hybrid_ext.comm.transports.shm.ShmTransport.note`). Across hosts there is no shared place that outlives
the failing host (the c10d store lives in a rank or launcher of one host, often the failing one), so each rank of
a group that spans hosts listens on a small socket of its own, and a rank that gives up *pushes* its note to the
other hosts' ranks (the kernel of each takes it, no thread is needed to listen) before it raises. A peer that
then sees the connection close reads its mail and finds the note there (waiting up to a second for one in flight).

Every push and wait has a deadline: a peer may be dead (refused at once) or out of reach (a cut link), and a
failing collective must still fail within its timeout. A note is accepted only from the address its rank
advertised at set-up.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable

NOTE_BYTES = 4096  # a note carries its writer's whole message, which may quote its peers' notes
PUSH_SECONDS = 1.5  # the most a failing rank spends handing its note to the other hosts' ranks
READ_WAIT_SECONDS = 1.0  # how long a failed rank waits for a note from a peer that closed on it
POLL_SECONDS = 0.05
BACKLOG = 256  # senders whose connections the kernel completes before this rank reads them
_HEADER = struct.Struct("!iI")  # sender's group rank, note length


class FaultNotes:
    """This rank's mailbox for notes from other hosts' ranks, and the addresses of theirs (see the docstring).

    No thread serves the mailbox: the kernel completes a sender's connection and holds its note in the
    listening socket's queue; a rank reads its mail only when it has failed itself.
    """

    def __init__(self, rank: int, address: str) -> None:
        self.rank = rank
        self.peers: dict[int, tuple[str, int]] = {}  # group rank on another host -> its mailbox (address, port)
        self._inbox: dict[int, str] = {}
        self._lock = threading.Lock()  # a segmented allreduce may fail on two threads at once
        self._server = socket.create_server((address, 0), backlog=BACKLOG)
        self._server.setblocking(False)
        self.address, self.port = self._server.getsockname()[:2]

    def connect(self, mailboxes: dict[int, tuple[str, int]]) -> None:
        """Learn the other hosts' ranks' mailboxes (from the group's set-up exchange)."""
        self.peers = {r: m for r, m in mailboxes.items() if r != self.rank}

    def close(self) -> None:
        self._server.close()

    def leave(self, text: str) -> None:
        """Hand this rank's reason for giving up to every rank on another host (never raises)."""
        data = text.encode(errors="replace")[:NOTE_BYTES]
        message = _HEADER.pack(self.rank, len(data)) + data
        pushes = [threading.Thread(target=_push, args=(m, message), daemon=True) for m in self.peers.values()]
        for push in pushes:
            push.start()
        deadline = time.monotonic() + PUSH_SECONDS
        for push in pushes:  # together: one deadline for all of them
            push.join(max(deadline - time.monotonic(), 0.0))

    def read(self, peers: Iterable[int], wait: float = READ_WAIT_SECONDS) -> dict[int, str]:
        """The notes ``peers`` left, waiting up to ``wait`` seconds for one of them (it may be on its way)."""
        peers = [p for p in dict.fromkeys(peers) if p in self.peers]
        if not peers:
            return {}
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                self._collect(deadline)
                left = deadline - time.monotonic()
                if any(p in self._inbox for p in peers) or left <= 0:
                    return {p: self._inbox[p] for p in peers if p in self._inbox}
                with contextlib.suppress(OSError, ValueError):  # closed meanwhile: the loop ends at the deadline
                    select.select([self._server], [], [], min(left, POLL_SECONDS))

    def _collect(self, deadline: float) -> None:
        """Read every note whose sender's connection is waiting in the queue."""
        while True:
            try:
                conn, (source, _) = self._server.accept()
            except (BlockingIOError, OSError):  # none waiting, or closed
                return
            try:
                with conn:
                    conn.settimeout(max(min(deadline - time.monotonic(), PUSH_SECONDS), 0.05))
                    rank, length = _HEADER.unpack(_read_exactly(conn, _HEADER.size))
                    text = _read_exactly(conn, min(length, NOTE_BYTES)).decode(errors="replace")
            except (OSError, struct.error):  # a sender that died mid-note: nothing to learn
                continue
            if self.peers.get(rank, ("",))[0] == source:  # only from where that rank said it would be
                self._inbox[rank] = text  # the latest: a rank may add its host-mates' notes to its own


def _push(mailbox: tuple[str, int], message: bytes) -> None:
    try:
        with socket.create_connection(mailbox, timeout=PUSH_SECONDS) as conn:
            conn.sendall(message)  # in the peer's kernel (or on the wire, ahead of this rank's exit) when it returns
            conn.shutdown(socket.SHUT_WR)
    except OSError:  # the peer is dead or out of reach: it will not read notes anyway
        pass


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        chunk = conn.recv(count - got)
        if not chunk:
            raise OSError("closed mid-note")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
