"""The training loop every recipe shares: parallelize, train, evaluate, log by the contract.

Recipes differ only in how their ranks start, which groups (transport) they pass, and — for a host framework
with its own engine, such as DeepSpeed — how one optimisation step is taken (``prepare``); this loop sees a
:class:`~hybrid_ext.parallel.dims.Groups` or builds torch.distributed ones.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from hybrid_ext.comm import metrics
from hybrid_ext.launch.heap import steady_heap
from hybrid_ext.parallel import ParallelModel, parallelize
from hybrid_ext.train import data as data_module
from hybrid_ext.train import models
from hybrid_ext.train.device import this_rank_device
from hybrid_ext.train.run_log import RunLogger, sharded_over


@dataclass
class TrainConfig:
    strategy: str = "hybrid"
    """dp, mp or hybrid."""
    reducer: str = "butterfly"
    """butterfly, rabenseifner, recursive_doubling, ring or native."""
    mp_size: int | None = None
    """Model-parallel group size (default: all ranks)."""
    model: str = "digits_alexnet"
    """digits_alexnet, alexnet or vgg11."""
    epochs: int = 5
    micro_batch: int = 16
    """Samples per rank per step (under mp every rank processes micro_batch × world samples)."""
    lr: float | None = None
    """Adam's learning rate; None: the model's (:data:`hybrid_ext.train.models.DEFAULT_LR`)."""
    size: int | None = None
    """Input height and width the images are scaled to; None: the model's (``models.DEFAULT_SIZE``)."""
    data: str | None = None
    """An ImageFolder / CIFAR-10 folder; None: the embedded digits set."""
    logdir: str = "runs"
    framework: str = "torch"
    max_steps: int | None = None
    """Stop after this many steps in all (for quick runs and tests)."""
    progress: bool = True
    seed: int = 0
    device: str = "auto"
    """auto (CUDA where there is a GPU), cpu or cuda; each rank takes GPU local rank % GPU count."""

    def __post_init__(self) -> None:
        if self.size is None:
            self.size = models.DEFAULT_SIZE.get(self.model, models.DEFAULT_SIZE["digits_alexnet"])
        if self.lr is None:
            self.lr = models.DEFAULT_LR.get(self.model, models.DEFAULT_LR["digits_alexnet"])


def _reduce_sum(comm, values: list[float], name: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm.device)  # where the group's transport carries
    comm.allreduce([t], name=name)
    return t.tolist()


def _reduce_max(comm, value: float, name: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=comm.device)
    comm.allreduce([t], op="max", name=name)
    return t.item()


def evaluate(model, dataset, config: TrainConfig, rank: int, world: int, device: torch.device) -> float:
    """Accuracy on the whole test set; every rank of a model-parallel group runs the same number of forwards."""
    x, y = dataset.test_x, dataset.test_y
    if config.strategy != "mp":
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    chunks = max(1, math.ceil(math.ceil(len(dataset.test_y) / (1 if config.strategy == "mp" else world)) / 256))
    correct = 0
    model.eval()
    with torch.no_grad():
        for xs, ys in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
            correct += int((model(xs.to(device)).argmax(1) == ys.to(device)).sum())
    model.train()
    comm = model.groups.world
    total_correct, total = _reduce_sum(comm, [correct, len(y)], "eval accuracy")
    if config.strategy == "mp":  # every rank saw the whole set
        total_correct, total = total_correct / world, total / world
    return total_correct / max(total, 1)


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""One optimisation step on this rank's batch: ``(x, y) -> (outputs, loss)``."""
Prepare = Callable[[torch.nn.Module, "TrainConfig", object], tuple[ParallelModel, StepFn]]
"""``(model, config, groups) -> (parallel model, step)``: how a recipe parallelizes and steps."""


def prepare_adam(net: torch.nn.Module, config: TrainConfig, groups=None) -> tuple[ParallelModel, StepFn]:
    """The default: :func:`hybrid_ext.parallelize`, then Adam; gradients are reduced during ``backward``."""
    model = parallelize(net, strategy=config.strategy, reducer=config.reducer, mp_size=config.mp_size, groups=groups)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        return out, loss

    return model, step


