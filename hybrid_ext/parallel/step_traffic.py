"""What one rank sends in one training step, per layer and per gradient bucket: the collectives a plan runs.

Notation: P ranks in the world, m = ``mp_size`` ranks per model-parallel group, d = P/m replicas of each FC
shard; rank r is rank q = r mod m of its model-parallel group and rank r div m of its data-parallel group
(:mod:`hybrid_ext.parallel.dims`). b samples per rank (dp, hybrid); under ``mp`` every rank passes the global
batch B = P·b. A layer's input holds I elements per sample, its output O = M·F (F features, M positions such as
a sequence); s bytes per element. A Linear split over the group gives rank t the features f_t of
:func:`~hybrid_ext.parallel.mappings.shard_sizes` (F split into m shards differing by at most one); c_t rows are
rank t's samples (hybrid: c_t = b).

Per layer (:mod:`hybrid_ext.parallel.layers`, :mod:`hybrid_ext.parallel.mappings`), hybrid:

======================  ============================================  ===============================================
style                   forward                                       backward
======================  ============================================  ===============================================
column                  row counts (all-gather of m int64);           reduce-scatter of blocks c_t·I (if the input
                        all-gather of blocks c_t·I                    needs a gradient)
column_last             as column, then all-to-all: to each t ≠ q     as column, and the transposed all-to-all:
                        c_t·M·f_q elements                            to each t ≠ q c_q·M·f_t elements
row                     reduce-scatter of blocks c_t·O                all-gather of blocks c_t·O
channel                 as column_last, with a Conv2d's output        as column_last
                        channels k_t for features, its H·W for M
======================  ============================================  ===============================================

Under ``mp``: column sends an all-reduce of B·I in backward (if its input needs a gradient); column_last adds an
all-gather of blocks f_t·B·M in forward; row an all-reduce of B·O in forward; channel (a Conv2d split by output
channels k_t, output C×H×W) an all-reduce of B·I in backward (if its input needs a gradient) and an all-gather of
blocks k_t·B·H·W in forward.

Gradients (dp and hybrid; none under mp): replicated parameters are averaged over all P ranks, FC shards summed
over the d ranks holding the same shard (a row layer's bias is replicated), in buckets of about
``bucket_bytes`` built as :mod:`hybrid_ext.parallel.reducer` builds them, one all-reduce each.

Bytes per collective are the schedule's own (:mod:`hybrid_ext.comm.schedule`, :mod:`hybrid_ext.comm.hierarchy`:
``elements_sent`` × s for this rank), for the schedule the communicator runs with the online tuner off
(``HYBRID_EXT_TUNE=off``; the tuner may pick another schedule, with other bytes): all-gathers recursive doubling
and reduce-scatters recursive halving — on a group spanning hosts with equal rank counts, from 64 KiB, the
hierarchical ones that send each block out of its host once; an all-reduce the one
:func:`hybrid_ext.comm.cost_model.resolve` picks for its size and the transport — on a group spanning hosts, from
64 KiB, the hierarchical all-reduce with the schedule between hosts the model picks for n/L bytes over H hosts
(L: the most ranks on one host). A native all-reduce is counted as :mod:`hybrid_ext.comm.metrics` counts it, as a
ring: 2(P−1)/P · n bytes. Bytes to ranks on other hosts are also counted apart (``network_bytes``).

Messages travel in the tensors' own dtype (no ``wire_dtype`` compression).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property

from torch import nn

from hybrid_ext.comm import choose, cost_model
from hybrid_ext.comm.hierarchy import (
    hierarchical_traffic,
    plan_hierarchical_allgather,
    plan_hierarchical_reduce_scatter,
)
from hybrid_ext.comm.schedule import Plan, plan_allgather, plan_allreduce, plan_reduce_scatter
from hybrid_ext.comm.topology import Topology
from hybrid_ext.parallel.layer_profile import LayerTable
from hybrid_ext.parallel.mappings import shard_sizes
from hybrid_ext.parallel.reducer import GRAD_ALGORITHMS

SHARDED_LINEAR = ("column", "column_last", "row")
COUNT_ITEMSIZE = 8  # the row counts travel as int64


@dataclass(frozen=True)
class Links:
    """What the ranks' groups run on.

    ``transport``: the name of a group's transport on one host (``shm`` between processes of one host), whose
    cost-model constants price its messages; ``hosts``: the host of every world rank (None: all on one host);
    ``network``: the transport between hosts (``torch-gloo``): a group spanning hosts runs on ``shm+<network>``,
    its messages to other hosts priced by the network's constants; ``native``: the name of the groups' own
    allreduce, where they have one."""

    transport: str = "shm"
    native: str | None = None
    hosts: tuple[int, ...] | None = None
    network: str = "torch-gloo"

    @cached_property
    def ranks_per_link(self) -> int:
        """The most ranks on one host: they send at once in a step's collectives, over their host's one link."""
        if self.hosts is None:
            return 1
        return max(Counter(self.hosts).values())

    def world_group(self, world: int, rank: int) -> GroupLinks:
        """:meth:`group` of every world rank (its hosts numbered once per layout: a planner asks for each of a
        thousand ranks)."""
        return self._links(world, rank, None if self.hosts is None else _world_hosts(tuple(self.hosts), world))

    def group(self, members: list[int], rank: int) -> GroupLinks:
        """The links of the group of world ranks ``members`` (in group order), seen from group rank ``rank``."""
        hosts = None if self.hosts is None else _group_hosts(tuple(self.hosts), tuple(members))
        return self._links(len(members), rank, hosts)

    def _links(self, size: int, rank: int, hosts: tuple[int, ...] | None) -> GroupLinks:
        transport = self.transport if hosts is None else f"{self.transport}+{self.network}"
        return GroupLinks(size, rank, hosts, transport, self.transport, self.network, self.native)


@functools.lru_cache(maxsize=16)
def _world_hosts(hosts: tuple[int, ...], world: int) -> tuple[int, ...] | None:
    return _group_hosts(hosts, tuple(range(world)))


@functools.lru_cache(maxsize=256)
def _group_hosts(hosts: tuple[int, ...], members: tuple[int, ...]) -> tuple[int, ...] | None:
    """The hosts of a group's ranks, numbered in order of first appearance; None for a group inside one host (it
    runs on that host's transport)."""
    numbering: dict[int, int] = {}
    numbered = tuple(numbering.setdefault(hosts[m], len(numbering)) for m in members)
    return None if len(numbering) == 1 else numbered


