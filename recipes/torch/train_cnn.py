"""Train a CNN with hybrid-ext under torchrun; logs by hybrid-ext's logging contract (TensorBoard on rank 0).

    torchrun --nproc_per_node 4 recipes/torch/train_cnn.py --strategy hybrid --reducer butterfly
    torchrun --nproc_per_node 4 recipes/torch/train_cnn.py --strategy dp --reducer native --data ~/cifar10
    hybrid-ext compare runs/

The training loop is hybrid-ext's (hybrid_ext.train.loop), shared with `hybrid-ext demo` and the Horovod and
DeepSpeed recipes; this script only starts torch.distributed and reads its arguments.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from hybrid_ext.launch import report_result
from hybrid_ext.train.loop import TrainConfig, train


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--strategy", choices=["dp", "mp", "hybrid"], default=defaults.strategy)
    parser.add_argument(
        "--reducer",
        choices=["butterfly", "rabenseifner", "recursive_doubling", "ring", "native"],
        default=defaults.reducer,
    )
    parser.add_argument("--mp-size", type=int, default=None)
    parser.add_argument("--model", default=defaults.model, help="digits_alexnet, alexnet, vgg11")
    parser.add_argument("--data", default=None, help="ImageFolder / CIFAR-10 folder (default: embedded digits)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--size", type=int, default=defaults.size, help="image side after resizing")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo, nccl, butterfly)")
    args = parser.parse_args()
    config = TrainConfig(
        strategy=args.strategy, reducer=args.reducer, mp_size=args.mp_size, model=args.model, data=args.data,
        epochs=args.epochs, micro_batch=args.micro_batch, lr=args.lr, size=args.size, max_steps=args.max_steps,
        logdir=args.logdir, framework="torchrun",
    )  # fmt: skip
    return config, args.backend


def main() -> None:
    config, backend = parse_args()
    dist.init_process_group(backend)
    try:
        final = train(config)
        report_result(final)  # for hybrid-ext's test harness; does nothing otherwise
        if dist.get_rank() == 0:
            print(
                f"{final['run']}: test accuracy {final['final/eval_accuracy'] * 100:.1f} %, "
                f"{final['final/samples_per_sec']:.1f} samples/s, logs in {config.logdir}/{final['run']}"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
