"""Replicas that must stay identical, checked: each parameter's exact fingerprint compared across its replicas.

Replicated parameters get the same reduced gradient and the same update on every rank, so they stay bitwise
equal — unless something per rank touches them (clipping by a rank's own norm, a rank-dependent update). Then
training goes on silently wrong. The fingerprint of a tensor is the sum of its bit patterns (as integers),
so any changed element shows; comparing it costs one small all-gather, not the parameters.

Checked where it is cheap to be sure: whenever a parallel model with shards makes its state dict (over the
model-parallel group, the ranks that call it together), and in check mode (``HYBRID_EXT_CHECK=1``) after the
first optimizer step and every ``HYBRID_EXT_CHECK_REPLICAS_EVERY`` steps (default 50) after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_ext import config
from hybrid_ext.comm import Communicator
from hybrid_ext.parallel.shards import ShardedStateDictMixin, sharded_mode

EVERY_ENV = "HYBRID_EXT_CHECK_REPLICAS_EVERY"
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaDivergenceError(RuntimeError):
    """Replicas of a parameter differ between ranks."""


def check_every() -> int:
    return config.get(EVERY_ENV)


def fingerprint(tensor: torch.Tensor) -> int:
    """An exact fingerprint of ``tensor``'s contents (a changed element changes it), below 2**31."""
    flat = tensor.detach().contiguous().view(-1)
    bits = flat.view(_INTEGER_OF_SIZE[flat.element_size()]).to(torch.int64)
    return int(bits.sum().item() % (1 << 31))


def check(named: Sequence[tuple[str, torch.Tensor]], comm: Communicator, over: str) -> None:
    """Raise :class:`ReplicaDivergenceError` naming the first parameter of ``named`` whose replicas differ
    between the ranks of ``comm`` (``over`` names that group in the message). Every rank of it calls this."""
    if comm.size == 1 or not named:
        return
    values = torch.tensor([[fingerprint(t) for _, t in named]], dtype=torch.float64)
    table = comm.allgather(values.to(comm.device), name="replica check")
    table = table.cpu()
    differs = (table != table[0]).any(dim=0)
    if bool(differs.any()):
        index = int(differs.nonzero()[0])
        name = named[index][0]
        groups: dict[float, list[int]] = {}
        for rank, value in enumerate(table[:, index].tolist()):
            groups.setdefault(value, []).append(rank)
        raise ReplicaDivergenceError(
            f"parameter {name!r} differs between its replicas on the {over} group (ranks of that group holding "
            f"the same values: {sorted(groups.values())}); {int(differs.sum())} of {len(named)} parameters differ. "
            "Something changed replicas per rank — clipping by a rank's own norm is the usual cause: use "
            "model.clip_grad_norm_(max_norm) (or torch.nn.utils.clip_grad_norm_ imported after hybrid_ext)"
        )


def split_parameters(module: torch.nn.Module) -> tuple[list, list]:
    """``module``'s named parameters as (whole, sharded), by what its sharded layers say (copies included)."""
    sharded_ids = {
        id(layer._parameters[name])
        for layer in module.modules()
        if isinstance(layer, ShardedStateDictMixin)
        for name in layer.sharded_params
        if layer._parameters.get(name) is not None
    }
    named = list(module.named_parameters())
    return [(n, p) for n, p in named if id(p) not in sharded_ids], [(n, p) for n, p in named if id(p) in sharded_ids]


def check_before_state_dict(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    """A state-dict pre-hook: the whole parameters must agree over the model-parallel group before a checkpoint
    is made of them (the ranks of that group make it together, gathering the shards)."""
    layers = [m for m in module.modules() if isinstance(m, ShardedStateDictMixin)]
    if layers and not sharded_mode():
        whole, _ = split_parameters(module)
        check(whole, layers[0].comm, "model-parallel")
