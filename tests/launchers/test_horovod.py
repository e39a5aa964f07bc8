"""Horovod under real ``horovodrun --gloo``: hvd.Butterfly, DistributedOptimizer, the partitioner, the recipe.

The ranks run tests/helpers/horovod_worker.py; this file checks their numbers against Horovod's own op and against the
single-process reference of tests/multiprocess/test_parallel.py.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from helpers import HELPERS, ROOT

pytest.importorskip("horovod.torch")

from helpers.parallel_reference import accumulation_reference, reference

WORKER = str(HELPERS / "horovod_worker.py")

# np=3 is the case Horovod's Adasum refuses; np=4 adds a 2-D grid (mp_size 2) with Horovod process sets, after a
# world-only grid in the same job (its one-rank dp subgroups reuse the 2-D grid's subgroup names: it once hung).
COMMON = ["ops", "transports", "optimizer"]
JOBS = {
    2: [*COMMON, "partitioner:hybrid:none:butterfly", "partitioner:dp:none:native", "usual_lines:none"],
    3: [*COMMON, "partitioner:hybrid:none:butterfly", "partitioner:mp:none:butterfly"],
    4: [
        *COMMON,
        "partitioner:hybrid:none:butterfly",
        "partitioner:hybrid:2:butterfly",
        "partitioner:hybrid:2:native",
        "process_set",
        "accumulation:2",
        "usual_lines:2",
    ],
}


@pytest.fixture(scope="module", params=sorted(JOBS))
def job(request):
    np = request.param
    from hybrid_ext import launch

    env = {"HYBRID_EXT_CHECK": "1", "HOROVOD_DYNAMIC_PROCESS_SETS": "1" if np == 4 else "0"}
    results = launch.run_horovodrun([sys.executable, WORKER, *JOBS[np]], np, timeout=300, env=env)
    return np, results


@pytest.mark.timeout(360)
def test_butterfly_op_equals_average_for_every_entry_point(job):
    np, results = job
    for rank, result in enumerate(results):
        ops = result["ops"]
        for name, error in ops["errors"].items():
            tolerance = 2e-3 if "float16" in name else 1e-5
            assert error <= tolerance, f"np={np} rank {rank}: {name} differs from hvd.Average by {error:.3g}"
        assert ops["butterfly_records"] > 0 and all(t.startswith("shm") for t in ops["transports"]), ops["transports"]
        assert ops["untouched"] == {
            "broadcast": float(np - 1),
            "allgather": [float(r) for r in range(np)],
            "min": 1.0,
            "alltoall": [float(r) for r in range(np)],
        }
        assert ops["equal_to_average"] and ops["repr"] == "hvd.Butterfly" and ops["still_registered"]
        assert "ButterflySum" in ops["int_average_error"]


@pytest.mark.timeout(360)
def test_distributed_optimizer_trains_the_same_with_butterfly(job):
    np, results = job
    for variant in results[0]["optimizer"]:
        first = results[0]["optimizer"][variant]["butterfly"]
        for result in results:
            run = result["optimizer"][variant]
            assert run["records"] > 0, f"{variant}: no butterfly reduction ran"
            for ours, theirs, first_rank in zip(run["butterfly"], run["average"], first):
                assert torch.equal(ours, first_rank), f"np={np} {variant}: ranks disagree"
                tolerance = 2e-3 if variant == "fp16" else 1e-5
                torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * 1e-1)


@pytest.mark.timeout(360)
def test_partitioner_under_horovodrun_equals_the_reference(job):
    np, results = job
    loss, grads, state = reference("small_cnn", np)
    for scenario in JOBS[np]:
        if not scenario.startswith("partitioner"):
            continue
        for result in results:
            out = result[scenario]
            assert out["loss"] == pytest.approx(loss, rel=1e-5), scenario
            for name, expected in grads.items():
                torch.testing.assert_close(out["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=f"{scenario} {name}")
            for name, expected in state.items():
                torch.testing.assert_close(out["state"][name], expected, rtol=1e-5, atol=1e-6, msg=f"{scenario} {name}")
            if scenario.endswith("native"):
                assert "horovod" in out["transports"], out["transports"]


@pytest.mark.timeout(360)
def test_partitioner_gradient_accumulation_under_horovodrun_equals_the_reference(job):
    np, results = job
    if np != 4:
        pytest.skip("the 4-rank job runs it (hybrid, mp_size 2)")
    expected = accumulation_reference(np)
    for rank, result in enumerate(results):
        for mode, out in result["accumulation:2"].items():
            assert out["no_sync_allreduces"] == 0, mode
            for name, value in expected["state"].items():
                torch.testing.assert_close(out["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"{mode} rank {rank}")


def _two_steps_reference(world: int) -> tuple[dict, dict, dict]:
    from helpers.parallel_reference import global_batch, small_cnn

    model = small_cnn()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = global_batch(world, (3, 16, 16), 10)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return initial, model.state_dict(), optimizer.state_dict()


@pytest.mark.timeout(360)
def test_horovods_usual_broadcasts_leave_every_shard_right(job):
    np, results = job
    scenario = {2: "usual_lines:none", 4: "usual_lines:2"}.get(np)
    if scenario is None:
        pytest.skip("the 2- and 4-rank jobs run it")
    initial, state, optimizer = _two_steps_reference(np)
    for rank, result in enumerate(results):
        out = result[scenario]
        for name, value in initial.items():
            torch.testing.assert_close(out["initial"][name], value, msg=f"rank {rank} {name} before broadcast")
            torch.testing.assert_close(out["after_broadcast"][name], value, msg=f"rank {rank} {name} broadcast")
        for name, value in state.items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
        for index, entries in optimizer["state"].items():
            torch.testing.assert_close(
                out["optimizer"]["state"][index]["momentum_buffer"], entries["momentum_buffer"], rtol=1e-5, atol=1e-6
            )


@pytest.mark.timeout(360)
def test_side_channel_gloo_and_alltoall_transports(job):
    np, results = job
    for result in results:
        out = result["transports"]
        assert set(out) == ({"gloo", "alltoall"} if np in (2, 4) else {"gloo"})
        assert out["gloo"]["transport"].endswith("gloo")
        assert all(v["error"] <= 1e-6 for v in out.values()), out


@pytest.mark.timeout(90)
def test_side_channel_stages_cuda_tensors_over_gloo_where_nccl_refuses_ranks_sharing_a_gpu(monkeypatch):
    """Two ranks (threads of this process) on a host with one GPU and NCCL 2.28: gloo with staging, not NCCL."""
    import concurrent.futures

    import torch.distributed as dist

    from hybrid_ext.comm.transports import side_channel
    from hybrid_ext.comm.transports.staged import StagedTransport
    from hybrid_ext.comm.transports.torch_p2p import TorchTransport

    facts = {"host": "h", "cuda": True, "gpus": 1, "nccl": True, "nccl_version": (2, 28, 9), "switch": True}
    monkeypatch.setattr(side_channel, "this_rank_gpu_facts", lambda: dict(facts))
    store = dist.HashStore()

    def rank_fn(rank):
        channel = side_channel.SideChannel(store, rank, 2, 30.0, "test")
        channel.cuda_device = torch.device("cpu")  # host tensors through the staged path
        transport = channel.transport(torch.device("cuda"), "torch")
        assert isinstance(transport, StagedTransport) and isinstance(transport.host, TorchTransport)
        assert transport.host is not channel.transport(torch.device("cpu"), "torch")  # a route of its own
        assert transport.name == "cpu-staged+test-gloo" and not channel.nccl_usable()
        received = torch.empty(5)
        transport.exchange(torch.full((5,), float(rank)), 1 - rank, received, 1 - rank)
        return received

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        received = [f.result(timeout=60) for f in [pool.submit(rank_fn, rank) for rank in (0, 1)]]
    assert torch.equal(received[0], torch.ones(5)) and torch.equal(received[1], torch.zeros(5))


@pytest.mark.timeout(360)
def test_butterfly_over_a_process_set(job):
    np, results = job
    if np != 4:
        pytest.skip("the 4-rank job adds a process set")
    assert results[0]["process_set"]["error"] <= 1e-6 and results[2]["process_set"]["error"] <= 1e-6
    assert "not part of" in results[1]["process_set"]["refused"]


def test_registration_relies_only_on_pinned_horovod_names():
    op = importlib.import_module("hybrid_ext.integrations.horovod.op")
    for module_name, names in op.PATCHED.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert callable(getattr(module, name)), f"{module_name}.{name}"
    mpi_ops = importlib.import_module("horovod.torch.mpi_ops")
    import inspect

    # The dispatch functions' signatures the wrappers forward.
    original = op._originals.get("horovod.torch.mpi_ops._allreduce_async", mpi_ops._allreduce_async)
    assert list(inspect.signature(original).parameters) == [
        "tensor", "output", "name", "op", "prescale_factor", "postscale_factor", "process_set",
    ]  # fmt: skip
    optimizer = importlib.import_module("horovod.torch.optimizer")
    assert "allreduce_async_" in inspect.getsource(optimizer._DistributedOptimizer._allreduce_grad_async)
    assert op.Butterfly == mpi_ops.Average and op.ButterflySum == mpi_ops.Sum
    assert op.Butterfly is not mpi_ops.Average
    # process_set_for's lookup of an existing set (Horovod has no public one).
    from horovod.common import process_sets

    assert callable(process_sets._temp_process_set_object)
    assert callable(mpi_ops._basics._get_process_set_ids_and_ranks)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_plain_horovod_script_trains_alike_with_only_the_op_changed():
    from hybrid_ext import launch

    script = str(ROOT / "recipes" / "horovod" / "plain_example.py")
    common = ["--epochs", "2", "--backward-passes", "2", "--predivide", "2.0"]
    ours = launch.run_horovodrun([sys.executable, script, "--op", "butterfly", *common], 3, timeout=240)
    theirs = launch.run_horovodrun([sys.executable, script, "--op", "average", *common], 3, timeout=240)
    assert ours[0]["accuracy"] > 0.8
    for mine, first in zip(ours, [ours[0]] * 3):
        assert all(torch.equal(a, b) for a, b in zip(mine["params"], first["params"]))
    for a, b in zip(ours[0]["params"], theirs[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_recipe_runs_every_strategy_and_reducer_and_logs_the_contract(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hybrid_ext import launch
    from hybrid_ext.train.compare import read_run
    from hybrid_ext.train.run_log import HPARAMS, TAGS

    runs = [f"{s}-{r}" for s in ("dp", "mp", "hybrid") for r in ("butterfly", "native")]
    recipe = str(ROOT / "recipes" / "horovod" / "train_cnn.py")
    results = launch.run_horovodrun(
        [sys.executable, recipe, "--runs", ",".join(runs), "--model", "digits_alexnet", "--size", "32",
         "--max-steps", "2", "--epochs", "1", "--micro-batch", "8", "--logdir", str(tmp_path)],
        2, timeout=400,
    )  # fmt: skip
    assert [r["run"] for r in results[0]] == [f"{run}-np2" for run in runs]
    for run in runs:
        path = tmp_path / f"{run}-np2"
        acc = EventAccumulator(str(path))
        acc.Reload()
        assert set(TAGS) <= set(acc.Tags()["scalars"]), run
        summary = read_run(path)
        assert set(HPARAMS) <= set(summary.hparams) and summary.hparams["framework"] == "horovod"
        assert len(summary.loss) == 2 and summary.bytes_per_step > 0, run
