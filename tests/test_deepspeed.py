"""DeepSpeed integration under the real ``deepspeed`` launcher (CPU, 2 and 4 ranks).

Each launcher job runs this file as its script (``deepspeed --num_gpus N tests/test_deepspeed.py <job> ...``,
see :func:`worker_main` at the bottom); every rank reports what it saw and the tests compare:

- ``deepspeed.comm.all_reduce`` goes through the butterfly (metrics) and equals gloo's result;
- ZeRO-0/1/2 data-parallel training on the butterfly ends with the same parameters as on plain gloo;
- ``strategy="hybrid"`` inside a DeepSpeed engine (ZeRO 0, 1, 2) matches the single-process reference, as
  does ``mp``;
- the ds_config's ``"hybrid_ext"`` section switches the strategy, and bad values are explained.

A launcher job costs 10–20 s of start-up here, so each job checks several things.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

MICRO_BATCH = 4
STEPS = 3
LR = 0.1
TOL = {"rtol": 1e-5, "atol": 1e-6}
ZERO_STAGES = (0, 1, 2)
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
LAUNCH_TIMEOUT = 300.0


def small_cnn() -> nn.Module:
    """Conv features and a 3-layer FC head (column, row, column_last under hybrid)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4, 30),  # 30 features: uneven shards at mp 4
        nn.ReLU(),
        nn.Linear(30, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``; rank r's micro-batch is rows [r·MICRO_BATCH, (r+1)·MICRO_BATCH)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * MICRO_BATCH, 3, 8, 8, generator=g), torch.randint(
        0, 10, (world * MICRO_BATCH,), generator=g
    )


def reference(world: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The unmodified model trained in one process on the global batches (SGD with momentum)."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(steps):
        x, y = batch(step, world)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(stage: int, **section) -> dict:
    """ZeRO-1 and -2 reduce inside their per-parameter gradient hooks here (small buckets; ZeRO-1 with
    overlap_comm), during backward: the case where hybrid-ext's own pre-reduction must already be done."""
    zero = {"stage": stage} if stage == 0 else {"stage": stage, "reduce_bucket_size": 200, "overlap_comm": True}
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ZeRO with a client optimizer
        "steps_per_print": 10_000,
    }
    if section:
        config["hybrid_ext"] = section
    return config


# ---------------------------------------------------------------------------------------------- rank side


def _train(config: dict, rank: int, world: int, strategy: str, steps: int = STEPS) -> dict:
    import hybrid_ext
    from hybrid_ext.integrations import deepspeed as hx_deepspeed
    from hybrid_ext.parallel import ParallelModel

    def sgd(params):
        return torch.optim.SGD(params, lr=LR, momentum=0.9)

    engine, *_ = hx_deepspeed.initialize(model=small_cnn(), optimizer=sgd, config=config)
    with hybrid_ext.metrics.capture() as records:
        for step in range(steps):
            x, y = batch(step, world)
            if strategy != "mp":
                x, y = (
                    x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH],
                    y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH],
                )
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
    module = engine.module
    parallel = isinstance(module, ParallelModel)
    state = hybrid_ext.full_state_dict(module) if parallel else module.state_dict()
    return {
        "state": {k: v.detach().clone() for k, v in state.items()},
        "butterfly_calls": sum(r.collective == "allreduce" for r in records),
        "module": type(module).__name__,
        "strategy": module.strategy if parallel else "dp",
        "mp": module.groups.dims.mp if parallel else 1,
        "marked": sum(bool(getattr(p, "model_parallel", False)) for p in module.parameters()),
    }


