"""DeepSpeed's ``mpu`` ("model parallel unit") for hybrid-ext's rank grid.

DeepSpeed asks an ``mpu`` for two groups and uses them as Megatron-LM's: it averages every gradient over the
data-parallel group and partitions ZeRO-1/2 state over it, and it sums gradient norms (and overflow flags)
over the model-parallel group, counting a parameter on every model-parallel rank if it is marked
``model_parallel`` (``deepspeed.runtime.utils.is_model_parallel_parameter``), else on model-parallel rank 0
only. The grid's groups are exactly those (:mod:`hybrid_ext.parallel.dims`): the model-parallel group is ``mp``
consecutive ranks, the data-parallel group the ranks holding the same FC shard.

DeepSpeed 0.19 calls ``get_{model,data}_parallel_{rank,group,world_size}`` and ``get_data_parallel_group_ranks``,
and prefers ``get_tensor_model_parallel_*`` where present (``deepspeed.utils.bwc``); there is no pipeline or
sequence parallelism here, so those methods are absent on purpose (DeepSpeed then assumes one stage).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hybrid_ext.parallel.dims import Groups


class GridMPU:
    """The ``mpu=`` argument of ``deepspeed.initialize`` for a :class:`~hybrid_ext.parallel.dims.Groups` grid."""

    def __init__(self, groups: Groups) -> None:
        if "mp" not in groups.handles or "dp" not in groups.handles:
            raise ValueError("the groups carry no torch.distributed groups (build them with torch_groups)")
        self.groups = groups

    # ------------------------------------------------------------------ model-parallel group
    def get_model_parallel_rank(self) -> int:
        return self.groups.rank % self.groups.dims.mp

    def get_model_parallel_world_size(self) -> int:
        return self.groups.dims.mp

    def get_model_parallel_group(self) -> Any:
        return self.groups.handles["mp"]

    # Megatron-core's names for the same group, which DeepSpeed prefers when they exist.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    # ------------------------------------------------------------------ data-parallel group
    def get_data_parallel_rank(self) -> int:
        return self.groups.rank // self.groups.dims.mp

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dims.dp

    def get_data_parallel_group(self) -> Any:
        return self.groups.handles["dp"]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.groups.dims.dp_group_of(self.groups.rank)

    def __repr__(self) -> str:
        dims = self.groups.dims
        return f"GridMPU(rank={self.groups.rank}, world={dims.world}, mp={dims.mp}, dp={dims.dp})"


def mark_model_parallel(model: nn.Module, mp_size: int) -> int:
    """Mark sharded parameters ``model_parallel`` (DeepSpeed's gradient norm sums them over the model-parallel
    group; replicated ones it counts once). Returns how many were marked."""
    marked = 0
    for param in model.parameters():
        if mp_size > 1 and hasattr(param, "shard_dim"):
            param.model_parallel = True  # type: ignore[attr-defined]
            marked += 1
    return marked
