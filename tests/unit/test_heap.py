"""steady_heap's mallopt calls, on a stand-in C library (the real one is changed only in ranks: see
tests/multiprocess/test_heap_ranks.py)."""

from __future__ import annotations

from hybrid_ext import config
from hybrid_ext.launch import heap


class FakeGlibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls, self.answer = [], answer

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


def test_steady_heap_turns_chunk_mmaps_off_and_trimming_up():
    libc = FakeGlibc()
    assert heap.steady_heap(libc) is True
    assert libc.calls == [(heap.M_MMAP_MAX, 0), (heap.M_TRIM_THRESHOLD, 2**31 - 1)]


def test_the_knob_leaves_glibc_alone_and_a_refusal_is_reported():
    libc = FakeGlibc()
    with config.override(HYBRID_EXT_HEAP="default"):
        assert heap.steady_heap(libc) is False
    assert libc.calls == []
    assert heap.steady_heap(FakeGlibc(answer=0)) is False  # mallopt returns 0 on error
