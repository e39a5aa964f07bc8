"""Hybrid parallelism: data-parallel conv layers, model-parallel FC layers (see :mod:`hybrid_ext.parallel.api`).

DCP checkpoints: :mod:`hybrid_ext.parallel.dcp` (``save`` / ``load``).
"""

from hybrid_ext.parallel.api import ParallelModel, parallelize
from hybrid_ext.parallel.checkpoint import (
    full_grads,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from hybrid_ext.parallel.dims import Groups, ParallelDims, torch_groups
from hybrid_ext.parallel.plan import Plan, make_plan

__all__ = [
    "Groups",
    "ParallelDims",
    "ParallelModel",
    "Plan",
    "full_grads",
    "full_optimizer_state_dict",
    "full_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "make_plan",
    "parallelize",
    "torch_groups",
]
