"""Train a CNN with hybrid-ext under torchrun; logs by hybrid-ext's logging contract (TensorBoard on rank 0).

    torchrun --nproc_per_node 4 recipes/torch/train_cnn.py --strategy hybrid --reducer butterfly
    torchrun --nproc_per_node 4 recipes/torch/train_cnn.py --strategy dp --reducer native --data ~/cifar10
    torchrun --nproc_per_node 2 recipes/torch/train_cnn.py --device cuda   # one GPU per rank: NCCL
    hybrid-ext compare runs/

The training loop is hybrid-ext's (hybrid_ext.train.loop), shared with `hybrid-ext demo` and the Horovod and
DeepSpeed recipes; this script only starts torch.distributed and reads its arguments.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from hybrid_ext.launch import report_result
from hybrid_ext.train.device import local_rank_and_size, this_job_backend
from hybrid_ext.train.loop import TrainConfig, train
from hybrid_ext.train.recipe_cli import add_train_arguments, summary_line, train_config


def parse_args() -> tuple[TrainConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    parser.add_argument(
        "--backend",
        default=None,
        help="torch.distributed backend (gloo, nccl, butterfly; default: gloo, with NCCL for CUDA tensors where each "
        "rank has a GPU of its own)",
    )
    args = parser.parse_args()
    config = train_config(args, framework="torchrun")
    return config, args.backend or this_job_backend(config.device, local_rank_and_size()[1])


def main() -> None:
    config, backend = parse_args()
    dist.init_process_group(backend)
    try:
        final = train(config)
        report_result(final)  # for hybrid-ext's test harness; does nothing otherwise
        if dist.get_rank() == 0:
            print(summary_line(final, config))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
