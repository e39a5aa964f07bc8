"""A group's communicator: its transport, its issue order and its buffers, and the collectives run over them.

Semantics: ops ``sum``, ``avg``, ``min``, ``max``; dtypes float32/float64/float16/bfloat16 and int32/int64 (ints:
sum, min, max). 16-bit inputs are reduced in a float32 working buffer (partial sums travel as float32, so they
are exact to float32; the result is rounded once at the end). Every rank ends with bitwise-identical results:
each element's final value is computed on one rank and copied (see :mod:`hybrid_ext.comm.schedule`), and
``avg`` divides identical sums. Memory: a contiguous tensor of the reduction dtype is reduced in place;
otherwise one working buffer holds the flat vector (kept for the next call, as DDP keeps its buckets: the
largest so far); plus one receive buffer of at most the largest reducing step, reused across calls.

Where the group has an allreduce of its own (``native``: gloo's, NCCL's, Horovod's; see
:class:`~hybrid_ext.comm.transports.contract.NativeCollectives`), ``auto`` counts it among its candidates, so it
never runs slower than the backend alone; it reduces the same working buffer (16-bit inputs in float32, ``avg`` as
a sum divided here), and is left out where the caller asked for a narrower wire dtype than the input's.

The collectives (:meth:`Communicator.allreduce`, :meth:`~Communicator.allgather`,
:meth:`~Communicator.reduce_scatter`) take their place in the group's issue order themselves (blocking, or
``async_op=True`` for a handle); which schedule an allreduce runs is chosen in :mod:`hybrid_ext.comm.choose`.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybrid_ext import config
from hybrid_ext.comm import choose, consistency, cost_model, metrics
from hybrid_ext.comm.buffers import ScratchPool
from hybrid_ext.comm.cost_model import HIERARCHICAL_PREFIX, NATIVE
from hybrid_ext.comm.executor import OPS, WIDENED, WireStaging, execute, wire_dtype_for
from hybrid_ext.comm.hierarchy import (
    plan_hierarchical,
    plan_hierarchical_allgather,
    plan_hierarchical_reduce_scatter,
    plan_hierarchical_segments,
)
from hybrid_ext.comm.ordering import Handle, IssueOrder
from hybrid_ext.comm.pipelined import NetworkStages, execute_segments, segment_count
from hybrid_ext.comm.schedule import (
    GATHER_ALGORITHMS,
    SCATTER_ALGORITHMS,
    Plan,
    block_bounds,
    plan_allgather,
    plan_allreduce,
    plan_reduce_scatter,
)
from hybrid_ext.comm.streams import HostOrder, stream_order_for
from hybrid_ext.comm.topology import Topology
from hybrid_ext.comm.transports.contract import HasDirect, HasNative, NativeCollectives, Transport
from hybrid_ext.comm.transports.shm_allreduce import DIRECT, SUPPORTED_DTYPES, DirectAllreduce
from hybrid_ext.comm.tuner import TUNE_ENV, Tuner

# The all-gather / reduce-scatter names a caller may pass: the flat plans' own, and the two resolved here.
GATHER_CHOICES = ("auto", "hierarchical", *GATHER_ALGORITHMS)
SCATTER_CHOICES = ("auto", "hierarchical", *SCATTER_ALGORITHMS)
DECIDED_MEMO_SIZE = 4096


def _without_grad(job: Callable[[], Any]) -> Any:
    """``job()`` under ``torch.no_grad()``, entered only where grad mode is on (a 1 KiB allreduce notices the cost)."""
    if not torch.is_grad_enabled():
        return job()
    with torch.no_grad():
        return job()


class Communicator:
    """Runs one group's collectives in issue order over its transport (see the module docstring)."""

    def __init__(
        self, transport: Transport, device: torch.device | str = "cpu", native: NativeCollectives | None = None
    ) -> None:
        self.transport = transport
        # The group's own allreduce: passed where the transport has no group of its own (shared memory).
        if native is None and isinstance(transport, HasNative):
            native = transport.native
        self.native: NativeCollectives | None = native if cost_model.native_enabled() else None
        # The one-host allreduce in one pass over shared memory, where the transport is shared memory alone.
        self.direct: DirectAllreduce | None = transport.direct if isinstance(transport, HasDirect) else None
        self.rank, self.size = transport.rank, transport.size
        self.topology = Topology.of(transport)  # what the choice of schedules reads; the group's layout is fixed
        self.device = torch.device(device)
        self.streams = stream_order_for(self.device)
        self._order = IssueOrder()
        self._scratch = ScratchPool()
        self._checked = 0  # collectives fingerprinted so far: their sequence number in this group
        self._tuner: Tuner | None = None  # made on the first tuned call (see _allreduce_plan)
        self._decided: dict[tuple, str] = {}  # tuned choices already made, by call (see _allreduce_choice)
        self._network_stages = NetworkStages()  # the helper thread of segmented hierarchical allreduces
        # Set on the thread running one of this group's ordered jobs: a collective called from inside such a job (a
        # composite one, like Horovod's scaled grouped reduction) runs there, in that job's place in the order.
        self._inside = threading.local()

    def __deepcopy__(self, memo: dict) -> Communicator:
        return self  # a deep copy of a model (an EMA's) talks over the same group

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a hybrid-ext communicator (rank {self.rank} of {self.size}) holds live connections and cannot be "
            "pickled: save the model's state_dict(), not the model object"
        )

    def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in issue order, blocking (see :mod:`hybrid_ext.comm.ordering`).

        For composite jobs (several collectives and the work between them as one step of the order); the
        collectives called inside ``job`` run in its place.

        Args:
            job (callable): takes no arguments; runs without grad, after the caller's queued GPU work.

        Returns:
            what ``job`` returns.
        """
        if isinstance(self.streams, HostOrder):  # no streams to order: the job, without grad
            return self._order.run(lambda: self._in_order(job))
        wrapped, done = self._on_stream(job)
        result = self._order.run(wrapped)
        self.streams.consume(done[0])
        return result

    def submit(self, job: Callable[[], Any]) -> Handle:
        """Queue ``job`` behind every collective issued before it (as :meth:`run`, not blocking).

        Args:
            job (callable): as for :meth:`run`.

        Returns:
            Handle: ``wait()`` returns what ``job`` returned.
        """
        wrapped, done = self._on_stream(job)
        return self._order.submit(wrapped, self.streams, done)

    def _in_order(self, job: Callable[[], Any]) -> Any:
        """``job()`` marked as this group's ordered job on this thread (see ``_inside``), without grad."""
        if getattr(self._inside, "job", False):
            return _without_grad(job)
        self._inside.job = True
        try:
            return _without_grad(job)
        finally:
            self._inside.job = False

    def _ordered(self, job: Callable[[], Any], async_op: bool) -> Any:
        """``job`` in issue order: its result, or (``async_op``) a handle to it; inside an ordered job, run now."""
        if getattr(self._inside, "job", False):
            if not async_op:
                return job()
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(job())
            return Handle(future)
        return self.submit(job) if async_op else self.run(job)

    def _on_stream(self, job: Callable[[], Any]) -> tuple[Callable[[], Any], list]:
        """``job`` run after the caller's queued work, on the collective's stream (:mod:`~hybrid_ext.comm.streams`)."""
        ready = self.streams.capture()  # on the caller's thread, now
        done: list = [None]

        def ordered() -> Any:
            # no_grad: reducing a tensor that requires grad in place is fine here (as with dist.all_reduce), and
            # grad mode is per thread: the worker thread's would be on.
            with torch.no_grad(), self.streams.run_after(ready) as end:
                result = self._in_order(job)
            done[0] = end[0]
            return result

        return ordered, done

    def scratch(self, elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._scratch.get(elements, dtype, device)

    # ---------------------------------------------------------------- the collectives, in issue order
    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        op: str = "sum",
        algorithm: str = "auto",
        wire_dtype: torch.dtype | str | None = None,
        name: str | None = None,
        async_op: bool = False,
        prescale: float | None = None,
        postscale: float | None = None,
    ) -> Handle | None:
        """Reduce ``tensors`` in place across the group as one flat vector, after the group's earlier collectives.

        Several tensors are gathered into one working buffer and copied back; where the allreduce runs in
        segments (:mod:`~hybrid_ext.comm.pipelined`), each segment's copies happen while others are on the wire.
        Arguments are not checked here (:func:`hybrid_ext.allreduce_coalesced` checks them).

        Args:
            tensors (sequence of torch.Tensor): dense tensors of one dtype and device, of the same shapes on every
                rank.
            op (str): ``"sum"``, ``"avg"``, ``"min"`` or ``"max"``.
            algorithm (str): the schedule, or ``"auto"`` (see :mod:`hybrid_ext.comm.choose`).
            wire_dtype (torch.dtype, str or None): the dtype messages travel in (see
                :func:`~hybrid_ext.comm.executor.wire_dtype_for`).
            name (str or None): what this collective is; in check mode ranks compare it, and a mismatch names it.
            async_op (bool): return a handle instead of waiting.
            prescale (float or None): a factor each element is multiplied by before the reduction.
            postscale (float or None): a factor each element is multiplied by after it (integrations that keep a
                host framework's arithmetic, such as DeepSpeed's gradient scaling).

        Returns:
            None; with ``async_op=True``, a :class:`~hybrid_ext.comm.ordering.Handle` whose ``wait()`` returns
            ``tensors``.

        Raises:
            PeerError: a peer did not answer within the timeout (from ``wait()`` when async).
            CollectiveMismatchError: in check mode, ranks issued different collectives.
        """

        def job() -> Sequence[torch.Tensor]:
            self._allreduce_now(tensors, op, algorithm, wire_dtype, name, prescale, postscale)
            return tensors

        handle = self._ordered(job, async_op)
        return handle if async_op else None

    def allgather(
        self,
        tensor: torch.Tensor,
        *,
        counts: tuple[int, ...] | None = None,
        algorithm: str = "auto",
        name: str | None = None,
        async_op: bool = False,
    ) -> torch.Tensor | Handle:
        """Concatenate every rank's ``tensor`` along dim 0 (ranks may hold different numbers of rows).

        Args:
            tensor (torch.Tensor): this rank's rows; every rank's has the same shape after dim 0.
            counts (tuple of int or None): rows per rank, when known; None exchanges them first.
            algorithm (str): one of :data:`GATHER_CHOICES`.
            name (str or None): compared across ranks in check mode.
            async_op (bool): return a handle instead of waiting.

        Returns:
            torch.Tensor: a new tensor of ``sum(counts)`` rows, rank 0's first; with ``async_op=True``, a handle
            whose ``wait()`` returns it.

        Raises:
            ValueError: ``counts`` that do not give this rank ``tensor``'s rows.
            PeerError, CollectiveMismatchError: as for :meth:`allreduce`.
        """
        return self._ordered(lambda: self._allgather_now(tensor, counts, algorithm, name), async_op)

    def reduce_scatter(
        self,
        tensor: torch.Tensor,
        *,
        counts: tuple[int, ...],
        op: str = "sum",
        algorithm: str = "auto",
        wire_dtype: torch.dtype | str | None = None,
        name: str | None = None,
        async_op: bool = False,
    ) -> torch.Tensor | Handle:
        """Reduce ``tensor`` (every rank's blocks of rows) over the group; keep this rank's ``counts[rank]`` rows.

        Args:
            tensor (torch.Tensor): ``sum(counts)`` rows, of the same shape on every rank.
            counts (tuple of int): rows of each rank's block, one per rank.
            op (str): as for :meth:`allreduce`.
            algorithm (str): one of :data:`SCATTER_CHOICES`.
            wire_dtype (torch.dtype, str or None): as for :meth:`allreduce`.
            name (str or None): compared across ranks in check mode.
            async_op (bool): return a handle instead of waiting.

        Returns:
            torch.Tensor: this rank's block, reduced over the group (a new tensor); with ``async_op=True``, a
            handle whose ``wait()`` returns it.

        Raises:
            ValueError: ``counts`` that do not split ``tensor``'s rows over the group.
            PeerError, CollectiveMismatchError: as for :meth:`allreduce`.
        """
        return self._ordered(
            lambda: self._reduce_scatter_now(tensor, counts, op, algorithm, wire_dtype, name), async_op
        )

    def row_counts(self, rows: int, *, device: torch.device | str | None = None, name: str | None = None) -> tuple:
        """Every rank's ``rows``, in rank order (one small all-gather of integers), after earlier collectives.

        Args:
            rows (int): this rank's number (of rows, layers, or any non-negative integer to share).
            device (torch.device, str or None): where the exchange runs (None: the communicator's device).
            name (str or None): compared across ranks in check mode.

        Returns:
            tuple[int, ...]: one number per rank.

        Raises:
            PeerError, CollectiveMismatchError: as for :meth:`allreduce`.
        """
        where = self.device if device is None else torch.device(device)
        return self._ordered(lambda: self._checked_row_counts(rows, where, name), False)

    def max_over_ranks(self, values: Sequence[float], *, name: str | None = None) -> list[float]:
        """The element-wise maximum of ``values`` over the group (float64), after earlier collectives.

        Args:
            values (sequence of float): of the same length on every rank.
            name (str or None): compared across ranks in check mode.

        Returns:
            list[float]: the maxima.

        Raises:
            PeerError, CollectiveMismatchError: as for :meth:`allreduce`.
        """

        def job() -> list[float]:
            table = torch.tensor(list(values), dtype=torch.float64, device=self.device)
            if consistency.check_enabled():
                self.check_consistency("allreduce", "max", [table], name)
            return self._max_over_ranks(table)

        return self._ordered(job, False)

    def median_over_ranks(self, values: Sequence[float], *, name: str | None = None) -> list[float]:
        """As :meth:`max_over_ranks`, the element-wise median (the mean of the middle two for an even group): one
        all-gather of every rank's ``values``, the same answer on every rank."""

        def job() -> list[float]:
            row = torch.tensor([list(values)], dtype=torch.float64, device=self.device)
            every = self._allgather_now(row, (1,) * self.size, "auto", name)
            return torch.quantile(every, 0.5, dim=0).cpu().tolist()

        return self._ordered(job, False)

    def _checked_row_counts(self, rows: int, device: torch.device, name: str | None) -> tuple[int, ...]:
        if consistency.check_enabled():
            self.check_consistency("allgather", "cat", [torch.empty(0, dtype=torch.int64, device=device)], name)
        return self._block_counts(rows, device)

    # ---------------------------------------------------------------- run on the ordered thread
    def check_consistency(
        self, collective: str, op: str, tensors: Sequence[torch.Tensor], name: str | None = None
    ) -> None:
        if self.size == 1:
            return
        device = tensors[0].device if tensors else torch.device("cpu")
        self._checked += 1
        row = consistency.fingerprint(collective, op, tensors, self._checked, name)
        table = torch.zeros(self.size, len(row), dtype=torch.int64, device=device)
        table[self.rank] = torch.tensor(row, dtype=torch.int64)
        self._sum_over_ranks(table)
        table = table.cpu()
        labels = None
        if consistency.disagree(table):
            # Every rank saw the same table, so all take this extra exchange: each rank's own description of its
            # call, so that the error names what the others passed (their names, ops, dtypes) in words.
            own = consistency.encode_label(row)
            text = torch.zeros(self.size, consistency.LABEL_BYTES, dtype=torch.int64, device=device)
            text[self.rank, : len(own)] = torch.tensor(own, dtype=torch.int64)
            self._sum_over_ranks(text)
            labels = consistency.decode_labels(text.cpu())
        consistency.verify(table, ";".join(str(tuple(t.shape)) for t in tensors), labels)

    def _sum_over_ranks(self, table: torch.Tensor, op: str = "sum") -> None:
        """Reduce a small table over the group in place (recursive doubling: log2 P messages)."""
        flat = table.view(-1)
        plan = plan_allreduce("recursive_doubling", self.rank, self.size, flat.numel())
        execute(plan, flat, torch.empty_like(flat), self.transport, op)

    def _allreduce_now(
        self,
        tensors: Sequence[torch.Tensor],
        op: str,
        algorithm: str,
        wire_dtype: torch.dtype | str | None = None,
        name: str | None = None,
        prescale: float | None = None,
        postscale: float | None = None,
    ) -> None:
        """:meth:`allreduce`, on the ordered thread."""
        start = time.perf_counter()
        self.streams.keep_alive(tensors)
        if consistency.check_enabled():
            self.check_consistency("allreduce", op, tensors, name)
        if self.size == 1:
            return
        dtype, device = tensors[0].dtype, tensors[0].device
        wide = WIDENED.get(dtype, dtype)
        count = sum(t.numel() for t in tensors)
        wire = wire_dtype_for(dtype, wire_dtype)
        nbytes = count * wire.itemsize
        # Native and direct reduce the caller's values as they are: not where the caller asked to compress the
        # messages. Direct rounds 16-bit values once, at the end: not where scaling must happen in float32 first.
        native_allowed = wire.itemsize >= dtype.itemsize
        direct_allowed = (
            device.type == "cpu"
            and (wide == dtype or (prescale is None and postscale is None))
            and self._direct_takes(dtype, wire, op)
        )
        choice, trial_of = self._allreduce_choice(algorithm, count, nbytes, native_allowed, direct_allowed)
        if choice == DIRECT:
            began = time.perf_counter()
            self._direct_allreduce(tensors, op, prescale, postscale)
            if trial_of is not None:
                self._tuner.record(trial_of, nbytes, time.perf_counter() - began)
            metrics.record_direct_allreduce(self.rank, self.size, count, dtype, time.perf_counter() - start)
            return
        in_place = len(tensors) == 1 and tensors[0].is_contiguous() and wide == dtype
        # Kept between calls (like DDP's buckets): a fresh one would fault in every page again, on the copy path.
        buffer = tensors[0].view(-1) if in_place else self._scratch.get(count, wide, device, role="coalesced")[:count]
        flats = [t.reshape(-1) for t in tensors]  # views, or copies of strided tensors (copied back whole)
        starts = [0]
        for t in tensors:
            starts.append(starts[-1] + t.numel())

        def pieces(lo: int, hi: int):  # (tensor index, its range, the buffer's range) covering [lo, hi)
            index = max(0, bisect.bisect_right(starts, lo) - 1)
            while index < len(tensors) and starts[index] < hi:
                first, last = max(lo, starts[index]), min(hi, starts[index + 1])
                if last > first:
                    yield index, slice(first - starts[index], last - starts[index]), slice(first, last)
                index += 1

        def prepare(lo: int, hi: int) -> None:
            if not in_place:
                for index, own, flat in pieces(lo, hi):
                    buffer[flat].copy_(flats[index][own])
            if prescale is not None:
                buffer[lo:hi].mul_(prescale)

        def finish(lo: int, hi: int) -> None:
            if op == "avg":
                buffer[lo:hi].div_(self.size)
            if postscale is not None:
                buffer[lo:hi].mul_(postscale)
            if not in_place:
                for index, own, flat in pieces(lo, hi):
                    if tensors[index].is_contiguous():
                        flats[index][own].copy_(buffer[flat])
                    elif own.stop == tensors[index].numel():  # strided: copied back whole, by its last piece
                        whole = buffer[starts[index] : starts[index + 1]]
                        tensors[index].copy_(whole.view(tensors[index].shape))

        element_size = wire.itemsize if wire != wide else buffer.element_size()
        name = choice
        timed_on_gpu = trial_of is not None and buffer.device.type == "cuda"
        if timed_on_gpu:  # a trial times its own GPU work, not what was queued before it
            torch.cuda.current_stream(buffer.device).synchronize()
        began = time.perf_counter()
        if name == NATIVE:
            self._native_allreduce(buffer[:count], op, prepare, finish)
        else:
            plan = self.allreduce_plan(name, count)
            self._execute(plan, buffer, wire, op, prepare, finish)
        if trial_of is not None:
            if timed_on_gpu:  # NCCL returns once its work is queued: time the work itself
                torch.cuda.current_stream(buffer.device).synchronize()
            self._tuner.record(trial_of, nbytes, time.perf_counter() - began)
        if name == NATIVE:
            metrics.record_native_allreduce(
                self.native.name, self.rank, self.size, buffer[:count], time.perf_counter() - start
            )
            return
        metrics.record(
            metrics.CollectiveRecord(
                collective="allreduce",
                algorithm=plan.algorithm,
                transport=self.transport.name,
                rank=self.rank,
                world_size=self.size,
                elements=count,
                dtype=str(wire).removeprefix("torch."),
                bytes_sent=plan.elements_sent * element_size,
                bytes_received=plan.elements_received * element_size,
                messages_sent=plan.messages_sent,
                seconds=time.perf_counter() - start,
            )
        )

    def _allreduce_plan(self, algorithm: str, count: int, nbytes: int) -> tuple[Plan, str | None]:
        """(the plan for ``algorithm`` among hybrid-ext's schedules, the tuner's request when this call is a trial)."""
        name, trial_of = self._allreduce_choice(algorithm, count, nbytes, native_allowed=False)
        return self.allreduce_plan(name, count), trial_of

    def try_direct(self, tensor: torch.Tensor, op: str, algorithm: str) -> bool:
        """Reduce the contiguous CPU ``tensor`` in place by the direct allreduce if this call is one the group has
        already settled on it for (or asks for it) and check mode is off; False (nothing done): take the full path.

        The fast lane of :func:`hybrid_ext.comm.api.allreduce` ("the check-free fast path"): the same result, in
        issue order, recorded in the metrics, without the argument checks and choice the full path repeats each call.
        """
        if self.direct is None or not tensor.is_contiguous() or consistency.check_enabled():
            return False
        dtype = tensor.dtype
        # Only the calls the full path would send to direct: no compressing wire dtype (native and direct allowed).
        if op not in OPS or wire_dtype_for(dtype, None) is not dtype or not self._direct_takes(dtype, dtype, op):
            return False
        nbytes = tensor.numel() * dtype.itemsize
        if nbytes == 0:
            return False
        if algorithm != DIRECT and self._decided.get(self._choice_key(algorithm, nbytes, True, True)) != DIRECT:
            return False
        self._order.run(lambda: self._direct_fast(tensor, op))
        return True

    def _direct_takes(self, dtype: torch.dtype, wire: torch.dtype, op: str) -> bool:
        """Whether the direct allreduce may run a reduction of ``dtype`` travelling as ``wire`` with ``op``."""
        return (
            self.direct is not None
            and wire.itemsize >= dtype.itemsize
            and dtype in SUPPORTED_DTYPES
            and (op != "avg" or dtype.is_floating_point)
        )

    @staticmethod
    def _choice_key(algorithm: str, nbytes: int, native_allowed: bool, direct_allowed: bool) -> tuple:
        """What a tuned choice depends on beyond the group: the request, its size, what may run, and the knobs."""
        knobs = (config.raw(cost_model.ALGO_ENV), config.raw(TUNE_ENV))
        return (algorithm, nbytes, native_allowed, direct_allowed, *knobs)

    def _direct_fast(self, tensor: torch.Tensor, op: str) -> None:
        start = time.perf_counter()
        self._run_direct(tensor, op)
        metrics.record_direct_allreduce(self.rank, self.size, tensor.numel(), tensor.dtype, time.perf_counter() - start)

    def _run_direct(self, flat: torch.Tensor, op: str) -> None:
        self.direct.allreduce(flat, op, float(self.size) if op == "avg" else 1.0)
        # Written through its address, not by a torch op: tell autograd the tensor changed, as an in-place op would.
        torch.autograd.graph.increment_version(flat)

    def _direct_allreduce(
        self, tensors: Sequence[torch.Tensor], op: str, prescale: float | None, postscale: float | None
    ) -> None:
        """The one-host allreduce on shared memory (:mod:`~hybrid_ext.comm.transports.shm_allreduce`), in the
        tensors' dtype."""
        dtype, device = tensors[0].dtype, tensors[0].device
        in_place = len(tensors) == 1 and tensors[0].is_contiguous()
        if in_place:
            flat = tensors[0]  # reduced by address and length: any contiguous shape will do
        else:
            count = sum(t.numel() for t in tensors)
            flat = self._scratch.get(count, dtype, device, role="coalesced-direct")[:count]
            torch.cat([t.reshape(-1) for t in tensors], out=flat)
        if prescale is not None:
            flat.mul_(prescale)
        self._run_direct(flat, op)
        if postscale is not None:
            flat.mul_(postscale)
        if not in_place:
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

    def _allreduce_choice(
        self, algorithm: str, count: int, nbytes: int, native_allowed: bool = True, direct_allowed: bool = False
    ) -> tuple[str, str | None]:
        """(what runs for ``algorithm`` here: a schedule's name, ``native`` or ``direct``; the tuner's request name
        when this call is one of its timed trials). :func:`hybrid_ext.comm.choose.allreduce` decides, or hands the
        call to the tuner; decided calls are remembered (``_decided``)."""
        # A call like an earlier one whose choice the tuner has made (the common case: a training step's buckets)
        # skips the rest; the knobs that steer the choice are part of the key.
        memo = self._choice_key(algorithm, nbytes, native_allowed, direct_allowed)
        decided = self._decided.get(memo)
        if decided is not None:
            return decided, None
        decision = choose.allreduce(
            algorithm,
            nbytes,
            self.topology,
            native=self.native.name if self.native is not None else None,
            native_allowed=native_allowed,
            direct=self.direct is not None,
            direct_allowed=direct_allowed,
        )
        if isinstance(decision, str):
            return decision, None
        name, trial = self._tuned_pick(decision, nbytes)
        if not trial:
            if len(self._decided) >= DECIDED_MEMO_SIZE:
                self._decided.clear()
            self._decided[memo] = name
        return name, (decision.request if trial else None)

    def _tuned_pick(self, decision: choose.Tune, nbytes: int) -> tuple[str, bool]:
        """The tuner's pick for ``decision`` (made on the group's first tuned call), and whether it is a trial."""
        if self._tuner is None:
            topology = self.topology
            layout = ",".join(map(str, topology.hosts)) if topology.spans_hosts else "one-host"
            signature = f"{self.transport.name}|{self.device.type}|P{self.size}|hosts {layout}"
            if self.native is not None:  # saved choices made without the native candidate are not reused
                signature += f"|native {self.native.name}"
            if self.direct is not None:  # nor those made without the direct one
                signature += "|direct"
            self._tuner = Tuner(signature, self._max_over_ranks)
        candidates = decision.candidates
        return self._tuner.pick(
            decision.request, nbytes, candidates, lambda: choose.plausible(candidates, nbytes, self.topology)
        )

    def _native_allreduce(
        self,
        buffer: torch.Tensor,
        op: str,
        prepare: Callable[[int, int], None],
        finish: Callable[[int, int], None],
    ) -> None:
        """The group's own allreduce of the working buffer (``avg``: a sum here, divided in ``finish``)."""
        prepare(0, buffer.numel())
        if buffer.numel():
            self.native.allreduce(buffer, "sum" if op == "avg" else op)
        finish(0, buffer.numel())

    def tuning(self, algorithm: str, nbytes: int) -> bool:
        """Whether the tuner is still trying candidates for ``algorithm`` at ``nbytes`` (benchmarks warm past it)."""
        if self._tuner is None:
            return choose.tuned(algorithm)
        return self._tuner.tuning(algorithm, nbytes)

    def allreduce_plan(self, schedule: str, count: int) -> Plan:
        """This rank's plan for an allreduce of ``count`` elements by ``schedule`` (benchmarks count its messages).

        Args:
            schedule (str): a flat schedule's name, or ``hierarchical/<schedule>`` on a group that knows its hosts.
            count (int): elements of the vector.

        Returns:
            Plan: the steps this rank runs (see :mod:`hybrid_ext.comm.schedule`).
        """
        if schedule.startswith(HIERARCHICAL_PREFIX):
            inter = schedule.removeprefix(HIERARCHICAL_PREFIX)
            return plan_hierarchical(inter, self.rank, self.topology.hosts, count)
        return plan_allreduce(schedule, self.rank, self.size, count)

    def _max_over_ranks(self, values: list[float] | torch.Tensor) -> list[float]:
        """Element-wise maximum of ``values`` over the group, on the ordered thread (the tuner's one small
        agreement message, unchecked: it happens inside the allreduce being checked)."""
        table = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
        table = table.to(self.device)
        self._sum_over_ranks(table, "max")
        return table.cpu().tolist()

    def _execute(
        self,
        plan: Plan,
        buffer: torch.Tensor,
        wire: torch.dtype,
        op: str,
        prepare: Callable[[int, int], None] | None = None,
        finish: Callable[[int, int], None] | None = None,
    ) -> None:
        """Run ``plan`` on ``buffer``; messages travel as ``wire`` (narrower than the buffer: staged).

        ``prepare(lo, hi)`` fills ``buffer[lo:hi]`` before its reduction starts, ``finish(lo, hi)`` takes the result
        out after: once for the whole vector, or per segment where the allreduce runs in segments."""
        device = buffer.device
        whole = plan.count
        if wire == buffer.dtype:
            segments = self._segments(plan, buffer)
            if segments is not None:
                bounds = block_bounds(whole, len(segments))

                def scratch(elements: int, role: str) -> torch.Tensor:
                    return self._scratch.get(elements, buffer.dtype, device, role=f"segments-{role}")

                def ranged(hook: Callable[[int, int], None] | None) -> Callable[[int], None] | None:
                    return None if hook is None else (lambda index: hook(bounds[index], bounds[index + 1]))

                execute_segments(
                    segments, buffer, self.transport, op, scratch, self._network_stages, ranged(prepare), ranged(finish)
                )
                return
        if prepare is not None:
            prepare(0, whole)
        if wire == buffer.dtype:
            execute(plan, buffer, self.scratch(plan.scratch_elements, buffer.dtype, device), self.transport, op)
        else:
            elements = plan.largest_step_elements
            staging = WireStaging(
                self._scratch.get(elements, wire, device, role="wire-send"),
                self._scratch.get(elements, wire, device, role="wire-recv"),
            )
            execute(plan, buffer, buffer[:0], self.transport, op, wire=staging)
        if finish is not None:
            finish(0, whole)

    def _segments(self, plan: Plan, buffer: torch.Tensor):
        """A large hierarchical allreduce cut into segments whose network and shared-memory stages overlap
        (:mod:`hybrid_ext.comm.pipelined`), or None where there is no shared-memory stage to hide."""
        if plan.collective != "allreduce" or not plan.algorithm.startswith(HIERARCHICAL_PREFIX):
            return None
        topology = self.topology
        if topology.local is None or buffer.device.type != "cpu":
            return None
        count = segment_count(plan.count * buffer.element_size(), topology.lanes, topology.host_count)
        if count < 2:
            return None
        inter = plan.algorithm.removeprefix(HIERARCHICAL_PREFIX)
        return plan_hierarchical_segments(inter, self.rank, topology.hosts, plan.count, count)

    def _block_plan(self, collective: str, algorithm: str, blocks: tuple[int, ...], element_size: int) -> Plan:
        """The all-gather / reduce-scatter plan for ``algorithm`` (chosen by :func:`.choose.block_schedule`)."""
        gather = collective == "allgather"
        schedule = choose.block_schedule(gather, algorithm, sum(blocks) * element_size, self.topology)
        if schedule == choose.HIERARCHICAL:
            layered = plan_hierarchical_allgather if gather else plan_hierarchical_reduce_scatter
            return layered(self.rank, self.topology.hosts, blocks)
        return (plan_allgather if gather else plan_reduce_scatter)(schedule, self.rank, blocks)

    def _block_counts(self, rows: int, device: torch.device) -> tuple[int, ...]:
        """Every rank's number of rows (one small all-gather of integers)."""
        table = torch.zeros(self.size, dtype=torch.int64, device=device)
        table[self.rank] = rows
        plan = plan_allgather("recursive_doubling", self.rank, (1,) * self.size)
        execute(plan, table, table[:0], self.transport, "sum")
        return tuple(int(v) for v in table.tolist())

    def _allgather_now(
        self, tensor: torch.Tensor, counts: tuple[int, ...] | None, algorithm: str, name: str | None = None
    ) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 (ranks may hold different numbers of rows)."""
        start = time.perf_counter()
        self.streams.keep_alive([tensor])
        if consistency.check_enabled():
            self.check_consistency("allgather", "cat", [tensor[:0]], name)  # same trailing shape and dtype
        if self.size == 1:
            return tensor.clone()
        if counts is None:
            counts = self._block_counts(tensor.shape[0], tensor.device)
        if counts[self.rank] != tensor.shape[0]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows, but counts say {counts[self.rank]}")
        row = math.prod(tensor.shape[1:])  # elements per row
        out = torch.empty((sum(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        flat = out.view(-1)
        offset = sum(counts[: self.rank]) * row
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        plan = self._block_plan("allgather", algorithm, tuple(c * row for c in counts), out.element_size())
        execute(plan, flat, flat[:0], self.transport, "sum")
        self._record("allgather", plan, out.element_size(), start, str(out.dtype))
        return out

    def _reduce_scatter_now(
        self,
        tensor: torch.Tensor,
        counts: tuple[int, ...],
        op: str,
        algorithm: str,
        wire_dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ) -> torch.Tensor:
        """Reduce ``tensor`` (all ranks' rows) over the group; return this rank's ``counts[rank]`` rows."""
        start = time.perf_counter()
        self.streams.keep_alive([tensor])
        if consistency.check_enabled():
            self.check_consistency("reduce_scatter", op, [tensor], name)
        if sum(counts) != tensor.shape[0] or len(counts) != self.size:
            raise ValueError(f"counts {list(counts)} do not split {tensor.shape[0]} rows over {self.size} ranks")
        first = sum(counts[: self.rank])
        if self.size == 1:
            return tensor.clone()
        wide = WIDENED.get(tensor.dtype, tensor.dtype)
        buffer = torch.empty(tensor.numel(), dtype=wide, device=tensor.device)  # the one working buffer
        buffer.view(tensor.shape).copy_(tensor)  # one copy, whatever the input's dtype and strides
        row = math.prod(tensor.shape[1:])
        wire = wire_dtype_for(tensor.dtype, wire_dtype)
        plan = self._block_plan("reduce_scatter", algorithm, tuple(c * row for c in counts), wire.itemsize)
        self._execute(plan, buffer, wire, op)
        mine = buffer[first * row : (first + counts[self.rank]) * row].view(counts[self.rank], *tensor.shape[1:])
        if op == "avg":
            mine.div_(self.size)
        self._record("reduce_scatter", plan, wire.itemsize, start, str(wire))
        return mine.to(tensor.dtype).clone() if wide != tensor.dtype else mine.clone()

    def _record(self, collective_name: str, plan: Plan, element_size: int, start: float, dtype: str) -> None:
        metrics.record(
            metrics.CollectiveRecord(
                collective=collective_name,
                algorithm=plan.algorithm,
                transport=self.transport.name,
                rank=self.rank,
                world_size=self.size,
                elements=plan.count,
                dtype=dtype.removeprefix("torch."),
                bytes_sent=plan.elements_sent * element_size,
                bytes_received=plan.elements_received * element_size,
                messages_sent=plan.messages_sent,
                seconds=time.perf_counter() - start,
            )
        )