@dataclass(frozen=True)
class GroupLinks:
    """One group as one rank sees it: its size, this rank's place, its ranks' hosts (None: one host)."""

    size: int
    rank: int
    hosts: tuple[int, ...] | None
    transport: str  # the group's transport name (what ``auto`` resolves against)
    local: str  # the transport inside a host
    network: str  # the transport between hosts
    native: str | None = None

    def remote(self, peer: int | None) -> bool:
        return peer is not None and self.hosts is not None and self.hosts[peer] != self.hosts[self.rank]


@dataclass(frozen=True)
class Transfer:
    """One collective as one rank takes part in it."""

    name: str  # the layer's path, or the gradient bucket's name (``replicated.bucket0``)
    phase: str  # "forward", "backward" or "gradients"
    collective: str  # "allgather", "reduce_scatter", "allreduce", "all_to_all", "counts"
    algorithm: str
    group_size: int
    elements: int  # the whole collective's elements (as a metrics record counts them)
    bytes_sent: int  # by this rank
    messages: int  # sent by this rank
    bytes_reduced: int  # received and reduced by this rank
    recorded: bool  # whether hybrid_ext.metrics records it (row counts and all-to-alls are not recorded)
    layers: tuple[str, ...] = ()  # a gradient bucket's layers
    network_bytes: int = 0  # of bytes_sent, to ranks on other hosts
    network_messages: int = 0  # of messages, to ranks on other hosts
    local: str = "shm"  # the transports its messages take (their cost-model constants)
    network: str = "torch-gloo"
    # Bytes this rank copies in memory around the collective (the mappings' re-layouts: a gather along channels
    # moved to and from the front, a clone before an in-place all-reduce); priced by the table's copy rate.
    copied_bytes: int = 0


