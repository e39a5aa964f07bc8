"""A rank with a steady heap (hybrid_ext.launch.heap) gets a freed 64 MiB tensor's memory back without a page
fault; with glibc's defaults every such tensor is mapped afresh and faults on each of its pages."""

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


def _faults_of_a_second_tensor(rank: int, world: int, heap: str) -> tuple[bool, int]:
    with config.override(HYBRID_EXT_HEAP=heap):
        steady = steady_heap()
    torch.ones(ELEMENTS).sum()  # allocated, touched, freed: as one step's activation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(ELEMENTS).sum()
    return steady, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="needs getrusage")
def test_a_steady_heap_reuses_a_freed_tensors_pages():
    steady, faults = spawn(_faults_of_a_second_tensor, 1, "steady", backend=None, timeout=60)[0]
    if not steady:
        pytest.skip("the C library is not glibc")
    steady_default, faults_default = spawn(_faults_of_a_second_tensor, 1, "default", backend=None, timeout=60)[0]
    # glibc's own: every page zeroed again (one fault per 4 KiB page, or per 2 MiB where huge pages back it)
    assert not steady_default and faults_default >= ELEMENTS * 4 // 2**21
    assert faults < min(PAGES // 100, faults_default)
