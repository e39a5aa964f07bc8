"""The wire dtype: 16-bit gradients travel as 16-bit (half the bytes) and are accumulated in float32 on every rank;
float32 inputs may travel compressed. Results stay bitwise identical on every rank."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import hybrid_ext
from hybrid_ext.comm.executor import wire_dtype_for

HALF = (torch.float16, torch.bfloat16)
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # half an ulp, relative


def _inputs(p: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.randn(n, generator=torch.Generator().manual_seed(7 * r + n), dtype=torch.float64).to(dtype)
        for r in range(p)
    ]


def _wire_rank(rank: int, p: int, sizes: list[int]) -> dict:
    hybrid_ext.set_check(True)
    failures, digest, bytes_by_wire = [], hashlib.sha256(), {}
    # Each rounding on the way (one per hop, at most 2·ceil(log2 p) + 2 with the fold, plus the final one) costs
    # at most half an ulp of the partial sum it rounds, and every partial sum is at most sum_r |x_r|.
    roundings = 2 * math.ceil(math.log2(max(p, 2))) + 3
    for n in sizes:
        for dtype, wire in [(d, "input") for d in HALF] + [(torch.float32, torch.bfloat16), (torch.float32, "float16")]:
            inputs = _inputs(p, n, dtype)
            magnitude = torch.stack([t.double().abs() for t in inputs]).sum(0)
            exact = torch.stack([t.double() for t in inputs]).sum(0)
            wire_dtype = wire_dtype_for(dtype, wire)
            for op in ("sum", "avg"):
                for algorithm in ("recursive_doubling", "rabenseifner", "ring"):
                    with hybrid_ext.metrics.capture() as records:
                        got = hybrid_ext.allreduce(inputs[rank].clone(), op=op, algorithm=algorithm, wire_dtype=wire)
                    label = f"n={n} {dtype} wire={wire} {op} {algorithm}"
                    digest.update(label.encode() + got.view(torch.uint8).numpy().tobytes())
                    expected = exact / p if op == "avg" else exact
                    bound = roundings * EPS[wire_dtype] * (magnitude / (p if op == "avg" else 1)) + 1e-30
                    if dtype in HALF:  # the result itself is rounded to the input's dtype once more
                        bound = bound + EPS[dtype] * expected.abs()
                    error = (got.double() - expected).abs()
                    if n and not bool((error <= bound).all()):
                        worst = int((error / bound).argmax())
                        failures.append(f"{label}: error {error[worst]:.3g} > bound {bound[worst]:.3g}")
                    if records and n:
                        bytes_by_wire.setdefault((n, str(dtype), algorithm), {})[str(wire_dtype)] = records[
                            -1
                        ].bytes_sent
                    if records and records[-1].dtype != str(wire_dtype).removeprefix("torch."):
                        failures.append(f"{label}: metrics say the wire was {records[-1].dtype}")
            # The same reduction with full-precision partial sums on the wire, for the byte count.
            if dtype in HALF and n:
                with hybrid_ext.metrics.capture() as records:
                    hybrid_ext.allreduce(inputs[rank].clone(), algorithm="rabenseifner", wire_dtype=torch.float32)
                bytes_by_wire[(n, str(dtype), "rabenseifner")]["torch.float32"] = records[-1].bytes_sent
    return {"failures": failures, "digest": digest.hexdigest(), "bytes": bytes_by_wire}


@pytest.mark.parametrize(("transport", "p"), [("shm", 2), ("shm", 3), ("shm", 4), ("torch", 5)])
def test_16_bit_wire_halves_the_bytes_and_stays_bitwise_identical(spawn_ranks, transport, p):
    sizes = sorted({0, 1, p + 1, 1000, 65537})
    results = spawn_ranks(_wire_rank, p, sizes, env={"HYBRID_EXT_TRANSPORT": transport}, timeout=300)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: " + "\n".join(result["failures"][:20])
        assert result["digest"] == results[0]["digest"], f"rank {rank} results are not bitwise equal to rank 0's"
    for (n, dtype, _), by_wire in results[0]["bytes"].items():
        if "torch.float32" in by_wire and dtype != "torch.float32":
            assert by_wire[dtype] * 2 == by_wire["torch.float32"], (n, dtype, by_wire)


def test_wire_dtype_choices_are_checked():
    assert wire_dtype_for(torch.float16) == torch.float16
    assert wire_dtype_for(torch.bfloat16, "float32") == torch.float32
    assert wire_dtype_for(torch.float32, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="choose input"):
        wire_dtype_for(torch.float32, "float8")
    with pytest.raises(TypeError, match="only floating types"):
        wire_dtype_for(torch.int64, torch.float16)
    with pytest.raises(TypeError, match="not supported"):
        wire_dtype_for(torch.float64, torch.float8_e4m3fn)


def test_the_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_WIRE_DTYPE", "float32")
    assert wire_dtype_for(torch.float16) == torch.float32
    monkeypatch.setenv("HYBRID_EXT_WIRE_DTYPE", "bogus")
    with pytest.raises(ValueError, match="choose input"):
        wire_dtype_for(torch.float16)
