"""The 2-D rank grid of hybrid parallelism and the communicators of its rows and columns.

World size W = dp × mp. Ranks are laid out model-parallel-major: the model-parallel group of rank r is the
``mp`` consecutive ranks ``[r // mp · mp, r // mp · mp + mp)`` (consecutive ranks usually share a node, and the
model-parallel group carries per-layer activations), and its data-parallel group is every ``mp``-th rank with
the same position ``r % mp`` (the replicas of the same FC shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hybrid_ext.comm import Communicator


@dataclass(frozen=True)
class ParallelDims:
    """World size and model-parallel size; ``dp`` follows. Validated on creation."""

    world: int
    """Number of ranks taking part."""
    mp: int
    """Ranks that share (shard) one copy of the FC layers; must divide ``world``."""

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        if self.mp < 1 or self.world % self.mp:
            divisors = [d for d in range(1, self.world + 1) if self.world % d == 0]
            raise ValueError(
                f"mp_size={self.mp} does not divide the world size {self.world}: the FC layers are sharded over "
                f"groups of mp_size ranks and replicated across world/mp_size groups. Choose one of {divisors}."
            )

    @property
    def dp(self) -> int:
        """Number of replicas of each FC shard."""
        return self.world // self.mp

    def mp_group_of(self, rank: int) -> list[int]:
        first = (rank // self.mp) * self.mp
        return list(range(first, first + self.mp))

    def dp_group_of(self, rank: int) -> list[int]:
        return list(range(rank % self.mp, self.world, self.mp))

    def mp_groups(self) -> list[list[int]]:
        return [self.mp_group_of(g * self.mp) for g in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [self.dp_group_of(i) for i in range(self.mp)]


@dataclass
class Groups:
    """The communicators one rank needs: everyone, its model-parallel group, its data-parallel group."""

    dims: ParallelDims
    rank: int
    world: Communicator
    mp: Communicator
    dp: Communicator
    handles: dict[str, Any] = field(default_factory=dict)  # host-framework group objects, kept alive
    native: Callable[[str], Callable] | None = None
    """``native(kind)`` for kind ``world`` / ``mp`` / ``dp``: the host framework's own allreduce over that group,
    as ``reduce(tensors, op) -> Handle`` (reducer="native"); None: torch.distributed's, over ``handles[kind]``."""


def torch_groups(dims: ParallelDims, device=None, own_mp: bool = True) -> Groups:
    """Create the groups with torch.distributed (every rank calls this, in the same order). ``own_mp``: give a
    model-parallel group of every rank its own group (False, for a plan that splits nothing: the world's)."""
    import torch
    import torch.distributed as dist

    from hybrid_ext.comm import communicator

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    if dist.get_world_size() != dims.world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the grid {dims.world}")
    device = device or torch.device("cpu")
    rank = dist.get_rank()
    mine: dict[str, Any] = {"world": dist.group.WORLD}
    # new_group is collective over the whole world: every rank creates every group, in the same order. A
    # model-parallel group of every rank is a group of its own all the same: its communicator runs the layers'
    # exchanges in its own issue order, which must not queue behind the world's gradient buckets in flight (a
    # convolution split under hybrid exchanges during backward, while they are).
    for kind, layout in (("mp", dims.mp_groups()), ("dp", dims.dp_groups())):
        for ranks in layout:
            own = len(ranks) < dims.world or (kind == "mp" and len(ranks) > 1 and own_mp)
            group = dist.new_group(ranks) if own else dist.group.WORLD
            if rank in ranks:
                mine[kind] = group
    return Groups(
        dims=dims,
        rank=rank,
        world=communicator(mine["world"], device),
        mp=communicator(mine["mp"], device),
        dp=communicator(mine["dp"], device),
        handles=mine,
    )
