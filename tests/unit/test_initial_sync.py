"""``broadcast_from_first``: every rank ends with the first rank's values, in collectives no larger than asked.

Two ranks run in threads of this process over a communicator that sums through shared slots (what a real group's
allreduce does, without processes).
"""

from __future__ import annotations

import threading

import pytest
import torch

from hybrid_ext.parallel.replicated_buffers import broadcast_from_first


class ThreadPairComm:
    """One of two ranks in threads: ``allreduce`` sums both ranks' tensors and records each call's elements."""

    size = 2

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.slots, self.barrier = rank, slots, barrier
        self.calls: list[tuple[str, int]] = []

    def allreduce(self, tensors, *, name=None, **_):
        assert len(tensors) == 1 and tensors[0].is_contiguous()
        self.calls.append((name, tensors[0].numel()))
        self.slots[self.rank] = tensors[0].clone()
        self.barrier.wait(timeout=30)
        total = self.slots[0] + self.slots[1]
        self.barrier.wait(timeout=30)
        tensors[0].copy_(total)


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(1000, generator=g)  # spans several pieces
    transposed = torch.randn(30, 20, generator=g).t()  # not contiguous: written back through a copy
    return [
        torch.randn(7, generator=g),
        big,
        transposed,
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g),
    ]


def _run(piece_bytes: int):
    slots: list = [None, None]
    barrier = threading.Barrier(2)
    comms = [ThreadPairComm(r, slots, barrier) for r in range(2)]
    tensors = [_tensors(seed=r) for r in range(2)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            broadcast_from_first(tensors[r], comms[r], piece_bytes=piece_bytes)
        except BaseException as error:  # reported by the test, in the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return tensors, comms


@pytest.mark.parametrize("piece_bytes", [4, 400, 1 << 20])
def test_every_rank_gets_the_first_ranks_values_in_pieces_no_larger_than_asked(piece_bytes):
    tensors, comms = _run(piece_bytes)
    first = _tensors(seed=0)
    for r in range(2):
        for got, want in zip(tensors[r], first):
            assert torch.equal(got, want), f"rank {r}"
    assert comms[0].calls == comms[1].calls  # the same collectives, named alike, on both ranks
    for name, elements in comms[0].calls:
        itemsize = 8 if "float64" in name else 4
        assert elements * itemsize <= max(piece_bytes, itemsize), name  # one element at least
    assert len({name for name, _ in comms[0].calls}) == len(comms[0].calls), "each collective named apart"


def test_small_tensors_share_a_collective():
    _, comms = _run(1 << 20)
    # float32: 7 + 1000 + 600 + 5 elements in one collective (the transposed one written back after its own);
    # float64: one.
    assert len(comms[0].calls) <= 3
