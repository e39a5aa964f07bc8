"""The one-host allreduce on shared memory: every rank reduces its own slice straight from every rank's copy.

Why: a schedule over the shared-memory transport (:mod:`hybrid_ext.comm.transports.shm`) moves each byte step by
step between pairs of ranks, a Python loop per step; on one host every rank can read every other's memory, so one
pass does it, as DeepSpeed's shared-memory allreduce and MPI's intra-node collectives do.

Per chunk of ``chunk_bytes`` (the vector is cut into chunks that fit the per-rank buffers):

1. each rank copies its chunk into its own buffer in shared memory, then arrives at a barrier;
2. small chunks (:func:`one_barrier_bytes`): each rank reduces the whole chunk from all buffers into its output —
   done;
3. otherwise each rank reduces slice ``rank`` of the chunk from all buffers into its own buffer (reduce-scatter),
   arrives at a second barrier, and copies every rank's reduced slice into its output (all-gather).

Every element is computed by the same loop from the same inputs in rank order (16-bit floats summed in float32 and
rounded once), so every rank ends with the same bits, whichever branch ran. Each rank has two buffers, used by
alternate chunks: a rank refills a buffer only after passing the first barrier of the chunk in between, which
every rank reaches only after it finished reading that buffer — so no third barrier is needed.

Waiting spins, then yields the core (ranks may outnumber cores), then sleeps on the rank's doorbell (a futex) until
a host-mate arrives; every wait checks the group's deadline and that every rank still runs, as the transport does.
The loops are C (:mod:`hybrid_ext.comm.transports.shm_kernels`) where a compiler is at hand.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import torch

from hybrid_ext.comm.cost_model import DIRECT
from hybrid_ext.comm.host_cores import usable_cores
from hybrid_ext.comm.transports.contract import PeerError
from hybrid_ext.comm.transports.shm_kernels import DTYPE_CODES, OP_CODES, Group, kernels

__all__ = ["DIRECT", "DirectAllreduce", "region_bytes"]
CHUNK_BYTES = 1 << 20  # per buffer; a rank holds two
# Every rank reduces a chunk whole (one barrier instead of two) while that reads at most this much of the others'
# buffers: 1 MiB chunks at 2 ranks, 512 KiB at 3, ~146 KiB at 8.
ONE_BARRIER_READ_BYTES = 1 << 20
REGION_HEAD = 128  # the rank's progress counter (int64), then its sleeping flag (int32), a cache line each
ALIGN_ELEMENTS = 16  # slices start on multiples of this: whole vectors for the reduction loop
# Looks at the counters per wait call: spinning first where every rank has a core of its own (a yield would hand
# the core to whatever else runs), else yielding almost at once to the rank this one waits for.
SPIN_ROUNDS_OWN_CORE = 1 << 15
SPIN_ROUNDS_SHARED_CORE = 64
YIELD_ROUNDS = 4096
SLEEP_NANOSECONDS = 1_000_000  # a lost wake-up costs at most this
PEER_CHECK_SECONDS = 0.5
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def one_barrier_bytes(ranks: int) -> int:
    """The largest chunk every rank reduces whole, at ``ranks`` ranks."""
    return ONE_BARRIER_READ_BYTES // max(1, ranks - 1)


def region_bytes(chunk_bytes: int = CHUNK_BYTES) -> int:
    """Shared memory each rank's file holds for this allreduce."""
    return REGION_HEAD + 2 * chunk_bytes


