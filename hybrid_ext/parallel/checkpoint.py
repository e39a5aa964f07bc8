"""Checkpoints that lose nothing: the original model's state dict from a parallel model, and back.

``full_state_dict`` gathers every shard, so the result has the unwrapped model's keys and shapes (it loads with
``strict=True``); ``load_full_state_dict`` scatters such a dict into any strategy and world size. Optimizer
state follows its parameters the same way (``full_optimizer_state_dict`` / ``load_full_optimizer_state_dict``):
per-parameter tensors of the parameter's shape (momentum, Adam moments) are gathered / sliced like it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hybrid_ext.parallel.api import ParallelModel


def _gather(model: ParallelModel, shard: torch.Tensor, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    comm = model.groups.mp
    if comm.size == 1:
        return shard.detach().clone()
    moved = shard.detach().movedim(dim, 0).contiguous()
    full = comm.run(lambda: comm.allgather_now(moved, sizes, "auto"))
    return full.movedim(0, dim).contiguous()


def _slice(model: ParallelModel, full: torch.Tensor, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    rank = model.groups.mp.rank
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _params_by_name(model: ParallelModel) -> dict[str, nn.Parameter]:
    return dict(model.module.named_parameters())


def full_state_dict(model: ParallelModel) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict (same keys and shapes), gathered from the shards. Call on every rank."""
    params = _params_by_name(model)
    out = {}
    for name, tensor in model.module.state_dict().items():
        param = params.get(name)
        if param is not None and hasattr(param, "shard_dim"):
            out[name] = _gather(model, tensor, param.shard_dim, param.shard_sizes)
        else:
            out[name] = tensor.detach().clone()
    return out


def load_full_state_dict(model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load an unwrapped model's state dict into a parallel model of any strategy and world size."""
    params = _params_by_name(model)
    own = model.module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    sliced = {}
    for name, tensor in state.items():
        param = params.get(name)
        if param is not None and hasattr(param, "shard_dim"):
            tensor = _slice(model, tensor, param.shard_dim, param.shard_sizes)
        if tensor.shape != own[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(own[name].shape)}")
        sliced[name] = tensor
    model.module.load_state_dict(sliced, strict=True)


def full_optimizer_state_dict(model: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict as an optimizer over the unwrapped model would hold it."""
    state = optimizer.state_dict()
    index_to_param = _index_to_param(optimizer)
    out = copy.deepcopy({k: v for k, v in state.items() if k != "state"})
    out["state"] = {}
    for index, entries in state["state"].items():
        param = index_to_param[index]
        out["state"][index] = {
            key: _gather(model, value, param.shard_dim, param.shard_sizes)
            if _is_shard_state(param, value)
            else copy.deepcopy(value)
            for key, value in entries.items()
        }
    return out


def load_full_optimizer_state_dict(
    model: ParallelModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full (unwrapped-model) optimizer state dict into the optimizer of a parallel model."""
    index_to_param = _index_to_param(optimizer)
    local = copy.deepcopy({k: v for k, v in state.items() if k != "state"})
    local["state"] = {}
    for index, entries in state["state"].items():
        param = index_to_param[int(index)]
        local["state"][index] = {
            key: _slice(model, value, param.shard_dim, param.shard_sizes).clone()
            if hasattr(param, "shard_dim") and torch.is_tensor(value) and value.dim() == param.dim()
            else copy.deepcopy(value)
            for key, value in entries.items()
        }
    optimizer.load_state_dict(local)


def _is_shard_state(param: torch.Tensor, value: Any) -> bool:
    return hasattr(param, "shard_dim") and torch.is_tensor(value) and value.shape == param.shape


def _index_to_param(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(enumerate(params))


def full_grads(model: ParallelModel) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient with the unwrapped model's names and shapes (shards gathered)."""
    out: dict[str, torch.Tensor | None] = {}
    for name, param in model.module.named_parameters():
        if param.grad is None:
            out[name] = None
        elif hasattr(param, "shard_dim"):
            out[name] = _gather(model, param.grad, param.shard_dim, param.shard_sizes)
        else:
            out[name] = param.grad.detach().clone()
    return out
