"""Any optimizer over a parallel model's parameters, however and whenever it was built, behaves as under DDP.

One process-wide optimizer step pre-hook (torch's ``register_optimizer_step_pre_hook``) sees every optimizer
the first time it steps parameters that hybrid-ext sharded, and then:

- cuts state that was made for the full parameter (built or loaded before the wrap, or loaded from a full
  checkpoint) down to this rank's shard, so a resumed run continues where the checkpoint left it;
- makes that optimizer's ``state_dict()`` full (each shard's per-parameter tensors gathered over the
  model-parallel group: what an optimizer over the plain model holds, loadable by it) and its
  ``load_state_dict()`` cut full state to the shard at once. Inside
  :func:`~hybrid_ext.parallel.shards.sharded_state_dicts` both deal in this rank's state instead.

An optimizer loaded before its first step gets full state; the hook cuts it on that first step. In check mode
a step post-hook also compares the replicas of the models it steps (:mod:`hybrid_ext.parallel.replicas`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from hybrid_ext.comm import consistency
from hybrid_ext.parallel import replicas, shards

_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its shard parameters
_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> steps taken (check mode)
_models: list[weakref.ref] = []  # parallel models whose replicas check mode compares, in the same order on every rank
_installed = False


def install() -> None:
    """Register the process-wide step hooks (once)."""
    global _installed
    if not _installed:
        register_optimizer_step_pre_hook(_before_step)
        register_optimizer_step_post_hook(_after_step)
        _installed = True


def watch(model) -> None:
    """Compare ``model``'s replicas after the steps of optimizers over it, in check mode (``check_replicas``)."""
    _models[:] = [ref for ref in _models if ref() is not None] + [weakref.ref(model)]


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _models or not consistency.check_enabled():
        return
    count = _steps.get(optimizer, 0) + 1
    _steps[optimizer] = count
    if count != 1 and (count - 1) % replicas.check_every():
        return
    stepped = {id(p) for p in _params(optimizer)}
    for model in [ref() for ref in _models]:
        if model is not None and any(id(p) in stepped for p in model.parameters()):
            model.check_replicas()


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    known = _seen.get(optimizer)
    if known is None or known[0] != len(optimizer.param_groups):  # first step, or a param group added since
        params = _params(optimizer)
        retired = [p.retired_by_hybrid_ext for p in params if hasattr(p, "retired_by_hybrid_ext")]
        if retired:
            raise RuntimeError(
                f"this optimizer steps parameters that parallelize() took out of the model ({', '.join(retired)}): "
                "they would never change the model; build the optimizer over model.parameters() after the wrap"
            )
        sharded = [p for p in params if shards.is_shard(p)]
        known = (len(optimizer.param_groups), sharded)
        _seen[optimizer] = known
        if sharded and not getattr(optimizer, "_hybrid_ext_hooked", False):
            optimizer.register_state_dict_post_hook(_full_state_dict)
            optimizer.register_load_state_dict_post_hook(_cut_loaded_state)
            optimizer._hybrid_ext_hooked = True  # type: ignore[attr-defined]
    for param in known[1]:
        _cut_state(optimizer.state.get(param), param)


def _cut_state(entries: dict | None, param: torch.Tensor) -> None:
    """Replace per-parameter state of the full parameter's shape by this rank's slice of it."""
    if not entries:
        return
    full = tuple(param.full_shape)
    if full == tuple(param.shape):
        return
    comm = shards.group_of(param)
    for key, value in entries.items():
        if torch.is_tensor(value) and tuple(value.shape) == full:
            entries[key] = shards.local_slice(value, param.shard_dim, param.shard_sizes, comm.rank).clone()


def cut_full_state(optimizer: torch.optim.Optimizer) -> None:
    """Cut the state of every shard the optimizer steps that still has the full parameter's shape."""
    for param in _params(optimizer):
        if shards.is_shard(param):
            _cut_state(optimizer.state.get(param), param)


def _cut_loaded_state(optimizer: torch.optim.Optimizer) -> None:
    if not shards.sharded_mode():
        cut_full_state(optimizer)


def gather_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (the optimizer's own, shards' state local) with each shard's tensors made full."""
    index_to_param = dict(enumerate(_params(optimizer)))
    out = {k: v for k, v in state_dict.items() if k != "state"}
    out["state"] = {}
    for index, entries in state_dict["state"].items():
        param = index_to_param[index]
        comm = shards.group_of(param)
        out["state"][index] = {
            key: shards.gather(value, param.shard_dim, param.shard_sizes, comm, f"optimizer state {key!r}")
            if comm is not None and torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0
            else value
            for key, value in entries.items()
        }
    return out


def _full_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    return state_dict if shards.sharded_mode() else gather_state(optimizer, state_dict)
