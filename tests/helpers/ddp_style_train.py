"""A compact training script written the way DDP image-classification pipelines are (torchvision's reference
``train.py`` shape): model, optimizer and LR scheduler built before the wrap, ``model_without_ddp``, an EMA of
it, gradient clipping with torch's function, a checkpoint saved on the first rank each epoch, resume, evaluate.

    torchrun --nproc_per_node 2 tests/helpers/ddp_style_train.py --wrap ddp|hybrid --out DIR \
        [--epochs E] [--resume CKPT]

``--wrap`` picks the one line that differs: ``DistributedDataParallel(model)`` or
``hybrid_ext.parallelize(model, strategy="hybrid", reducer="butterfly")``. Each rank reports its logged losses,
evaluation results and final weights (tests/launchers/test_ddp_style_script.py compares the two).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_reference import small_cnn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hybrid_ext.launch.results import report_result

BATCH = 4  # per rank
STEPS_PER_EPOCH = 3
CLIP = 0.2  # below the gradients' norm (~0.45 at the start): every step clips
EMA_DECAY = 0.8


def data(epoch: int, step: int, rank: int, world: int, train: bool = True):
    g = torch.Generator().manual_seed((1 if train else 2) * 10_000 + epoch * 100 + step)
    x = torch.randn(world * BATCH, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (world * BATCH,), generator=g)
    return x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]


def train_one_epoch(model, optimizer, epoch, rank, world, model_ema, losses):
    model.train()
    for step in range(STEPS_PER_EPOCH):
        image, target = data(epoch, step, rank, world)
        loss = F.cross_entropy(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        model_ema.update_parameters(model)
        losses.append(loss.item())


def evaluate(model, rank, world):
    model.eval()
    total, correct = 0.0, 0
    with torch.inference_mode():
        for step in range(2):
            image, target = data(0, step, rank, world, train=False)
            output = model(image)
            total += F.cross_entropy(output, target).item()
            correct += int((output.argmax(1) == target).sum())
    return total, correct


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrap", choices=["ddp", "hybrid"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", default="")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)

    model_without_ddp = model
    if args.wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        import hybrid_ext

        model = hybrid_ext.parallelize(model, strategy="hybrid", reducer="butterfly")
    model_without_ddp = model.module

    model_ema = AveragedModel(model_without_ddp, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)

    start_epoch = 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        model_ema.load_state_dict(checkpoint["model_ema"])
        start_epoch = checkpoint["epoch"] + 1

    losses: list[float] = []
    evaluations = []
    for epoch in range(start_epoch, args.epochs):
        train_one_epoch(model, optimizer, epoch, rank, world, model_ema, losses)
        lr_scheduler.step()
        evaluations.append((evaluate(model, rank, world), evaluate(model_ema, rank, world)))
        checkpoint = {
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "model_ema": model_ema.state_dict(),
            "epoch": epoch,
        }
        if rank == 0:  # save_on_master
            torch.save(checkpoint, os.path.join(args.out, f"model_{epoch}.pth"))

    result = {
        "losses": losses,
        "evaluations": evaluations,
        "model": {k: v.clone() for k, v in model_without_ddp.state_dict().items()},
        "ema": {k: v.clone() for k, v in model_ema.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    dist.barrier()
    report_result(result, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
