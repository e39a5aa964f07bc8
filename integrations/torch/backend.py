"""The ``butterfly`` torch.distributed backend: ``dist.init_process_group("butterfly")``.

``all_reduce`` (and ``all_reduce_coalesced``) go through hybrid-ext's butterfly allreduce; every other
collective — broadcast, all_gather, reduce_scatter, all_to_all, barrier, send/recv... — falls back to an inner
gloo group, created from the same store. CUDA tensors (where every rank has CUDA) take an inner NCCL group where
NCCL can serve the job, else a second gloo group, the butterfly staging them through host buffers: NCCL is
missing, or ranks share a GPU and their NCCL refuses that (before 2.30, or without NCCL_MULTI_RANK_GPU_ENABLE=1).
DDP, DeviceMesh and DeepSpeed (``deepspeed.init_distributed(dist_backend="butterfly")``) run on it unchanged.

    import hybrid_ext  # registers the backend
    dist.init_process_group("butterfly")
    dist.all_reduce(t)  # butterfly

The algorithm follows ``HYBRID_EXT_ALGO`` (default ``auto``; among its candidates, gloo's or NCCL's own
allreduce). Reductions torch has but the butterfly does not (product, bitwise ops, pre-multiplied sums) and dtypes
it does not support go to the inner group.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybrid_ext import comm
from hybrid_ext.comm.cost_model import requested_algorithm
from hybrid_ext.comm.transports import _c10d_private as c10d
from hybrid_ext.comm.transports.factory import transport_for
from hybrid_ext.comm.transports.native import TorchNativeCollectives
from hybrid_ext.comm.transports.side_channel import StoreCollectives, nccl_usable_for
from hybrid_ext.comm.transports.staged import StagedTransport
from hybrid_ext.comm.transports.torch_p2p import TorchTransport

BACKEND_NAME = "butterfly"

_REDUCE_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
}


def _op_name(reduce_op: Any) -> str | None:
    for torch_op, name in _REDUCE_OPS.items():
        try:
            if reduce_op == torch_op:
                return name
        except (TypeError, RuntimeError):  # pre-multiplied sums do not compare
            return None
    return None


def _device_of(args: tuple) -> torch.device | None:
    """The device a collective runs on: its first tensor's, or a device / ``BarrierOptions.device`` argument."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, torch.device):
            return arg
        if isinstance(arg, (list, tuple)):
            found = _device_of(tuple(arg))
            if found is not None:
                return found
        elif isinstance(arg, dist.BarrierOptions) and arg.device is not None:
            return torch.device(arg.device)
    return None


def _to_inner(name: str, inner_name: str | None = None, pass_args: bool = True):
    """A method that runs collective ``name`` on the inner group for its device, through the inner group's binding.

    Why not leave these to ``_register_backend``: torch's trampoline for Python process groups
    (``PyProcessGroup``) calls the base ``ProcessGroup`` method for a collective the subclass does not define
    *while holding the GIL*, and that method enqueues on gloo, taking gloo's work-queue mutex. gloo's worker
    threads drop a finished collective (its tensors: a Python decref, which takes the GIL) while holding that
    mutex. So the caller holds the GIL and waits for the mutex while a gloo thread holds the mutex and waits for
    the GIL: a deadlock, whenever a collective is issued before gloo's thread has let go of the previous one.
    The inner group's own bindings release the GIL.
    """
    target = inner_name or name

    def method(self, *args, **kwargs):  # called by torch's Python API (keywords too) and by the trampoline
        inner = self.butterfly_inner_group(_device_of((*args, *kwargs.values())) or torch.device("cpu"))
        return getattr(inner, target)(*args, **kwargs) if pass_args else getattr(inner, target)()

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``{name}`` on the inner gloo / NCCL group (see :func:`_to_inner`)."
    return method


