"""Skip the optimizer step on every rank when any rank saw a NaN or Inf gradient — never a split decision.

Why: with data parallelism alone a NaN reaches every rank through the gradient allreduce, so every rank skips
alike. With model parallelism each rank holds gradients of its own shard that no allreduce mixes: a NaN in one
rank's FC shard is seen by that rank only, and a local check (``GradScaler``'s included) would skip the step
there and take it elsewhere — the replicas of the data-parallel layers then differ for good. The guard agrees
first: one allreduce (max) of a one-element flag over the group, so every rank gets the same answer.

Plain training::

    guard = hybrid_ext.NonFiniteGuard()
    loss.backward()
    guard.step(optimizer)  # steps on every rank, or on none; guard.skipped counts the skips

With ``torch.amp.GradScaler`` (which already skips a step whose gradients hold an inf, but decides per rank)::

    scaler.scale(loss).backward()
    guard.share(model.parameters())  # any rank non-finite: every rank's gradients now hold an inf
    scaler.step(optimizer)           # so every rank's scaler skips ...
    scaler.update()                  # ... and backs its scale off alike: the scales stay equal too
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hybrid_ext.comm.api import allreduce


class NonFiniteGuard:
    """Agree across ``group`` on whether any rank's gradients hold a NaN or an Inf (see the module docstring).

    Args:
        group: the ranks that must agree, as for :func:`hybrid_ext.allreduce` (default: every rank).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.skipped = 0  # steps skipped so far (the same number on every rank)

    def any_nonfinite(self, parameters: Iterable[torch.Tensor]) -> bool:
        """True on every rank if any rank's gradients (of ``parameters``) hold a NaN or an Inf.

        A collective: every rank of the group must call it, in the same order as its other collectives.
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        for grad in grads:  # stays on the device: one host sync, after the allreduce
            flag = torch.maximum(flag, (~torch.isfinite(grad)).any().to(torch.float32).view(1))
        allreduce(flag, op="max", group=self.group, name="hybrid-ext.nonfinite-guard")
        return bool(flag.item())

    def step(self, optimizer: torch.optim.Optimizer, closure=None) -> bool:
        """``optimizer.step()`` unless any rank saw a non-finite gradient (a collective over the group).

        Args:
            optimizer (torch.optim.Optimizer): its parameters' gradients are checked.
            closure: passed to ``optimizer.step``.

        Returns:
            bool: True (on every rank) if the step was taken, False if every rank skipped it.
        """
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if self.any_nonfinite(parameters):
            self.skipped += 1
            return False
        optimizer.step(closure) if closure is not None else optimizer.step()
        return True

    def share(self, parameters: Iterable[torch.Tensor]) -> bool:
        """If any rank saw a non-finite gradient, put an inf into this rank's gradients too; return whether so.

        For ``GradScaler``, which decides from the local gradients alone: after this every rank's scaler finds an
        inf (skips the step, backs off the scale) or none does.
        """
        parameters = [p for p in parameters if p.grad is not None]
        if not self.any_nonfinite(parameters):
            return False
        self.skipped += 1
        for p in parameters:  # in every gradient: whichever optimizer (and scaler state) a parameter belongs to
            grad = p.grad
            if grad.numel():
                (grad if grad.dim() == 0 else grad[(0,) * grad.dim()]).fill_(float("inf"))
        return True
