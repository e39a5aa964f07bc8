"""A DDP communication hook that averages gradient buckets with the butterfly allreduce.

For users who keep their gloo / NCCL process group and change only the gradient reduction.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext import comm


@dataclass
class ButterflyHookState:
    """State for :func:`butterfly_hook`.

    group: the process group to reduce over (None: DDP's default group).
    algorithm: ``"auto"``, ``"butterfly"``, ``"rabenseifner"``, ``"recursive_doubling"`` or ``"ring"``.
    """

    group: Any = None
    algorithm: str = "auto"


# Real (not postponed) annotations: DDP checks them with inspect.signature.
def butterfly_hook(state: ButterflyHookState | Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket over the group with the butterfly allreduce.

    Like DDP's default ``allreduce_hook`` (sum, then divide by the group size), but the bucket travels through
    hybrid-ext's schedules instead of the backend's own allreduce. The reduction runs on hybrid-ext's
    communication thread, so it overlaps the rest of the backward pass as DDP's own does.

    Args:
        state (ButterflyHookState, process group or None): the group and algorithm; a process group or None
            stands for ``ButterflyHookState(group=state)``.
        bucket (dist.GradBucket): the bucket DDP hands the hook.

    Returns:
        torch.futures.Future[torch.Tensor]: completed with the bucket's buffer, averaged in place.

    Example::

        >>> from hybrid_ext.integrations.torch import butterfly_hook, ButterflyHookState
        >>> ddp_model.register_comm_hook(ButterflyHookState(algorithm="auto"), butterfly_hook)
    """
    if not isinstance(state, ButterflyHookState):
        state = ButterflyHookState(group=state)
    tensor = bucket.buffer()
    handle = comm.allreduce_async(tensor, op="avg", algorithm=state.algorithm, group=state.group)
    return handle.as_torch_future(tensor)
