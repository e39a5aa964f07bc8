"""The script every rank of the DeepSpeed tests' launcher jobs runs: ``deepspeed --num_gpus N
tests/helpers/deepspeed_worker.py <job> ...``. Each rank reports what it saw; tests/launchers/test_deepspeed.py
compares.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from deepspeed_reference import (
    DATA_GAS,
    DATA_STEPS,
    LR,
    MICRO_BATCH,
    RECIPES,
    STEPS,
    ZERO_STAGES,
    batch,
    data_path_config,
    data_path_dataset,
    ds_config,
    small_cnn,
)


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
            if config.get("bf16", {}).get("enabled"):
                x = x.to(torch.bfloat16)  # DeepSpeed casts the model, not the inputs
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
    module = engine.module
    parallel = isinstance(module, ParallelModel)
    state = hybrid_ext.full_state_dict(module) if parallel else module.state_dict()
    return {
        "state": {k: v.detach().float().clone() for k, v in state.items()},
        "butterfly_calls": sum(r.collective == "allreduce" for r in records),
        "wires": sorted({(r.collective, r.dtype) for r in records}),
        "module": type(module).__name__,
        "strategy": module.strategy if parallel else "dp",
        "mp": module.groups.dims.mp if parallel else 1,
        "marked": sum(bool(getattr(p, "model_parallel", False)) for p in module.parameters()),
    }


def _checkpoint_round_trip(config: dict, rank: int, world: int, directory: str) -> dict:
    """DeepSpeed's own save_checkpoint / load_checkpoint under the hybrid_ext section: a fresh engine loads what
    one saved after two steps, and both take a third step alike."""
    import hybrid_ext
    from hybrid_ext.integrations import deepspeed as hx_deepspeed

    def sgd(params):
        return torch.optim.SGD(params, lr=LR, momentum=0.9)

    def step(engine, index):
        x, y = batch(index, world)
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()

    saved, *_ = hx_deepspeed.initialize(model=small_cnn(), optimizer=sgd, config=config)
    for index in range(2):
        step(saved, index)
    saved.save_checkpoint(directory, tag="two")
    loaded, *_ = hx_deepspeed.initialize(model=small_cnn(), optimizer=sgd, config=config)
    loaded.load_checkpoint(directory, tag="two")
    at_load = hybrid_ext.full_state_dict(loaded.module)
    at_save = hybrid_ext.full_state_dict(saved.module)
    step(saved, 2)
    step(loaded, 2)
    return {
        "at_save": at_save,
        "at_load": at_load,
        "saved_then": hybrid_ext.full_state_dict(saved.module),
        "loaded_then": hybrid_ext.full_state_dict(loaded.module),
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


def _bucket_reduction(rank: int, world: int) -> dict:
    """DeepSpeed's gradient bucket reduced by hybrid-ext (HYBRID_EXT_DEEPSPEED_REDUCTION=hybrid-ext) against
    DeepSpeed's own method on the same engine and gradients, under each of DeepSpeed's scaling settings.

    Gradients are small integers, so every sum is exact in any order and the two must agree bit for bit; a spy
    on ``allreduce_bucket`` (which only DeepSpeed's own method calls) tells which one ran."""
    import os

    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = {"deepspeed": 0}
    own_bucket = DeepSpeedEngine.allreduce_bucket

    def spy(self, *args, **kwargs):
        calls["deepspeed"] += 1
        return own_bucket(self, *args, **kwargs)

    DeepSpeedEngine.allreduce_bucket = spy
    seen: dict = {}
    try:
        settings = {
            "default": {},
            "predivide": {"gradient_predivide_factor": 2.0},
            "prescale": {"prescale_gradients": True},
            "sum": {"gradient_average": False},  # hypothetical: not a ds_config key; set on the engine below
        }
        for label, extra in settings.items():
            config = {**ds_config(0), **{k: v for k, v in extra.items() if k != "gradient_average"}}
            model = small_cnn()
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
            )
            if "gradient_average" in extra:
                engine.gradient_average = extra["gradient_average"]
            results = {}
            for reduction in ("hybrid-ext", "deepspeed"):
                for index, p in enumerate(engine.module.parameters()):
                    p.grad = (torch.arange(p.numel()) * (rank + 1 + index) % 17 - 8).float().reshape(p.shape)
                os.environ["HYBRID_EXT_DEEPSPEED_REDUCTION"] = reduction
                before = calls["deepspeed"]
                engine.allreduce_gradients()
                results[reduction] = {
                    "grads": [p.grad.clone() for p in engine.module.parameters()],
                    "deepspeed_calls": calls["deepspeed"] - before,
                }
            seen[label] = results
    finally:
        DeepSpeedEngine.allreduce_bucket = own_bucket
        os.environ.pop("HYBRID_EXT_DEEPSPEED_REDUCTION", None)
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
    result["bucket_reduction"] = _bucket_reduction(rank, world)
    result["dp"] = {stage: _train(ds_config(stage), rank, world, "dp") for stage in ZERO_STAGES}
    gloo = _GlooDataParallel()
    result["dp_gloo"] = {stage: _train_on_gloo(stage, rank, world, gloo) for stage in ZERO_STAGES}
    for mp in args.mp_sizes:
        for stage in ZERO_STAGES:
            section = {"strategy": "hybrid", "mp_size": mp}
            result[f"hybrid-mp{mp}-zero{stage}"] = _train(ds_config(stage, **section), rank, world, "hybrid")
    if args.more:
        result["mp-zero1"] = _train(ds_config(1, strategy="mp"), rank, world, "mp")
        # DeepSpeed's bf16 (fp16 needs a GPU in DeepSpeed): plain data parallelism and hybrid from the section.
        for name, section in (("dp", {}), ("hybrid", {"strategy": "hybrid", "mp_size": 2})):
            config = {**ds_config(0, **section), "bf16": {"enabled": True}}
            result[f"bf16/{name}"] = _train(config, rank, world, section.get("strategy", "dp"))
        result["configs"] = _config_switches(rank, world)
        for stage in (0, 1):
            directory = os.path.join(os.environ["HYBRID_EXT_RESULT_DIR"], f"checkpoint-zero{stage}")
            config = ds_config(stage, strategy="hybrid", mp_size=2)
            result[f"checkpoint-zero{stage}"] = _checkpoint_round_trip(config, rank, world, directory)
    result["seconds"] = time.perf_counter() - start
    report_result(result)


