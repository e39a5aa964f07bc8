"""A predicted training step per layer: compute from a layer table, communication from the plan's transfers.

Notation as in :mod:`hybrid_ext.parallel.step_traffic` (P ranks, m per model-parallel group, b samples per rank);
t_f(ℓ), t_b(ℓ) are layer ℓ's forward and backward seconds measured at micro-batch b₀
(:mod:`hybrid_ext.parallel.layer_profile`).

Compute: a layer's time grows with the rows it processes and, sharded, shrinks with the fraction of its features
it holds: (t₀(ℓ) + (t(ℓ) − t₀(ℓ)) · R/b₀) · s, where t₀ is the part of the time that does not grow with the rows
(measured by timing the layer at two batches: a Linear layer's weights are read and written whatever the batch),
R = b for a replicated layer under dp and hybrid, R = m·b for a sharded layer
under hybrid (it sees the group's gathered batch), R = P·b for every layer under mp (the global batch on every
rank), and s the share of the layer a shard computes: φ = f_q/F (a column shard's output features, a row shard's
input features; 1 replicated); for a convolution's channel shard w + (1 − w)·φ, w the share of its time that does
not shrink with its channels (measured by timing a copy with half of them; 0 in calibrations of format 5 and
before).
A layer timed as growing faster than its rows (t₀ < 0: its tensors come fresh from the kernel or outgrow the
caches at more rows) grows so by the size of its tensors: a shard's are the whole layer's at R·φ rows, so it takes
(t₀⁺ + (t − t₀⁺) · R/b₀) · s + (−t₀) · (R·φ/b₀ − 1)⁺, t₀⁺ = max(t₀, 0) — under mp a convolution's shard adds
nothing beyond proportional, the ReLU and pooling after its gather (the whole tensor at P·b rows) do.
Only leaves are timed (a module that owns parameters and has children counts through its children); the whole
model's time beyond its leaves' (the glue: residual additions, reshapes) is fixed + per row as a layer's, at the
rows every layer of the trunk sees (b, or P·b under mp). The optimizer's update costs T_o = u · N, u seconds per
parameter element (measured with the table) and N the elements this rank holds (a shard: its fraction φ of the
layer's). Every time is multiplied by ``compute_scale`` σ ≥ 1 where ranks share a device: σ = R·t/C for R ranks
of t threads each on C cores (the table measured one rank alone).

Communication: each transfer costs α·k + β·n + γ·u + c·σ·v, with k messages sent, n bytes sent, u bytes received
and reduced by this rank (:class:`hybrid_ext.comm.cost_model.CostModel`; a transport's calibrated constants, else
its built-in ones; inside a host its β and γ, CPU work, at σ_c, ranks × threads per core on the host
(``cpu_sharing``, σ where the ranks compute on the CPU: :func:`hybrid_ext.comm.cost_model.at_sharing`) and v
bytes the rank copies in memory around the collective (a gather along channels moves its shards to the front and
back; an in-place all-reduce starts from a clone) at the table's copy rate c: the
messages to ranks on other hosts at the link's α, β (``network/<transport>``, calibrated across hosts, else the
network transport's own: :func:`hybrid_ext.comm.cost_model.network_model`), the others at those of the transport
inside a host, the link's β times the ranks of a host (they send at once and share its link); a native all-reduce
costs its calibrated constants' ring formula.

Step, per rank:

- forward T_f = Σ forward compute + Σ forward transfers; backward T_b likewise (activation exchanges block:
  the layer waits for them);
- gradient buckets (:mod:`hybrid_ext.parallel.reducer`) overlap the rest of backward: bucket k is ready when
  backward has finished the last (in backward order) of its layers, at r_k; it starts at s_k = max(r_k, e_{k−1})
  — buckets launch in a fixed order, one after another on the communicator's thread — and ends at
  e_k = s_k + c_k; what reaches past backward is exposed: E = max(0, e_last − T_b). Where the ranks' compute
  keeps every core of a CPU host busy (R·t ≥ C), a bucket's own CPU work (its copies and reductions: the α, β, γ
  terms inside a host and every γ term) finds no idle core to run on while backward runs: it is exposed whole, and
  its network stages, which that work feeds (a hierarchical all-reduce reduces inside the host before it sends),
  start when backward ends: s_k = max(r_k, e_{k−1}, T_b) — nothing overlaps backward (measured across emulated
  hosts: ResNet-18's dp at 2 × 2 took the whole wire time more than on one host). That is one bound: the phases
  measured there say the collectives did run during backward (vgg11's dp at 2 × 2: 5.4 s of them in 5.5 s of
  backward), and the step came out as if they had not — the links' bytes cost the shared cores too. The other
  bound (``overlap_wire``): the bucket's CPU work shares the cores with what is left of backward, each at half
  speed, so for min(w_k, left) both take that much longer (backward and the later buckets' ready times move by
  it), and its time on the wire overlaps backward as with a core to spare: E = L + max(0, e_last − T_b − L), L the
  lengthening; it under-predicted fresh runs at 3 × 2 (ResNet-18 −19 %, vgg11's hybrid −14 %), the first bound
  fits them; :mod:`hybrid_ext.parallel.auto_plan` checks a plan beyond the fixed strategies against both;
- a bucket's time on a link is at least the hosts' CPU to move its bytes: max(β·n_net·R_link, κ·σ_c·n_net), κ the
  link's CPU per byte sent (:mod:`hybrid_ext.bench.link_cpu`; binds on links faster than the kernel, 100 Gbit/s
  is 0.085 ns per byte against κ ≈ 0.7 measured here);
- a layer's exchange in backward whose bytes cross hosts while a bucket's are on the link (a convolution split
  under hybrid runs backward after later layers' buckets were launched) shares the link with it: for the time
  they overlap, capped at the exchange's own β·n on the link, each moves at half its rate, so the layer and the
  bucket both end that much later (one more pass over backward with those delays). The exchanges run on the
  model-parallel group's own communicator, never queued behind the world's buckets (where a host framework
  reduces the data-parallel part, DeepSpeed's path, the replicated gradients go over that group and they do
  queue: a path this model does not predict);
- the reducer's own copies T_r = r · G + r_s · G_s (:mod:`hybrid_ext.parallel.reducer`: each gradient into its
  bucket during backward, the reduced bucket back into ``.grad`` after), at the table's rate r per byte for the G
  bytes of gradient it buckets — every parameter this rank holds under dp and hybrid, none under mp — except
  hybrid's FC shards held by no other rank (mp_size = world), the G_s bytes it only scales in ``.grad``, at the
  rate r_s; on the training thread, so never hidden;
- step = T_f + T_b + E + T_o + T_r; exposed communication = the forward and backward transfers + E + T_r.

Left out: the loss, contention between communication and compute beyond the two rules above (busy cores, a
shared link), the online tuner's choice of schedule. :func:`predict_step` reports the slowest rank (shard sizes
differ by one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from hybrid_ext.comm import cost_model
from hybrid_ext.comm.cost_model import CostModel
from hybrid_ext.parallel.layer_profile import LayerTable
from hybrid_ext.parallel.mappings import shard_sizes
from hybrid_ext.parallel.step_traffic import Links, Transfer, parameters_after_wrap, reducer_bytes, step_transfers


@dataclass(frozen=True)
class LayerPrediction:
    path: str
    style: str
    forward_s: float
    backward_s: float
    communication_s: float  # its activation transfers (forward and backward)
    bytes_sent: int


@dataclass(frozen=True)
class BucketPrediction:
    transfer: Transfer
    seconds: float
    ready_s: float  # from the start of backward
    start_s: float
    end_s: float


@dataclass
class StepPrediction:
    strategy: str
    world: int
    mp_size: int
    micro_batch: int
    rank: int
    layers: list[LayerPrediction] = field(default_factory=list)
    buckets: list[BucketPrediction] = field(default_factory=list)
    layer_transfers: list[Transfer] = field(default_factory=list)  # the activation exchanges
    forward_s: float = 0.0  # T_f
    backward_s: float = 0.0  # T_b
    exposed_gradient_s: float = 0.0  # E
    optimizer_s: float = 0.0  # T_o: the optimizer's update of the parameters this rank holds
    reducer_s: float = 0.0  # T_r: the reducer's copies of the gradients through its buckets, and its scaling
    glue_s: float = 0.0  # forward and backward between the layers (in forward_s and backward_s)
    host_link_bytes: int = 0  # the most bytes any host sends out over its link in the step (all its ranks)

    @property
    def compute_s(self) -> float:
        return sum(layer.forward_s + layer.backward_s for layer in self.layers) + self.glue_s + self.optimizer_s

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.exposed_gradient_s + self.optimizer_s + self.reducer_s

    @property
    def exposed_communication_s(self) -> float:
        return self.step_s - self.compute_s

    @property
    def bytes_sent(self) -> int:
        return sum(layer.bytes_sent for layer in self.layers) + sum(b.transfer.bytes_sent for b in self.buckets)

    @property
    def network_bytes(self) -> int:
        """Of :attr:`bytes_sent`, to ranks on other hosts."""
        transfers = [b.transfer for b in self.buckets] + list(self.layer_transfers)
        return sum(t.network_bytes for t in transfers)

    @property
    def samples_per_s(self) -> float:
        """The global batch P·b over the step."""
        return self.world * self.micro_batch / self.step_s if self.step_s > 0 else float("inf")

    def describe(self) -> str:
        names = [layer.path for layer in self.layers] + [b.transfer.name for b in self.buckets]
        width = max(map(len, names), default=10)
        lines = [
            f"predicted step (strategy={self.strategy}, world={self.world}, mp_size={self.mp_size}, "
            f"micro-batch {self.micro_batch}, rank {self.rank})",
            f"  {'layer':<{width}}  {'style':<12} {'fwd ms':>8} {'bwd ms':>8} {'comm ms':>8} {'bytes':>12}",
        ]
        for layer in self.layers:
            lines.append(
                f"  {layer.path:<{width}}  {layer.style:<12} {layer.forward_s * 1e3:8.3f} {layer.backward_s * 1e3:8.3f}"
                f" {layer.communication_s * 1e3:8.3f} {layer.bytes_sent:12,}"
            )
        for bucket in self.buckets:
            lines.append(
                f"  {bucket.transfer.name:<{width}}  {'gradients':<12} {'':>8} {'':>8} {bucket.seconds * 1e3:8.3f}"
                f" {bucket.transfer.bytes_sent:12,}"
            )
        lines.append(f"  {'between layers':<{width}}  {'glue':<12} {self.glue_s * 1e3:17.3f}")
        lines.append(f"  {'optimizer':<{width}}  {'update':<12} {self.optimizer_s * 1e3:17.3f}")
        lines.append(f"  {'reducer':<{width}}  {'copies':<12} {self.reducer_s * 1e3:17.3f}")
        lines.append(
            f"  step {self.step_s * 1e3:.3f} ms = compute {self.compute_s * 1e3:.3f} ms + exposed communication "
            f"{self.exposed_communication_s * 1e3:.3f} ms; {self.bytes_sent:,} bytes sent; "
            f"{self.samples_per_s:,.1f} samples/s"
        )
        return "\n".join(lines)

    __str__ = describe


def host_sharing(ranks_on_host: int, threads: int, cores: float, on_cpu: bool) -> dict:
    """:func:`predict_step`'s ``compute_scale``, ``cpu_sharing`` and ``cores_busy`` for ``ranks_on_host`` ranks of
    ``threads`` compute threads each on ``cores`` cores, whose layer times were measured one rank alone: on the CPU
    each computes R·t/C times slower (at least 1), and with R·t ≥ C no core is idle for the gradients' copies; on
    an accelerator (``on_cpu`` False) the cores only move messages, one thread a rank."""
    if not on_cpu:
        return {"compute_scale": 1.0, "cpu_sharing": max(1.0, ranks_on_host / cores), "cores_busy": False}
    demand = ranks_on_host * threads
    sharing = max(1.0, demand / cores)
    return {"compute_scale": sharing, "cpu_sharing": sharing, "cores_busy": demand >= cores}


def transfer_split(
    transfer: Transfer,
    links: Links,
    constants: CostModel | None = None,
    network_constants: CostModel | None = None,
    cpu_sharing: float | None = None,
) -> tuple[float, float]:
    """(seconds of the rank's own CPU work, seconds on the wire between hosts) of one transfer: α·k + β·n + γ·u (see
    the module docstring), the messages to other hosts priced by the network's constants — on the wire, and never
    faster than the hosts' CPU moves their bytes (κ·σ_c per byte) —, the rest and every reduction by the
    transport's inside a host — CPU work. ``constants``: one set for every message;
    ``network_constants``: the set for messages to other hosts (a link's measured rate, say); ``cpu_sharing``: ranks
    × threads per core on a host (None: the constants as measured)."""
    network = _link_constants(transfer, constants, network_constants)
    if transfer.algorithm == cost_model.NATIVE:
        measured = cost_model.native_model(links.native) if links.native else None
        if links.hosts:
            seconds = (measured or network).predict(cost_model.NATIVE, _native_bytes(transfer), transfer.group_size)
            return 0.0, seconds
        model = _at_sharing(measured or constants or cost_model.default_model(transfer.local), cpu_sharing)
        return model.predict(cost_model.NATIVE, _native_bytes(transfer), transfer.group_size), 0.0
    local = _at_sharing(constants or cost_model.default_model(transfer.local), cpu_sharing)
    near_messages = transfer.messages - transfer.network_messages
    near_bytes = transfer.bytes_sent - transfer.network_bytes
    cpu = local.alpha * near_messages + local.beta * near_bytes + local.gamma * transfer.bytes_reduced
    on_link = link_bytes_s(transfer, links, constants, network_constants)
    # The hosts' kernels move the bytes: on a link faster than they are, the link waits for them.
    moving = link_cpu_s(transfer, links, constants, network_constants) * (1.0 if cpu_sharing is None else cpu_sharing)
    return cpu, network.alpha * transfer.network_messages + max(on_link, moving)


def link_bytes_s(
    transfer: Transfer, links: Links, constants: CostModel | None = None, network_constants: CostModel | None = None
) -> float:
    """Seconds the bytes this rank sends to other hosts in ``transfer`` hold its host's link: β·n times the host's
    ranks, which send at once (every group of the step runs the same collective) and share its link; 0 on one
    host."""
    if links.hosts is None or not transfer.network_bytes:
        return 0.0
    network = _link_constants(transfer, constants, network_constants)
    return network.beta * transfer.network_bytes * links.ranks_per_link


def _link_sharing(
    launched: list, finished_at: dict[str, float], backward_of: dict[str, float], by_layer: dict, link_s
) -> tuple[dict[str, float], dict[int, float]]:
    """(layer -> its delay, id(bucket) -> its delay) where a layer's backward exchanges cross the link while a
    bucket's bytes are on it: each overlap, capped at the exchange's own time on the link, delays both (two flows
    on one link move at half the rate each). ``launched``: the buckets' (transfer, ready, start, end)."""
    layer_delays: dict[str, float] = {}
    bucket_delays: dict[int, float] = {}
    crossing = [(transfer, start, stop, link_s(transfer)) for transfer, _ready, start, stop in launched]
    crossing = [bucket for bucket in crossing if bucket[3] > 0]
    for path, own in by_layer.items():
        left = sum(link_s(t) for t in own if t.phase == "backward")
        end = finished_at[path]
        begin = end - backward_of[path]
        for transfer, start, stop, on_link in crossing:
            if left <= 0:
                break
            overlap = min(left, on_link, max(0.0, min(end, stop) - max(begin, start)))
            if overlap > 0:
                layer_delays[path] = layer_delays.get(path, 0.0) + overlap
                bucket_delays[id(transfer)] = bucket_delays.get(id(transfer), 0.0) + overlap
                left -= overlap
    return layer_delays, bucket_delays


def link_cpu_s(
    transfer: Transfer, links: Links, constants: CostModel | None = None, network_constants: CostModel | None = None
) -> float:
    """The hosts' CPU seconds for the bytes this rank sends to other hosts in ``transfer``: the link's
    ``cpu_per_byte`` (κ) times them (0 on one host, or where the link's κ was not measured)."""
    if links.hosts is None or not transfer.network_bytes:
        return 0.0
    return _link_constants(transfer, constants, network_constants).cpu_per_byte * transfer.network_bytes


def _at_sharing(model: CostModel, cpu_sharing: float | None) -> CostModel:
    return model if cpu_sharing is None else cost_model.at_sharing(model, cpu_sharing)


def _link_constants(transfer: Transfer, constants: CostModel | None, network_constants: CostModel | None) -> CostModel:
    """The constants of ``transfer``'s messages to other hosts: those given for the link, else the one set given for
    every message, else the link's calibration (:func:`hybrid_ext.comm.cost_model.network_model`)."""
    return network_constants or constants or cost_model.network_model(transfer.network)


def _native_bytes(transfer: Transfer) -> int:
    """The whole vector's bytes of a native all-reduce (its transfer records the ring's bytes sent)."""
    p = transfer.group_size
    return round(transfer.bytes_sent * p / (2 * (p - 1)))


def compute_fraction(style: str, path: str, model_modules: dict[str, nn.Module], mp_size: int, mp_rank: int) -> float:
    """φ: the fraction of a layer's work this rank does (its shard of the split features)."""
    if style == "dp":
        return 1.0
    module = model_modules[path]
    if style in ("column", "column_last"):
        total = module.out_features
    elif style == "row":
        total = module.in_features
    elif style == "channel":
        total = module.out_channels
    else:
        raise ValueError(f"unknown style {style!r} for {path!r}")
    return shard_sizes(total, mp_size)[mp_rank] / total


def _predict_rank(
    transfers: list[Transfer],
    table: LayerTable,
    styles: dict[str, str],
    strategy: str,
    world: int,
    mp_size: int,
    rank: int,
    micro_batch: int,
    links: Links,
    constants: CostModel | None,
    network_constants: CostModel | None,
    compute_scale: float,
    cpu_sharing: float,
    cores_busy: bool,
    modules: dict[str, nn.Module],
    held: list,
    overlap_wire: bool = False,
) -> StepPrediction:
    """Rank ``rank``'s step from its ``transfers`` (:func:`step_transfers`); ``modules``: the model's by path;
    ``held``: the parameters it holds after the wrap."""
    m = mp_size if strategy in ("hybrid", "mp") else 1
    split = {}
    for t in transfers:  # the mappings' own copies around a collective are CPU work, at the table's copy rate
        cpu, wire = transfer_split(t, links, constants, network_constants, cpu_sharing)
        split[id(t)] = (cpu + table.copy_s_per_byte * t.copied_bytes * compute_scale, wire)
    seconds = {key: cpu + wire for key, (cpu, wire) in split.items()}
    prediction = StepPrediction(strategy, world, mp_size, micro_batch, rank)
    prediction.layer_transfers = [t for t in transfers if t.phase != "gradients"]
    by_layer: dict[str, list[Transfer]] = {}
    for transfer in prediction.layer_transfers:
        by_layer.setdefault(transfer.name, []).append(transfer)
    backward_of: dict[str, float] = {}  # layer -> its backward compute and transfers
    for path, record in table.layers.items():
        style = styles.get(path, "dp") if strategy != "dp" else "dp"
        if strategy == "mp":
            samples = world * micro_batch
        elif style != "dp":
            samples = m * micro_batch
        else:
            samples = micro_batch
        fraction = compute_fraction(style, path, modules, m, rank % m)
        forward, backward = (
            record.shard_seconds_at(samples, table.micro_batch, style, fraction) if record.leaf else (0.0, 0.0)
        )
        forward, backward = forward * compute_scale, backward * compute_scale
        own = by_layer.get(path, [])
        comm = sum(seconds[id(t)] for t in own)
        prediction.layers.append(LayerPrediction(path, style, forward, backward, comm, sum(t.bytes_sent for t in own)))
        prediction.forward_s += forward + sum(seconds[id(t)] for t in own if t.phase == "forward")
        backward_of[path] = backward + sum(seconds[id(t)] for t in own if t.phase == "backward")
    # The model's own work between its layers (residual additions, reshapes), at the rows the trunk processes.
    glue_forward, glue_backward = table.glue_at(world * micro_batch if strategy == "mp" else micro_batch)
    glue_forward, glue_backward = glue_forward * compute_scale, glue_backward * compute_scale
    prediction.glue_s = glue_forward + glue_backward
    prediction.forward_s += glue_forward
    buckets = [t for t in transfers if t.phase == "gradients"]

    def backward_timeline(delays: dict[str, float]) -> tuple[dict[str, float], float]:
        """(layer -> when its backward ends, from the start of backward; when backward ends)."""
        finished_at, clock = {}, glue_backward  # the glue counted first: buckets are then ready late, never early
        for path in reversed(table.layers):
            clock += backward_of[path] + delays.get(path, 0.0)
            finished_at[path] = clock
        return finished_at, clock

    def schedule(finished_at: dict[str, float], clock: float, delays: dict[int, float]):
        """The buckets' (ready, start, end) in launch order, their CPU time that no idle core hides, and how much
        that work lengthened backward (``overlap_wire``)."""
        previous_end, unhidden, lengthened, out = 0.0, 0.0, 0.0, []
        for transfer in buckets:
            # A bucket's gradients are all in once backward has passed the earliest (in forward order) of its layers
            # (later by the buckets' CPU work that shared the cores with backward before it).
            ready = max((finished_at.get(layer, clock) for layer in transfer.layers), default=clock) + lengthened
            start = max(ready, previous_end)
            cpu, wire = split[id(transfer)]
            wire += delays.get(id(transfer), 0.0)
            if cores_busy and overlap_wire:  # its CPU work and what is left of backward share the cores
                shared = min(cpu, max(0.0, clock + lengthened - start))
                lengthened += shared
                cpu += shared
            elif cores_busy:  # its copies and reductions, which feed its network stages, wait for backward to end
                unhidden += cpu
                cpu = 0.0
                start = max(start, clock)
            previous_end = start + cpu + wire
            out.append((transfer, ready, start, previous_end))
        return out, previous_end, unhidden, lengthened

    finished_at, clock = backward_timeline({})
    launched, previous_end, unhidden, lengthened = schedule(finished_at, clock, {})
    # An activation exchange in backward whose bytes cross hosts while a bucket's are on the link shares the link
    # with it: the time they overlap, each moves at half its rate, and both take that much longer.
    layer_delays, bucket_delays = _link_sharing(
        launched, finished_at, backward_of, by_layer, lambda t: link_bytes_s(t, links, constants, network_constants)
    )
    if layer_delays:
        finished_at, clock = backward_timeline(layer_delays)
        launched, previous_end, unhidden, lengthened = schedule(finished_at, clock, bucket_delays)
        prediction.layers = [
            replace(layer, communication_s=layer.communication_s + layer_delays.get(layer.path, 0.0))
            for layer in prediction.layers
        ]
    prediction.backward_s = clock
    for transfer, ready, start, end in launched:
        taken = seconds[id(transfer)] + bucket_delays.get(id(transfer), 0.0)
        prediction.buckets.append(BucketPrediction(transfer, taken, ready, start, end))
    prediction.exposed_gradient_s = unhidden + lengthened + max(0.0, previous_end - clock - lengthened)
    prediction.optimizer_s = table.optimizer_s_per_element * sum(p.numel for p in held) * compute_scale
    bucketed, scaled = reducer_bytes(held, strategy, world, mp_size)
    prediction.reducer_s = (table.bucket_s_per_byte * bucketed + table.scale_s_per_byte * scaled) * compute_scale
    return prediction


def predict_step(
    model: nn.Module,
    table: LayerTable,
    styles: dict[str, str],
    strategy: str,
    world: int,
    mp_size: int | None,
    micro_batch: int,
    grad_algorithm: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links | None = None,
    constants: CostModel | None = None,
    network_constants: CostModel | None = None,
    compute_scale: float = 1.0,
    cores_busy: bool = False,
    memo: dict | None = None,
    cpu_sharing: float | None = None,
    overlap_wire: bool = False,
) -> StepPrediction:
    """The predicted step of the slowest rank (see the module docstring); ``mp_size`` None: all ranks.

    ``styles``: the plan (``plan_by_rules(model, strategy).styles``); ``table``: per-layer times
    (:func:`~hybrid_ext.parallel.layer_profile.profile_layers` or a loaded calibration); ``constants``: α, β, γ to
    use instead of the transport's, ``network_constants`` for messages between hosts; ``links``: default one host's
    shared memory; ``compute_scale``: σ, for ranks that share a device's cores; ``cpu_sharing``: ranks × threads per
    core on a host, for the CPU work of messages (default σ: where ranks compute on the CPU, the same sharing;
    where the layer times already hold it, measured by ranks at once, pass it apart); ``cores_busy``: the ranks' compute
    keeps every core of their host busy, so the gradient buckets' CPU work cannot overlap it (see the module
    docstring); ``overlap_wire``: with ``cores_busy``, the other bound (the buckets' CPU work sharing the cores
    with backward, their time on the wire overlapping it); ``memo``: a dict kept across calls with the same
    ``model``, ``table``, ``links`` and environment (:func:`~hybrid_ext.parallel.step_traffic.step_transfers`),
    where a caller predicts many plans."""
    if compute_scale <= 0:
        raise ValueError(f"compute_scale must be positive, got {compute_scale}")
    cpu_sharing = compute_scale if cpu_sharing is None else cpu_sharing
    if cpu_sharing <= 0:
        raise ValueError(f"cpu_sharing must be positive, got {cpu_sharing}")
    links = links or Links()
    if strategy not in ("dp", "hybrid", "mp"):
        raise ValueError(f"unknown strategy {strategy!r}; choose dp, hybrid or mp")
    mp_size = world if mp_size is None else mp_size
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    # What every rank of an mp_rank shares, worked out once.
    m = mp_size if strategy in ("hybrid", "mp") else 1
    modules = dict(model.named_modules())
    held = {q: parameters_after_wrap(model, styles if strategy != "dp" else {}, m, q) for q in range(m)}
    memo = {} if memo is None else memo
    # A rank's step depends on its rank only through its shards' sizes and its transfers: ranks alike in both (on
    # equal hosts, most of them) are predicted once, as the first of them.
    sharded = [(path, style) for path, style in styles.items() if style != "dp" and strategy != "dp"]
    shards = {
        q: (tuple(compute_fraction(style, path, modules, m, q) for path, style in sharded), tuple(held[q]))
        for q in range(m)
    }
    by_class: dict[tuple, StepPrediction] = {}
    predictions = []
    for r in range(world):
        transfers = step_transfers(
            model, table, styles, strategy, world, mp_size, r, micro_batch, grad_algorithm, bucket_bytes, links,
            held[r % m], memo,
        )  # fmt: skip
        key = (shards[r % m], tuple(transfers))
        if key not in by_class:
            by_class[key] = _predict_rank(
                transfers, table, styles, strategy, world, mp_size, r, micro_batch, links, constants,
                network_constants, compute_scale, cpu_sharing, cores_busy, modules, held[r % m], overlap_wire,
            )  # fmt: skip
        predictions.append(by_class[key])
    slowest = max(predictions, key=lambda p: p.step_s)
    if links.hosts is not None:
        leaving = {h: 0 for h in links.hosts}
        for rank, prediction in enumerate(predictions):
            leaving[links.hosts[rank]] += prediction.network_bytes
        slowest.host_link_bytes = max(leaving.values())
    return slowest
