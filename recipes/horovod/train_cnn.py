"""Train a CNN with hybrid-ext under horovodrun; logs by hybrid-ext's logging contract (TensorBoard on rank 0).

    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --strategy hybrid --reducer butterfly
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --strategy dp --reducer native
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --model alexnet --data ~/cifar10
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/train_cnn.py --runs dp-native,hybrid-butterfly
    horovodrun -np 2 -H localhost:2 python recipes/horovod/train_cnn.py --device cuda   # a GPU per rank
    hybrid-ext compare runs/

The same defaults as the torchrun and DeepSpeed recipes: the FC-heavy digits CNN on the digits that ship with
scikit-learn (32×32), 5 epochs, Adam at 1e-3; ``--model alexnet`` / ``vgg11`` for torchvision's (at their own
size and learning rate), ``--data`` for an ImageFolder / CIFAR-10 folder. Conv layers data-parallel, FC layers
model-parallel (``--strategy hybrid``) — the gradients of the replicated layers reduced by the butterfly over a
side channel (``--reducer butterfly``) or by ``hvd.allreduce`` (``--reducer native``). The training loop is
hybrid-ext's (hybrid_ext.train.loop), shared with `hybrid-ext demo` and the torchrun and DeepSpeed recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import horovod.torch as hvd

import hybrid_ext.integrations.horovod as hxh
from hybrid_ext.launch import report_result
from hybrid_ext.parallel.plan import STRATEGIES
from hybrid_ext.train.loop import TrainConfig, train
from hybrid_ext.train.recipe_cli import add_train_arguments, summary_line, train_config


def parse_args() -> list[TrainConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    parser.add_argument(
        "--runs", default=None, help="several runs in one job, e.g. dp-native,hybrid-butterfly (strategy-reducer)"
    )
    args = parser.parse_args()
    base = train_config(args, framework="horovod")
    if not args.runs:
        return [base]
    configs = []
    for run in args.runs.split(","):
        strategy, _, reducer = run.strip().partition("-")
        if strategy not in STRATEGIES or not reducer:
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
            print(summary_line(final, config))
    report_result(results, hvd.rank())  # for hybrid-ext's test harness; does nothing otherwise


if __name__ == "__main__":
    main()
