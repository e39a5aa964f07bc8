"""The shared-memory allreduce's hot loops: ``shm_kernels.c`` built and loaded with ctypes, or the same in Python.

Why C: a reduction of 16-bit gradients in torch is a conversion pass, an add and a rounding pass, each allocating
and each a trip through memory; the C loop widens, adds and rounds block by block in L1, and its barrier spins
without the interpreter. It needs no torch headers, so the system compiler builds it in under a second on first use
(as DeepSpeed builds its shared-memory op); the library lands in the cache directory, named by a hash of the
source, the compiler and this CPU's flags (it is built for this CPU). Where no compiler works, :class:`PythonKernels`
does the same work with torch ops, with the same rounding, so results do not depend on which one ran.

Both expose one interface (pointer arrays are ctypes arrays of addresses):

``reduce(dtype, op, out, sources, n, offset, count, divisor=1.0)``
    ``out[:count] = op(sources[0][offset:offset+count], ...)`` element-wise, 16-bit floats summed in float32 in rank
    order, a sum divided by ``divisor``, then rounded once.
``gather(dst, sources, n, starts, stops)``
    ``dst[starts[k]:stops[k]] = sources[k][starts[k]:stops[k]]`` for every k (byte offsets).
``arrive(own, target, sleeping, bells, n)`` / ``wait(counters, n, target, rounds, spins)`` /
``sleep(sleeping, bell, counters, n, target, nanoseconds)``
    the counter barrier of :mod:`hybrid_ext.comm.transports.shm_allreduce`.
``small(group, dtype, op, out, source, nbytes, count, divisor, target)``
    a chunk every rank reduces whole, in one call: copy in, arrive, wait (a bounded number of looks), reduce; 1
    done, 0 when the wait ran out (the caller waits on and reduces).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hybrid_ext import config

SOURCE = Path(__file__).with_name("shm_kernels.c")
DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
}
OP_CODES = {"sum": 0, "avg": 0, "min": 1, "max": 2}  # avg: a sum here, divided by the caller
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_OPS = {0: "sum", 1: "min", 2: "max"}

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "hx_reduce": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, _p, _p, ctypes.c_int, _i64, _i64, ctypes.c_double]),
    "hx_gather": (None, [_p, _p, ctypes.c_int, _p, _p]),
    "hx_arrive": (None, [_p, _i64, _p, _p, ctypes.c_int]),
    "hx_wait": (ctypes.c_int, [_p, ctypes.c_int, _i64, _i64, _i64]),
    "hx_sleep": (ctypes.c_int, [_p, _p, _p, ctypes.c_int, _i64, _i64]),
    "hx_small": (ctypes.c_int, [_p, ctypes.c_int, ctypes.c_int, _p, _p, _i64, _i64, ctypes.c_double, _i64]),
}


class _GroupStruct(ctypes.Structure):
    _fields_ = (
        ("n", _i64),
        ("own", _i64),
        ("rounds", _i64),
        ("spins", _i64),
        ("own_counter", _p),
        ("counters", _p),
        ("sleeping", _p),
        ("bells", _p),
        ("buffers", _p),
    )


class Group:
    """One rank's view of one buffer set of the allreduce: what ``small`` needs, built once (C reads ``struct``)."""

    def __init__(self, own: int, own_counter: int, counters, sleeping, bells, buffers, rounds: int, spins: int):
        self.n, self.own, self.rounds, self.spins = len(buffers), own, rounds, spins
        self.own_counter, self.counters, self.sleeping, self.bells, self.buffers = (
            own_counter,
            counters,
            sleeping,
            bells,
            buffers,
        )
        self.struct = _GroupStruct(
            self.n,
            own,
            rounds,
            spins,
            own_counter,
            *(ctypes.cast(array, _p) for array in (counters, sleeping, bells, buffers)),
        )
        self.address = ctypes.addressof(self.struct)


class CKernels:
    """The compiled loops (see the module docstring)."""

    name = "c"

    def __init__(self, library: ctypes.CDLL) -> None:
        for symbol, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(library, symbol)
            function.restype, function.argtypes = restype, argtypes
        self._library = library  # keeps the functions below alive
        self.gather, self.arrive, self.wait, self.sleep = (
            library.hx_gather,
            library.hx_arrive,
            library.hx_wait,
            library.hx_sleep,
        )
        self._reduce = library.hx_reduce
        self._small = library.hx_small

    def small(self, group: Group, *arguments) -> int:  # (dtype, op, out, source, nbytes, count, divisor, target)
        return self._small(group.address, *arguments)

    def reduce(
        self, dtype: int, op: int, out: int, sources, n: int, offset: int, count: int, divisor: float = 1.0
    ) -> None:
        if self._reduce(dtype, op, out, sources, n, offset, count, divisor) != 0:
            raise ValueError(f"shm_kernels: no reduction for dtype code {dtype}, op code {op}")


