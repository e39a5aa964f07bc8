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
======================  ============================================  ===============================================

Under ``mp``: column sends an all-reduce of B·I in backward (if its input needs a gradient); column_last adds an
all-gather of blocks f_t·B·M in forward; row an all-reduce of B·O in forward; channel (a Conv2d split by output
channels k_t, output C×H×W) an all-reduce of B·I in backward (if its input needs a gradient) and an all-gather of
blocks k_t·B·H·W in forward.

Gradients (dp and hybrid; none under mp): replicated parameters are averaged over all P ranks, FC shards summed
over the d ranks holding the same shard (a row layer's bias is replicated), in buckets of about
``bucket_bytes`` built as :mod:`hybrid_ext.parallel.reducer` builds them, one all-reduce each.

Bytes per collective are the schedule's own (:mod:`hybrid_ext.comm.schedule`: ``elements_sent`` × s for this
rank), for the schedule the communicator runs: all-gathers recursive doubling, reduce-scatters recursive halving,
an all-reduce the one :func:`hybrid_ext.comm.cost_model.resolve` picks for its size and the transport (what runs
with the online tuner off, ``HYBRID_EXT_TUNE=off``; the tuner may pick another schedule, with other bytes). A
native all-reduce is counted as :mod:`hybrid_ext.comm.metrics` counts it, as a ring: 2(P−1)/P · n bytes.

Scope: the flat schedules of a group on one host (a group spanning hosts runs hierarchical schedules, not
modelled here yet), messages in the tensors' own dtype (no ``wire_dtype`` compression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from hybrid_ext.comm import cost_model
from hybrid_ext.comm.schedule import Plan, plan_allgather, plan_allreduce, plan_reduce_scatter
from hybrid_ext.parallel.layer_profile import LayerTable
from hybrid_ext.parallel.mappings import shard_sizes

SHARDED_LINEAR = ("column", "column_last", "row")
COUNT_ITEMSIZE = 8  # the row counts travel as int64
REDUCERS = ("butterfly", "auto", "rabenseifner", "recursive_doubling", "ring", "native")


@dataclass(frozen=True)
class Links:
    """What the ranks' groups run on: the transport's name (its cost-model constants; ``shm`` between processes
    of one host) and, where the groups have one, the name of their own (native) allreduce."""

    transport: str = "shm"
    native: str | None = None


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


def _from_plan(name, phase, collective, plan: Plan, itemsize: int, recorded: bool = True, layers=()) -> Transfer:
    reduced = sum(s.recv_count for s in plan.steps if s.reduce)
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
    )


def allreduce_transfer(
    name: str, phase: str, algorithm: str, count: int, itemsize: int, rank: int, size: int, links: Links, layers=()
) -> Transfer | None:
    """The all-reduce of ``count`` elements that runs for a request of ``algorithm`` (None on a group of one)."""
    if size == 1:
        return None  # the communicator returns before sending or recording anything
    nbytes = count * itemsize
    native = links.native if count > 0 else None
    chosen = cost_model.NATIVE if algorithm == cost_model.NATIVE else None
    if chosen is None:
        chosen = cost_model.resolve(algorithm, nbytes, size, links.transport, native=native)
    if chosen == cost_model.NATIVE:
        moved = int(2 * (size - 1) / size * nbytes)
        return Transfer(
            name, phase, "allreduce", "native", size, count, moved, 2 * (size - 1), moved // 2, True, layers
        )
    return _from_plan(name, phase, "allreduce", plan_allreduce(chosen, rank, size, count), itemsize, True, layers)


def _allgather(name: str, phase: str, rank: int, blocks: tuple[int, ...], itemsize: int) -> Transfer:
    return _from_plan(name, phase, "allgather", plan_allgather("recursive_doubling", rank, blocks), itemsize)


def _reduce_scatter(name: str, phase: str, rank: int, blocks: tuple[int, ...], itemsize: int) -> Transfer:
    return _from_plan(name, phase, "reduce_scatter", plan_reduce_scatter("recursive_halving", rank, blocks), itemsize)


def _row_counts(name: str, rank: int, size: int) -> Transfer:
    plan = plan_allgather("recursive_doubling", rank, (1,) * size)
    return _from_plan(name, "forward", "counts", plan, COUNT_ITEMSIZE, recorded=False)


def _all_to_all(name: str, phase: str, rank: int, sent: list[int], itemsize: int) -> Transfer:
    """``sent[t]``: elements this rank sends to rank t (its own block stays; empty blocks are not sent)."""
    others = [n for t, n in enumerate(sent) if t != rank and n]
    return Transfer(name, phase, "all_to_all", "pairwise", len(sent), sum(sent), sum(others) * itemsize,
                    len(others), 0, False)  # fmt: skip


