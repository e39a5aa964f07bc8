"""A rank with a steady heap (hybrid_ext.launch.heap) gets a freed 64 MiB tensor's memory back without page faults
once its heap holds the step's blocks (the first steps may still take fresh memory: a small block allocated after a
large one keeps it from merging with the free space around it); with glibc's defaults every such tensor is mapped
afresh, at every step, and faults on each of its pages."""

from __future__ import annotations

import resource

import pytest
import torch

from hybrid_ext import config
from hybrid_ext.launch import spawn
from hybrid_ext.launch.heap import steady_heap

pytestmark = pytest.mark.timeout(120)
ELEMENTS = 16 * 2**20  # float32: 64 MiB, above glibc's largest mmap threshold (32 MiB)
PAGES = ELEMENTS * 4 // 4096
STEPS, LAST = 16, 4  # measured here: the heap held the block from the 5th to the 8th step on


def _faults_of_the_last_steps(rank: int, world: int, heap: str) -> tuple[bool, int]:
    """Whether the heap is steady, and the page faults of the last LAST of STEPS "steps" that each allocate, touch
    and free one large tensor (and keep a small one from it, as a step keeps its loss)."""
    with config.override(HYBRID_EXT_HEAP=heap):
        steady = steady_heap()
    faults = []
    for _ in range(STEPS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(ELEMENTS).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return steady, sum(faults[-LAST:])


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="needs getrusage")
def test_a_steady_heap_reuses_a_freed_tensors_pages():
    steady, faults = spawn(_faults_of_the_last_steps, 1, "steady", backend=None, timeout=60)[0]
    if not steady:
        pytest.skip("the C library is not glibc")
    steady_default, faults_default = spawn(_faults_of_the_last_steps, 1, "default", backend=None, timeout=60)[0]
    # glibc's own: every page zeroed again (one fault per 4 KiB page, or per 2 MiB where huge pages back it)
    assert not steady_default and faults_default >= LAST * ELEMENTS * 4 // 2**21
    assert faults < min(LAST * PAGES // 100, faults_default)