class ButterflyProcessGroup(dist.ProcessGroup):
    """A Python process group: butterfly allreduce, everything else delegated to inner gloo / NCCL groups."""

    # The device the 'cuda' entry's communicator runs on (CPU tests put the CPU here to drive the staged path).
    cuda_entry_device = torch.device("cuda")

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        self._group_name = ""
        self._group_desc = ""
        self._inner: dict[str, Any] = {}
        self._comms: dict[str, comm.Communicator] = {}
        gloo = dist.ProcessGroupGloo(dist.PrefixStore("butterfly/gloo", store), rank, size, timeout)
        setup = StoreCollectives(dist.PrefixStore("butterfly/setup", store), rank, size)
        cpu_transport = transport_for(gloo, torch.device("cpu"), setup.all_gather, setup.barrier)
        cpu_native = TorchNativeCollectives(gloo, torch.device("cpu"), timeout.total_seconds())
        self._add_inner("cpu", c10d.BackendType.GLOO, gloo, cpu_transport, cpu_native)
        every_rank_has_cuda, nccl_usable = nccl_usable_for(setup.all_gather)
        seconds = timeout.total_seconds()
        cuda = self.cuda_entry_device
        if every_rank_has_cuda and nccl_usable:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            nccl = dist.ProcessGroupNCCL(dist.PrefixStore("butterfly/nccl", store), rank, size, options)
            nccl_native = TorchNativeCollectives(nccl, cuda, seconds)
            self._add_inner("cuda", c10d.BackendType.NCCL, nccl, TorchTransport(nccl, seconds), nccl_native)
        elif every_rank_has_cuda:
            # A gloo group of its own, so that CPU and CUDA collectives in flight together never pair up on one;
            # the butterfly stages CUDA tensors over the host route CPU tensors take (gloo's send/recv is CPU-only),
            # gloo's own collectives copy them to the host themselves.
            staged_gloo = dist.ProcessGroupGloo(dist.PrefixStore("butterfly/gloo-cuda", store), rank, size, timeout)
            host = transport_for(staged_gloo, torch.device("cpu"), setup.all_gather, setup.barrier)
            staged_native = TorchNativeCollectives(staged_gloo, cuda, seconds)
            self._add_inner("cuda", c10d.BackendType.GLOO, staged_gloo, StagedTransport(host, cuda), staged_native)
        c10d.set_default_backend(self, c10d.BackendType.GLOO)

    def _add_inner(self, device_type: str, backend_type, backend, transport, native) -> None:
        self._inner[device_type] = backend
        device = self.cuda_entry_device if device_type == "cuda" else torch.device("cpu")
        self._comms[device_type] = comm.Communicator(transport, device, native)
        c10d.attach_backend(self, torch.device(device_type), backend_type, backend)

    # ------------------------------------------------------------------ identity
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getRank(self) -> int:
        return self._rank

    def getSize(self) -> int:
        return self._size

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    def getGroupDesc(self) -> str:
        return self._group_desc

    def butterfly_inner_group(self, device: torch.device) -> Any:
        """The inner group that carries this group's traffic for ``device`` (hybrid-ext's transports use it)."""
        return self._inner["cuda" if device.type == "cuda" and "cuda" in self._inner else "cpu"]

    def butterfly_communicator(self, device: torch.device) -> comm.Communicator:
        return self._comms["cuda" if device.type == "cuda" and "cuda" in self._comms else "cpu"]

    # ------------------------------------------------------------------ the butterfly
    def allreduce(self, tensors, opts=None):
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        if op is None or not self._supported(tensors, op):
            return self.butterfly_inner_group(tensors[0].device).allreduce(tensors, opts)
        return self._submit(tensors, op, separate=True)

    def allreduce_coalesced(self, tensors, opts=None):
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        if op is None or not self._supported(tensors, op):
            return self.butterfly_inner_group(tensors[0].device).allreduce_coalesced(tensors, opts)
        return self._submit(tensors, op, separate=False)

    def _supported(self, tensors, op: str) -> bool:
        if not tensors:
            return False
        first = tensors[0]
        if first.dtype not in comm.SUPPORTED_DTYPES or (op == "avg" and not first.dtype.is_floating_point):
            return False
        return all(t.dtype == first.dtype and t.device == first.device and not t.is_sparse for t in tensors)

    def _submit(self, tensors, op: str, separate: bool):
        tensors = list(tensors)
        group_comm = self.butterfly_communicator(tensors[0].device)
        algorithm = requested_algorithm()

        def job():
            if separate:  # all_reduce of several tensors reduces each on its own, as other backends do
                for t in tensors:
                    group_comm.allreduce([t], op=op, algorithm=algorithm, name="c10d.allreduce")
            else:
                group_comm.allreduce(tensors, op=op, algorithm=algorithm, name="c10d.allreduce_coalesced")
            return tensors

        return c10d.work_from_future(group_comm.submit(job).as_torch_future(tensors))

    # ------------------------------------------------------------------ everything else: the inner groups
    # Every collective torch's PyProcessGroup trampoline can route here (see _to_inner for why each needs a method).
    broadcast = _to_inner("broadcast")
    allgather = _to_inner("allgather")
    all_gather_single = _to_inner("all_gather_single")
    all_gather_single_coalesced = _to_inner("all_gather_single_coalesced")
    reduce = _to_inner("reduce")
    alltoall = _to_inner("alltoall")
    all_to_all_single = _to_inner("all_to_all_single")
    barrier = _to_inner("barrier")
    gather = _to_inner("gather")
    scatter = _to_inner("scatter")
    reduce_scatter = _to_inner("reduce_scatter")
    reduce_scatter_single = _to_inner("reduce_scatter_single")
    reduce_scatter_single_coalesced = _to_inner("reduce_scatter_single_coalesced")
    send = _to_inner("send")
    recv = _to_inner("recv")
    recvAnysource = _to_inner("recvAnysource", "recv_anysource")
    start_coalescing = _to_inner("start_coalescing", "_start_coalescing", pass_args=False)
    end_coalescing = _to_inner("end_coalescing", "_end_coalescing", pass_args=False)


def create_butterfly_group(store: dist.Store, rank: int, size: int, timeout: timedelta) -> ButterflyProcessGroup:
    return ButterflyProcessGroup(store, rank, size, timeout)


def register_backend() -> None:
    """Make ``"butterfly"`` a torch.distributed backend name (idempotent; importing hybrid_ext calls it).

    ``dist.init_process_group("butterfly")`` then runs ``all_reduce`` through hybrid-ext's schedules and every
    other collective on an inner group (gloo; for CUDA tensors NCCL where it can serve the job, see the module
    docstring).
    """
    if c10d.backend_registered(BACKEND_NAME):
        return
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    dist.Backend.register_backend(BACKEND_NAME, create_butterfly_group, devices=devices)
