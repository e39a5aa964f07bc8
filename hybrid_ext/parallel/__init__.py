"""Hybrid parallelism: data-parallel conv layers, model-parallel FC layers (see :mod:`hybrid_ext.parallel.api`).

DCP checkpoints: :mod:`hybrid_ext.parallel.dcp` (``save`` / ``load``).
"""

from hybrid_ext.parallel.api import ParallelModel, parallelize
from hybrid_ext.parallel.auto_plan import make_plan
from hybrid_ext.parallel.checkpoint import (
    full_grads,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from hybrid_ext.parallel.clip_grad import clip_grad_norm_
from hybrid_ext.parallel.dims import Groups, ParallelDims, torch_groups
from hybrid_ext.parallel.plan import PartitionPlan
from hybrid_ext.parallel.replicas import ReplicaDivergenceError
from hybrid_ext.parallel.shards import sharded_state_dicts

__all__ = [
    "Groups",
    "ParallelDims",
    "ParallelModel",
    "PartitionPlan",
    "ReplicaDivergenceError",
    "clip_grad_norm_",
    "full_grads",
    "full_optimizer_state_dict",
    "full_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "make_plan",
    "parallelize",
    "sharded_state_dicts",
    "torch_groups",
]
