"""``hvd.Butterfly``: hybrid-ext's butterfly allreduce as a Horovod reduce op.

    import horovod.torch as hvd
    import hybrid_ext.integrations.horovod as hxh

    hvd.init()
    hxh.register()                      # adds hvd.Butterfly and hvd.ButterflySum (idempotent)
    hvd.allreduce(t, op=hvd.Butterfly)  # the average, as op=hvd.Average; hvd.ButterflySum: the sum
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Butterfly)

How it hooks in (Horovod 0.28.1 has no registry for ops; its algorithms are C++ classes):

- ``hvd.Butterfly`` *is* Horovod's Average op — an ``int`` subclass equal to ``hvd.Average`` — that also says
  "reduce me with the butterfly". So every check Horovod's Python layer makes (``op == Average`` to split
  ``gradient_predivide_factor`` into pre/postscale factors, ``op != Average`` to refuse it, ``op != Adasum`` to
  pick the optimizer class) treats it as the average it is, and nothing in Horovod has to be changed.
- Every allreduce entry point (``allreduce``, ``allreduce_``, ``allreduce_async``, ``allreduce_async_``, the
  grouped variants, the optimizer's gradient hooks) ends in one of two private dispatch functions of
  ``horovod.torch.mpi_ops`` — ``_allreduce_async`` and ``_grouped_allreduce_async`` — looked up at call time.
  :func:`register` wraps those two: a Butterfly op goes to hybrid-ext, anything else to Horovod untouched.
- Resets: ``shutdown`` is wrapped too (where ``horovod.torch``, its ``mpi_ops`` and ``elastic`` bind it) to drop
  the side channels first, so after ``hvd.elastic.run`` re-initializes Horovod the butterfly meets the new ranks.
- Handles: a Butterfly reduction returns a :class:`ButterflyHandle`; ``synchronize`` and ``poll`` are wrapped
  (in ``horovod.torch.mpi_ops``, ``horovod.torch`` and ``horovod.torch.optimizer``, the modules that bind them)
  to wait on it, and pass Horovod's own integer handles through.

Everything this relies on is listed in :data:`PATCHED` and pinned by the tests (``tests/launchers/test_horovod.py``).

Ordering: Horovod matches reductions across ranks by name; the butterfly, like NCCL and DDP, by issue order —
every rank must issue its Butterfly reductions in the same order, as training loops do (``HYBRID_EXT_CHECK=1``
verifies shapes and dtypes on every call). Bytes travel over a side channel (:mod:`.transport`), not through
Horovod's engine: Horovod has no point-to-point send/recv.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybrid_ext.comm import SUPPORTED_DTYPES, Communicator, Handle
from hybrid_ext.comm.transports.contract import PeerError
from hybrid_ext.integrations.horovod.session import reset
from hybrid_ext.integrations.horovod.transport import communicator_for

# module -> names wrapped there. Pinned by tests: a Horovod upgrade that moves any of them fails loudly.
# shutdown: in each module that binds it (horovod.torch.elastic's _reset calls its own binding between attempts).
PATCHED: dict[str, tuple[str, ...]] = {
    "horovod.torch.mpi_ops": ("_allreduce_async", "_grouped_allreduce_async", "synchronize", "poll", "shutdown"),
    "horovod.torch": ("synchronize", "poll", "DistributedOptimizer", "shutdown"),
    "horovod.torch.optimizer": ("synchronize",),
    "horovod.torch.elastic": ("shutdown",),
}
_lock = threading.Lock()
_originals: dict[str, Callable] = {}


class ButterflyOp(int):
    """A Horovod reduce op equal to ``base`` (hvd.Average or hvd.Sum), reduced by hybrid-ext's butterfly."""

    def __new__(cls, base: int, name: str, reduce_op: str) -> ButterflyOp:
        op = super().__new__(cls, base)
        op.name, op.reduce_op = name, reduce_op
        return op

    def __repr__(self) -> str:
        return f"hvd.{self.name}"

    __str__ = __repr__

    def __reduce__(self):  # pickles as itself (broadcast_object, multiprocessing)
        return ButterflyOp, (int(self), self.name, self.reduce_op)


