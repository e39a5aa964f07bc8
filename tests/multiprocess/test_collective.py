"""The butterfly allreduce on real gloo processes: exact against float64 and dist.all_reduce, safe on bad input."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hybrid_ext
from hybrid_ext.launch import LaunchError

ALGORITHMS = ("auto", "recursive_doubling", "rabenseifner", "ring")
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)
# Tolerance against the float64 reference: 16-bit results are rounded once, at the end.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def _input(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + n)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def _reference(stack: torch.Tensor, op: str) -> torch.Tensor:
    """The float64 result of reducing every rank's input (rows of ``stack``)."""
    if op in ("sum", "avg"):
        out = stack.sum(0)
        return out / stack.shape[0] if op == "avg" else out
    return stack.min(0).values if op == "min" else stack.max(0).values


def _matrix_rank(rank: int, p: int, sizes: list[int]) -> dict:
    """Every algorithm x op x dtype x size; returns failures and a digest of all results (for bitwise checks)."""
    hybrid_ext.set_check(True)
    failures, digest = [], hashlib.sha256()
    for n in sizes:
        for dtype in FLOATS + INTS:
            inputs = [_input(r, n, dtype) for r in range(p)]
            stack = torch.stack([t.to(torch.float64) for t in inputs])
            for op in ("sum", "avg", "min", "max"):
                if op == "avg" and not dtype.is_floating_point:
                    continue
                expected = _reference(stack, op)
                native = None
                if dtype in (torch.float32, torch.float64, *INTS) and op != "avg":
                    native = inputs[rank].clone()
                    dist.all_reduce(
                        native, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.MAX)
                    )
                for algorithm in ALGORITHMS:
                    got = hybrid_ext.allreduce(inputs[rank].clone(), op=op, algorithm=algorithm)
                    label = f"n={n} {dtype} {op} {algorithm}"
                    if got.dtype != dtype or got.shape != (n,):
                        failures.append(f"{label}: returned {got.dtype} {tuple(got.shape)}")
                        continue
                    digest.update(label.encode() + got.view(torch.uint8).numpy().tobytes())
                    if dtype.is_floating_point:
                        rtol, atol = TOLERANCE[dtype]
                        close = torch.allclose(got.double(), expected, rtol=rtol, atol=atol)
                    else:
                        close = torch.equal(got.double(), expected)
                    if not close:
                        failures.append(f"{label}: max error {(got.double() - expected).abs().max().item():.3g}")
                    if native is not None and not torch.allclose(got.double(), native.double(), rtol=1e-5, atol=1e-4):
                        failures.append(f"{label}: differs from dist.all_reduce")
    return {"failures": failures, "digest": digest.hexdigest()}


# Shared memory is what ranks on one host use by default; the torch transport is what crosses hosts.
TRANSPORT_CASES = [("shm", p) for p in range(1, 9)] + [("torch", p) for p in (2, 3, 5, 8)]


@pytest.mark.parametrize(("transport", "p"), TRANSPORT_CASES)
def test_allreduce_exact_for_every_world_size_op_and_dtype(spawn_ranks, transport, p):
    sizes = sorted({0, 1, max(p - 1, 0), p + 1, 1000, 2**20 + 3})
    # Full-precision partial sums on the wire: 16-bit results are rounded once (16-bit wire: test_wire_dtype.py).
    env = {"HYBRID_EXT_TRANSPORT": transport, "HYBRID_EXT_WIRE_DTYPE": "float32"}
    results = spawn_ranks(_matrix_rank, p, sizes, timeout=600, env=env)
    assert results[0]["failures"] == [], "\n".join(results[0]["failures"][:20])
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: " + "\n".join(result["failures"][:20])
        assert result["digest"] == results[0]["digest"], f"rank {rank} results are not bitwise equal to rank 0's"


def _traffic_rank(rank: int, p: int, transport: str) -> list:
    n = 1 << 20
    out = []
    for algorithm in ("rabenseifner", "recursive_doubling", "ring"):
        with hybrid_ext.metrics.capture() as records:
            hybrid_ext.allreduce(torch.ones(n), algorithm=algorithm)
        out.append(records[0].as_dict())
    return out


@pytest.mark.parametrize(("transport", "name", "p"), [("shm", "shm", 4), ("shm", "shm", 8), ("torch", "torch-gloo", 4)])
def test_rabenseifner_traffic_is_optimal_per_the_metrics(spawn_ranks, transport, name, p):
    n, log_p = 1 << 20, int(math.log2(p))
    for records in spawn_ranks(_traffic_rank, p, transport, env={"HYBRID_EXT_TRANSPORT": transport}):
        rab, rd, ring = records
        assert rab["algorithm"] == "rabenseifner" and rab["transport"] == name
        assert rab["bytes_sent"] == 2 * (p - 1) * n // p * 4
        assert rab["messages_sent"] == 2 * log_p
        assert rd["bytes_sent"] == n * 4 * log_p and rd["messages_sent"] == log_p
        assert ring["messages_sent"] == 2 * (p - 1)
        assert rab["seconds"] > 0


