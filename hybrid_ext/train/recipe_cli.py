"""The command line every training recipe shares (torchrun, horovodrun, deepspeed): one set of options, one summary.

parser = argparse.ArgumentParser()
add_train_arguments(parser)   # the same defaults in every recipe: the digits model, 5 epochs, Adam at 1e-3
config = train_config(parser.parse_args(), framework="horovod")
...
print(summary_line(train(config), config))
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from hybrid_ext.parallel.api import GRAD_ALGORITHMS
from hybrid_ext.parallel.plan import STRATEGIES
from hybrid_ext.train.device import add_device_argument
from hybrid_ext.train.loop import TrainConfig

_OPTIONS = (
    "strategy",
    "reducer",
    "mp_size",
    "model",
    "data",
    "epochs",
    "micro_batch",
    "lr",
    "size",
    "max_steps",
    "device",
)
RECIPE_GRAD_ALGORITHMS = tuple(r for r in GRAD_ALGORITHMS if r != "auto")  # a recipe names the reduction it runs


def add_train_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add the options of :class:`TrainConfig` a recipe exposes; ``defaults`` override TrainConfig's own."""
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | defaults
    parser.add_argument("--strategy", choices=STRATEGIES, default=base["strategy"])
    parser.add_argument("--reducer", choices=RECIPE_GRAD_ALGORITHMS, default=base["reducer"])
    parser.add_argument(
        "--mp-size", type=int, default=base["mp_size"], help="model-parallel group size (default: all ranks)"
    )
    parser.add_argument("--model", default=base["model"], help="digits_alexnet (default), alexnet, vgg11")
    parser.add_argument("--data", default=base["data"], help="ImageFolder / CIFAR-10 folder (default: embedded digits)")
    parser.add_argument("--epochs", type=int, default=base["epochs"])
    parser.add_argument("--micro-batch", type=int, default=base["micro_batch"], help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=base["lr"], help="Adam's learning rate (default: the model's)")
    parser.add_argument("--size", type=int, default=base["size"], help="image side (default: the model's)")
    parser.add_argument("--max-steps", type=int, default=base["max_steps"])
    parser.add_argument("--logdir", default=base["logdir"])
    add_device_argument(parser)


def train_config(args: argparse.Namespace, framework: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe (``overrides`` win over them)."""
    values = {name: getattr(args, name) for name in _OPTIONS} | overrides
    return TrainConfig(**values, logdir=args.logdir, framework=framework)


def summary_line(final: dict, config: TrainConfig) -> str:
    """What a recipe prints on rank 0 when a run ends."""
    return (
        f"{final['run']}: test accuracy {final['final/eval_accuracy'] * 100:.1f} %, "
        f"{final['final/samples_per_sec']:.1f} samples/s, logs in {config.logdir}/{final['run']}"
    )
