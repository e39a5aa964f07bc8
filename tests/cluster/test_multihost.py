"""Every launcher across the hosts of an emulated cluster (2 hosts × 2 ranks), checked against the single-process
references as the one-host tests are: ``torchrun --nnodes 2`` (static master address, and the c10d rendezvous),
``horovodrun -np 4 -H node0:2,node1:2 --gloo``, and ``deepspeed --hostfile`` (pdsh over ssh).

One job per launcher (per rendezvous for torchrun), each checking several things; the ranks run the one-host
tests' workers (tests/helpers/torchrun_worker.py, tests/helpers/horovod_worker.py,
tests/helpers/deepspeed_worker.py). Ranks of one host exchange through shared memory, ranks on different hosts over
the bridge: the tests check both (the transports in the metrics, bytes counted on the hosts' interfaces).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from hybrid_ext.launch import run_deepspeed, run_horovodrun, run_torchrun

from helpers import HELPERS, ROOT

NP = 4
JOB_TIMEOUT = 300.0
# DeepSpeed JIT-builds its CPU shared-memory op on first use (~3 min on a loaded 2-core machine): room for it.
DEEPSPEED_TIMEOUT = 480.0
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _traffic_during(cluster, job):
    """(job's result, bytes node1 sent on its cluster interface meanwhile)."""
    before = cluster.traffic(1)["tx_bytes"]
    result = job()
    return result, cluster.traffic(1)["tx_bytes"] - before


def _assert_hosts_and_network(results, sent: int) -> None:
    assert [r["host"] for r in results] == ["node0", "node0", "node1", "node1"]
    assert sent > 100_000, f"node1 sent only {sent} bytes on its interface"


def _assert_matches_partitioner_reference(out: dict, what: str, transports: set[str] | None = None) -> None:
    from helpers.parallel_reference import reference

    loss, grads, state = reference("small_cnn", NP)
    assert out["loss"] == pytest.approx(loss, rel=1e-5), what
    for name, expected in grads.items():
        torch.testing.assert_close(out["grads"][name], expected, **TOL, msg=f"{what}: grad {name}")
    for name, expected in state.items():
        torch.testing.assert_close(out["state"][name], expected, **TOL, msg=f"{what}: {name}")
    if transports is None:  # every group spans both hosts: shared memory within each host, gloo between them
        assert set(out["transports"]) == {"shm+torch-gloo"}, out["transports"]
    else:
        assert set(out["transports"]) == transports, what


# ------------------------------------------------------------------ torchrun


@pytest.fixture(scope="module")
def torchrun_jobs(cluster):
    """static: DDP on the butterfly backend; c10d: DDP on gloo with the butterfly comm hook; both: hybrid."""
    worker = str(HELPERS / "torchrun_worker.py")
    jobs = {}
    for rendezvous, backend in (("static", "butterfly"), ("c10d", "gloo")):
        jobs[rendezvous] = _traffic_during(
            cluster,
            lambda r=rendezvous, b=backend: run_torchrun(
                [worker, b], NP, cluster=cluster, rendezvous=r, timeout=JOB_TIMEOUT
            ),
        )
    return jobs


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_across_hosts_ddp_and_hybrid_match_the_reference(torchrun_jobs, rendezvous):
    from helpers.ddp_reference import reference_params

    results, sent = torchrun_jobs[rendezvous]
    _assert_hosts_and_network(results, sent)
    expected = reference_params(NP)
    for rank, result in enumerate(results):
        ddp = result["ddp"]
        assert ddp["backend"] == ("butterfly" if rendezvous == "static" else "gloo")
        assert ddp["butterfly_calls"] >= 4 and ddp["transports"] == ["shm+torch-gloo"], ddp["transports"]
        for mine, first, ref in zip(ddp["params"], results[0]["ddp"]["params"], expected):
            assert torch.equal(mine, first), f"rank {rank}: DDP parameters differ from rank 0's"
            torch.testing.assert_close(mine, ref, **TOL)
        _assert_matches_partitioner_reference(result["hybrid"], f"{rendezvous} rank {rank} hybrid")


# ------------------------------------------------------------------ horovodrun

# mp_size 2: each model-parallel pair on one host, each data-parallel pair across the two.
HOROVOD_SCENARIOS = ["optimizer", "partitioner:hybrid:2:butterfly"]


@pytest.fixture(scope="module")
def horovod_job(cluster):
    pytest.importorskip("horovod.torch")
    command = [sys.executable, str(HELPERS / "horovod_worker.py"), *HOROVOD_SCENARIOS]
    env = {"HYBRID_EXT_CHECK": "1", "HOROVOD_DYNAMIC_PROCESS_SETS": "1"}  # mp_size 2: a process set per group
    return _traffic_during(cluster, lambda: run_horovodrun(command, NP, cluster=cluster, env=env, timeout=JOB_TIMEOUT))


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_horovodrun_across_hosts_butterfly_optimizer_and_partitioner(horovod_job):
    results, sent = horovod_job
    assert sent > 100_000, f"node1 sent only {sent} bytes on its interface"
    for rank, result in enumerate(results):
        for variant, run in result["optimizer"].items():
            assert run["records"] > 0, f"{variant}: no butterfly reduction ran"
            tolerance = 2e-3 if variant == "fp16" else 1e-5
            first_rank = results[0]["optimizer"][variant]["butterfly"]
            for ours, theirs, first in zip(run["butterfly"], run["average"], first_rank):
                assert torch.equal(ours, first), f"rank {rank} {variant}: ranks disagree"
                torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * 1e-1)
        # The world: shared memory within each host, gloo between; this rank's data-parallel pair (one rank on
        # each host) over gloo; its model-parallel pair (one host) over shared memory.
        expected = {"shm+horovod-ps0-gloo", f"horovod-ps0/dp{rank % 2}-gloo", "shm"}
        _assert_matches_partitioner_reference(result[HOROVOD_SCENARIOS[1]], f"rank {rank} hybrid mp 2", expected)