def layer_transfers(
    path: str, style: str, table: LayerTable, strategy: str, mp_size: int, mp_rank: int, rows: int, links: Links
) -> list[Transfer]:
    """The activation traffic of one sharded layer (see the module docstring); ``rows``: samples per rank."""
    if style == "dp" or mp_size == 1:
        return []
    record = table.layers[path]
    m, q, s = mp_size, mp_rank, record.itemsize
    per_input = math.prod(record.input_shape)
    per_output = math.prod(record.output_shape)
    positions = math.prod(record.output_shape[:-1])
    out: list[Transfer | None] = []
    if strategy == "hybrid":
        counts = (rows,) * m
        if style in ("column", "column_last"):
            out.append(_row_counts(path, q, m))
            out.append(_allgather(path, "forward", q, tuple(c * per_input for c in counts), s))
            if record.input_requires_grad:
                out.append(_reduce_scatter(path, "backward", q, tuple(c * per_input for c in counts), s))
        if style == "column_last":
            features = shard_sizes(record.output_shape[-1], m)
            out.append(_all_to_all(path, "forward", q, [c * positions * features[q] for c in counts], s))
            out.append(_all_to_all(path, "backward", q, [counts[q] * positions * f for f in features], s))
        if style == "row":
            blocks = tuple(c * per_output for c in counts)
            out.append(_reduce_scatter(path, "forward", q, blocks, s))
            out.append(_allgather(path, "backward", q, blocks, s))
    elif strategy == "mp":
        if style in ("column", "column_last", "channel") and record.input_requires_grad:
            out.append(allreduce_transfer(path, "backward", "auto", rows * per_input, s, q, m, links))
        if style == "column_last":
            features = shard_sizes(record.output_shape[-1], m)
            out.append(_allgather(path, "forward", q, tuple(f * rows * positions for f in features), s))
        if style == "channel":
            channels = shard_sizes(record.output_shape[0], m)
            plane = math.prod(record.output_shape[1:])
            out.append(_allgather(path, "forward", q, tuple(k * rows * plane for k in channels), s))
        if style == "row":
            out.append(allreduce_transfer(path, "forward", "auto", rows * per_output, s, q, m, links))
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


def _parameters_after_wrap(model: nn.Module, styles: dict[str, str], mp_size: int, mp_rank: int) -> list[_Param]:
    """Every trainable parameter as this rank holds it after ``parallelize``, in the wrapped model's order."""
    params, seen = [], set()
    for path, module in model.named_modules():
        style = styles.get(path, "dp")
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            numel, sharded = p.numel(), False
            if style in ("column", "column_last") or (style == "row" and name == "weight"):
                split_dim = 1 if style == "row" else 0
                sizes = shard_sizes(p.shape[split_dim], mp_size)
                numel, sharded = numel // p.shape[split_dim] * sizes[mp_rank], True
            elif style == "channel":
                sizes = shard_sizes(p.shape[0], mp_size)
                numel, sharded = numel // p.shape[0] * sizes[mp_rank], True
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
    reducer: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links = Links(),
) -> list[Transfer]:
    """The gradient all-reduces of one step, in the order the reducer launches them (see the module docstring)."""
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)}")
    if strategy == "mp":
        return []  # every rank computes the same loss: nothing to combine
    m = mp_size if strategy == "hybrid" else 1
    params = _parameters_after_wrap(model, styles if strategy == "hybrid" else {}, m, rank % m)
    position = {id(p): i for i, p in enumerate(params)}
    algorithm = "butterfly" if reducer in ("butterfly", "auto") else reducer
    groups = [("replicated", [p for p in params if not p.sharded], rank, world)]
    if strategy == "hybrid":
        groups.append(("fc-shards", [p for p in params if p.sharded], rank // m, world // m))
    pending = []
    for name, members, group_rank, size in groups:
        pending += [(name, group_rank, size, bucket) for bucket in _buckets(members, bucket_bytes)]
    pending.sort(key=lambda item: -max(position[id(p)] for p in item[3]))  # the reducer's launch order
    out = []
    for index, (name, group_rank, size, bucket) in enumerate(pending):
        count = sum(p.numel for p in bucket)
        layers = tuple(dict.fromkeys(p.layer for p in bucket))
        transfer = allreduce_transfer(
            f"{name}.bucket{index}", "gradients", algorithm, count, bucket[0].itemsize, group_rank, size, links, layers
        )
        if transfer is not None:
            out.append(transfer)
    return out


def step_transfers(
    model: nn.Module,
    table: LayerTable,
    styles: dict[str, str],
    strategy: str,
    world: int,
    mp_size: int,
    rank: int,
    micro_batch: int,
    reducer: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links = Links(),
) -> list[Transfer]:
    """Everything rank ``rank`` sends in one step: forward (layer order), backward (reverse), gradient buckets.

    ``styles``: the plan's layer path → style (``make_plan(model, strategy).styles``); ``table``: the layers'
    shapes (:func:`~hybrid_ext.parallel.layer_profile.layer_shapes`); ``micro_batch``: b, samples per rank."""
    if world < 1 or mp_size < 1 or world % mp_size:
        raise ValueError(f"mp_size={mp_size} does not divide the world size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    m = mp_size if strategy in ("hybrid", "mp") else 1
    rows = world * micro_batch if strategy == "mp" else micro_batch
    per_layer = [
        t
        for path in table.layers
        if styles.get(path, "dp") != "dp"
        for t in layer_transfers(path, styles[path], table, strategy, m, rank % m, rows, links)
    ]
    forward = [t for t in per_layer if t.phase == "forward"]
    backward = [t for t in reversed(per_layer) if t.phase == "backward"]
    gradients = gradient_transfers(model, styles, strategy, world, mp_size, rank, reducer, bucket_bytes, links)
    return forward + backward + gradients