def _from_plan(
    name, phase, collective, plan: Plan, itemsize: int, group: GroupLinks, recorded: bool = True, layers=()
) -> Transfer:
    reduced = sum(s.recv_count for s in plan.steps if s.reduce)
    remote = [s for s in plan.steps if s.send is not None and group.remote(s.send_to)]
    return Transfer(
        name,
        phase,
        collective,
        plan.algorithm,
        plan.world_size,
        plan.count,
        plan.elements_sent * itemsize,
        plan.messages_sent,
        reduced * itemsize,
        recorded,
        layers,
        sum(s.send_count for s in remote) * itemsize,
        len(remote),
        group.local,
        group.network,
    )


def _topology(group: GroupLinks) -> Topology:
    """The group as the communicator sees it (:class:`~hybrid_ext.comm.topology.Topology`): its choices are ours."""
    if group.hosts is None:
        return Topology(group.size, group.transport, None, None, group.transport)
    return Topology(group.size, group.transport, group.hosts, group.local, group.network)


def _allreduce_schedule(algorithm: str, nbytes: int, group: GroupLinks, memo: dict | None = None) -> str:
    """The schedule the communicator runs for a request of ``algorithm`` with the tuner off (or ``native``);
    ``memo``: choices already made in this prediction (the same for every rank of a group)."""
    if algorithm == cost_model.NATIVE:
        return algorithm
    topology = _topology(group)
    key = ("allreduce", algorithm, nbytes, topology, group.native)
    if memo is not None and key in memo:
        return memo[key]
    chosen = choose.allreduce(algorithm, nbytes, topology, native=group.native, tune=False)
    if memo is not None:
        memo[key] = chosen
    return chosen


def allreduce_transfer(
    name: str, phase: str, algorithm: str, count: int, itemsize: int, group: GroupLinks, layers=(), memo=None
) -> Transfer | None:
    """The all-reduce of ``count`` elements that runs for a request of ``algorithm`` (None on a group of one)."""
    size, rank = group.size, group.rank
    if size == 1:
        return None  # the communicator returns before sending or recording anything
    chosen = _allreduce_schedule(algorithm, count * itemsize, group, memo)
    if chosen == cost_model.NATIVE:
        moved = int(2 * (size - 1) / size * count * itemsize)
        return Transfer(name, phase, "allreduce", "native", size, count, moved, 2 * (size - 1), moved // 2, True,
                        layers, 0, 0, group.local, group.network)  # fmt: skip
    if chosen.startswith(cost_model.HIERARCHICAL_PREFIX):
        inter = chosen.removeprefix(cost_model.HIERARCHICAL_PREFIX)
        sums = hierarchical_traffic(inter, rank, group.hosts, count)  # plan_hierarchical's, without its steps
        return Transfer(name, phase, "allreduce", chosen, size, count, sums.elements_sent * itemsize, sums.messages,
                        sums.elements_reduced * itemsize, True, layers, sums.remote_elements * itemsize,
                        sums.remote_messages, group.local, group.network)  # fmt: skip
    plan = plan_allreduce(chosen, rank, size, count)
    return _from_plan(name, phase, "allreduce", plan, itemsize, group, True, layers)


def _block_plan(gather: bool, blocks: tuple[int, ...], itemsize: int, group: GroupLinks) -> Plan:
    """``auto``'s all-gather / reduce-scatter (:func:`hybrid_ext.comm.choose.block_schedule`)."""
    chosen = choose.block_schedule(gather, "auto", sum(blocks) * itemsize, _topology(group))
    if chosen == choose.HIERARCHICAL:
        layered = plan_hierarchical_allgather if gather else plan_hierarchical_reduce_scatter
        return layered(group.rank, group.hosts, blocks)
    return (plan_allgather if gather else plan_reduce_scatter)(chosen, group.rank, blocks)


def allgather_transfer(name: str, phase: str, blocks: tuple[int, ...], itemsize: int, group: GroupLinks) -> Transfer:
    return _from_plan(name, phase, "allgather", _block_plan(True, blocks, itemsize, group), itemsize, group)