def _array_at(address: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype)


def _word(address: int, ctype) -> np.ndarray:
    return np.ctypeslib.as_array((ctype * 1).from_address(address))


class PythonKernels:
    """The same loops in torch and numpy, for machines without a C compiler (slower; same results)."""

    name = "python"

    def reduce(
        self, dtype: int, op: int, out: int, sources, n: int, offset: int, count: int, divisor: float = 1.0
    ) -> None:
        kind = _DTYPES[dtype]
        start = offset * kind.itemsize
        parts = [_array_at(int(sources[k]) + start, count, kind) for k in range(n)]
        wide = torch.float32 if kind in (torch.float16, torch.bfloat16) else kind
        acc = parts[0].to(wide, copy=True)
        for part in parts[1:]:
            if _OPS[op] == "sum":
                acc.add_(part.to(wide))
            elif _OPS[op] == "min":
                torch.minimum(acc, part.to(wide), out=acc)
            else:
                torch.maximum(acc, part.to(wide), out=acc)
        if divisor != 1.0:
            acc.div_(divisor)
        _array_at(out, count, kind).copy_(acc)  # rounds to nearest even, as the C loop

    def small(
        self,
        group: Group,
        dtype: int,
        op: int,
        out: int,
        source: int,
        nbytes: int,
        count: int,
        divisor: float,
        target: int,
    ) -> int:
        ctypes.memmove(group.buffers[group.own], source, nbytes)
        self.arrive(group.own_counter, target, group.sleeping, group.bells, group.n)
        if not self.wait(group.counters, group.n, target, group.rounds, group.spins):
            return 0
        self.reduce(dtype, op, out, group.buffers, group.n, 0, count, divisor)
        return 1

    def gather(self, dst: int, sources, n: int, starts, stops) -> None:
        for k in range(n):
            ctypes.memmove(dst + starts[k], int(sources[k]) + starts[k], stops[k] - starts[k])

    @staticmethod
    def _reached(counters, n: int, target: int) -> bool:
        return all(int(_word(int(counters[k]), ctypes.c_int64)[0]) >= target for k in range(n))

    def arrive(self, own: int, target: int, sleeping, bells, n: int) -> None:
        _word(own, ctypes.c_int64)[0] = target  # no sleeper to wake: sleep() below polls

    def wait(self, counters, n: int, target: int, rounds: int, spins: int) -> int:
        for _ in range(max(1, rounds // 64)):
            if self._reached(counters, n, target):
                return 1
            os.sched_yield()
        return int(self._reached(counters, n, target))

    def sleep(self, sleeping: int, bell: int, counters, n: int, target: int, nanoseconds: int) -> int:
        time.sleep(min(nanoseconds, 200_000) / 1e9)
        return int(self._reached(counters, n, target))


_loaded: CKernels | PythonKernels | None = None
_problem: str | None = None


def kernels() -> CKernels | PythonKernels:
    """This process's kernels: the compiled ones unless ``HYBRID_EXT_SHM_KERNELS=python`` or they cannot be built."""
    global _loaded, _problem
    choice = config.get("HYBRID_EXT_SHM_KERNELS")
    if choice == "python":
        return PythonKernels()
    if _loaded is None:
        try:
            _loaded = CKernels(ctypes.CDLL(str(build())))
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            _problem = str(exc) or type(exc).__name__
            if choice == "c":
                raise RuntimeError(
                    f"HYBRID_EXT_SHM_KERNELS=c, but the C kernels could not be built: {_problem}"
                ) from exc
            _loaded = PythonKernels()
    return _loaded


def problem() -> str | None:
    """Why the C kernels are not in use in this process, if they were tried and failed."""
    return _problem


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build() -> Path:
    """The compiled library for this source, compiler and CPU: from the cache, or built now (atomically: ranks that
    build at once each write their own file and rename it into place)."""
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc, or $CC) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_flags().encode()]))
    target = config.cache_dir() / "kernels" / f"shm_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=".shm_kernels-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target
