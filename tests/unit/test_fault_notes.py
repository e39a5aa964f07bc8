"""The mailboxes through which a rank that gives up tells other hosts' ranks why
(hybrid_ext.comm.transports.fault_notes), in one process on loopback: read by the peer once it fails, bounded when a
peer is dead, refused from an address the sender did not advertise."""

from __future__ import annotations

import socket
import time

from hybrid_ext.comm.transports import fault_notes
from hybrid_ext.comm.transports.fault_notes import FaultNotes


def _pair_with(b: FaultNotes) -> tuple[FaultNotes, FaultNotes]:
    a = FaultNotes(0, "127.0.0.1")
    a.connect({1: (b.address, b.port)})
    b.connect({0: (a.address, a.port)})
    return a, b


def _pair() -> tuple[FaultNotes, FaultNotes]:
    a, b = FaultNotes(0, "127.0.0.1"), FaultNotes(1, "127.0.0.1")
    a.connect({1: (b.address, b.port)})
    b.connect({0: (a.address, a.port)})
    return a, b


def test_a_note_left_before_the_sender_leaves_is_read_by_the_peer_when_it_fails():
    a, b = _pair()
    try:
        a.leave("rank 0 gave up: rank 3 died")
        a.close()  # the sender is gone (its exit is what the peer notices): the note is still there
        assert b.read([0], wait=1.0) == {0: "rank 0 gave up: rank 3 died"}
        a, _ = _pair_with(b)
        a.leave("rank 0 gave up: rank 3 died; rank 1 (same host) saw it too")  # the latest note counts
        assert b.read([0], wait=1.0)[0].endswith("saw it too")
        assert a.read([1], wait=0) == {}  # nothing from b
    finally:
        a.close()
        b.close()


def test_reading_waits_for_a_note_on_its_way_and_no_longer_than_asked():
    a, b = _pair()
    try:
        start = time.monotonic()
        assert b.read([0], wait=0.3) == {}
        assert 0.25 < time.monotonic() - start < 2.0
        assert b.read([5], wait=5.0) == {}  # not a peer on another host: no wait at all
        assert time.monotonic() - start < 2.0
    finally:
        a.close()
        b.close()


def test_leaving_a_note_for_dead_or_unreachable_peers_is_bounded_and_silent():
    a = FaultNotes(0, "127.0.0.1")
    with socket.socket() as unused:  # a port nobody listens on: refused at once
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()
    # A listener that never reads: the kernel takes the note all the same.
    silent = socket.create_server(("127.0.0.1", 0), backlog=1)
    try:
        a.connect({1: dead, 2: silent.getsockname()[:2]})
        start = time.monotonic()
        a.leave("gave up")
        assert time.monotonic() - start < fault_notes.PUSH_SECONDS + 1.0
    finally:
        silent.close()
        a.close()


def test_a_note_from_an_address_its_rank_did_not_advertise_is_ignored():
    a, b = FaultNotes(0, "127.0.0.1"), FaultNotes(1, "127.0.0.1")
    try:
        b.connect({0: ("127.0.0.2", a.port)})  # rank 0 said it would be elsewhere
        a.connect({1: (b.address, b.port)})
        a.leave("forged")
        assert b.read([0], wait=0.3) == {}
    finally:
        a.close()
        b.close()


def test_a_closed_mailbox_stops_listening():
    a = FaultNotes(0, "127.0.0.1")
    a.close()
    time.sleep(0.1)
    with socket.socket() as probe:
        assert probe.connect_ex((a.address, a.port)) != 0  # refused: nothing listens there any more
