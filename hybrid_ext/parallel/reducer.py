"""Gradient reduction during backward: bucketed, launched as buckets fill, overlapped with the rest of backward.

Parameters are grouped by how their gradients combine:

- replicated (data-parallel) parameters: averaged over the ranks that replicate them;
- FC shards (hybrid): a shard's gradient already holds every model-parallel rank's loss (the gathered batch
  flowed through it), so it is *summed* over the replicas of that shard and divided by the world size —
  not averaged over the group. The single-process reference on the global batch decides (the exactness
  tests in ``tests/test_parallel.py``).

Within a group, parameters are bucketed in reverse registration order (roughly the order backward produces
their gradients, as DDP does); a bucket is reduced with one collective as soon as its last gradient is
accumulated, on the communicator's thread, while autograd goes on. At the end of backward a callback reduces
any bucket that is still waiting (parameters without a gradient this step count as zeros, so every rank
issues the same collectives) and waits for all of them, so ``optimizer.step()`` needs no extra call.

Two variants serve host frameworks that reduce over the data-parallel group themselves (DeepSpeed):

- a group without a communicator (``comm=None``) only scales each incoming gradient by ``scale`` (a tensor hook,
  so it runs before the gradient is accumulated into ``.grad`` and is linear under gradient accumulation);
- ``blocking=True`` reduces each parameter's incoming gradient on its own, synchronously, in a tensor hook:
  tensor hooks run before ``AccumulateGrad``, hence before *any* post-accumulate-grad hook on that parameter —
  where DeepSpeed's ZeRO-2 (and ZeRO-1 with ``overlap_comm``) read the gradient and bucket it for their own
  reduction. The price is one collective per parameter, without overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid_ext.comm import Communicator, Handle, allreduce_coalesced_async


@dataclass
class ReduceGroup:
    """Parameters whose gradients combine the same way."""

    name: str
    params: list[nn.Parameter]
    comm: Communicator | None  # None: nothing to communicate, only ``scale`` each incoming gradient
    op: str  # "avg" or "sum"
    scale: float = 1.0  # applied after the reduction
    algorithm: str = "butterfly"
    native: Callable[[list[torch.Tensor], str], Handle] | None = None  # the host framework's own allreduce


@dataclass
class _Bucket:
    group: ReduceGroup
    params: list[nn.Parameter]
    ready: int = 0
    handle: Handle | None = None
    grads: list[torch.Tensor] = field(default_factory=list)


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current backward pass finishes (what DDP uses; private torch API)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class GradientReducer:
    """Reduces the gradients of ``groups`` during backward (bucketed and overlapped, or ``blocking``: see above)."""

    def __init__(self, groups: list[ReduceGroup], bucket_bytes: int = 25 << 20, blocking: bool = False) -> None:
        self.groups = [g for g in groups if g.params]
        self.blocking = blocking
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._armed = False
        self.enabled = True
        self.launched_during_backward = 0  # buckets started before backward ended (overlap), for inspection
        self._hooks = []
        for group in self.groups:
            if (group.comm is None or group.comm.size == 1) and group.scale == 1.0:
                continue  # nothing to combine
            if group.comm is None or blocking:
                self._hooks += [p.register_hook(functools.partial(self._on_incoming_grad, group)) for p in group.params]
                continue
            current: list[nn.Parameter] = []
            size = 0
            for param in reversed(group.params):
                current.append(param)
                size += param.numel() * param.element_size()
                if size >= bucket_bytes:
                    self._add_bucket(group, current)
                    current, size = [], 0
            if current:
                self._add_bucket(group, current)
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]

    def _add_bucket(self, group: ReduceGroup, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(group, list(params))
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def _on_incoming_grad(self, group: ReduceGroup, grad: torch.Tensor) -> torch.Tensor | None:
        """Tensor hook: scale (and, if ``blocking``, reduce) one parameter's gradient before it is accumulated."""
        if not self.enabled:
            return None
        if group.comm is None:
            return grad * group.scale
        grad = grad.detach().clone(memory_format=torch.contiguous_format)  # a hook must not change its input
        if group.native is not None:
            group.native([grad], group.op).wait()
        else:
            allreduce_coalesced_async([grad], group.op, group.algorithm, group.comm).wait()
        if group.scale != 1.0:
            grad.mul_(group.scale)
        return grad

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        if not self._armed:
            self._armed = True
            queue_end_of_backward(self.finish)
        bucket = self._bucket_of[id(param)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)
            self.launched_during_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        for p in bucket.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket.grads = [p.grad for p in bucket.params]
        group = bucket.group
        if group.native is not None:
            bucket.handle = group.native(bucket.grads, group.op)
        else:
            bucket.handle = allreduce_coalesced_async(bucket.grads, group.op, group.algorithm, group.comm)

    def finish(self) -> None:
        """Reduce what is left, wait for every bucket, scale. Runs at the end of backward (or call it yourself)."""
        self._armed = False
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            if bucket.group.scale != 1.0:
                for grad in bucket.grads:
                    grad.mul_(bucket.group.scale)
            bucket.handle, bucket.ready, bucket.grads = None, 0, []

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
