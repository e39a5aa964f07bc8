"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), loadable under any strategy and world size.

What is saved is the unwrapped model's state dict (:func:`~hybrid_ext.parallel.checkpoint.full_state_dict`: FC
shards gathered, same keys and shapes as the plain model), and the optimizer's in the same form. Every rank
holds the same full tensors, and DCP's planner writes each replicated tensor once; loading reads them back into
full tensors and slices them for this run's strategy, mp size and world size. Other DCP tools (format
conversion, ``dcp_to_torch_save``) see an ordinary model checkpoint.

    hybrid_ext.parallel.dcp.save(model, "ckpt/step-100", optimizer)
    hybrid_ext.parallel.dcp.load(model, "ckpt/step-100", optimizer)   # any strategy / world size

The gathered state is whole on every rank (memory: the full model, once), which suits the CNNs this package is
for; the optimizer to load into must already hold state for its parameters (one step taken), as DCP needs a
template of every tensor it reads.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hybrid_ext.parallel.api import ParallelModel
from hybrid_ext.parallel.checkpoint import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)


def _state(model: ParallelModel, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": full_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = full_optimizer_state_dict(model, optimizer)
    return state


def save(model: ParallelModel, checkpoint_id: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None):
    """Write ``model`` (and ``optimizer``) to ``checkpoint_id`` with DCP. Every rank calls this."""
    import torch.distributed.checkpoint as dcp

    return dcp.save(_state(model, optimizer), checkpoint_id=checkpoint_id)


def load(
    model: ParallelModel, checkpoint_id: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Read a checkpoint written by :func:`save` (any strategy, world size) into ``model`` (and ``optimizer``)."""
    import torch.distributed.checkpoint as dcp

    if optimizer is not None and not optimizer.state:
        raise ValueError(
            "the optimizer has no state to load into yet: take one step first (DCP reads into existing tensors)"
        )
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    load_full_state_dict(model, state["model"])
    if optimizer is not None:
        load_full_optimizer_state_dict(model, optimizer, state["optimizer"])