def reduce_scatter_transfer(
    name: str, phase: str, blocks: tuple[int, ...], itemsize: int, group: GroupLinks
) -> Transfer:
    return _from_plan(name, phase, "reduce_scatter", _block_plan(False, blocks, itemsize, group), itemsize, group)


def _row_counts(name: str, group: GroupLinks) -> Transfer:
    plan = plan_allgather("recursive_doubling", group.rank, (1,) * group.size)
    return _from_plan(name, "forward", "counts", plan, COUNT_ITEMSIZE, group, recorded=False)


def _all_to_all(name: str, phase: str, sent: list[int], itemsize: int, group: GroupLinks) -> Transfer:
    """``sent[t]``: elements this rank sends to rank t (its own block stays; empty blocks are not sent)."""
    others = [(t, n) for t, n in enumerate(sent) if t != group.rank and n]
    remote = [n for t, n in others if group.remote(t)]
    return Transfer(name, phase, "all_to_all", "pairwise", len(sent), sum(sent), sum(n for _, n in others) * itemsize,
                    len(others), 0, False, (), sum(remote) * itemsize, len(remote), group.local,
                    group.network)  # fmt: skip


def layer_transfers(
    path: str, style: str, table: LayerTable, strategy: str, group: GroupLinks, rows: int
) -> list[Transfer]:
    """The activation traffic of one sharded layer over its model-parallel ``group`` (see the module docstring);
    ``rows``: samples per rank."""
    if style == "dp" or group.size == 1:
        return []
    record = table.layers[path]
    m, q, s = group.size, group.rank, record.itemsize
    per_input = math.prod(record.input_shape)
    per_output = math.prod(record.output_shape)
    positions = math.prod(record.output_shape[:-1])
    out: list[Transfer | None] = []
    if strategy == "hybrid":
        counts = (rows,) * m
        if style in ("column", "column_last", "channel"):
            out.append(_row_counts(path, group))
            out.append(allgather_transfer(path, "forward", tuple(c * per_input for c in counts), s, group))
            if record.input_requires_grad:
                out.append(reduce_scatter_transfer(path, "backward", tuple(c * per_input for c in counts), s, group))
        if style in ("column_last", "channel"):
            if style == "column_last":
                features = shard_sizes(record.output_shape[-1], m)
            else:  # a convolution's channels, each with its output map
                features, positions = shard_sizes(record.output_shape[0], m), math.prod(record.output_shape[1:])
            # forward: the received blocks concatenated along features (my rows, all features); backward: the
            # gradient's feature blocks made contiguous, then the received rows concatenated
            whole, mine = rows * positions * sum(features) * s, m * rows * positions * features[q] * s
            forward = _all_to_all(path, "forward", [c * positions * features[q] for c in counts], s, group)
            backward = _all_to_all(path, "backward", [counts[q] * positions * f for f in features], s, group)
            out += [replace(forward, copied_bytes=whole), replace(backward, copied_bytes=whole + mine)]
        if style == "row":
            blocks = tuple(c * per_output for c in counts)
            out.append(reduce_scatter_transfer(path, "forward", blocks, s, group))
            out.append(allgather_transfer(path, "backward", blocks, s, group))
    elif strategy == "mp":
        if style in ("column", "column_last", "channel") and record.input_requires_grad:
            # the input's gradient is cloned before it is reduced in place
            reduced = allreduce_transfer(path, "backward", "auto", rows * per_input, s, group)
            out.append(reduced and replace(reduced, copied_bytes=rows * per_input * s))
        if style in ("column_last", "channel"):
            # gather along features / channels: my shard moved to the front, the whole output moved back, and in
            # backward my slice of the gradient made contiguous
            if style == "column_last":
                shards, per_unit = shard_sizes(record.output_shape[-1], m), rows * positions
            else:
                shards, per_unit = shard_sizes(record.output_shape[0], m), rows * math.prod(record.output_shape[1:])
            gathered = allgather_transfer(path, "forward", tuple(k * per_unit for k in shards), s, group)
            copied = (2 * shards[q] + sum(shards)) * per_unit * s
            out.append(gathered and replace(gathered, copied_bytes=copied))
        if style == "row":
            reduced = allreduce_transfer(path, "forward", "auto", rows * per_output, s, group)
            out.append(reduced and replace(reduced, copied_bytes=rows * per_output * s))
    else:
        raise ValueError(f"layer {path!r} is {style!r} under strategy {strategy!r}: only hybrid and mp shard layers")
    return [t for t in out if t is not None]


