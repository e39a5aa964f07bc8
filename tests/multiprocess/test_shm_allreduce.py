"""The one-host allreduce on shared memory (``direct``): its kernels, exact results on real ranks, its faults."""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import hybrid_ext
from hybrid_ext.comm.transports import shm_allreduce, shm_kernels
from hybrid_ext.comm.transports.contract import PeerError
from hybrid_ext.launch import LaunchError

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
OPS = ("sum", "min", "max")


def _values(seed: int, n: int, dtype: torch.dtype, specials: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)  # large values: sums wrap, as torch's do
        return torch.randint(info.min // 2, info.max // 2, (n,), generator=g, dtype=torch.int64).to(dtype)
    values = (torch.randn(n, generator=g, dtype=torch.float64) * 100).to(dtype)
    if specials and n > 8:
        values[3], values[5], values[7] = float("nan"), float("inf"), -0.0
    return values


def _reference(inputs: list[torch.Tensor], op: str, divisor: float = 1.0) -> torch.Tensor:
    """What the kernels promise: rank order, 16-bit accumulated in float32 and rounded once."""
    dtype = inputs[0].dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    acc = inputs[0].to(wide).clone()
    combine = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}[op]
    for t in inputs[1:]:
        acc = combine(acc, t.to(wide))
    if divisor != 1.0:
        acc = acc / divisor
    return acc.to(dtype)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bits, except that a NaN may be any NaN (torch's own minimum returns different NaN bits by path)."""
    if not expected.dtype.is_floating_point:
        return _bits(got) == _bits(expected)
    nan = torch.isnan(expected)
    return torch.equal(torch.isnan(got), nan) and _bits(got[~nan]) == _bits(expected[~nan])


def _run_kernel(kernels, inputs: list[torch.Tensor], op: str, offset: int, count: int, divisor: float = 1.0):
    sources = (ctypes.c_void_p * len(inputs))(*(t.data_ptr() for t in inputs))
    out = torch.empty(count, dtype=inputs[0].dtype)
    code = shm_kernels.DTYPE_CODES[out.dtype]
    kernels.reduce(code, shm_kernels.OP_CODES[op], out.data_ptr(), sources, len(inputs), offset, count, divisor)
    return out


@pytest.fixture(scope="module")
def c_kernels():
    assert shm_kernels.SOURCE.is_file(), f"{shm_kernels.SOURCE} is not installed with the package"
    loaded = shm_kernels.kernels()
    if not isinstance(loaded, shm_kernels.CKernels):
        pytest.skip(f"no C compiler here: {shm_kernels.problem()}")
    return loaded


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_c_and_python_kernels_give_the_reference_bits(c_kernels, dtype, op):
    for n in (1, 2, 3, 5):
        inputs = [_values(100 * n + k, 1500, dtype) for k in range(n)]
        offset, count = 2, 1300  # not a whole number of blocks, not aligned; NaN, inf and -0.0 included
        expected = _reference([t[offset : offset + count] for t in inputs], op)
        for kernels in (c_kernels, shm_kernels.PythonKernels()):
            got = _run_kernel(kernels, inputs, op, offset, count)
            assert _same(got, expected), f"{kernels.name} kernels, {n} ranks, {dtype} {op}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16), ids=str)
def test_an_average_is_the_float32_sum_divided_then_rounded_once(c_kernels, dtype):
    inputs = [_values(k, 999, dtype, specials=False) for k in range(3)]
    expected = _reference(inputs, "sum", divisor=3.0)
    for kernels in (c_kernels, shm_kernels.PythonKernels()):
        assert _bits(_run_kernel(kernels, inputs, "sum", 0, 999, divisor=3.0)) == _bits(expected), kernels.name


def test_the_library_is_built_once_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_CACHE", str(tmp_path))
    try:
        first = shm_kernels.build()
    except OSError as exc:
        pytest.skip(f"no C compiler here: {exc}")
    stamp = first.stat().st_mtime_ns
    assert shm_kernels.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial file left behind


def test_without_a_compiler_the_python_kernels_serve_and_c_says_why(monkeypatch):
    monkeypatch.setattr(shm_kernels, "_loaded", None)
    monkeypatch.setattr(shm_kernels, "build", lambda: (_ for _ in ()).throw(OSError("no C compiler (test)")))
    assert isinstance(shm_kernels.kernels(), shm_kernels.PythonKernels)
    assert shm_kernels.problem() == "no C compiler (test)"
    monkeypatch.setattr(shm_kernels, "_loaded", None)
    monkeypatch.setenv("HYBRID_EXT_SHM_KERNELS", "c")
    with pytest.raises(RuntimeError, match=r"HYBRID_EXT_SHM_KERNELS=c.*no C compiler"):
        shm_kernels.kernels()


# Sizes in elements: empty, tiny, the one-barrier branch, the two-barrier branch, and several chunks with a ragged end.
def _sizes(dtype: torch.dtype, p: int) -> list[int]:
    per_chunk = shm_allreduce.CHUNK_BYTES // dtype.itemsize
    small = shm_allreduce.one_barrier_bytes(p) // dtype.itemsize
    return [0, 1, 33, small, small + 17, per_chunk, 2 * per_chunk + 5]


def _direct_rank(rank: int, p: int) -> dict:
    failures, digest = [], hashlib.sha256()
    hybrid_ext.set_check(True)
    for dtype in DTYPES:
        for n in _sizes(dtype, p):
            inputs = [_values(1000 * r + n, n, dtype) for r in range(p)]
            for op in ("sum", "avg", "min", "max"):
                if op == "avg" and not dtype.is_floating_point:
                    continue
                with hybrid_ext.metrics.capture() as records:
                    got = hybrid_ext.allreduce(inputs[rank].clone(), op=op, algorithm="direct")
                expected = _reference(inputs, "sum" if op == "avg" else op, float(p) if op == "avg" else 1.0)
                label = f"n={n} {dtype} {op}"
                digest.update(label.encode() + _bits(got))
                if not _same(got, expected):
                    failures.append(label)
                if n and records[-1].algorithm != "direct":
                    failures.append(f"{label}: ran {records[-1].algorithm}")
    # Autograd sees the in-place change, as with any in-place op.
    leaf = torch.ones(8)
    version = leaf._version
    hybrid_ext.allreduce(leaf, algorithm="direct")
    if leaf._version == version:
        failures.append("the tensor's version did not change")
    # Several tensors of mixed shapes and a strided one travel as one vector.
    parts = [torch.full((3, 4), float(rank)), torch.arange(10.0).view(2, 5).t() * (rank + 1)]
    hybrid_ext.allreduce_coalesced(parts, algorithm="direct")
    coalesced = [_bits(t) for t in parts]
    return {"failures": failures, "digest": digest.hexdigest(), "coalesced": coalesced}


def _fast_lane_rank(rank: int, p: int) -> dict:
    """Calls the fast lane takes, in issue order behind an async collective, and with check mode on (full path)."""
    big = torch.full((1 << 18,), float(rank))
    handle = hybrid_ext.allreduce_async(big, algorithm="ring")  # queued or running: the next call waits its turn
    small = torch.full((64,), float(rank + 1))
    hybrid_ext.allreduce(small, algorithm="direct")
    handle.wait()
    hybrid_ext.set_check(True)
    checked = torch.full((64,), 2.0)
    with hybrid_ext.metrics.capture() as records:
        hybrid_ext.allreduce(checked, algorithm="direct", op="avg", name="checked")
    return {
        "big": torch.equal(big, torch.full_like(big, sum(range(p)))),
        "small": torch.equal(small, torch.full_like(small, p * (p + 1) / 2)),
        "checked": torch.equal(checked, torch.full_like(checked, 2.0)) and records[-1].algorithm == "direct",
    }


def test_the_fast_lane_keeps_issue_order_and_check_mode(spawn_ranks):
    env = {"HYBRID_EXT_TRANSPORT": "shm"}
    for result in spawn_ranks(_fast_lane_rank, 3, env=env):
        assert result == {"big": True, "small": True, "checked": True}


@pytest.mark.parametrize(("p", "kernels"), [(2, "c"), (3, "c"), (4, "c"), (3, "python")])
def test_direct_allreduce_is_exact_and_bitwise_equal_on_every_rank(spawn_ranks, p, kernels):
    env = {"HYBRID_EXT_TRANSPORT": "shm", "HYBRID_EXT_SHM_KERNELS": kernels}
    results = spawn_ranks(_direct_rank, p, timeout=600, env=env)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: " + "\n".join(result["failures"][:20])
        assert result["digest"] == results[0]["digest"], f"rank {rank} differs from rank 0"
    total = sum(range(1, p + 1))
    expected_parts = [torch.full((3, 4), float(sum(range(p)))), torch.arange(10.0).view(2, 5).t() * total]
    assert results[0]["coalesced"] == [_bits(t) for t in expected_parts]


def _auto_rank(rank: int, p: int, dtype_name: str) -> list[str]:
    dtype = getattr(torch, dtype_name)
    ran = []
    for call in range(80):  # past the tuner's trials of the 64 KiB class
        x = torch.full(((32 << 10) // dtype.itemsize,), float(rank + 1), dtype=dtype)
        with hybrid_ext.metrics.capture() as records:
            hybrid_ext.allreduce(x)
        ran.append(records[-1].algorithm if torch.equal(x, torch.full_like(x, p * (p + 1) / 2)) else f"wrong {call}")
    return ran


def test_the_tuner_tries_direct_on_one_host_and_not_under_a_compressed_wire(spawn_ranks, tmp_path):
    env = {"HYBRID_EXT_TRANSPORT": "shm", "HYBRID_EXT_TUNE": "fresh", "HYBRID_EXT_TUNED": str(tmp_path / "tuned.json")}
    ran = spawn_ranks(_auto_rank, 2, "bfloat16", env=env)
    assert "direct" in ran[0] and ran[0] == ran[1]
    assert len(set(ran[0][-20:])) == 1 and not any(r.startswith("wrong") for r in ran[0])  # chosen; all exact
    compressed = spawn_ranks(_auto_rank, 2, "float32", env={**env, "HYBRID_EXT_WIRE_DTYPE": "bfloat16"})
    assert "direct" not in compressed[0] and compressed[0] == compressed[1]


def _dies_before_the_allreduce(rank: int, p: int, outdir: str) -> None:
    hybrid_ext.set_check(False)  # the direct allreduce itself must notice (not check mode's exchange before it)
    hybrid_ext.allreduce(torch.ones(4), algorithm="direct")  # every rank set up and in step
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    try:
        hybrid_ext.allreduce(torch.ones(1 << 20), algorithm="direct")
        outcome = "no error"
    except PeerError as exc:
        outcome = f"PeerError after {time.monotonic() - started:.1f}s: {exc}"
    Path(outdir, f"rank{rank}.txt").write_text(outcome)


def test_a_killed_rank_is_named_by_the_others_within_seconds(spawn_ranks, tmp_path):
    env = {"HYBRID_EXT_TRANSPORT": "shm"}
    with pytest.raises(LaunchError, match="rank 1 failed first"):
        spawn_ranks(_dies_before_the_allreduce, 3, str(tmp_path), timeout=90, failure_grace=40, env=env)
    for rank in (0, 2):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert outcome.startswith("PeerError after"), outcome
        assert float(outcome.split()[2].rstrip("s:")) < 5, outcome
        assert "direct allreduce of 1048576 elements" in outcome and "rank 1 (pid" in outcome and "died" in outcome
