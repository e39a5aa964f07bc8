"""Which communicator serves a group: one per torch process group (or transport object) and device type."""

from __future__ import annotations

import threading
from typing import Any

import torch

from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.transports.contract import NativeCollectives, OwnsCommunicator, Transport

_communicators: dict[tuple[int, str], tuple[Any, Communicator]] = {}
_registry_lock = threading.Lock()  # guards the two dicts; never held across a set-up
_setup_locks: dict[tuple[int, str], threading.Lock] = {}  # one per key: a group is set up once


def communicator(group: Any = None, device: torch.device | None = None) -> Communicator:
    """The communicator of a torch process group (None: the default group) or of a transport object."""
    if isinstance(group, Communicator):
        return group
    if group is None or not isinstance(group, Transport):
        from hybrid_ext.comm.transports.factory import resolve_group

        if group is not None and not (
            callable(getattr(group, "rank", None)) and callable(getattr(group, "size", None))
        ):
            raise TypeError(
                f"group must be a torch.distributed process group, a hybrid-ext Transport or None, "
                f"got {type(group).__name__}"
            )

        group = resolve_group(group)
        # The butterfly backend's own communicator: its dist.all_reduce calls and ours share one order.
        if issubclass(type(group), OwnsCommunicator):  # by the group's class: asked on every call
            return group.butterfly_communicator(device or torch.device("cpu"))
    device = device or torch.device("cpu")
    key = (id(group), device.type)
    with _registry_lock:
        entry = _communicators.get(key)
        if entry is not None and entry[0] is group:
            return entry[1]
        setup_lock = _setup_locks.setdefault(key, threading.Lock())
    # Setting a transport up is a collective over the group. Threads that set up different groups at once
    # (one group per thread) must not wait on each other: with one lock for all, rank 0's thread could hold it
    # for group A while rank 1's holds it for group B, each waiting for the other rank — a deadlock.
    with setup_lock:
        with _registry_lock:
            entry = _communicators.get(key)
        if entry is None or entry[0] is not group:
            entry = (group, Communicator(_as_transport(group, device), device, _native(group, device)))
            with _registry_lock:
                _communicators[key] = entry
        return entry[1]


def existing_cpu(group: Any) -> Communicator | None:
    """The CPU communicator already made for ``group`` (None: the default group), or None: a look-up for the fast
    lane of :func:`hybrid_ext.comm.api.allreduce`, without set-up, locks or checks (the full look-up does those)."""
    if isinstance(group, Communicator):
        return group
    if group is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        group = dist.group.WORLD
    entry = _communicators.get((id(group), "cpu"))
    return entry[1] if entry is not None and entry[0] is group else None


def _as_transport(group: Any, device: torch.device) -> Transport:
    if isinstance(group, Transport):
        return group
    from hybrid_ext.comm.transports.factory import transport_for

    return transport_for(group, device)


def _native(group: Any, device: torch.device) -> NativeCollectives | None:
    """A torch process group's own allreduce (what ``dist.all_reduce`` runs), for ``auto`` to weigh."""
    if isinstance(group, Transport):
        return None  # a transport object brings its own, if any (its ``native``)
    from hybrid_ext.comm.transports.native import TorchNativeCollectives

    return TorchNativeCollectives(group, device)


def forget_all() -> None:
    """Drop every communicator kept so far (their transports hold their process groups): a process that destroys
    its groups then frees them there and then, not in the interpreter's teardown."""
    with _registry_lock:
        _communicators.clear()
        _setup_locks.clear()