def _train_from_deepspeeds_loader(config: dict) -> dict:
    """A plain DeepSpeed loop: the engine's own loader (training_data=), engine.backward / engine.step."""
    import hybrid_ext
    from hybrid_ext.integrations import deepspeed as hx_deepspeed
    from hybrid_ext.parallel import ParallelModel

    def sgd(params):
        return torch.optim.SGD(params, lr=LR, momentum=0.9)

    engine, _, loader, scheduler = hx_deepspeed.initialize(
        model=small_cnn(), optimizer=sgd, config=config, training_data=data_path_dataset()
    )
    seen: list[int] = []
    batches = iter(loader)
    for _ in range(DATA_STEPS * DATA_GAS):
        x, y, index = next(batches)
        seen += index.tolist()
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    module = engine.module
    state = hybrid_ext.full_state_dict(module) if isinstance(module, ParallelModel) else module.state_dict()
    return {
        "state": {k: v.detach().clone() for k, v in state.items()},
        "samples": seen,
        "lr": scheduler.get_last_lr(),
        "accumulation": engine.gradient_accumulation_steps(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
    }


def job_data_path(args) -> None:
    """DeepSpeed's own data loader, gradient accumulation, clipping and LR scheduler, under dp and hybrid."""
    import torch.distributed as dist

    from hybrid_ext.integrations import deepspeed as hx_deepspeed
    from hybrid_ext.launch import report_result

    hx_deepspeed.init_distributed(reducer="butterfly")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"rank": rank, "world": world}
    result["dp"] = _train_from_deepspeeds_loader(data_path_config(0, world))
    for stage in (0, 2):
        config = data_path_config(stage, world, strategy="hybrid", mp_size=2)
        try:
            result[f"hybrid-zero{stage}"] = _train_from_deepspeeds_loader(config)
        except Exception as exc:  # reported, so that the test shows what DeepSpeed said
            result[f"hybrid-zero{stage}"] = {"error": f"{type(exc).__name__}: {exc}"}
    report_result(result)


JOBS = {"collectives-and-training": job_collectives_and_training, "data-path": job_data_path}


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--mp-sizes", type=lambda s: [int(v) for v in s.split(",") if v], default=[])
    parser.add_argument("--more", action="store_true", help="also mp, and the recipe configs")
    parser.add_argument("--local_rank", type=int, default=-1)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    JOBS[args.job](args)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
