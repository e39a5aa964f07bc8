"""The transport ``bench train``'s compute-only limit runs on: every message skipped, every shape kept."""

from __future__ import annotations


class MirrorTransport:
    """A transport that moves nothing: every peer 'answers' with a copy of what this rank sent (or zeros).

    Keeps every shape and every computation of a run while skipping its communication.
    """

    name = "mirror"

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size, self.timeout = rank, size, 60.0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        if recv is None:
            return
        if send is not None and send.numel() == recv.numel():
            recv.copy_(send)
        else:
            recv.zero_()
