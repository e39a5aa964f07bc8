"""A steady glibc heap for CPU ranks: freed tensors' memory kept for the next step instead of unmapped.

glibc's malloc serves a block above its mmap threshold with a fresh ``mmap`` and unmaps it when freed; the
threshold starts at 128 KiB and rises to the size of the largest such block freed, at most 32 MiB on 64-bit. A
CPU training step allocates and frees the same large activations and gradients every step, so whether each of
them comes back as pages the kernel must zero again at first touch depends on what the process freed before:
measured on the 2-core machine this project is built on, one process's digits_alexnet layers took 1× or 4–7× as
long from one profile to the next (the first ReLU's forward 0.5 or 3.6 ms), and four ranks' mp step 537 ms against
359 ms with the heap steady (``docs/benchmarks.md``). :func:`steady_heap` turns the chunk-level mmaps off and the
trimming of the heap's top up, as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…`` would at a process's start; a
process's peak memory is what it was (its largest step is kept, not returned and taken again). A thread's own
arena still maps a block larger than its heap (64 MiB).

hybrid-ext's launchers' ranks (``hybrid-ext bench train``, the recipes) and ``hybrid-ext plan``'s profile call it
so that the layer times a plan is made from are those of the steps it predicts; ``HYBRID_EXT_HEAP=default``
leaves glibc's behaviour alone. A user's own script may call it before building its model
(``hybrid_ext.steady_heap()``), or preload jemalloc or tcmalloc, which keep freed memory too.
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