def _mpi_ops():
    return importlib.import_module("horovod.torch.mpi_ops")


def _make_ops() -> tuple[ButterflyOp, ButterflyOp]:
    mpi_ops = _mpi_ops()
    return ButterflyOp(mpi_ops.Average, "Butterfly", "avg"), ButterflyOp(mpi_ops.Sum, "ButterflySum", "sum")


Butterfly, ButterflySum = _make_ops()


class ButterflyHandle:
    """What a Butterfly reduction returns in place of Horovod's integer handle."""

    def __init__(self, handle: Handle, outputs: list[torch.Tensor], grouped: bool) -> None:
        self._handle, self._outputs, self._grouped = handle, outputs, grouped

    def wait(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        try:
            self._handle.wait()
        except PeerError as exc:
            # Horovod's own failure type, so elastic Horovod (hvd.elastic.run) recovers from it as from its own.
            raise _mpi_ops().HorovodInternalError(str(exc)) from exc
        return tuple(self._outputs) if self._grouped else self._outputs[0]

    def done(self) -> bool:
        return self._handle.is_completed()


def _check(tensors: Sequence[torch.Tensor], op: ButterflyOp) -> None:
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{op!r} reduces {names}; got {t.dtype} (use hvd.Average for it)")
        if op.reduce_op == "avg" and not t.dtype.is_floating_point:
            raise TypeError(f"{op!r} averages floating-point tensors; got {t.dtype} (use hvd.ButterflySum)")
        if t.is_sparse:
            raise TypeError(f"{op!r} reduces dense tensors; got a sparse one")


def _start(
    tensors: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    op: ButterflyOp,
    prescale_factor: float,
    postscale_factor: float,
    process_set: Any,
    grouped: bool,
    name: str | None,
) -> ButterflyHandle:
    tensors, outputs = list(tensors), list(outputs)
    _check(tensors, op)
    if process_set.included() is False:
        raise ValueError(f"rank is not part of {process_set}; only its members may reduce over it")
    device = tensors[0].device if tensors else torch.device("cpu")
    comm: Communicator = communicator_for(process_set, device)
    for t, out in zip(tensors, outputs):
        if out is not t:
            out.copy_(t)

    # Horovod's name for the reduction where the caller gave one (it names gradients by parameter).
    label = f"horovod {'grouped_allreduce' if grouped else 'allreduce'} {name or ''}".rstrip()

    def job() -> list[torch.Tensor]:
        if prescale_factor != 1.0:
            for out in outputs:
                out.mul_(prescale_factor)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for out in outputs:
            by_dtype.setdefault(out.dtype, []).append(out)
        for group in by_dtype.values():  # a grouped reduction is one collective per dtype
            if grouped:
                comm.allreduce(group, op=op.reduce_op, name=f"{label} ({group[0].dtype})")
            else:
                for out in group:
                    comm.allreduce([out], op=op.reduce_op, name=label)
        if postscale_factor != 1.0:
            for out in outputs:
                out.mul_(postscale_factor)
        return outputs

    return ButterflyHandle(comm.submit(job), outputs, grouped)


def _allreduce_async(tensor, output, name, op, prescale_factor, postscale_factor, process_set):
    if isinstance(op, ButterflyOp):
        return _start([tensor], [output], op, prescale_factor, postscale_factor, process_set, grouped=False, name=name)
    return _originals["horovod.torch.mpi_ops._allreduce_async"](
        tensor, output, name, op, prescale_factor, postscale_factor, process_set
    )


def _grouped_allreduce_async(tensors, outputs, name, op, prescale_factor, postscale_factor, process_set):
    if isinstance(op, ButterflyOp):
        return _start(tensors, outputs, op, prescale_factor, postscale_factor, process_set, grouped=True, name=name)
    return _originals["horovod.torch.mpi_ops._grouped_allreduce_async"](
        tensors, outputs, name, op, prescale_factor, postscale_factor, process_set
    )


def synchronize(handle):
    if isinstance(handle, ButterflyHandle):
        return handle.wait()
    return _originals["horovod.torch.mpi_ops.synchronize"](handle)


def poll(handle) -> bool:
    if isinstance(handle, ButterflyHandle):
        return handle.done()
    return _originals["horovod.torch.mpi_ops.poll"](handle)


def shutdown(*args, **kwargs):
    """``hvd.shutdown``, after forgetting the side channels of this Horovod session (see :func:`.session.reset`).

    ``hvd.elastic.run`` shuts Horovod down and initializes it again whenever ranks are lost or added: the next
    Butterfly reduction must meet the ranks there are then, not the channel to the ones before.
    """
    reset()
    return _originals["horovod.torch.mpi_ops.shutdown"](*args, **kwargs)


def distributed_optimizer(optimizer, *args, **kwargs):
    """``hvd.DistributedOptimizer``, except around a ``hybrid_ext.parallelize``'d model's parameters.

    The partitioner reduces those gradients itself, during every backward pass; Horovod's optimizer would reduce
    them again — averaging different FC shards across ranks. So the optimizer comes back as it was, with
    Horovod's ``synchronize()`` / ``skip_synchronize()`` as no-ops for scripts that call them. Any
    ``backward_passes_per_step`` is exact: each pass's gradient is reduced and accumulated into ``.grad`` (use
    ``model.no_sync()`` on all but the last pass to send once). Mixing such parameters with others is refused.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ours = [p for p in params if getattr(p, "reduced_by_hybrid_ext", False)]
    if not ours:
        return _originals["horovod.torch.DistributedOptimizer"](optimizer, *args, **kwargs)
    if len(ours) != len(params):
        raise ValueError(
            f"hvd.DistributedOptimizer got {len(ours)} parameters of a hybrid_ext.parallelize'd model, which reduces "
            f"their gradients itself, and {len(params) - len(ours)} others: give the parallel model's parameters "
            "to a plain optimizer and the others to their own hvd.DistributedOptimizer"
        )
    optimizer.synchronize = lambda: None
    optimizer.skip_synchronize = contextlib.nullcontext
    return optimizer


_WRAPPERS = {
    "_allreduce_async": _allreduce_async,
    "_grouped_allreduce_async": _grouped_allreduce_async,
    "synchronize": synchronize,
    "poll": poll,
    "DistributedOptimizer": distributed_optimizer,
    "shutdown": shutdown,
}


def registered() -> bool:
    return _mpi_ops()._allreduce_async is _allreduce_async


def register() -> None:
    """Add ``hvd.Butterfly`` / ``hvd.ButterflySum`` and route them to the butterfly (idempotent).

    Call it after ``hvd.init()``. It wraps the Horovod functions named in :data:`PATCHED` (allreduce, grouped
    allreduce, synchronize, poll, shutdown, DistributedOptimizer) so that a reduction with ``op=hvd.Butterfly``
    (average) or ``hvd.ButterflySum`` (sum) runs on hybrid-ext; every other op goes to Horovod unchanged, and
    ``hvd.DistributedOptimizer`` leaves a ``hybrid_ext.parallelize``'d model's gradients to it
    (:func:`distributed_optimizer`).

    Raises:
        RuntimeError: a function it wraps is missing from this Horovod version.
    """
    with _lock:
        if registered():
            return
        modules = {name: importlib.import_module(name) for name in PATCHED}
        for module_name, names in PATCHED.items():
            module = modules[module_name]
            for name in names:
                current = getattr(module, name, None)
                if current is None:
                    version = getattr(importlib.import_module("horovod"), "__version__", "?")
                    raise RuntimeError(
                        f"{module_name}.{name} is missing: hybrid-ext's Horovod op was written for Horovod 0.28.1, "
                        f"this is {version}"
                    )
                _originals[f"{module_name}.{name}"] = current
                setattr(module, name, _WRAPPERS[name])
        for module in (modules["horovod.torch"], modules["horovod.torch.mpi_ops"]):
            module.Butterfly, module.ButterflySum = Butterfly, ButterflySum