class DirectAllreduce:
    """The allreduce above among the ranks of one :class:`~hybrid_ext.comm.transports.shm.ShmTransport`.

    ``regions[k]``: the address of rank k's region (:func:`region_bytes`) in this process; ``bells[k]``: rank k's
    doorbell (a futex word). ``transport`` gives the rank, size, timeout, and the liveness check.
    """

    def __init__(self, transport, regions: list[int], bells: list[int], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.transport = transport
        self.rank, self.size = transport.rank, transport.size
        self.chunk_bytes = chunk_bytes
        n = self.size
        pointers = ctypes.c_void_p * n
        self._progress = pointers(*regions)
        self._own_progress = regions[self.rank]
        self._sleeping = pointers(*(r + 64 for r in regions))
        self._own_sleeping = regions[self.rank] + 64
        self._bells = pointers(*bells)
        self._own_bell = bells[self.rank]
        self._buffers = [pointers(*(r + REGION_HEAD + b * chunk_bytes for r in regions)) for b in (0, 1)]
        self._counters = [np.ctypeslib.as_array((ctypes.c_int64 * 1).from_address(r)) for r in regions]
        self._spins = SPIN_ROUNDS_OWN_CORE if self.size <= usable_cores() else SPIN_ROUNDS_SHARED_CORE
        self._rounds = self._spins + YIELD_ROUNDS
        self._groups = [
            Group(
                self.rank, self._own_progress, self._progress, self._sleeping, self._bells, b, self._rounds, self._spins
            )
            for b in self._buffers
        ]
        self._one_barrier_bytes = one_barrier_bytes(self.size)
        self._kernels = None
        self._arrived = 0  # barriers this rank has reached
        self._chunks = 0  # chunks reduced: which buffer the next one uses
        self._slices: dict[tuple[int, int], tuple[int, int, object, object]] = {}

    def allreduce(self, flat: torch.Tensor, op: str, divisor: float = 1.0) -> None:
        """Reduce the contiguous CPU tensor ``flat`` in place over the group; a sum (``avg`` too) is divided by
        ``divisor`` (floating types) before it is rounded to ``flat``'s dtype."""
        code, reduce_op = DTYPE_CODES[flat.dtype], OP_CODES[op]
        if self._kernels is None:  # chosen at the first call (HYBRID_EXT_SHM_KERNELS), kept for the group's life
            self._kernels = kernels()
        k = self._kernels
        try:
            self._allreduce(k, flat, code, reduce_op, divisor)
        except PeerError as exc:
            raise PeerError(
                f"direct allreduce of {flat.numel()} elements on rank {self.transport.label(self.rank)} of "
                f"{self.size} (same host): {exc}"
            ) from exc

    def _allreduce(self, k, flat: torch.Tensor, code: int, reduce_op: int, divisor: float) -> None:
        size = flat.element_size()
        per_chunk = self.chunk_bytes // size
        base = flat.data_ptr()
        count = flat.numel()
        for lo in range(0, count, per_chunk):
            elements = min(per_chunk, count - lo)
            nbytes = elements * size
            out = base + lo * size
            buffers = self._buffers[self._chunks & 1]
            group = self._groups[self._chunks & 1]
            self._chunks += 1
            if nbytes <= self._one_barrier_bytes:
                self._arrived += 1
                done = k.small(group, code, reduce_op, out, out, nbytes, elements, divisor, self._arrived)
                if done < 0:
                    raise ValueError(f"shm_kernels: no reduction for {flat.dtype} and op code {reduce_op}")
                if not done:
                    self._wait(k, self._arrived)  # arrived already: wait on, watching the deadline and the peers
                    k.reduce(code, reduce_op, out, buffers, self.size, 0, elements, divisor)
                continue
            ctypes.memmove(buffers[self.rank], out, nbytes)
            self._barrier(k)
            first, last, starts, stops = self._slice(elements, size)
            k.reduce(
                code, reduce_op, buffers[self.rank] + first * size, buffers, self.size, first, last - first, divisor
            )
            self._barrier(k)
            k.gather(out, buffers, self.size, starts, stops)

    def _slice(self, elements: int, size: int) -> tuple[int, int, object, object]:
        """This rank's slice of a chunk (elements) and every rank's in bytes, as the gather takes them."""
        key = (elements, size)
        found = self._slices.get(key)
        if found is None:
            blocks = -(-elements // ALIGN_ELEMENTS)
            cuts = [min(elements, (blocks * r // self.size) * ALIGN_ELEMENTS) for r in range(self.size + 1)]
            starts = (ctypes.c_int64 * self.size)(*(c * size for c in cuts[:-1]))
            stops = (ctypes.c_int64 * self.size)(*(c * size for c in cuts[1:]))
            found = self._slices[key] = (cuts[self.rank], cuts[self.rank + 1], starts, stops)
        return found

    def _barrier(self, k) -> None:
        self._arrived += 1
        target = self._arrived
        k.arrive(self._own_progress, target, self._sleeping, self._bells, self.size)
        if not k.wait(self._progress, self.size, target, self._rounds, self._spins):
            self._wait(k, target)

    def _wait(self, k, target: int) -> None:
        """Wait until every rank arrived at ``target``: sleeping between looks, raising past the deadline or when a
        rank of the group died."""
        now = time.monotonic()
        deadline, next_check = now + self.transport.timeout, now + PEER_CHECK_SECONDS
        while not k.sleep(self._own_sleeping, self._own_bell, self._progress, self.size, target, SLEEP_NANOSECONDS):
            if k.wait(self._progress, self.size, target, YIELD_ROUNDS, 0):
                return
            now = time.monotonic()
            late = next((r for r in range(self.size) if int(self._counters[r][0]) < target), self.rank)
            if now > next_check:
                next_check = now + PEER_CHECK_SECONDS
                self.transport.check_alive(late)
            if now > deadline:
                raise PeerError(f"waited {self.transport.timeout:g}s for rank {self.transport.label(late)}")
