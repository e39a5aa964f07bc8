"""DeepSpeed's data-parallel gradient reduction on the butterfly, with its copies overlapping the wire.

DeepSpeed (ZeRO-0, and the bf16 optimizer's fallback) reduces a bucket of gradients in
``DeepSpeedEngine.allreduce_and_copy``: it flattens the whole bucket into one new tensor, scales it, runs one
blocking ``all_reduce``, scales again and copies every gradient back. Those passes over the bucket's memory run
before the first byte leaves and after the last arrives, so their time adds to the wire's instead of hiding
behind it.

On a group that runs the ``butterfly`` backend, :func:`install` puts :func:`allreduce_and_copy` in that method's
place: one hybrid-ext allreduce of the bucket's tensors as they are, with DeepSpeed's factors
(:func:`scaling`) applied inside it. Where the allreduce runs in segments (across hosts), each segment is
gathered from the gradients, scaled, reduced, scaled and copied back on its own, while other segments are on
the wire (:mod:`hybrid_ext.comm.pipelined`); elsewhere the work is DeepSpeed's, done once for the whole bucket.
The arithmetic is DeepSpeed's — the same factors applied in the same order to each element of the working
buffer — so results differ from DeepSpeed's own path only by the order in which the allreduce sums (as between
any two allreduce algorithms). Anything else runs DeepSpeed's own method: another backend, sparse or mixed
tensors, a ``communication_data_type`` that differs from the gradients'.

``HYBRID_EXT_DEEPSPEED_REDUCTION=deepspeed`` keeps DeepSpeed's own method on every group (``hybrid-ext``, the
default, this one). The DeepSpeed method replaced is named in :data:`PATCHED`; a test pins that DeepSpeed still
defines and calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hybrid_ext import config

REDUCTION_ENV = "HYBRID_EXT_DEEPSPEED_REDUCTION"
# (class, method) this module replaces; tests pin that DeepSpeed still defines and calls it.
PATCHED = ("deepspeed.runtime.engine.DeepSpeedEngine", "allreduce_and_copy")


def reduction() -> str:
    """Who reduces the engine's gradient buckets on the butterfly: ``hybrid-ext`` (default) or ``deepspeed``."""
    return config.get(REDUCTION_ENV)


def scaling(engine: Any, dp_world_size: Any) -> tuple[float | None, float | None]:
    """DeepSpeed's factors around the allreduce, as ``allreduce_bucket`` applies them: (before, after)."""
    if not engine.gradient_average:
        return None, None
    if engine.postscale_gradients():
        predivide = engine.gradient_predivide_factor()
        before = 1.0 / predivide if predivide != 1.0 else None
        after = predivide / dp_world_size if predivide != dp_world_size else None
        return before, after
    return 1.0 / dp_world_size, None


def _butterfly_communicator(group: Any, device: torch.device) -> Any:
    """The communicator of ``group``'s ``butterfly`` backend, or None where the group runs another backend."""
    from hybrid_ext.comm.transports.contract import OwnsCommunicator
    from hybrid_ext.comm.transports.factory import resolve_group

    group = resolve_group(group)
    return group.butterfly_communicator(device) if isinstance(group, OwnsCommunicator) else None


def _supported(engine: Any, bucket: Sequence[torch.Tensor]) -> bool:
    if not bucket:
        return False
    from hybrid_ext.comm.executor import SUPPORTED_DTYPES

    first = bucket[0]
    return (
        first.dtype in SUPPORTED_DTYPES
        and first.dtype.is_floating_point
        and engine.communication_data_type == first.dtype
        and all(
            t.dtype == first.dtype and t.device == first.device and t.layout == torch.strided and t.is_contiguous()
            for t in bucket
        )
    )


def allreduce_and_copy(engine: Any, small_bucket: list, dp_group: Any, dp_world_size: Any = None) -> None:
    """``DeepSpeedEngine.allreduce_and_copy`` on the butterfly: one allreduce of the bucket's tensors as they are,
    DeepSpeed's scaling inside it (see the module docstring); anything else, DeepSpeed's own."""
    import torch.distributed as dist

    if reduction() == "deepspeed" or not _supported(engine, small_bucket):
        return _original(engine, small_bucket, dp_group, dp_world_size)
    comm = _butterfly_communicator(dp_group, small_bucket[0].device)
    if comm is None:
        return _original(engine, small_bucket, dp_group, dp_world_size)
    if dp_world_size is None:
        dp_world_size = dist.get_world_size(group=dp_group)
    from hybrid_ext.comm.cost_model import requested_algorithm

    before, after = scaling(engine, dp_world_size)
    bucket, algorithm = list(small_bucket), requested_algorithm()  # what the backend runs for DeepSpeed's own
    comm.allreduce(bucket, algorithm=algorithm, name="deepspeed.bucket", prescale=before, postscale=after)


_ORIGINAL: dict[str, Any] = {}


def _original(engine: Any, *args: Any) -> None:
    return _ORIGINAL["allreduce_and_copy"](engine, *args)


def install() -> None:
    """Put :func:`allreduce_and_copy` in DeepSpeed's place (once per process; other backends keep DeepSpeed's)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    current = DeepSpeedEngine.allreduce_and_copy
    if current is allreduce_and_copy:
        return
    _ORIGINAL["allreduce_and_copy"] = current
    DeepSpeedEngine.allreduce_and_copy = allreduce_and_copy
