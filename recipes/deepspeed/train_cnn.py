"""Train a CNN with hybrid-ext inside a DeepSpeed engine; logs by hybrid-ext's logging contract (TensorBoard, rank 0).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 recipes/deepspeed/train_cnn.py \
        --deepspeed_config recipes/deepspeed/hybrid-butterfly.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 recipes/deepspeed/train_cnn.py \
        --deepspeed_config recipes/deepspeed/dp-native.json --data ~/cifar10
    hybrid-ext compare runs/

The ds_config's ``"hybrid_ext"`` section picks the reducer and the strategy (``--strategy``, ``--reducer``,
``--mp-size`` override it); everything else in it is DeepSpeed's own (ZeRO stage, optimizer, fp16/bf16...), but
for the learning rate: the recipe's (``--lr``, default the model's) replaces the optimizer's, so that all three
recipes train with the same defaults — the digits CNN, 5 epochs, Adam at 1e-3 (``--model alexnet`` for
torchvision's AlexNet, at its own size and learning rate).
The training loop is hybrid-ext's (hybrid_ext.train.loop), shared with the torchrun and Horovod recipes; this
script only starts DeepSpeed and builds the engine that takes each step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from hybrid_ext.integrations import deepspeed as hx_deepspeed
from hybrid_ext.integrations.deepspeed.config import STRATEGIES, HybridSection, split_config
from hybrid_ext.integrations.deepspeed.engine import zero_stage_of
from hybrid_ext.launch import report_result
from hybrid_ext.parallel.api import GRAD_ALGORITHMS
from hybrid_ext.train.device import add_device_argument, cuda_facts, resolve_device
from hybrid_ext.train.loop import TrainConfig, train
from hybrid_ext.train.recipe_cli import summary_line


def parse_args() -> tuple[TrainConfig, dict, HybridSection]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--deepspeed_config", required=True, help="ds_config JSON (with a hybrid_ext section)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None, help="overrides hybrid_ext.strategy")
    parser.add_argument("--reducer", choices=GRAD_ALGORITHMS, default=None, help="overrides hybrid_ext.reducer")
    parser.add_argument("--mp-size", type=int, default=None, help="overrides hybrid_ext.mp_size")
    parser.add_argument("--model", default=defaults.model, help="digits_alexnet (default), alexnet, vgg11")
    parser.add_argument("--data", default=None, help="ImageFolder / CIFAR-10 folder (default: embedded digits)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--micro-batch", type=int, default=None, help="default: train_micro_batch_size_per_gpu")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the model's); replaces the config optimizer's"
    )
    parser.add_argument("--size", type=int, default=None, help="image side after resizing (default: the model's)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_device_argument(parser)
    args = parser.parse_args()
    # DeepSpeed picks its accelerator by itself: it must be the one the ranks train on.
    on_cuda = resolve_device(args.device, *cuda_facts(), 0).type == "cuda"
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        parser.error(f"--device {args.device} trains on CUDA, but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}")

    ds_config, section = split_config(args.deepspeed_config)
    section = section or HybridSection()
    overrides = {k: v for k, v in (("strategy", args.strategy), ("reducer", args.reducer)) if v is not None}
    if args.mp_size is not None:
        overrides["mp_size"] = args.mp_size
    section = HybridSection.from_dict({**vars(section), **overrides})
    micro_batch = args.micro_batch or ds_config.get("train_micro_batch_size_per_gpu", defaults.micro_batch)
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch
    ds_config.pop("train_batch_size", None)  # follows from the micro-batch and the data-parallel size
    config = TrainConfig(
        strategy=section.strategy, reducer=section.reducer, mp_size=section.mp_size, model=args.model,
        data=args.data, epochs=args.epochs, micro_batch=micro_batch, lr=args.lr, size=args.size,
        max_steps=args.max_steps, logdir=args.logdir, framework="deepspeed", device=args.device,
    )  # fmt: skip
    if "optimizer" in ds_config:  # the same learning rate as the torchrun and Horovod recipes
        ds_config["optimizer"].setdefault("params", {})["lr"] = config.lr
    return config, ds_config, section


def deepspeed_prepare(ds_config: dict):
    """The loop's ``prepare``: shard for DeepSpeed, build the engine; a step is forward, backward, step."""

    def prepare(net: torch.nn.Module, config: TrainConfig, groups=None):
        model, _ = hx_deepspeed.parallelize_for_deepspeed(
            net, config.strategy, config.reducer, config.mp_size, zero_stage_of(ds_config), groups=groups
        )
        # No optimizer in the ds_config: Adam, as the other recipes (DeepSpeed calls this with the parameters).
        optimizer = None if "optimizer" in ds_config else (lambda params: torch.optim.Adam(params, lr=config.lr))
        if optimizer is not None:
            ds_config.setdefault("zero_allow_untested_optimizer", True)
        engine, *_ = hx_deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = engine(x)
            loss = F.cross_entropy(out, y)
            engine.backward(loss)
            engine.step()
            return out, loss

        return model, step

    return prepare


def main() -> None:
    config, ds_config, section = parse_args()
    hx_deepspeed.init_distributed(reducer=section.reducer)
    import torch.distributed as dist

    try:
        final = train(config, prepare=deepspeed_prepare(ds_config))
        report_result(final)  # for hybrid-ext's test harness; does nothing otherwise
        if dist.get_rank() == 0:
            print(summary_line(final, config))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
