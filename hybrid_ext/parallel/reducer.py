"""Gradient reduction during backward: bucketed, launched in a fixed order, overlapped with the rest of backward.

Parameters are grouped by how their gradients combine:

- replicated (data-parallel) parameters: averaged over the ranks that replicate them;
- FC shards (hybrid): a shard's gradient already holds every model-parallel rank's loss (the gathered batch
  flowed through it), so it is *summed* over the replicas of that shard and divided by the world size —
  not averaged over the group. The single-process reference on the global batch decides (the exactness
  tests in ``tests/multiprocess/test_parallel.py``).

What is reduced: each backward pass's *own contribution*, never the accumulated ``.grad``. A tensor hook (it
runs before ``AccumulateGrad``) copies the incoming gradient into the bucket's flat buffer; once the bucket is
reduced, the reduced and scaled contribution is added to ``.grad``. So with k backward passes before
``optimizer.step()``, ``.grad`` ends as Σ_k reduce(g_k) = reduce(Σ_k g_k): the update of the single-process step on
all k micro-batches (divide each micro-loss by k, as with DDP). Reducing the accumulated ``.grad`` instead is right
only for an average of values already equal on every rank (DDP's case); an FC shard's sum-then-scale would count
earlier passes again (g1/W² + g2/W). Where ``.grad`` is empty when the gradient arrives (after
``zero_grad()``, the usual case) the hook lets autograd store the gradient itself there and the reduced value
overwrites it in place: no new tensor is allocated and touched for ``.grad`` (a fresh one costs page faults on a
CPU). Otherwise it hands autograd a zero to accumulate and adds the reduced value.

``no_sync()`` (as DDP's): backward passes inside it communicate nothing; their contributions stay in the
buckets, and the first backward after it reduces everything accumulated since the last reduction. Until
then ``.grad`` does not show them, and ``optimizer.zero_grad()`` does not clear them: to drop them unreduced,
call :meth:`GradientReducer.discard_pending`.

Order (DDP's rule): buckets have fixed indices, the same on every rank (reverse registration order, roughly the
order backward produces gradients); a bucket is launched when all its gradients have arrived *and* every
bucket before it has been launched, so ranks issue the same collectives in the same order whatever order
their gradients arrive in. An end-of-backward callback launches what is left — a parameter that got no
gradient on this rank in this pass contributes zeros — and waits for every bucket, so ``optimizer.step()``
needs no extra call. Collectives run on the communicator's thread while autograd goes on. Each is named
(``name=``: ``<group>.bucket<i>``, ``<group>.param<i>`` when blocking), so check mode (``HYBRID_EXT_CHECK=1``)
names the bucket when ranks disagree on what they reduce.

A group without a communicator (``comm=None``: no other rank holds its parameters, as hybrid's FC shards at
mp_size = world, or a host framework reduces them) only scales each incoming gradient by ``scale``, with no
bucket, before it is accumulated into ``.grad`` (linear under accumulation); where ``.grad`` is empty, autograd
stores the gradient and a post-accumulate hook scales it in place. Inside ``no_sync()`` its contributions are held
as the buckets' are, so every ``.grad`` shows the same passes and ``discard_pending`` drops them all.

``blocking=True`` serves host frameworks that reduce over the data-parallel group themselves (DeepSpeed): it
reduces each parameter's incoming gradient on its own, synchronously, in a tensor hook. Tensor hooks run before
``AccumulateGrad``, hence before *any* post-accumulate-grad hook on that parameter — where DeepSpeed's ZeRO-2 (and
ZeRO-1 with ``overlap_comm``) read the gradient and bucket it for their own reduction. The price is one collective
per parameter, without overlap. It reduces what each pass adds, so it is exact under accumulation too;
``no_sync()`` stops neither it nor the scaling of ``comm=None`` groups (the host framework owns accumulation).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid_ext.comm import Communicator, Handle, allreduce_coalesced_async

# What ``parallelize(reducer=...)`` accepts: the gradient all-reduce algorithm ("auto" lets the communicator
# choose; "native" is the host framework's own allreduce).
GRAD_ALGORITHMS = ("butterfly", "auto", "rabenseifner", "recursive_doubling", "ring", "native")


@dataclass
class ReduceGroup:
    """Parameters whose gradients combine the same way."""

    name: str
    params: list[nn.Parameter]
    comm: Communicator | None  # None: nothing to communicate, only ``scale`` each incoming gradient (see above)
    op: str  # "avg" or "sum"
    scale: float = 1.0  # applied after the reduction
    algorithm: str = "butterfly"
    native: Callable[[list[torch.Tensor], str], Handle] | None = None  # the host framework's own allreduce


@dataclass
class _Bucket:
    """Parameters reduced together: one flat buffer (one dtype and device), one collective."""

    index: int
    group: ReduceGroup
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    flat: torch.Tensor | None = None  # contributions since the last reduction; allocated at first use
    filled: set[int] = field(default_factory=set)  # slots holding a contribution (else stale: copy, don't add)
    arrived: set[int] = field(default_factory=set)  # slots whose gradient arrived in this backward pass
    overwrite: set[int] = field(default_factory=set)  # slots whose ``.grad`` holds only this pass's own gradient
    handle: Handle | None = None

    @property
    def name(self) -> str:
        """What its collective is called (``name=``): check mode names a bucket the ranks disagree on."""
        return f"{self.group.name}.bucket{self.index}"

    def slot(self, index: int) -> torch.Tensor:
        param = self.params[index]
        if self.flat is None:
            self.flat = torch.empty(self.numel, dtype=param.dtype, device=param.device)
        return self.flat[self.offsets[index] : self.offsets[index] + param.numel()].view(param.shape)


@dataclass
class _Unshared:
    """A parameter of a ``comm=None`` group: scaled as its gradient arrives; ``held``: its ``no_sync()`` passes."""

    group: ReduceGroup
    held: torch.Tensor | None = None
    scale_in_place: bool = False  # this pass's gradient went into an empty ``.grad`` unscaled: scale it there


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current backward pass finishes (what DDP uses; private torch API)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class GradientReducer:
    """Reduces the gradients of ``groups`` during backward (bucketed and overlapped, or ``blocking``: see above)."""

    def __init__(
        self,
        groups: list[ReduceGroup],
        bucket_bytes: int = 25 << 20,
        blocking: bool = False,
        parameter_order: list[nn.Parameter] | None = None,
    ) -> None:
        """``parameter_order``: the model's registration order (default: the groups' parameters, in turn)."""
        self.groups = [g for g in groups if g.params]
        self.blocking = blocking
        self.buckets: list[_Bucket] = []
        self.sync_enabled = True  # False inside no_sync()
        self._armed = False
        self._next_launch = 0  # buckets [0, _next_launch) are launched in this pass
        self.launched_during_backward = 0  # buckets started before backward ended (overlap), for inspection
        self._hooks = []
        self._unshared: list[_Unshared] = []
        order = parameter_order if parameter_order is not None else [p for g in self.groups for p in g.params]
        position = {id(p): i for i, p in enumerate(order)}
        pending: list[tuple[ReduceGroup, list[nn.Parameter]]] = []
        for group in self.groups:
            trainable = [p for p in group.params if p.requires_grad]
            if (group.comm is None or group.comm.size == 1) and group.scale == 1.0:
                continue  # nothing to combine
            if group.comm is None and not blocking:
                for p in trainable:
                    unshared = _Unshared(group)
                    self._unshared.append(unshared)
                    self._hooks.append(p.register_hook(functools.partial(self._scale, unshared, p)))
                    self._hooks.append(
                        p.register_post_accumulate_grad_hook(functools.partial(self._scale_in_place, unshared))
                    )
                continue
            if blocking:
                self._hooks += [
                    p.register_hook(functools.partial(self._on_incoming_grad, group, f"{group.name}.param{i}"))
                    for i, p in enumerate(trainable)
                ]
                continue
            pending += _split_into_buckets(group, list(reversed(trainable)), bucket_bytes)
        # One order for all groups: by when backward is expected to reach each bucket (its latest parameter).
        pending.sort(key=lambda item: -max(position[id(p)] for p in item[1]))
        for group, params in pending:
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            bucket = _Bucket(len(self.buckets), group, params, offsets[:-1], offsets[-1])
            self.buckets.append(bucket)
            for slot, p in enumerate(params):
                self._hooks.append(p.register_hook(functools.partial(self._collect, bucket, slot)))

    # ------------------------------------------------------------------ the per-parameter hooks
    def _on_incoming_grad(self, group: ReduceGroup, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """Tensor hook: scale (and, if ``blocking``, reduce) one parameter's gradient before it is accumulated."""
        if group.comm is None:
            return grad * group.scale
        grad = grad.detach().clone(memory_format=torch.contiguous_format)  # a hook must not change its input
        if group.native is not None:
            group.native([grad], group.op).wait()
        else:
            handle = allreduce_coalesced_async(
                [grad], op=group.op, algorithm=group.algorithm, group=group.comm, name=name
            )
            handle.wait()
        if group.scale != 1.0:
            grad.mul_(group.scale)
        return grad

    def _scale(self, unshared: _Unshared, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor | None:
        """Tensor hook of an unshared parameter: scale this pass's gradient (with any held ``no_sync()`` passes)."""
        unshared.scale_in_place = False
        if not self.sync_enabled:
            if unshared.held is None:
                unshared.held = grad.detach().clone(memory_format=torch.contiguous_format)
            else:
                unshared.held.add_(grad)
            return grad.new_zeros(()).expand_as(grad)
        if unshared.held is not None:
            grad, unshared.held = unshared.held.add_(grad), None
        elif param.grad is None:
            unshared.scale_in_place = True
            return None  # autograd stores it as it is; _scale_in_place scales it there
        return grad * unshared.group.scale

    @staticmethod
    def _scale_in_place(unshared: _Unshared, param: nn.Parameter) -> None:
        """Post-accumulate hook: ``.grad`` is this pass's gradient alone (it was empty), no one else's tensor."""
        if unshared.scale_in_place:
            unshared.scale_in_place = False
            param.grad.mul_(unshared.group.scale)

    def _collect(self, bucket: _Bucket, slot: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Tensor hook: copy this pass's gradient into the bucket. Autograd then stores it in an empty ``.grad``,
        which the reduced value overwrites; else (``.grad`` holds earlier passes, or inside ``no_sync()``) it
        accumulates a zero in its place."""
        if grad.is_sparse:
            raise TypeError(f"sparse gradients are not supported (parameter of shape {tuple(grad.shape)})")
        target = bucket.slot(slot)
        if slot in bucket.filled:
            target.add_(grad)
        else:
            target.copy_(grad)
            bucket.filled.add(slot)
        if not self.sync_enabled:
            return grad.new_zeros(()).expand_as(grad)  # no allocation
        self.arm()
        bucket.arrived.add(slot)
        overwrite = bucket.params[slot].grad is None
        if overwrite:
            bucket.overwrite.add(slot)
        self._launch_ready()
        return None if overwrite else grad.new_zeros(()).expand_as(grad)

    # ------------------------------------------------------------------ launching in bucket order
    def arm(self) -> None:
        """Make sure :meth:`finish` runs at the end of the current backward pass (call during backward)."""
        if not self._armed and self.sync_enabled and self.buckets:
            self._armed = True
            queue_end_of_backward(self.finish)

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.arrived) < len(bucket.params):
                return  # later buckets wait for this one, even if they are ready: the same order on every rank
            self._launch(bucket)
            self.launched_during_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        for slot in range(len(bucket.params)):
            if slot not in bucket.filled:  # no gradient since the last reduction: contributes zeros
                bucket.slot(slot).zero_()
        group = bucket.group
        if group.native is not None:
            bucket.handle = group.native([bucket.flat], group.op)
        else:
            bucket.handle = allreduce_coalesced_async(
                [bucket.flat], op=group.op, algorithm=group.algorithm, group=group.comm, name=bucket.name
            )
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what is left, wait for every bucket, add the results to ``.grad``. Runs at the end of backward."""
        if not self._armed:
            return  # no synchronising backward pass since the last finish: nothing to reduce
        self._armed = False
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
        self._next_launch = 0
        with torch.no_grad():
            for bucket in self.buckets:
                bucket.handle.wait()
                scale = bucket.group.scale
                for slot, param in enumerate(bucket.params):
                    reduced = bucket.slot(slot)
                    if param.grad is None:  # no gradient reached it (torch.autograd.grad, an unused parameter)
                        param.grad = reduced * scale if scale != 1.0 else reduced.clone()
                    elif slot in bucket.overwrite:
                        torch.mul(reduced, scale, out=param.grad)
                    else:
                        param.grad.add_(reduced, alpha=scale)
                bucket.handle = None
                bucket.filled.clear()
                bucket.arrived.clear()
                bucket.overwrite.clear()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside communicate nothing; the next one outside reduces everything accumulated."""
        previous = self.sync_enabled
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def discard_pending(self) -> None:
        """Forget contributions held since the last reduction (e.g. from ``no_sync()`` passes thrown away)."""
        if self._armed:
            raise RuntimeError("discard_pending() during a synchronising backward pass")
        for bucket in self.buckets:
            bucket.filled.clear()
            bucket.arrived.clear()
            bucket.overwrite.clear()
        for unshared in self._unshared:
            unshared.held = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _split_into_buckets(
    group: ReduceGroup, params: list[nn.Parameter], bucket_bytes: int
) -> list[tuple[ReduceGroup, list[nn.Parameter]]]:
    """Consecutive runs of about ``bucket_bytes``, each of one dtype and device (a bucket is one flat buffer)."""
    buckets: list[tuple[ReduceGroup, list[nn.Parameter]]] = []
    current: list[nn.Parameter] = []
    size = 0
    for param in params:
        if current and (param.dtype, param.device) != (current[0].dtype, current[0].device):
            buckets.append((group, current))
            current, size = [], 0
        current.append(param)
        size += param.numel() * param.element_size()
        if size >= bucket_bytes:
            buckets.append((group, current))
            current, size = [], 0
    if current:
        buckets.append((group, current))
    return buckets