@pytest.mark.timeout(120)
def test_horovodrun_names_a_host_that_does_not_answer(cluster):
    pytest.importorskip("horovod.torch")
    from hybrid_ext.launch import launcher_path

    command = [launcher_path("horovodrun"), "-np", "2", "-H", "node0:1,node9:1", "--gloo",
               "--network-interface", cluster.interface, "true"]  # fmt: skip
    done = cluster.run(0, command, capture_output=True, text=True, timeout=90)
    assert done.returncode != 0 and "ssh not successful for host node9" in done.stdout + done.stderr


# ------------------------------------------------------------------ deepspeed


@pytest.fixture(scope="module")
def deepspeed_cluster_job(cluster):
    command = [str(HELPERS / "deepspeed_worker.py"), "collectives-and-training", "--mp-sizes", "2"]
    return _traffic_during(cluster, lambda: run_deepspeed(command, NP, cluster=cluster, timeout=DEEPSPEED_TIMEOUT))


@pytest.mark.timeout(DEEPSPEED_TIMEOUT + 60)
def test_deepspeed_hostfile_across_hosts_zero_and_hybrid_match_the_reference(deepspeed_cluster_job):
    from helpers.deepspeed_reference import ZERO_STAGES, reference

    results, sent = deepspeed_cluster_job
    assert sent > 100_000, f"node1 sent only {sent} bytes on its interface"
    expected = reference(NP)

    def close(actual: dict, wanted: dict, what: str) -> None:
        assert set(actual) == set(wanted), what
        for name, value in wanted.items():
            torch.testing.assert_close(actual[name], value, **TOL, msg=f"{what}: {name}")

    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world"] == NP and result["backend"] == "butterfly"
        records = result["allreduce"]["records"]
        assert [r["collective"] for r in records] == ["allreduce"] and records[0]["world_size"] == NP
        assert records[0]["transport"] == "shm+torch-gloo", records[0]["transport"]  # shm in a host, gloo between
        torch.testing.assert_close(result["allreduce"]["ours"], result["allreduce"]["gloo"], rtol=1e-6, atol=1e-6)
        for stage in ZERO_STAGES:
            assert result["dp"][stage]["butterfly_calls"] > 0, f"ZeRO-{stage}: no butterfly reduction"
            close(result["dp"][stage]["state"], result["dp_gloo"][stage], f"rank {rank} ZeRO-{stage} vs gloo")
            close(result["dp"][stage]["state"], expected, f"rank {rank} ZeRO-{stage} vs reference")
            hybrid = result[f"hybrid-mp2-zero{stage}"]
            assert hybrid["strategy"] == "hybrid" and hybrid["mp"] == 2
            close(hybrid["state"], expected, f"rank {rank} hybrid mp 2 ZeRO-{stage}")


# ------------------------------------------------------------------ the README's recipe


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_the_multihost_recipe_trains_across_hosts_under_torchrun(cluster, tmp_path):
    """``hybrid-ext cluster run node0 -- recipes/multihost/train.sh torchrun ...``, as the README has it: the
    recipe starts the other host's torchrun over ssh. (Its horovodrun and deepspeed lines are the ones the jobs
    above run; their recipes are tested on one host.)"""
    launcher = "torchrun"
    script = ROOT / "recipes" / "multihost" / "train.sh"
    options = ["--model", "digits_alexnet", "--size", "32", "--max-steps", "2", "--epochs", "1",
               "--micro-batch", "8", "--logdir", str(tmp_path)]  # fmt: skip
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = cluster.run(0, ["bash", str(script), launcher, *options], env=env, capture_output=True, text=True,
                       timeout=JOB_TIMEOUT)  # fmt: skip
    cluster.kill_strays()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hybrid-butterfly-np4: test accuracy" in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "hybrid-butterfly-np4").is_dir()
