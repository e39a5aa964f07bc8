"""Every private torch.distributed API hybrid-ext relies on, in one place (pinned by
tests/multiprocess/test_torch_integration.py).

torch supports Python process groups (``dist.ProcessGroup`` subclasses, see upstream
``test/distributed/test_c10d_pypg.py``), but a few of the pieces are underscored. If a torch release moves
them, this file and its pinning tests are what change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

BackendType = dist.ProcessGroup.BackendType


def work_from_future(future: torch.futures.Future) -> dist.Work:
    """A ``Work`` whose ``wait()`` / ``get_future()`` follow ``future`` (what a Python process group returns)."""
    return _create_work_from_future(future)


def attach_backend(group: dist.ProcessGroup, device: torch.device, backend_type, backend) -> None:
    """Route the collectives ``group`` does not override in Python to ``backend`` for ``device``.

    A Python ``ProcessGroup`` has no backend of its own: without this, calls it does not implement
    (gather, scatter, reduce, alltoall...) fail instead of falling back.
    """
    group._register_backend(device, backend_type, backend)


def set_default_backend(group: dist.ProcessGroup, backend_type) -> None:
    group._set_default_backend(backend_type)


def backend_timeout_seconds(group) -> float | None:
    """The timeout a process group (or backend) was created with, if it tells."""
    try:
        backend = group._get_backend(torch.device("cpu")) if isinstance(group, dist.ProcessGroup) else group
        return float(backend.options._timeout.total_seconds())
    except Exception:  # not every backend exposes its options
        return None


def backend_name(group, device: torch.device) -> str:
    """The name of the backend that carries ``group``'s traffic for tensors on ``device`` ("gloo", "nccl"...).

    A process group made with one backend name answers for every device that backend registered (gloo: cpu and
    cuda); one made with ``"cpu:gloo,cuda:nccl"`` answers per device; a device nothing is registered for gets the
    group's own name. Backend objects (``ProcessGroupGloo``) and stand-ins answer with their ``name()``.
    """
    if isinstance(group, dist.ProcessGroup):
        try:
            return str(group._get_backend(device).name()).lower()
        except RuntimeError:  # "No backend type associated with device type ..."
            pass
    try:
        return str(group.name()).lower()
    except Exception:  # an object without a name
        return type(group).__name__.lower()


def backend_registered(name: str) -> bool:
    return name.upper() in dist.Backend._plugins


def post_grouped(group, device: torch.device, post) -> list:
    """Post the point-to-point ops ``post()`` starts as one group where the backend needs it; return the works.

    NCCL requires a send and a receive that depend on each other to be posted inside one group (ncclGroupStart /
    End): posted separately, two ranks exchanging can deadlock. Backends that coalesce (NCCL) get ``post()``
    bracketed by their private ``_start_coalescing`` / ``_end_coalescing`` (what ``dist.batch_isend_irecv`` does
    through the Python layer); the others (gloo) post each op as it comes, which they handle concurrently.
    """
    backend = group._get_backend(device) if isinstance(group, dist.ProcessGroup) else group
    if not getattr(backend, "supports_coalescing", False):
        return list(post())
    backend._start_coalescing()
    try:
        works = list(post())
    finally:
        coalesced = backend._end_coalescing()
    # One work stands for the whole group on NCCL; keep the individual ones too, where the backend returned them.
    return [w for w in (*works, coalesced) if w is not None]
