"""A group's communicator: its transport, its issue order and its buffers, and the collectives run over them.

Semantics: ops ``sum``, ``avg``, ``min``, ``max``; dtypes float32/float64/float16/bfloat16 and int32/int64 (ints:
sum, min, max). 16-bit inputs are reduced in a float32 working buffer (partial sums travel as float32, so they
are exact to float32; the result is rounded once at the end). Every rank ends with bitwise-identical results:
each element's final value is computed on one rank and copied (see :mod:`hybrid_ext.comm.schedule`), and
``avg`` divides identical sums. Memory: a contiguous tensor of the reduction dtype is reduced in place;
otherwise one working buffer holds the flat vector (kept for the next call, as DDP keeps its buckets: the
largest so far); plus one receive buffer of at most the largest reducing step, reused across calls.

Where the group has an allreduce of its own (``native``: gloo's, NCCL's, Horovod's; see
:class:`~hybrid_ext.comm.transport.NativeCollectives`), ``auto`` counts it among its candidates, so it never runs
slower than the backend alone; it reduces the same working buffer (16-bit inputs in float32, ``avg`` as a sum
divided here), and is left out where the caller asked for a narrower wire dtype than the input's.

The ``*_now`` methods run on the group's ordered thread: call them through :meth:`Communicator.run` /
:meth:`Communicator.submit` (the public functions in :mod:`hybrid_ext.comm.api` do).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybrid_ext import config
from hybrid_ext.comm import consistency, cost_model, metrics
from hybrid_ext.comm.buffers import ScratchPool
from hybrid_ext.comm.cost_model import HIERARCHICAL_PREFIX, NATIVE
from hybrid_ext.comm.executor import OPS, WIDENED, WireStaging, execute, wire_dtype_for
from hybrid_ext.comm.hierarchy import (
    equal_hosts,
    plan_hierarchical,
    plan_hierarchical_allgather,
    plan_hierarchical_reduce_scatter,
    plan_hierarchical_segments,
)
from hybrid_ext.comm.ordering import Handle, IssueOrder
from hybrid_ext.comm.pipelined import NetworkStages, execute_segments, segment_count
from hybrid_ext.comm.schedule import (
    ALGORITHMS,
    GATHER_ALGORITHMS,
    SCATTER_ALGORITHMS,
    Plan,
    block_bounds,
    plan_allgather,
    plan_allreduce,
    plan_reduce_scatter,
)
from hybrid_ext.comm.shm_allreduce import DIRECT, SUPPORTED_DTYPES, DirectAllreduce
from hybrid_ext.comm.streams import HostOrder, stream_order_for
from hybrid_ext.comm.transport import NativeCollectives, Transport
from hybrid_ext.comm.tuner import TUNE_ENV, Tuner, tune_mode

# The all-gather / reduce-scatter names a caller may pass: the flat plans' own, and the two resolved here.
GATHER_CHOICES = ("auto", "hierarchical", *GATHER_ALGORITHMS)
SCATTER_CHOICES = ("auto", "hierarchical", *SCATTER_ALGORITHMS)
# Below this, a group that spans hosts runs the flat schedules: latency-bound messages gain nothing from staging
# through shared memory first (recursive doubling already crosses hosts in its later, fewer steps).
HIERARCHY_MIN_BYTES = 64 << 10
# The tuner tries only candidates the cost model puts within this factor of its best: the model misjudges close
# calls (what trials settle), not a ring's 2(P-1) messages for 1 KiB or recursive doubling's log2 P copies of 1 GiB.
TRIAL_WITHIN = 2.5
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
        native = native if native is not None else getattr(transport, "native", None)
        self.native: NativeCollectives | None = native if cost_model.native_enabled() else None
        # The one-host allreduce in one pass over shared memory, where the transport is shared memory alone.
        self.direct: DirectAllreduce | None = getattr(transport, "direct", None)
        self.rank, self.size = transport.rank, transport.size
        self.device = torch.device(device)
        self.streams = stream_order_for(self.device)
        self._order = IssueOrder()
        self._scratch = ScratchPool()
        self._checked = 0  # collectives fingerprinted so far: their sequence number in this group
        self._tuner: Tuner | None = None  # made on the first tuned call (see _allreduce_plan)
        self._decided: dict[tuple, str] = {}  # tuned choices already made, by call (see _allreduce_choice)
        self._network_stages = NetworkStages()  # the helper thread of segmented hierarchical allreduces

    def __deepcopy__(self, memo: dict) -> Communicator:
        return self  # a deep copy of a model (an EMA's) talks over the same group

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a hybrid-ext communicator (rank {self.rank} of {self.size}) holds live connections and cannot be "
            "pickled: save the model's state_dict(), not the model object"
        )

    def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in issue order, blocking (see :mod:`hybrid_ext.comm.ordering`)."""
        if isinstance(self.streams, HostOrder):  # no streams to order: the job, without grad
            return self._order.run(lambda: _without_grad(job))
        wrapped, done = self._on_stream(job)
        result = self._order.run(wrapped)
        self.streams.consume(done[0])
        return result

    def submit(self, job: Callable[[], Any]) -> Handle:
        """Queue ``job`` behind every collective issued before it; return its handle."""
        wrapped, done = self._on_stream(job)
        return self._order.submit(wrapped, self.streams, done)

    def _on_stream(self, job: Callable[[], Any]) -> tuple[Callable[[], Any], list]:
        """``job`` run after the caller's queued work, on the collective's stream (:mod:`~hybrid_ext.comm.streams`)."""
        ready = self.streams.capture()  # on the caller's thread, now
        done: list = [None]

        def ordered() -> Any:
            # no_grad: reducing a tensor that requires grad in place is fine here (as with dist.all_reduce), and
            # grad mode is per thread: the worker thread's would be on.
            with torch.no_grad(), self.streams.run_after(ready) as end:
                result = job()
            done[0] = end[0]
            return result

        return ordered, done

    def scratch(self, elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._scratch.get(elements, dtype, device)

    # ---------------------------------------------------------------- collectives (run on the ordered thread)
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

    def allreduce_now(
        self,
        tensors: Sequence[torch.Tensor],
        op: str,
        algorithm: str,
        wire_dtype: torch.dtype | str | None = None,
        name: str | None = None,
        prescale: float | None = None,
        postscale: float | None = None,
    ) -> None:
        """Reduce ``tensors`` in place as one flat vector (call through :meth:`run` / :meth:`submit`).

        ``wire_dtype``: the dtype messages travel in (see :func:`~hybrid_ext.comm.executor.wire_dtype_for`);
        ``name``: the caller's name for this collective, compared across ranks in check mode. ``prescale`` /
        ``postscale``: factors each element of the flat vector is multiplied by before / after the reduction
        (integrations that must keep a host framework's arithmetic, such as DeepSpeed's gradient scaling).

        Several tensors are gathered into one working buffer and copied back; where the allreduce runs in
        segments (:mod:`~hybrid_ext.comm.pipelined`), each segment's copies happen while others are on the wire.
        """
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
            plan = self._plan_named(name, count)
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
        return self._plan_named(name, count), trial_of

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
        """The one-host allreduce on shared memory (:mod:`~hybrid_ext.comm.shm_allreduce`), in the tensors' dtype."""
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
        """(what runs for ``algorithm`` here: a schedule's name or ``native``, the tuner's request name when this
        call is one of its timed trials).

        ``auto`` / ``butterfly`` / ``hierarchical``: chosen by the tuner (:mod:`hybrid_ext.comm.tuner`) among the
        flat schedules, where the group spans hosts the hierarchical ones, and for ``auto`` the group's native
        allreduce (``native_allowed`` and the group has one); with ``HYBRID_EXT_TUNE=off`` by the cost model alone
        (hierarchical from 64 KiB where the group spans hosts).
        """
        # A call like an earlier one whose choice the tuner has made (the common case: a training step's buckets)
        # skips the rest; the knobs that steer the choice are part of the key.
        memo = self._choice_key(algorithm, nbytes, native_allowed, direct_allowed)
        decided = self._decided.get(memo)
        if decided is not None:
            return decided, None
        native = self.native.name if (self.native is not None and native_allowed and count > 0) else None
        direct = direct_allowed and count > 0
        if algorithm == DIRECT:
            if not direct_allowed:
                raise ValueError(
                    f"algorithm='direct' needs the ranks on one host's shared memory, CPU tensors of a supported "
                    f"dtype and no compressed wire dtype (transport {self.transport.name!r})"
                )
            return DIRECT, None
        if algorithm == NATIVE:
            if self.native is None:
                raise ValueError(
                    f"algorithm='native': the group of transport {self.transport.name!r} has no allreduce of its own"
                )
            return NATIVE, None
        hosts = getattr(self.transport, "hosts", None)
        spans_hosts = hosts is not None and len(set(hosts)) > 1
        if algorithm.startswith(HIERARCHICAL_PREFIX):  # named: the caller's schedule between hosts
            return (algorithm if spans_hosts else algorithm.removeprefix(HIERARCHICAL_PREFIX)), None
        if algorithm == "hierarchical" and not spans_hosts:
            algorithm = "auto"  # one host: the flat schedules are the hierarchy
        if self._tuned(algorithm):
            if self._tuner is None:
                layout = ",".join(map(str, hosts)) if spans_hosts else "one-host"
                signature = f"{self.transport.name}|{self.device.type}|P{self.size}|hosts {layout}"
                if self.native is not None:  # saved choices made without the native candidate are not reused
                    signature += f"|native {self.native.name}"
                if self.direct is not None:  # nor those made without the direct one
                    signature += "|direct"
                self._tuner = Tuner(signature, self._max_over_ranks)
            candidates = self._candidates(algorithm, spans_hosts, native is not None, direct)
            # Calls that may not run native or direct (a compressed wire, scaled 16-bit values) are tuned apart:
            # their candidates differ.
            narrowed = (self.native is not None and native is None) or (self.direct is not None and not direct)
            request = f"{algorithm}|schedules" if narrowed else algorithm

            def plausible() -> list[bool]:  # asked on a size class's first call only, not on every call
                predicted = [self._predicted(name, nbytes) for name in candidates if name not in (NATIVE, DIRECT)]
                # The backend's own algorithm and the direct one are outside the model: they are always tried.
                return [
                    name in (NATIVE, DIRECT) or self._predicted(name, nbytes) <= TRIAL_WITHIN * min(predicted)
                    for name in candidates
                ]

            name, trial = self._tuner.pick(request, nbytes, candidates, plausible)
            if not trial:
                if len(self._decided) >= DECIDED_MEMO_SIZE:
                    self._decided.clear()
                self._decided[memo] = name
            return name, (request if trial else None)
        if spans_hosts and (
            algorithm == "hierarchical"
            or (algorithm in ("auto", "butterfly") and nbytes >= HIERARCHY_MIN_BYTES and not cost_model.forced())
        ):
            lanes = max(hosts.count(h) for h in set(hosts))
            network = getattr(getattr(self.transport, "network", None), "name", self.transport.name)
            between = "butterfly" if algorithm == "butterfly" else "auto"
            inter = cost_model.resolve(between, nbytes // lanes, len(set(hosts)), network)
            return f"{HIERARCHICAL_PREFIX}{inter}", None
        return cost_model.resolve(algorithm, nbytes, self.size, self.transport.name, native=native), None

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
            return self._tuned(algorithm)
        return self._tuner.tuning(algorithm, nbytes)

    @staticmethod
    def _tuned(algorithm: str) -> bool:
        """Whether the tuner picks the schedule for a request of ``algorithm``."""
        return algorithm in ("auto", "butterfly", "hierarchical") and not cost_model.forced() and tune_mode() != "off"

    @staticmethod
    def _candidates(algorithm: str, spans_hosts: bool, native: bool = False, direct: bool = False) -> tuple[str, ...]:
        """What the tuner tries for a request: flat schedules, hierarchical ones across hosts, and for ``auto`` the
        group's native allreduce and the one-host direct one where they may run."""
        if config.get(cost_model.ALGO_ENV) == "butterfly":
            algorithm = "butterfly" if algorithm == "auto" else algorithm
        flat = cost_model.BUTTERFLIES if algorithm == "butterfly" else ALGORITHMS
        stacked = tuple(f"{HIERARCHICAL_PREFIX}{name}" for name in flat) if spans_hosts else ()
        if algorithm == "hierarchical":
            return stacked
        extra = ((DIRECT,) if direct else ()) + ((NATIVE,) if native else ())
        return flat + stacked + (extra if algorithm == "auto" else ())

    def _predicted(self, name: str, nbytes: int) -> float:
        """The cost model's seconds for a candidate (flat: as if every link were the group's slowest)."""
        network = getattr(getattr(self.transport, "network", None), "name", self.transport.name)
        if not name.startswith(HIERARCHICAL_PREFIX):
            return cost_model.default_model(self.transport.name).predict(name, nbytes, self.size)
        hosts = self.transport.hosts
        lanes = max(hosts.count(h) for h in set(hosts))
        local = getattr(getattr(self.transport, "local", None), "name", "shm")
        within = cost_model.default_model(local).predict("ring", nbytes, lanes)  # reduce-scatter + all-gather
        between = cost_model.default_model(network).predict(
            name.removeprefix(HIERARCHICAL_PREFIX), nbytes // lanes, len(set(hosts))
        )
        return within + between

    def _plan_named(self, name: str, count: int) -> Plan:
        if name.startswith(HIERARCHICAL_PREFIX):
            hosts = tuple(self.transport.hosts)
            return plan_hierarchical(name.removeprefix(HIERARCHICAL_PREFIX), self.rank, hosts, count)
        return plan_allreduce(name, self.rank, self.size, count)

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise maximum of ``values`` over the group (the tuner's one small agreement message)."""
        table = torch.tensor(values, dtype=torch.float64, device=self.device)
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
        if getattr(self.transport, "local", None) is None or buffer.device.type != "cpu":
            return None
        hosts = tuple(self.transport.hosts)
        lanes = max(hosts.count(h) for h in set(hosts))
        count = segment_count(plan.count * buffer.element_size(), lanes, len(set(hosts)))
        if count < 2:
            return None
        inter = plan.algorithm.removeprefix(HIERARCHICAL_PREFIX)
        return plan_hierarchical_segments(inter, self.rank, hosts, plan.count, count)

    def _block_plan(self, collective: str, algorithm: str, blocks: tuple[int, ...], element_size: int) -> Plan:
        """The all-gather / reduce-scatter plan for ``algorithm``: ``auto`` (and ``hierarchical``) send each
        block out of its host once on a group of equal hosts — from 64 KiB, where bytes matter more than the
        extra message — and run the flat butterfly otherwise."""
        gather = collective == "allgather"
        if algorithm in ("auto", "hierarchical"):
            hosts = getattr(self.transport, "hosts", None)
            large = algorithm == "hierarchical" or sum(blocks) * element_size >= HIERARCHY_MIN_BYTES
            if hosts is not None and equal_hosts(hosts) and large:
                layered = plan_hierarchical_allgather if gather else plan_hierarchical_reduce_scatter
                return layered(self.rank, tuple(hosts), blocks)
            algorithm = "recursive_doubling" if gather else "recursive_halving"
        return (plan_allgather if gather else plan_reduce_scatter)(algorithm, self.rank, blocks)

    def block_counts(self, rows: int, device: torch.device) -> tuple[int, ...]:
        """Every rank's number of rows (one small all-gather of integers)."""
        table = torch.zeros(self.size, dtype=torch.int64, device=device)
        table[self.rank] = rows
        plan = plan_allgather("recursive_doubling", self.rank, (1,) * self.size)
        execute(plan, table, table[:0], self.transport, "sum")
        return tuple(int(v) for v in table.tolist())

    def allgather_now(
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
            counts = self.block_counts(tensor.shape[0], tensor.device)
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

    def reduce_scatter_now(
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
