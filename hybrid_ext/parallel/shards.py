"""Sharded parameters: cut in place, made whole for checkpoints, cut again on load.

A sharded layer keeps the very ``nn.Parameter`` objects the original layer had and only swaps their data for
this rank's slice, as DDP keeps parameters: an optimizer, LR scheduler, GradScaler or EMA built before
:func:`~hybrid_ext.parallel.parallelize` still steps the parameters the model uses.

Each shard is recorded here with its model-parallel communicator (weakly: a dropped model frees it), so the
optimizer's state, gradient clipping and checkpoints can find the group a shard is spread over.

State dicts are whole by default: ``state_dict()`` gathers every shard over the model-parallel group (each rank
of that group calls it, as DDP scripts do before saving on the first rank), and ``load_state_dict`` cuts full
tensors again. Inside :func:`sharded_state_dicts` both deal in this rank's shards instead, for models too large
to gather.

A gathered tensor is a :class:`GatheredShard`: code that writes into state-dict tensors in place (timm's EMAs
lerp ``ema.state_dict()`` values toward the model's) reaches this rank's shard, as it reaches the parameter
itself under DDP, where state-dict tensors share the parameters' storage. Everything else sees a plain tensor:
results of operations, copies and saved files are ordinary tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from hybrid_ext.comm import Communicator, PeerError
from hybrid_ext.parallel import mappings

_groups: WeakIdKeyDictionary = WeakIdKeyDictionary()  # shard parameter -> its model-parallel communicator
_mode = threading.local()


def shard_in_place(param: nn.Parameter, dim: int, comm: Communicator) -> nn.Parameter:
    """Swap ``param``'s data for this rank's slice along ``dim`` (the object stays the same) and record it."""
    full_shape = tuple(param.shape)
    sizes = mappings.shard_sizes(full_shape[dim], comm.size)
    with torch.no_grad():
        param.data = local_slice(param.data, dim, sizes, comm.rank).clone()
    if param.grad is not None:  # a gradient of the full shape would not fit the shard any more
        param.grad = local_slice(param.grad, dim, sizes, comm.rank).clone()
    param.shard_dim = dim  # type: ignore[attr-defined]
    param.shard_sizes = sizes  # type: ignore[attr-defined]
    param.full_shape = full_shape  # type: ignore[attr-defined]
    _groups[param] = comm
    return param


def group_of(param: torch.Tensor) -> Communicator | None:
    """The model-parallel communicator ``param`` is sharded over, or None for a parameter that is whole."""
    return _groups.get(param)


def is_shard(param: torch.Tensor) -> bool:
    return param in _groups


def local_slice(full: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


def gather(shard: torch.Tensor, dim: int, sizes: tuple[int, ...], comm: Communicator, what: str) -> torch.Tensor:
    """The full tensor from every rank's ``shard`` (a collective over ``comm``; ``what`` names it in errors)."""
    if comm.size == 1:
        return shard.detach().clone()
    moved = shard.detach().movedim(dim, 0).contiguous()
    try:
        full = comm.allgather(moved, counts=sizes, name=f"gather {what}")
    except PeerError as error:
        raise RuntimeError(
            f"gathering {what} over the model-parallel group failed: every rank of that group must call "
            f"state_dict() (it gathers the FC shards; DDP scripts build the checkpoint on every rank and save it "
            f"on the first). Inside hybrid_ext.parallel.sharded_state_dicts() each rank saves its own shards. "
            f"Cause: {error}"
        ) from error
    return full.movedim(0, dim).contiguous()


def _tensors_in(value) -> list:
    if isinstance(value, GatheredShard):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v)]
    return []


class GatheredShard(torch.Tensor):
    """A full tensor gathered from a parameter's shards; in-place writes to it are written to this rank's shard."""

    _target: tuple  # (parameter, dim, sizes, rank)

    @staticmethod
    def wrap(full: torch.Tensor, param: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int) -> GatheredShard:
        out = full.as_subclass(GatheredShard)
        out._target = (param, dim, sizes, rank)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name in (
            "__setitem__",
            "__iadd__",
            "__isub__",
            "__imul__",
            "__itruediv__",
        )
        if in_place and args:
            for written in _tensors_in(args[0]):
                param, dim, sizes, rank = written._target
                with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
                    param.data.copy_(local_slice(written, dim, sizes, rank))
        return result

    def __reduce_ex__(self, protocol):  # saved as a plain tensor: a checkpoint holds no reference to the model
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).clone()


def sharded_mode() -> bool:
    return getattr(_mode, "sharded", False)


@contextlib.contextmanager
def sharded_state_dicts() -> Iterator[None]:
    """Inside: ``state_dict()`` / ``load_state_dict()`` of parallel models and their optimizers deal in this
    rank's shards (no communication; each rank saves and loads its own file)."""
    before = sharded_mode()
    _mode.sharded = True
    try:
        yield
    finally:
        _mode.sharded = before


class ShardedStateDictMixin:
    """For sharded layers: the state dict holds full tensors (gathered), and loading cuts them again.

    ``sharded_params`` maps each sharded parameter's name to its dim (a name without a parameter, a bias the layer
    does not have, is skipped); ``sizes`` and ``comm`` are the layer's.
    The layer keeps this knowledge itself (copies of it, such as an EMA's deep copy, have plain parameters).
    """

    sharded_params: dict[str, int]
    sizes: tuple[int, ...]
    comm: Communicator

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if sharded_mode():
            return
        for name, dim in self.sharded_params.items():
            param = self._parameters.get(name)  # type: ignore[attr-defined]
            if param is not None:
                full = gather(param, dim, self.sizes, self.comm, prefix + name)
                destination[prefix + name] = GatheredShard.wrap(full, param, dim, self.sizes, self.comm.rank)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        if not sharded_mode():
            cut = {}
            for name, dim in self.sharded_params.items():
                param, key = self._parameters.get(name), prefix + name  # type: ignore[attr-defined]
                if param is None or key not in state_dict:
                    continue
                full = state_dict[key]
                full_shape = list(param.shape)
                full_shape[dim] = sum(self.sizes)
                if list(full.shape) != full_shape:
                    error_msgs.append(
                        f"{key}: the checkpoint holds shape {tuple(full.shape)}, not the full {tuple(full_shape)} "
                        f"this rank's shard is cut from"
                        + (
                            " — it is one rank's shard (a sharded checkpoint): load it inside "
                            "hybrid_ext.parallel.sharded_state_dicts() on the rank that saved it"
                            if list(full.shape) == list(param.shape)
                            else ""
                        )
                    )
                    continue
                cut[key] = local_slice(full, dim, self.sizes, self.comm.rank)
            if cut:
                state_dict = {**state_dict, **cut}
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
        )