@dataclass(frozen=True)
class _Param:
    layer: str
    numel: int
    itemsize: int
    dtype: str
    device: str
    sharded: bool


def parameters_after_wrap(model: nn.Module, styles: dict[str, str], mp_size: int, mp_rank: int) -> list[_Param]:
    """Every trainable parameter as this rank holds it after ``parallelize``, in the wrapped model's order."""
    params, seen = [], set()
    for path, module in model.named_modules():
        style = styles.get(path, "dp")
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            numel, sharded = p.numel(), False
            if style in ("column", "column_last", "channel") or (style == "row" and name == "weight"):
                split_dim = 1 if style == "row" else 0  # a row layer's inputs; output features or channels
                sizes = shard_sizes(p.shape[split_dim], mp_size)
                numel, sharded = numel // p.shape[split_dim] * sizes[mp_rank], True
            params.append(_Param(path, numel, p.element_size(), str(p.dtype), str(p.device), sharded))
    return params


def _buckets(params: list[_Param], bucket_bytes: int) -> list[list[_Param]]:
    """Runs of about ``bucket_bytes`` of one dtype and device, as the reducer cuts them (reversed order)."""
    buckets: list[list[_Param]] = []
    current: list[_Param] = []
    size = 0
    for param in reversed(params):
        if current and (param.dtype, param.device) != (current[0].dtype, current[0].device):
            buckets.append(current)
            current, size = [], 0
        current.append(param)
        size += param.numel * param.itemsize
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def gradient_transfers(
    model: nn.Module,
    styles: dict[str, str],
    strategy: str,
    world: int,
    mp_size: int,
    rank: int,
    grad_algorithm: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links | None = None,
    held: list[_Param] | None = None,
    memo: dict | None = None,
) -> list[Transfer]:
    """The gradient all-reduces of one step, in the order the reducer launches them (see the module docstring);
    ``held``: :func:`parameters_after_wrap` for this rank, where the caller has it; ``memo``: see
    :func:`step_transfers`."""
    links = links or Links()
    if grad_algorithm not in GRAD_ALGORITHMS:
        raise ValueError(f"unknown reducer {grad_algorithm!r}; choose one of {', '.join(GRAD_ALGORITHMS)}")
    if strategy == "mp":
        return []  # every rank computes the same loss: nothing to combine
    m = mp_size if strategy == "hybrid" else 1
    params = (
        held if held is not None else parameters_after_wrap(model, styles if strategy == "hybrid" else {}, m, rank % m)
    )
    algorithm = "butterfly" if grad_algorithm in ("butterfly", "auto") else grad_algorithm
    groups = {"replicated": links.world_group(world, rank)}
    if strategy == "hybrid":
        replicas = list(range(rank % m, world, m))  # the ranks holding this rank's shards (dims.dp_group_of)
        groups["fc-shards"] = links.group(replicas, rank // m)
    out = []
    for index, (name, count, itemsize, layers) in enumerate(_launch_order(params, strategy, bucket_bytes, memo)):
        transfer = allreduce_transfer(
            f"{name}.bucket{index}", "gradients", algorithm, count, itemsize, groups[name], layers, memo
        )
        if transfer is not None:
            out.append(transfer)
    return out


def _launch_order(params: list[_Param], strategy: str, bucket_bytes: int, memo: dict | None) -> list[tuple]:
    """The buckets of ``params`` as the reducer launches them: (its group, elements, element size, layers); the
    same for every rank holding the same list (a memo keeps it, and the list with it: its id stays its own)."""
    key = ("launch order", id(params), strategy, bucket_bytes)
    if memo is not None and key in memo and memo[key][0] is params:
        return memo[key][1]
    position = {id(p): i for i, p in enumerate(params)}
    members = {"replicated": [p for p in params if not p.sharded]}
    if strategy == "hybrid":
        members["fc-shards"] = [p for p in params if p.sharded]
    pending = [(name, bucket) for name, group in members.items() for bucket in _buckets(group, bucket_bytes)]
    pending.sort(key=lambda item: -max(position[id(p)] for p in item[1]))  # the reducer's launch order
    order = [
        (name, sum(p.numel for p in bucket), bucket[0].itemsize, tuple(dict.fromkeys(p.layer for p in bucket)))
        for name, bucket in pending
    ]
    if memo is not None:
        memo[key] = (params, order)
    return order


def reducer_bytes(held: list[_Param], strategy: str, world: int, mp_size: int) -> tuple[int, int]:
    """Bytes of gradient a rank's reducer handles in a step, ``held`` its parameters (:func:`parameters_after_wrap`):
    (through its buckets — copied in during backward, added back into ``.grad`` after —, only scaled as they arrive).
    Under dp and hybrid on more than one rank every parameter a rank holds is bucketed, except hybrid's FC shards
    where no other rank holds them (mp_size = world): those are only scaled by 1/world. Under mp: nothing.
    (``parallelize``'s own reducer: where a host framework reduces the data-parallel gradients itself, DeepSpeed's
    path, or ``blocking_reduction``, the step model does not model the gradients.)"""
    if strategy == "mp" or world == 1:
        return 0, 0
    unshared = [p for p in held if p.sharded and mp_size == world]
    total = sum(p.numel * p.itemsize for p in held)
    scaled = sum(p.numel * p.itemsize for p in unshared)
    return total - scaled, scaled


def step_transfers(
    model: nn.Module,
    table: LayerTable,
    styles: dict[str, str],
    strategy: str,
    world: int,
    mp_size: int,
    rank: int,
    micro_batch: int,
    grad_algorithm: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links | None = None,
    held: list[_Param] | None = None,
    memo: dict | None = None,
) -> list[Transfer]:
    """Everything rank ``rank`` sends in one step: forward (layer order), backward (reverse), gradient buckets.

    ``styles``: the plan's layer path → style (``plan_by_rules(model, strategy).styles``); ``table``: the layers'
    shapes (:func:`~hybrid_ext.parallel.layer_profile.layer_shapes`); ``micro_batch``: b, samples per rank;
    ``held``: :func:`parameters_after_wrap` for this rank, where the caller has it; ``memo``: a dict the caller
    keeps while it asks for many ranks of one plan, with the same ``model``, ``table``, ``links`` and environment:
    what is the same for every rank of a group (the schedule chosen for a size, a layer's traffic at one place in
    its group) is worked out once (a thousand ranks are planned rank by rank)."""
    links = links or Links()
    if links.hosts is not None and len(links.hosts) != world:
        raise ValueError(f"links.hosts names the hosts of {len(links.hosts)} ranks, not of the world's {world}")
    if world < 1 or mp_size < 1 or world % mp_size:
        raise ValueError(f"mp_size={mp_size} does not divide the world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    m = mp_size if strategy in ("hybrid", "mp") else 1
    rows = world * micro_batch if strategy == "mp" else micro_batch
    first = rank // m * m
    mp_group = links.group(list(range(first, first + m)), rank % m)  # dims.mp_group_of
    per_layer = []
    for path in table.layers:
        style = styles.get(path, "dp")
        if style == "dp":
            continue
        key = ("layer", path, style, strategy, mp_group, rows)
        found = memo.get(key) if memo is not None else None
        if found is None:
            found = layer_transfers(path, style, table, strategy, mp_group, rows)
            if memo is not None:
                memo[key] = found
        per_layer += found
    forward = [t for t in per_layer if t.phase == "forward"]
    backward = [t for t in reversed(per_layer) if t.phase == "backward"]
    gradients = gradient_transfers(
        model, styles, strategy, world, mp_size, rank, grad_algorithm, bucket_bytes, links, held, memo
    )
    return forward + backward + gradients
