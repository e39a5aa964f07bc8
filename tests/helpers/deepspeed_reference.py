"""The DeepSpeed tests' model, batches, single-process reference and ds_configs (shared by the test module and
the script its launcher jobs run, tests/helpers/deepspeed_worker.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MICRO_BATCH = 4
STEPS = 3
LR = 0.1
TOL = {"rtol": 1e-5, "atol": 1e-6}
ZERO_STAGES = (0, 1, 2)
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"


def small_cnn() -> nn.Module:
    """Conv features and a 3-layer FC head (column, row, column_last under hybrid)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4, 30),  # 30 features: uneven shards at mp 4
        nn.ReLU(),
        nn.Linear(30, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``; rank r's micro-batch is rows [r·MICRO_BATCH, (r+1)·MICRO_BATCH)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * MICRO_BATCH, 3, 8, 8, generator=g), torch.randint(
        0, 10, (world * MICRO_BATCH,), generator=g
    )


def reference(world: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The unmodified model trained in one process on the global batches (SGD with momentum)."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(steps):
        x, y = batch(step, world)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(stage: int, **section) -> dict:
    """ZeRO-1 and -2 reduce inside their per-parameter gradient hooks here (small buckets; ZeRO-1 with
    overlap_comm), during backward: the case where hybrid-ext's own pre-reduction must already be done."""
    zero = {"stage": stage} if stage == 0 else {"stage": stage, "reduce_bucket_size": 200, "overlap_comm": True}
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ZeRO with a client optimizer
        "steps_per_print": 10_000,
    }
    if section:
        config["hybrid_ext"] = section
    return config


# ------------------------------------------------------------------ DeepSpeed's own data path under hybrid

DATA_STEPS = 3
DATA_GAS = 2  # gradient_accumulation_steps
DATA_CLIP = 0.5
DATA_SAMPLES = 100  # not a multiple of the ranks: DistributedSampler pads


def data_path_dataset() -> torch.utils.data.TensorDataset:
    """Samples with their index, so that every rank can report which ones it trained on."""
    g = torch.Generator().manual_seed(77)
    x = torch.randn(DATA_SAMPLES, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (DATA_SAMPLES,), generator=g)
    return torch.utils.data.TensorDataset(x, y, torch.arange(DATA_SAMPLES))


def data_path_config(stage: int, world: int, **section) -> dict:
    """An unchanged DeepSpeed config in DeepSpeed's own terms: train_batch_size = micro × accumulation × GPUs,
    gradient clipping and an LR scheduler on (plus, to switch to hybrid, the section)."""
    config = ds_config(stage, **section)
    config.update(
        train_batch_size=MICRO_BATCH * DATA_GAS * world,
        gradient_accumulation_steps=DATA_GAS,
        gradient_clipping=DATA_CLIP,
        scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 2}},
    )
    return config


def data_path_indices(world: int) -> list[list[int]]:
    """Each rank's sample order under DeepSpeed's loader over all ``world`` ranks: torch's DistributedSampler
    (shuffled with seed 0, epoch 0, padded by repeating the first indices, every world-th index from the rank)."""
    order = torch.randperm(DATA_SAMPLES, generator=torch.Generator().manual_seed(0)).tolist()
    total = -(-DATA_SAMPLES // world) * world
    order += order[: total - DATA_SAMPLES]
    return [order[rank:total:world] for rank in range(world)]


def data_path_reference(world: int) -> dict[str, torch.Tensor]:
    """One process on the global batch of each step — every rank's micro-batches of that step — with DeepSpeed's
    own clipping rule (total norm) and its own WarmupLR, stepped where the engine steps it."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    x_all, y_all, _ = data_path_dataset().tensors
    per_rank = data_path_indices(world)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=LR, warmup_num_steps=2)
    span = MICRO_BATCH * DATA_GAS
    for step in range(DATA_STEPS):
        chosen = [i for rank in range(world) for i in per_rank[rank][step * span : (step + 1) * span]]
        optimizer.zero_grad()
        F.cross_entropy(model(x_all[chosen]), y_all[chosen]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), DATA_CLIP)
        optimizer.step()
        scheduler.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
