"""Why a rank gave up on a collective, pushed to the group's ranks on other hosts before it raises.

A rank that raises :class:`~hybrid_ext.comm.transport.PeerError` leaves the collective, and usually the job: its
exit closes its connections, so a peer on another host that was waiting on it sees only "connection closed by
rank 0" — not that rank 0 gave up because rank 1 died. Host-mates pass such notes through shared memory
(:meth:`~hybrid_ext.comm.shm_transport.ShmTransport.note`). Across hosts there is no shared place that outlives
the failing host (the c10d store lives in a rank or launcher of one host, often the failing one), so each rank of
a group that spans hosts listens on a small socket of its own, and a rank that gives up *pushes* its note to the
other hosts' ranks and waits for their acknowledgement (bounded) before it raises. A peer that then sees the
connection close finds the note already delivered.

Every push and wait has a deadline: a peer may be dead (refused at once) or out of reach (a cut link), and a
failing collective must still fail within its timeout. A note is accepted only from the address its rank
advertised at set-up.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterable

NOTE_BYTES = 4096  # a note carries its writer's whole message, which may quote its peers' notes
PUSH_SECONDS = 1.5  # the most a failing rank spends handing its note to the other hosts' ranks
READ_WAIT_SECONDS = 1.0  # how long a failed rank waits for a note from a peer that closed on it
_HEADER = struct.Struct("!iI")  # sender's group rank, note length


class FaultNotes:
    """This rank's mailbox for notes from other hosts' ranks, and the addresses of theirs (see the docstring)."""

    def __init__(self, rank: int, address: str) -> None:
        self.rank = rank
        self.peers: dict[int, tuple[str, int]] = {}  # group rank on another host -> its mailbox (address, port)
        self._inbox: dict[int, str] = {}
        self._arrived = threading.Condition()
        self._server = socket.create_server((address, 0))
        self.address, self.port = self._server.getsockname()[:2]
        threading.Thread(target=self._serve, name="hybrid-ext-fault-notes", daemon=True).start()

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
        for push in pushes:  # together: one deadline for all of them
            push.join(PUSH_SECONDS)

    def read(self, peers: Iterable[int], wait: float = READ_WAIT_SECONDS) -> dict[int, str]:
        """The notes ``peers`` left, waiting up to ``wait`` seconds for one of them (it may be on its way)."""
        peers = [p for p in dict.fromkeys(peers) if p in self.peers]
        with self._arrived:
            self._arrived.wait_for(lambda: any(p in self._inbox for p in peers), timeout=wait if peers else 0)
            return {p: self._inbox[p] for p in peers if p in self._inbox}

    def _serve(self) -> None:
        while True:
            try:
                conn, (source, _) = self._server.accept()
            except OSError:  # closed
                return
            try:
                with conn:
                    conn.settimeout(PUSH_SECONDS)
                    rank, length = _HEADER.unpack(_read_exactly(conn, _HEADER.size))
                    text = _read_exactly(conn, min(length, NOTE_BYTES)).decode(errors="replace")
                    if self.peers.get(rank, ("",))[0] != source:
                        continue  # not from where that rank said it would be
                    with self._arrived:
                        self._inbox[rank] = text  # the latest: a rank may add its host-mates' notes to its own
                        self._arrived.notify_all()
                    conn.sendall(b"k")
            except (OSError, struct.error):  # a sender that died mid-note: nothing to learn
                continue


def _push(mailbox: tuple[str, int], message: bytes) -> None:
    try:
        with socket.create_connection(mailbox, timeout=PUSH_SECONDS) as conn:
            conn.sendall(message)
            conn.recv(1)  # the acknowledgement: the note is in the peer's inbox before this rank raises
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
