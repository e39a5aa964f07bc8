"""The bench tool's command: ``hybrid-ext bench allreduce`` spawning its own ranks, and under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("isolated_cost_models")


@pytest.mark.multiprocess
def test_bench_cli_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_ext", "bench", "allreduce", "--np", "2", "--sizes", "1K,64K",
         "--algorithms", "auto,ring", "--iters", "2", "--inner", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=True,
    )  # fmt: skip
    assert "hybrid-ext transport: shm" in result.stdout
    rows = json.loads(out.read_text())
    assert {(r["size_bytes"], r["algorithm"]) for r in rows} == {
        (s, a) for s in (1024, 65536) for a in ("auto", "ring", "native")
    }
    assert all(r["median_ms"] > 0 for r in rows)
    assert all(r["ratio_to_native"] == 1.0 for r in rows if r["algorithm"] == "native")


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_bench_under_a_launcher_runs_on_the_launched_ranks():
    from hybrid_ext.launch import run_torchrun

    command = ["-m", "hybrid_ext", "bench", "allreduce", "--sizes", "1K", "--algorithms", "butterfly",
               "--iters", "2", "--inner", "2", "--warmup", "1"]  # fmt: skip
    results = run_torchrun(command, 2, timeout=240)  # torchrun sets RANK, WORLD_SIZE: no ranks are spawned
    for result in results:
        assert result["transport"].startswith("shm")
        assert {(r["algorithm"], r["ranks"]) for r in result["rows"]} == {("butterfly", 2), ("native", 2)}