def _async_rank(rank: int, p: int) -> dict:
    hybrid_ext.set_check(True)
    tensors = [torch.full((k + 1, 3), float(rank + k)) for k in range(6)]
    handles = [hybrid_ext.allreduce_async(t, op="sum") for t in tensors]
    waited = [h.wait(timeout=60) for h in handles]
    grads = [torch.full((5,), float(rank)), torch.full((2, 2), 1.0), torch.full((7,), float(rank) * 2)]
    bucket = hybrid_ext.allreduce_coalesced(grads, op="avg")
    half = hybrid_ext.allreduce(torch.full((33,), 0.5 * (rank + 1), dtype=torch.float16), op="sum")
    strided = torch.arange(20.0).view(4, 5).t() * (rank + 1)  # not contiguous
    hybrid_ext.allreduce(strided, op="max")
    return {
        "same_objects": all(a is b for a, b in zip(waited, tensors)),
        "async": [t.tolist() for t in tensors],
        "coalesced": [t.tolist() for t in bucket],
        "half": half.tolist(),
        "strided": strided.tolist(),
    }


def test_async_coalesced_16bit_and_strided_forms(spawn_ranks):
    p = 3
    results = spawn_ranks(_async_rank, p)
    total = sum(range(p))
    for result in results:
        assert result["same_objects"]
        for k, t in enumerate(result["async"]):
            assert t == torch.full((k + 1, 3), float(total + p * k)).tolist()
        assert result["coalesced"][0] == [total / p] * 5
        assert result["coalesced"][1] == [[1.0, 1.0], [1.0, 1.0]]
        assert result["coalesced"][2] == [2 * total / p] * 7
        assert result["half"] == [0.5 * (1 + 2 + 3)] * 33
        assert result["strided"] == (torch.arange(20.0).view(4, 5).t() * p).tolist()
        assert result == results[0]


def _mismatch_rank(rank: int, p: int) -> str:
    hybrid_ext.set_check(True)
    n = 1001 if rank == 2 else 1000
    try:
        hybrid_ext.allreduce(torch.ones(n))
    except hybrid_ext.CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_mismatched_shapes_raise_a_clear_error_on_every_rank(spawn_ranks, transport):
    start = time.monotonic()
    messages = spawn_ranks(_mismatch_rank, 4, timeout=60, env={"HYBRID_EXT_TRANSPORT": transport})
    assert time.monotonic() - start < 60
    for message in messages:
        assert "ranks [0, 1, 3]: allreduce(op=sum) of 1 tensor(s), 1000 elements of float32" in message
        assert "ranks [2]: allreduce(op=sum) of 1 tensor(s), 1001 elements of float32" in message


def _dead_peer_rank(rank: int, p: int, outdir: str) -> None:
    hybrid_ext.allreduce(torch.ones(10))  # everyone is connected
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        hybrid_ext.allreduce(torch.ones(1 << 16), algorithm="rabenseifner")
        outcome = "no error"
    except hybrid_ext.PeerError as exc:
        outcome = f"PeerError after {time.monotonic() - start:.1f}s: {exc}"
    Path(outdir, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_a_killed_rank_makes_the_others_raise_within_the_timeout(spawn_ranks, tmp_path, transport):
    env = {"HYBRID_EXT_TRANSPORT": transport}
    with pytest.raises(LaunchError, match="rank 1 failed first"):
        spawn_ranks(_dead_peer_rank, 4, str(tmp_path), pg_timeout=15, timeout=90, failure_grace=40, env=env)
    for rank in (0, 2, 3):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert outcome.startswith("PeerError after"), outcome
        assert float(outcome.split()[2].rstrip("s:")) < 20
        # Check mode's fingerprint exchange may be the first collective to notice; either way it is named. A rank
        # may learn of it from a partner that already gave up (the error names that partner): no one hangs.
        assert "allreduce of" in outcome and ("died" in outcome or "failed to" in outcome)


def _bad_arguments_rank(rank: int, p: int) -> list[str]:
    errors = []
    for call in (
        lambda: hybrid_ext.allreduce(torch.ones(3), op="prod"),
        lambda: hybrid_ext.allreduce(torch.ones(3, dtype=torch.int64), op="avg"),
        lambda: hybrid_ext.allreduce(torch.ones(3), algorithm="tree"),
        lambda: hybrid_ext.allreduce(torch.ones(3, dtype=torch.complex64)),
        lambda: hybrid_ext.allreduce_coalesced([torch.ones(3), torch.ones(3, dtype=torch.float64)]),
    ):
        try:
            call()
            errors.append("no error")
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    return errors


def test_bad_arguments_fail_before_any_communication(spawn_ranks):
    errors = spawn_ranks(_bad_arguments_rank, 2)[0]
    assert "unsupported op 'prod'" in errors[0]
    assert "op 'avg' needs a floating-point tensor" in errors[1]
    assert "unknown allreduce algorithm 'tree'" in errors[2]
    assert "unsupported dtype torch.complex64" in errors[3]
    assert "share dtype and device" in errors[4]


def test_allreduce_without_a_process_group_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        hybrid_ext.allreduce(torch.ones(3))
