"""DeepSpeed integration under the real ``deepspeed`` launcher (CPU, 2 and 4 ranks).

Each launcher job runs tests/helpers/deepspeed_worker.py
(``deepspeed --num_gpus N tests/helpers/deepspeed_worker.py <job> ...``); every rank reports what it saw and the
tests compare:

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

import pytest
import torch

from helpers import HELPERS
from helpers.deepspeed_reference import LR, RECIPES, STEPS, TOL, ZERO_STAGES, ds_config, reference, small_cnn

LAUNCH_TIMEOUT = 300.0
WORKER = str(HELPERS / "deepspeed_worker.py")


def _job(np: int, *flags: str) -> list[dict]:
    from hybrid_ext.launch import run_deepspeed

    return run_deepspeed([WORKER, "collectives-and-training", *flags], np, timeout=LAUNCH_TIMEOUT)


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
def test_hybrid_ext_reduces_deepspeeds_gradient_buckets_with_deepspeeds_arithmetic(job):
    world = len(job)
    for rank, result in enumerate(job):
        for label, runs in result["bucket_reduction"].items():
            ours, theirs = runs["hybrid-ext"], runs["deepspeed"]
            assert ours["deepspeed_calls"] == 0, f"{label}: DeepSpeed's own allreduce_bucket ran"
            assert theirs["deepspeed_calls"] > 0, f"{label}: HYBRID_EXT_DEEPSPEED_REDUCTION=deepspeed was ignored"
            for index, (mine, own) in enumerate(zip(ours["grads"], theirs["grads"])):
                assert torch.equal(mine, own), f"rank {rank} {label}: gradient {index} differs"
            assert torch.equal(ours["grads"][0], job[0]["bucket_reduction"][label]["hybrid-ext"]["grads"][0])
        # the scaling really differed between settings (a test that ignores them would pass the above)
        default = result["bucket_reduction"]["default"]["hybrid-ext"]["grads"][0]
        summed = result["bucket_reduction"]["sum"]["hybrid-ext"]["grads"][0]
        assert torch.equal(summed / world, default) and not torch.equal(summed, default)


def test_the_deepspeed_method_hybrid_ext_replaces_is_still_deepspeeds_reduction_path(monkeypatch):
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    from hybrid_ext.integrations.deepspeed import grad_reduction

    path, name = grad_reduction.PATCHED
    assert path == f"{DeepSpeedEngine.__module__}.{DeepSpeedEngine.__qualname__}"
    assert callable(getattr(DeepSpeedEngine, name))
    assert f"self.{name}(" in inspect.getsource(DeepSpeedEngine.allreduce_no_retain)  # still the bucket's way
    parameters = list(inspect.signature(grad_reduction._ORIGINAL.get(name, getattr(DeepSpeedEngine, name))).parameters)
    assert parameters[:3] == ["self", "small_bucket", "dp_group"], parameters
    for attribute in ("gradient_average", "postscale_gradients", "gradient_predivide_factor"):
        assert attribute in inspect.getsource(DeepSpeedEngine.allreduce_bucket), attribute
    monkeypatch.setenv("HYBRID_EXT_DEEPSPEED_REDUCTION", "bogus")
    with pytest.raises(ValueError, match="HYBRID_EXT_DEEPSPEED_REDUCTION='bogus'"):
        grad_reduction.reduction()


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
@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeeds_own_checkpoints_round_trip_under_the_hybrid_section(job_np2, stage):
    for rank, result in enumerate(job_np2):
        run = result[f"checkpoint-zero{stage}"]
        _assert_state_close(run["at_load"], run["at_save"], f"rank {rank} loaded")
        _assert_state_close(run["loaded_then"], run["saved_then"], f"rank {rank} a step after loading")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_bf16_with_the_hybrid_section_trains_like_deepspeeds_own_bf16(job_np2):
    expected = reference(2)
    for result in job_np2:
        dp, hybrid = result["bf16/dp"], result["bf16/hybrid"]
        assert hybrid["strategy"] == "hybrid" and dp["strategy"] == "dp"
        # bf16 weights after 3 steps: both within bf16's reach of the float32 reference, and of each other.
        for key, value in expected.items():
            torch.testing.assert_close(hybrid["state"][key], value, rtol=5e-2, atol=2e-2, msg=key)
            torch.testing.assert_close(hybrid["state"][key], dp["state"][key], rtol=5e-2, atol=2e-2, msg=key)
        # 16-bit activations and gradients travel as 16-bit.
        assert ("allgather", "bfloat16") in hybrid["wires"] and ("reduce_scatter", "bfloat16") in hybrid["wires"]


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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


def test_the_private_deepspeed_names_we_touch_still_exist_and_are_read():
    import importlib
    import inspect

    from hybrid_ext.integrations.deepspeed.engine import DEEPSPEED_PRIVATE

    for module_name, names in DEEPSPEED_PRIVATE.items():
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        for name in names:
            assert hasattr(module, name), f"{module_name}.{name} is gone"
            # DeepSpeed's data-parallel group getter still falls back to the module global we reset.
            assert f"{name}." in inspect.getsource(module._get_data_parallel_group), f"{module_name}.{name} unread"
            assert f"global {name}" in source or f"{name} = " in source
