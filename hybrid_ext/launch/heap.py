"""A steady glibc heap for CPU ranks: freed tensors' memory kept for the next step instead of unmapped.

glibc's malloc serves a block above its mmap threshold with a fresh ``mmap`` and unmaps it when freed; the
threshold starts at 128 KiB and rises to the size of the largest such block freed, at most 32 MiB on 64-bit. A
CPU training step allocates and frees the same large activations and gradients every step, so whether each comes
back as pages the kernel must zero again at first touch depends on what the process freed before: the same layer
timed several times as long from one process to the next, a step up to 1.5× as long (``docs/benchmarks.md``, "On a
steady heap"). :func:`steady_heap` turns the chunk-level mmaps off and the trimming of the heap's top up, as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…`` would at a process's start — what torch's ``run_cpu`` gets by
preloading jemalloc or tcmalloc. A process then keeps its largest step's memory rather than returning it and
taking it again, once its first few steps have grown the heap to hold their blocks (a small block allocated after
a large one keeps the large one, freed, from merging with its neighbours). A thread's own arena still maps a block
larger than its heap (64 MiB).

hybrid-ext's ranks (``hybrid-ext bench train``, the recipes) and ``hybrid-ext plan``'s profile call it, so that the
layer times a plan is made from are those of the steps it predicts; ``HYBRID_EXT_HEAP=default`` leaves glibc's
behaviour alone. A script under a launcher of its own may call it before building its model; ``parallelize`` does
not change a process's allocator.
"""

from __future__ import annotations

import ctypes

from hybrid_ext import config

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: free memory at the heap's top is returned past 2 GiB

_applied = False


def _glibc():
    """This process's C library where it is glibc (the only one whose mallopt this module knows), else None."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process has loaded: its C library's among them
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def steady_heap(libc=None) -> bool:
    """Keep this process's freed heap memory for reuse (module docstring), unless ``HYBRID_EXT_HEAP`` is
    ``default``; True where it is so now. Idempotent; a no-op (False) where the C library is not glibc."""
    global _applied
    if config.get("HYBRID_EXT_HEAP") != "steady":
        return False
    if _applied and libc is None:
        return True
    libc = libc or _glibc()
    if libc is None:
        return False
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    _applied = _applied or done
    return done