def train(config: TrainConfig, groups=None, prepare: Prepare = prepare_adam) -> dict:
    """Train under ``config``; returns the final metrics (the same on every rank)."""
    if config.size < models.MIN_SIZE.get(config.model, 1):
        smallest = models.MIN_SIZE[config.model]
        raise ValueError(f"{config.model} needs images of at least {smallest} px a side; got size={config.size}")
    steady_heap()  # every step's large tensors reused, not mapped afresh (HYBRID_EXT_HEAP)
    device = this_rank_device(config.device)
    dataset = data_module.load(config.data, config.size, models.input_channels(config.model))
    net = models.build(config.model, dataset.channels, dataset.classes, config.seed).to(device)
    model, train_step = prepare(net, config, groups)
    world, rank = model.groups.dims.world, model.groups.rank
    comm = model.groups.world
    hparams = {
        **{k: v for k, v in asdict(config).items() if k in ("strategy", "reducer", "model", "framework")},
        "world_size": world,
        "mp_size": sharded_over(config.strategy, model.groups.dims.mp),
        "batch_size": config.micro_batch * world,
        "device": device.type,
    }
    logger = RunLogger(config.logdir, hparams, rank)
    global_batch = config.micro_batch * world
    steps_per_epoch = len(dataset.train_y) // global_batch
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    bar = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        # disable=None: no bar when output is not a terminal (CI logs stay readable)
        bar = tqdm(total=total_steps, desc=logger.path.name, unit="step", leave=False, disable=None)
    step, history = 0, {"samples_per_sec": [], "step_ms": [], "bytes": [], "own_loss": []}
    eval_accuracy = 0.0
    for epoch in range(config.epochs):
        order = torch.randperm(len(dataset.train_y), generator=torch.Generator().manual_seed(config.seed + epoch))
        for s in range(steps_per_epoch):
            if step >= total_steps:
                break
            batch = order[s * global_batch : (s + 1) * global_batch]
            if config.strategy != "mp":
                batch = batch[rank * config.micro_batch : (rank + 1) * config.micro_batch]
            x, y = dataset.train_x[batch].to(device), dataset.train_y[batch].to(device)
            with metrics.capture() as records:
                start = time.perf_counter()
                out, loss = train_step(x, y)
                elapsed = time.perf_counter() - start
            correct = int((out.argmax(1) == y).sum())
            history["own_loss"].append(loss.item())
            loss_sum, correct_sum, count = _reduce_sum(comm, [loss.item() * len(y), correct, len(y)], "loss average")
            slowest = _reduce_max(comm, elapsed, "slowest step")
            sent = sum(r.bytes_sent for r in records)
            values = {
                "train/loss": loss_sum / count,
                "train/accuracy": correct_sum / count,
                "perf/samples_per_sec": global_batch / slowest,
                "perf/step_time_ms": slowest * 1e3,
                "comm/time_ms": sum(r.seconds for r in records) * 1e3,
                "comm/bytes_per_step": sent,
                "comm/messages_per_step": sum(r.messages_sent for r in records),
            }
            logger.scalars(step, values)
            history["samples_per_sec"].append(values["perf/samples_per_sec"])
            history["step_ms"].append(values["perf/step_time_ms"])
            history["bytes"].append(sent)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['train/loss']:.3f}")
        eval_accuracy = evaluate(model, dataset, config, rank, world, device)
        logger.scalars(step, {"eval/accuracy": eval_accuracy})
        if step >= total_steps:
            break
    if bar is not None:
        bar.close()
    final = {
        "final/eval_accuracy": eval_accuracy,
        "final/samples_per_sec": statistics.median(history["samples_per_sec"][1:] or history["samples_per_sec"]),
        "final/step_time_ms": statistics.median(history["step_ms"][1:] or history["step_ms"]),
        "final/comm_bytes_per_step": statistics.median(history["bytes"]),
    }
    logger.finish(final)
    return {**final, "run": logger.path.name, "steps": step, "own_losses": history["own_loss"], "device": str(device)}