class _GlooDataParallel:
    """An ``mpu`` whose data-parallel group is a plain gloo group over all ranks (and mp = 1): the engine's every
    gradient reduction, broadcast and ZeRO collective then runs on gloo, not on the butterfly — the plain-gloo
    run to compare with, in the same job."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp = dist.new_group(backend="gloo")
        self.mp = [dist.new_group([r], backend="gloo") for r in range(self.world)][self.rank]

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_group(self):
        return self.mp

    def get_data_parallel_rank(self):
        return self.rank

    def get_data_parallel_world_size(self):
        return self.world

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_group_ranks(self):
        return list(range(self.world))


def _train_on_gloo(stage: int, rank: int, world: int, mpu: _GlooDataParallel) -> dict:
    import deepspeed

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage), mpu=mpu)
    for step in range(STEPS):
        x, y = batch(step, world)
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _config_switches(rank: int, world: int) -> dict:
    """The shipped recipe configs, each through initialize(): what engine and grid they give."""
    from hybrid_ext.integrations import deepspeed as hx_deepspeed

    seen = {}
    for name in ("dp-butterfly", "hybrid-butterfly", "mp-butterfly", "dp-butterfly"):
        engine, *_ = hx_deepspeed.initialize(model=small_cnn(), config=str(RECIPES / f"{name}.json"))
        module = engine.module
        seen[name] = {
            "module": type(module).__name__,
            "strategy": getattr(module, "strategy", "dp"),
            "mp": module.groups.dims.mp if hasattr(module, "groups") else 1,
            "dp_world_size": engine.dp_world_size,
            "zero_stage": engine.zero_optimization_stage(),
        }
    try:
        hx_deepspeed.initialize(model=small_cnn(), config=ds_config(0, strategy="hybrid", mp_size=3))
        seen["mp_size=3"] = "no error"
    except ValueError as exc:
        seen["mp_size=3"] = str(exc)
    return seen


def job_collectives_and_training(args) -> None:
    """all_reduce vs gloo; dp at ZeRO 0/1/2 on the butterfly and on gloo; hybrid / mp at ZeRO 0/1/2."""
    import time

    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    import hybrid_ext
    from hybrid_ext.integrations import deepspeed as hx_deepspeed
    from hybrid_ext.launch import report_result

    start = time.perf_counter()
    hx_deepspeed.init_distributed(reducer="butterfly")
    rank, world = ds_comm.get_rank(), ds_comm.get_world_size()
    result: dict = {"rank": rank, "world": world, "backend": dist.get_backend()}
    # deepspeed.comm.all_reduce, and the same on a plain gloo group.
    t = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
    with hybrid_ext.metrics.capture() as records:
        ours = t.clone()
        ds_comm.all_reduce(ours)
    gloo_result = t.clone()
    dist.all_reduce(gloo_result, group=dist.new_group(backend="gloo"))
    result["allreduce"] = {"ours": ours, "gloo": gloo_result, "records": [r.as_dict() for r in records]}
    result["dp"] = {stage: _train(ds_config(stage), rank, world, "dp") for stage in ZERO_STAGES}
    gloo = _GlooDataParallel()
    result["dp_gloo"] = {stage: _train_on_gloo(stage, rank, world, gloo) for stage in ZERO_STAGES}
    for mp in args.mp_sizes:
        for stage in ZERO_STAGES:
            section = {"strategy": "hybrid", "mp_size": mp}
            result[f"hybrid-mp{mp}-zero{stage}"] = _train(ds_config(stage, **section), rank, world, "hybrid")
    if args.more:
        result["mp-zero1"] = _train(ds_config(1, strategy="mp"), rank, world, "mp")
        result["configs"] = _config_switches(rank, world)
    result["seconds"] = time.perf_counter() - start
    report_result(result)


JOBS = {"collectives-and-training": job_collectives_and_training}


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--mp-sizes", type=lambda s: [int(v) for v in s.split(",") if v], default=[])
    parser.add_argument("--more", action="store_true", help="also mp, and the recipe configs")
    parser.add_argument("--local_rank", type=int, default=-1)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    JOBS[args.job](args)


# ---------------------------------------------------------------------------------------------- test side


def _job(np: int, *flags: str) -> list[dict]:
    from hybrid_ext.launch import run_deepspeed

    return run_deepspeed([__file__, "collectives-and-training", *flags], np, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def job_np2():
    return _job(2, "--mp-sizes", "2", "--more")


@pytest.fixture(scope="module")
def job_np4():
    return _job(4, "--mp-sizes", "2")


@pytest.fixture(params=[2, 4], ids=["np2", "np4"])
def job(request):
    return request.getfixturevalue(f"job_np{request.param}")


def _assert_state_close(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **TOL, msg=f"{what}: {name}")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_deepspeed_all_reduce_goes_through_the_butterfly_and_equals_gloo(job):
    for rank, result in enumerate(job):
        assert result["rank"] == rank and result["backend"] == "butterfly"
        records = result["allreduce"]["records"]
        assert [r["collective"] for r in records] == ["allreduce"], "deepspeed.comm.all_reduce left no butterfly record"
        assert records[0]["world_size"] == len(job) and records[0]["elements"] == 1000
        torch.testing.assert_close(result["allreduce"]["ours"], result["allreduce"]["gloo"], rtol=1e-6, atol=1e-6)
        assert torch.equal(result["allreduce"]["ours"], job[0]["allreduce"]["ours"])  # same bits on every rank


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_zero_training_on_the_butterfly_ends_where_plain_gloo_does(job):
    expected = reference(len(job))
    for rank, result in enumerate(job):
        for stage in ZERO_STAGES:
            run = result["dp"][stage]
            assert run["butterfly_calls"] >= STEPS, f"ZeRO-{stage}: gradients did not go through the butterfly"
            _assert_state_close(run["state"], result["dp_gloo"][stage], f"rank {rank} ZeRO-{stage} vs gloo")
            _assert_state_close(run["state"], expected, f"rank {rank} ZeRO-{stage} vs reference")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_hybrid_in_a_deepspeed_engine_matches_the_single_process_reference(job):
    expected = reference(len(job))
    runs = [key for key in job[0] if key.startswith(("hybrid-", "mp-"))]
    assert len(runs) >= len(ZERO_STAGES)
    for rank, result in enumerate(job):
        for key in runs:
            run = result[key]
            assert run["module"] == "ParallelModel" and run["strategy"] == key.split("-")[0]
            assert run["marked"] > 0  # FC shards marked model_parallel for DeepSpeed's gradient norm
            _assert_state_close(run["state"], expected, f"rank {rank} {key}")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_the_config_section_switches_strategy(job_np2):
    for result in job_np2:
        configs = result["configs"]
        assert configs["dp-butterfly"] == {
            "module": "Sequential", "strategy": "dp", "mp": 1, "dp_world_size": 2, "zero_stage": 1,
        }  # fmt: skip
        assert configs["hybrid-butterfly"] == {
            "module": "ParallelModel", "strategy": "hybrid", "mp": 2, "dp_world_size": 1, "zero_stage": 1,
        }  # fmt: skip
        assert configs["mp-butterfly"]["strategy"] == "mp" and configs["mp-butterfly"]["dp_world_size"] == 1
        assert "mp_size=3 does not divide the world size 2" in configs["mp_size=3"]
        assert "hybrid_ext.mp_size" in configs["mp_size=3"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"strategy": "tensor"}, r'"hybrid_ext.strategy" must be one of dp, mp, hybrid; got \'tensor\''),
        ({"reducer": "nccl"}, r'"hybrid_ext.reducer" must be one of butterfly, auto, .*native; got \'nccl\''),
        ({"strategy": "hybrid", "mp_size": 0}, r'"hybrid_ext.mp_size" must be a positive integer or null; got 0'),
        ({"strategy": "hybrid", "mp_size": "2"}, r"must be a positive integer or null; got '2'"),
        ({"mp_size": 2}, r'"hybrid_ext.mp_size" is 2, but strategy "dp" has no model parallelism'),
        ({"stratgy": "hybrid"}, r"unknown key\(s\) \['stratgy'\] in the ds_config \"hybrid_ext\" section"),
        (["hybrid"], r'section must be an object such as \{"reducer"'),
    ],
    ids=["strategy", "reducer", "mp_size_zero", "mp_size_string", "mp_size_under_dp", "unknown_key", "not_an_object"],
)
def test_bad_config_values_are_explained(section, message):
    from hybrid_ext.integrations.deepspeed import split_config

    with pytest.raises(ValueError, match=message):
        split_config({"train_micro_batch_size_per_gpu": 1, "hybrid_ext": section})


def test_the_section_is_taken_out_and_the_callers_config_left_alone(tmp_path):
    from hybrid_ext.integrations.deepspeed import HybridSection, parallelize_for_deepspeed, split_config

    config = ds_config(2, strategy="hybrid", mp_size=2)
    ds, section = split_config(config)
    assert "hybrid_ext" not in ds and "hybrid_ext" in config
    assert section == HybridSection(reducer="butterfly", strategy="hybrid", mp_size=2)
    assert split_config({"train_micro_batch_size_per_gpu": 1})[1] is None  # no section: plain DeepSpeed
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert split_config(args=argparse.Namespace(deepspeed_config=str(path)))[1] == section
    with pytest.raises(ValueError, match=r"both as config= and as args\.deepspeed_config"):
        split_config(config, argparse.Namespace(deepspeed_config=str(path)))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        split_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="ZeRO stage 3 partitions the parameters themselves"):
        parallelize_for_deepspeed(small_cnn(), "hybrid", zero_stage=3)


def test_parameters_of_the_unsharded_model_are_refused():
    from hybrid_ext.integrations.deepspeed.engine import _check_parameters_belong

    unsharded, sharded = small_cnn(), small_cnn()
    _check_parameters_belong(sharded, list(sharded.parameters()), None)
    _check_parameters_belong(sharded, [{"params": list(sharded.parameters())}], lambda params: None)
    with pytest.raises(ValueError, match="parameters of the unsharded model"):
        _check_parameters_belong(sharded, list(unsharded.parameters()), None)
    with pytest.raises(ValueError, match="pass model_parameters=None and an optimizer callable"):
        _check_parameters_belong(sharded, None, torch.optim.SGD(unsharded.parameters(), lr=LR))


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_recipe_logs_every_tag_of_the_contract(tmp_path):
    from hybrid_ext.launch import run_deepspeed
    from hybrid_ext.train import compare
    from hybrid_ext.train.run_log import TAGS

    recipe = RECIPES / "train_cnn.py"
    results = run_deepspeed(
        [str(recipe), "--deepspeed_config", str(RECIPES / "hybrid-butterfly.json"), "--max-steps", "2",
         "--epochs", "1", "--micro-batch", "8", "--logdir", str(tmp_path)],
        2, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert [r["run"] for r in results] == ["hybrid-butterfly-np2"] * 2 and results[0]["steps"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "hybrid-butterfly-np2"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    summary = compare.read_run(tmp_path / "hybrid-butterfly-np2")
    assert summary.hparams["framework"] == "deepspeed" and summary.hparams["mp_size"] == 2
    assert len(summary.loss) == 2 and summary.bytes_per_step > 0


@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_a_plain_deepspeed_script_trains_on_the_butterfly_with_one_line_changed():
    from hybrid_ext.launch import run_deepspeed

    script = RECIPES / "plain_example.py"
    text = script.read_text()
    assert text.count("hx_deepspeed.") == 1  # the init line is the only hybrid-ext call outside the harness glue
    results = run_deepspeed(
        [str(script), "--deepspeed_config", str(RECIPES / "plain_example.json"), "--steps", "8"], 2,
        timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    for result in results:
        assert result["backend"] == "butterfly" and result["butterfly_allreduces"] >= 8
        assert result["losses"][-1] < result["losses"][0]
        for mine, first in zip(result["weights"], results[0]["weights"]):
            assert torch.equal(mine, first)  # the ranks agree


if __name__ == "__main__":
    worker_main(sys.argv[1:])
