"""Checkpoints that lose nothing: the original model's state dict from a parallel model, and back.

A parallel model's ``state_dict()`` already holds full tensors (:mod:`hybrid_ext.parallel.shards`), and an
optimizer stepping it gives full state once it has stepped (:mod:`hybrid_ext.parallel.optimizers`); these
functions are the explicit forms. ``full_state_dict`` has the unwrapped model's keys and shapes (it loads with
``strict=True``); ``load_full_state_dict`` scatters such a dict into any strategy and world size. Optimizer
state follows its parameters the same way (``full_optimizer_state_dict`` / ``load_full_optimizer_state_dict``):
per-parameter tensors of the parameter's shape (momentum, Adam moments) are gathered / sliced like it, whether
or not the optimizer has stepped yet.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from hybrid_ext.parallel.api import ParallelModel
from hybrid_ext.parallel.optimizers import cut_full_state, gather_state
from hybrid_ext.parallel.shards import gather, group_of, sharded_state_dicts


def full_state_dict(model: ParallelModel) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict (same keys and shapes), gathered from the shards.

    A collective: every rank calls it, and every rank gets the whole state dict.

    Args:
        model (ParallelModel): a model returned by :func:`hybrid_ext.parallelize`.

    Returns:
        dict[str, torch.Tensor]: what ``model.module.state_dict()`` of the model before the wrap would hold
        (copies).
    """
    return {name: tensor.detach().clone() for name, tensor in model.module.state_dict().items()}


def load_full_state_dict(model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load an unwrapped model's state dict into a parallel model of any strategy and world size.

    Args:
        model (ParallelModel): a model returned by :func:`hybrid_ext.parallelize`; each rank keeps its shards.
        state (dict[str, torch.Tensor]): a state dict of the unwrapped model (:func:`full_state_dict`, or one
            saved without hybrid-ext).

    Raises:
        KeyError: ``state`` lacks some of the model's keys or has others.
    """
    keys = set(_keys(model))
    missing = sorted(keys - set(state))
    unexpected = sorted(set(state) - keys)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.module.load_state_dict(state, strict=True)


def _keys(model: ParallelModel) -> list[str]:
    with sharded_state_dicts():  # only the names: no need to gather
        return list(model.module.state_dict(keep_vars=True))


def full_optimizer_state_dict(model: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict as an optimizer over the unwrapped model would hold it.

    A collective: every rank calls it, and every rank gets the whole state dict.

    Args:
        model (ParallelModel): the model the optimizer steps.
        optimizer (torch.optim.Optimizer): built on ``model.parameters()``.

    Returns:
        dict: the optimizer's state dict with every sharded parameter's state gathered to its full shape.
    """
    with sharded_state_dicts():
        local = copy.deepcopy(optimizer.state_dict())
    return gather_state(optimizer, local)


def load_full_optimizer_state_dict(
    model: ParallelModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full (unwrapped-model) optimizer state dict into the optimizer of a parallel model.

    Args:
        model (ParallelModel): the model the optimizer steps.
        optimizer (torch.optim.Optimizer): built on ``model.parameters()``; it may have stepped or not.
        state (dict): from :func:`full_optimizer_state_dict`, or an optimizer over the unwrapped model.
    """
    with sharded_state_dicts():  # loaded as it is, then cut here: the same whether or not the optimizer has stepped
        optimizer.load_state_dict(copy.deepcopy(state))
    cut_full_state(optimizer)


def full_grads(model: ParallelModel) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient with the unwrapped model's names and shapes (shards gathered)."""
    out: dict[str, torch.Tensor | None] = {}
    for name, param in model.module.named_parameters():
        if param.grad is None:
            out[name] = None
        elif group_of(param) is not None:
            out[name] = gather(param.grad, param.shard_dim, param.shard_sizes, group_of(param), f"{name}.grad")
        else:
            out[name] = param.grad.detach().clone()
    return out
