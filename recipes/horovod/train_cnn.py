"""Train a CNN with hybrid-ext under horovodrun; logs by hybrid-ext's logging contract (TensorBoard on rank 0).

    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --strategy hybrid --reducer butterfly
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --strategy dp --reducer native
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --data ~/cifar10 --size 64
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --runs dp-native,hybrid-butterfly
    hybrid-ext compare runs/

AlexNet (torchvision) by default, on the digits that ship with scikit-learn (grayscale made RGB, 64×64), or
on an ImageFolder / CIFAR-10 folder by path. Conv layers data-parallel, FC layers model-parallel
(``--strategy hybrid``) — the gradients of the replicated layers reduced by the butterfly over a side channel
(``--reducer butterfly``) or by ``hvd.allreduce`` (``--reducer native``). The training loop is hybrid-ext's
(hybrid_ext.train.loop), shared with `hybrid-ext demo` and the torchrun and DeepSpeed recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import horovod.torch as hvd

import hybrid_ext.integrations.horovod as hxh
from hybrid_ext.launch import report_result
from hybrid_ext.train.loop import TrainConfig, train


def parse_args() -> list[TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=["dp", "mp", "hybrid"], default="hybrid")
    parser.add_argument(
        "--reducer", choices=["butterfly", "rabenseifner", "recursive_doubling", "ring", "native"], default="butterfly"
    )
    parser.add_argument("--mp-size", type=int, default=None, help="model-parallel group size (default: all ranks)")
    parser.add_argument("--model", default="alexnet", help="alexnet, vgg11, digits_alexnet")
    parser.add_argument("--data", default=None, help="ImageFolder / CIFAR-10 folder (default: embedded digits)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--size", type=int, default=64, help="image side after resizing (AlexNet needs >= 63)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument(
        "--runs", default=None, help="several runs in one job, e.g. dp-native,hybrid-butterfly (strategy-reducer)"
    )
    args = parser.parse_args()
    base = TrainConfig(
        strategy=args.strategy, reducer=args.reducer, mp_size=args.mp_size, model=args.model, data=args.data,
        epochs=args.epochs, micro_batch=args.micro_batch, lr=args.lr, size=args.size, max_steps=args.max_steps,
        logdir=args.logdir, framework="horovod",
    )  # fmt: skip
    if not args.runs:
        return [base]
    configs = []
    for run in args.runs.split(","):
        strategy, _, reducer = run.strip().partition("-")
        if strategy not in ("dp", "mp", "hybrid") or not reducer:
            parser.error(f"--runs: {run!r} is not <dp|mp|hybrid>-<reducer>")
        configs.append(dataclasses.replace(base, strategy=strategy, reducer=reducer))
    return configs


def main() -> None:
    configs = parse_args()
    if any(c.reducer == "native" for c in configs) and configs[0].mp_size not in (None, 1):
        # hvd.allreduce over the mp / dp groups of a 2-D grid needs process sets added at run time.
        os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    hvd.init()
    hxh.register()
    results = []
    for config in configs:
        final = train(config, groups=hxh.horovod_groups(config.mp_size))
        results.append(final)
        if hvd.rank() == 0:
            print(
                f"{final['run']}: test accuracy {final['final/eval_accuracy'] * 100:.1f} %, "
                f"{final['final/samples_per_sec']:.1f} samples/s, logs in {config.logdir}/{final['run']}"
            )
    report_result(results, hvd.rank())  # for hybrid-ext's test harness; does nothing otherwise


if __name__ == "__main__":
    main()
