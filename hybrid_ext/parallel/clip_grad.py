"""Gradient clipping by the norm of the whole model, shards included (FSDP's ``clip_grad_norm_``, for shards).

A shard holds only part of a parameter's gradient, so each rank's own norm is not the model's: clipping by it
scales replicated gradients differently on every rank, and the replicas drift apart. Here the norm is taken
once over every gradient: whole (replicated) gradients locally, shards summed over their model-parallel group
(a replica of a shard holds the same reduced gradient as the others, so counting one group is counting each
shard once).

While a parallel model with shards exists, ``torch.nn.utils.clip_grad_norm_`` is this function for parameter
lists that hold shards and torch's own for every other list, so the line scripts already have stays right. A
script that bound torch's function before hybrid-ext was imported is not redirected; replicas that drift
apart are then caught by :mod:`hybrid_ext.parallel.replicas`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

from hybrid_ext.parallel import shards

_torch_clip_grad_norm_ = torch.nn.utils.clip_grad_norm_


@torch.no_grad()
def total_grad_norm(
    parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0, foreach: bool | None = None
) -> torch.Tensor:
    """The ``norm_type``-norm of every gradient of ``parameters`` together, shards over their whole groups.

    Every rank of a shard's model-parallel group calls this with the corresponding parameters.
    """
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    norm_type = float(norm_type)
    whole: list[torch.Tensor] = []
    by_group: dict[int, tuple] = {}  # shards' gradients by their communicator, in the order parameters come
    for p in params:
        if p.grad is None:
            continue
        comm = shards.group_of(p)
        if comm is None:
            whole.append(p.grad)
        else:
            by_group.setdefault(id(comm), (comm, []))[1].append(p.grad)
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    total = _norm(whole, norm_type, foreach, device)
    for comm, grads in by_group.values():  # in the order the parameters come, the same on every rank
        part = _norm(grads, norm_type, foreach, device)
        if math.isinf(norm_type):
            combined = part.reshape(1).to(torch.float32).clone()
            comm.allreduce([combined], op="max", name="grad norm (max)")
            total = torch.maximum(total, combined[0].to(total.dtype))
        else:
            powered = (part.to(torch.float32) ** norm_type).reshape(1).clone()
            comm.allreduce([powered], name="grad norm")
            total = (total.to(torch.float32) ** norm_type + powered[0]) ** (1.0 / norm_type)
    return total


def _norm(grads: list[torch.Tensor], norm_type: float, foreach: bool | None, device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """As ``torch.nn.utils.clip_grad_norm_``, by the norm over every rank's shards (see the module docstring).

    Returns the total norm, the same on every rank.
    """
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    total = total_grad_norm(params, norm_type, foreach)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped; "
            "set error_if_nonfinite=False to clip anyway"
        )
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
    return total


def _routed_clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    if any(shards.is_shard(p) for p in params):
        return clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    return _torch_clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)


def route_torch_clip_grad_norm() -> None:
    """Make ``torch.nn.utils.clip_grad_norm_`` clip shards by the whole model's norm (idempotent)."""
    torch.nn.utils.clip_grad_norm_ = _routed_clip_grad_norm_
    torch.nn.utils.clip_grad.clip_grad_norm_ = _routed_clip_grad_norm_
