"""DeepSpeed's batch settings and data loader under hybrid: one global batch over *all* ranks, as in plain DeepSpeed.

Under hybrid the conv layers are data-parallel over every rank, so every rank must get its own samples — as an
unchanged DeepSpeed script gives them without hybrid-ext. DeepSpeed, though, reads both its batch arithmetic and
its loader's sharding from the ``mpu`` (``DeepSpeedConfig`` takes ``world_size`` from
``mpu.get_data_parallel_world_size()``, and ``engine.deepspeed_io`` builds a ``DistributedSampler`` over
``mpu.get_data_parallel_rank()`` / ``world_size``). The grid's data-parallel group is the world / mp_size
replicas of one FC shard — right for DeepSpeed's gradient averaging, wrong for samples: the ranks of one
model-parallel group would get identical samples, and ``train_batch_size = micro × accumulation × GPUs`` would
fail DeepSpeed's check (it counts world / mp_size GPUs).

So, under hybrid only (under mp every rank of a group must pass the same batch, which DeepSpeed's sharding over
the data-parallel group gives):

- :func:`batch_settings_for_hybrid` resolves ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` /
  ``gradient_accumulation_steps`` with DeepSpeed's own rules over *all* ranks, then hands DeepSpeed the same
  micro-batch and accumulation with the train_batch_size its world / mp_size count expects (so DeepSpeed's own
  ``engine.train_batch_size()`` reports the samples per step of one model-parallel rank's replicas);
- :func:`sample_loader` builds the training loader with DeepSpeed's own ``engine.deepspeed_io`` (its batch
  size, collate_fn, drop_last, pinning), handing it a ``DistributedSampler`` over all ranks — what plain
  DeepSpeed builds when there is no mpu.
"""

from __future__ import annotations

import copy
from typing import Any

MICRO, ACCUMULATION, TRAIN = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"


def resolve_batch(ds_config: dict, world: int) -> tuple[int, int, int]:
    """(train_batch_size, micro-batch, accumulation steps) by DeepSpeed's rules (``DeepSpeedConfig.
    _set_batch_related_parameters``) for ``world`` ranks; a clear error where they do not fit."""
    train, micro, accumulation = (ds_config.get(k) for k in (TRAIN, MICRO, ACCUMULATION))
    for key, value in ((TRAIN, train), (MICRO, micro), (ACCUMULATION, accumulation)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f'"{key}" must be a positive integer; got {value!r}')
    if train is not None and micro is not None and accumulation is not None:
        pass
    elif train is not None and micro is not None:
        accumulation = train // micro // world
    elif train is not None and accumulation is not None:
        micro = train // world // accumulation
    elif micro is not None:
        accumulation = accumulation or 1
        train = micro * accumulation * world
    elif train is not None:
        accumulation, micro = 1, train // world
    else:
        raise ValueError(f'the ds_config needs "{TRAIN}" or "{MICRO}"')
    if not micro or not accumulation or train != micro * accumulation * world:
        raise ValueError(
            f'"{TRAIN}" ({train}) must equal "{MICRO}" ({micro}) × "{ACCUMULATION}" ({accumulation}) × the '
            f"{world} ranks: under hybrid every rank trains on its own samples, as in plain DeepSpeed"
        )
    return train, micro, accumulation


def batch_settings_for_hybrid(ds_config: dict, world: int, dp: int) -> dict:
    """A copy of ``ds_config`` whose batch settings mean, to DeepSpeed's dp-sized count, what they meant over
    all ``world`` ranks (see the module docstring)."""
    _, micro, accumulation = resolve_batch(ds_config, world)
    out = copy.deepcopy(ds_config)
    out.update({MICRO: micro, ACCUMULATION: accumulation, TRAIN: micro * accumulation * dp})
    return out


def sample_loader(engine: Any, dataset: Any, world: int, rank: int) -> Any:
    """DeepSpeed's own training loader for ``dataset``, sharded over all ``world`` ranks (each its own samples)."""
    from torch.utils.data.distributed import DistributedSampler

    if engine.curriculum_learning_enabled():
        raise ValueError(
            "DeepSpeed's curriculum-learning loader shards over the mpu's data-parallel group, which "
            "under hybrid is not every rank: build the loader yourself (one shard per rank)"
        )
    return engine.deepspeed_io(dataset, data_sampler=DistributedSampler(dataset, num_replicas=world, rank=rank))
