"""The benchmarks and the demo on the emulated cluster (2 hosts × 2 ranks): `bench allreduce --hosts` counts the
bytes that left each host's interface and they match the plan's, and `demo --hosts` trains and compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

MIB = 1 << 20


def _cli(cluster, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``hybrid-ext ARGS`` with ``--hosts 2`` on the live cluster (its own ``--nic``, so it is reused, not rebuilt)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    nic = ["--nic", cluster.nic] if cluster.nic else []
    argv = [sys.executable, "-m", "hybrid_ext.cli", *args, "--hosts", "2", "--np", "4", *nic]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.timeout(300)
def test_bench_allreduce_across_hosts_counts_the_bytes_each_host_sent_and_they_match_the_plan(cluster, tmp_path):
    out = tmp_path / "rows.json"
    size = 4 * MIB
    _cli(cluster, "bench", "allreduce", "--sizes", "4M", "--algorithms", "rabenseifner,ring",
         "--iters", "2", "--inner", "1", "--warmup", "1", "--json", str(out), timeout=280)  # fmt: skip
    rows = {row["algorithm"]: row for row in json.loads(out.read_text())}
    # Rabenseifner's first exchange stays in each host: the minimum n out of each host (2(H-1)/H·n at H = 2).
    # The flat ring crosses hosts on one of each host's two ranks: 2(P-1)/P·n = 1.5 n out of each host.
    for algorithm, planned in (("rabenseifner", 1.0), ("ring", 1.5)):
        row = rows[algorithm]
        assert row["hosts"] == 2
        assert row["plan_nic_bytes"] == pytest.approx(planned * size), algorithm
        # Counted on the interface: the payload plus TCP/IP and Ethernet headers (~4 %) and the barrier's bytes.
        assert 0.99 * planned * size <= row["nic_bytes"] <= 1.12 * planned * size, (algorithm, row)
    assert rows["native"]["nic_bytes"] > size  # gloo's own allreduce also crossed the hosts


@pytest.mark.timeout(300)
def test_calibrating_across_hosts_saves_the_link_between_them(cluster, tmp_path, monkeypatch):
    saved = tmp_path / "cost_model.json"
    monkeypatch.setenv("HYBRID_EXT_COST_MODEL", str(saved))
    # --calibrate across hosts adds the hierarchical butterflies and a 4 KiB row to what is asked
    done = _cli(cluster, "bench", "allreduce", "--sizes", "1M", "--algorithms", "auto",
                "--iters", "3", "--inner", "1", "--warmup", "1", "--calibrate", timeout=280)  # fmt: skip
    assert "saved as 'network/torch-gloo'" in done.stdout, done.stdout[-2000:]
    constants = json.loads(saved.read_text())
    assert {"shm+torch-gloo", "network/torch-gloo"} <= set(constants)
    link = constants["network/torch-gloo"]
    # A link's latency: more than a microsecond (a fit pushed to its floor, 1 ns, would mean the messages inside a
    # host were priced above the whole row), far below a second (the fit's arithmetic: test_cost_model)
    assert 1e-6 < link["alpha"] < 1.0
    # Moving a byte between the hosts costs their CPU something, far less than a microsecond (bench.link_cpu)
    assert 0.0 < link["cpu_per_byte"] < 1e-6
    if cluster.nic:
        from hybrid_ext.launch.cluster import rate_bytes_per_second

        assert link["beta"] == pytest.approx(1 / rate_bytes_per_second(cluster.nic))


@pytest.mark.timeout(420)
def test_the_demo_runs_on_the_emulated_cluster(cluster, tmp_path):
    done = _cli(cluster, "demo", "--strategies", "hybrid", "--reducers", "butterfly", "--epochs", "1",
                "--max-steps", "3", "--micro-batch", "8", "--out", str(tmp_path), timeout=400)  # fmt: skip
    assert "on 2 emulated hosts" in done.stdout
    assert "hybrid-butterfly-np4" in (tmp_path / "demo.md").read_text()
    assert (tmp_path / "demo-time_to_accuracy.png").exists() and (tmp_path / "demo-step_split.png").exists()


@pytest.mark.timeout(420)
def test_bench_train_across_hosts_runs_hybrid_at_each_runs_own_mp_size(cluster, tmp_path):
    # mp_size 2 keeps each model-parallel group on one host and all-reduces the FC shards between the hosts;
    # the warm-up ends at one step on every rank although their groups' trials differ.
    out = tmp_path / "rows.json"
    _cli(cluster, "bench", "train", "--model", "digits_alexnet", "--runs", "hybrid-butterfly,hybrid-butterfly@2",
         "--micro-batch", "4", "--size", "32", "--steps", "1", "--json", str(out), timeout=400)  # fmt: skip
    rows = {row["run"]: row for row in json.loads(out.read_text())}
    assert {run: row["mp_size"] for run, row in rows.items()} == {"hybrid-butterfly": 4, "hybrid-butterfly@2": 2}
    assert rows["hybrid-butterfly@2"]["bytes_per_step"] != rows["hybrid-butterfly"]["bytes_per_step"]
