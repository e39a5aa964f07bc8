"""``strategy="auto"``: shard or replicate each Linear chain, split the convolutions that pay, and pick ``mp_size``,
by the predicted step.

The candidates: every Linear chain (consecutive Linear layers of one ``nn.Sequential`` with elementwise layers
between, as :func:`~hybrid_ext.parallel.plan.plan_by_rules` finds them; a Linear elsewhere is a chain of one) either
sharded (column / row / column_last, as under ``hybrid``) or replicated, and every ``mp_size`` > 1 dividing the
world size (or the one given); all chains replicated is ``dp``. Up to ``MAX_EXHAUSTIVE_CHAINS`` chains every
combination is predicted; beyond, one pass of toggling each chain from all-sharded, kept where it helps. From the
best chains at each ``mp_size``, each convolution that might pay (:func:`convolution_candidates`: its weights not
small next to the activations a split would move) is tried split by output channels, as under ``hybrid`` with a
rule's ``"mp"``, and kept where the predicted step drops: a convolution late in a CNN, with many weights on a small
feature map, then exchanges its activations within the group instead of all-reducing its gradients over the world.
The plan with the least predicted step (:func:`~hybrid_ext.parallel.step_model.predict_step`) wins; ties go to
fewer sharded chains, then fewer split convolutions, then the smaller ``mp_size``. Where every core computes, a
plan beyond the fixed strategies' own (dp; hybrid's or mp's at an ``mp_size``) must also beat them with the
gradients' all-reduces overlapping backward (the step model's other bound there), or the fastest that does wins:
what it saves in gradient bytes may be hidden behind backward anyway. ``mp`` (every layer split, the
convolutions by channels, every rank passing the same global batch) is weighed only when asked for
(``strategies``): switching to it changes what each rank must pass, which auto cannot do behind a script's back.

The choice is only as good as ``predict_step`` (docs/benchmarks.md sets it against measured steps on this
repository's 2-core machine).

Across ranks (:func:`plan_on_ranks`): every rank profiles its layers (:func:`~hybrid_ext.parallel.layer_profile.
profile_layers` on ``example_input``), the ranks agree on the element-wise maximum of every layer's times (one
small all-reduce over the world), each decides from those same figures, and the chosen plan's fingerprint (its
styles and ``mp_size``) is compared across ranks: a mismatch is an error, before anything is sharded. The times
were measured with the host-mates profiling at once, so they already hold the cores' sharing (σ = 1); the
messages' CPU work and whether a core is left idle for it follow the most-shared host
(:func:`~hybrid_ext.parallel.step_model.host_sharing`, agreed over the ranks).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from dataclasses import astuple, dataclass, field, fields, replace

import torch
from torch import nn

from hybrid_ext import config
from hybrid_ext.comm import cost_model, host_cores
from hybrid_ext.parallel.layer_profile import LayerRecord, LayerTable, profile_layers, save_calibration
from hybrid_ext.parallel.plan import STRATEGIES, PartitionPlan, _linear_chains, check_shardable, plan_by_rules
from hybrid_ext.parallel.step_model import StepPrediction, host_sharing, predict_step
from hybrid_ext.parallel.step_traffic import Links

MAX_EXHAUSTIVE_CHAINS = 6
# The strategies under which every rank passes its own micro-batch: auto may switch between them unseen.
SAME_BATCH_STRATEGIES = ("dp", "hybrid")


@dataclass(frozen=True)
class Candidate:
    """One plan auto predicted: its strategy, ``mp_size``, the sharded chains (by first layer) and its step."""

    strategy: str
    mp_size: int
    sharded: tuple[str, ...]
    step_s: float
    compute_s: float
    exposed_communication_s: float
    convolutions: tuple[str, ...] = ()  # under hybrid, the convolutions split by output channels
    overlapped_step_s: float | None = None  # where checked: its step with the gradients overlapping backward

    @property
    def label(self) -> str:
        if self.strategy == "dp":
            return "dp"
        if self.strategy == "mp":
            return f"mp mp_size={self.mp_size} (every rank passes the global batch)"
        parts = [f"sharded chains at {', '.join(self.sharded)}"] if self.sharded else []
        if self.convolutions:
            parts.append(f"convolutions split by channels at {', '.join(self.convolutions)}")
        return f"hybrid mp_size={self.mp_size}, {'; '.join(parts)}"


@dataclass
class AutoPlan(PartitionPlan):
    """The chosen plan (``strategy`` is what it amounts to: ``dp``, ``hybrid`` or ``mp``), its prediction and the
    others."""

    mp_size: int = 1
    prediction: StepPrediction | None = None
    alternatives: list[Candidate] = field(default_factory=list)  # each predicted: the chosen, then fastest first

    def fingerprint(self) -> int:
        """48 bits of a hash of the styles and ``mp_size`` (what must agree across ranks)."""
        text = repr((self.strategy, self.mp_size, sorted(self.styles.items())))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")

    def describe(self) -> str:
        step = self.prediction
        by_path = {layer.path: layer for layer in step.layers} if step else {}
        width = max((len(p) for p in self.styles), default=10)
        lines = [
            f"hybrid-ext plan (strategy=auto: {self.strategy}, mp_size={self.mp_size}; predicted by predict_step)",
            f"  {'layer':<{width}}  {'style':<12} {'params':>12} {'fwd ms':>8} {'bwd ms':>8} {'comm ms':>8}",
        ]
        for path, style in self.styles.items():
            layer = by_path.get(path)
            times = (
                f"{layer.forward_s * 1e3:8.3f} {layer.backward_s * 1e3:8.3f} {layer.communication_s * 1e3:8.3f}"
                if layer
                else f"{'-':>8} {'-':>8} {'-':>8}"
            )
            lines.append(f"  {path:<{width}}  {style:<12} {self.parameters.get(path, 0):>12,} {times}")
        if step:
            rest = sum(layer.forward_s + layer.backward_s for layer in step.layers if layer.path not in self.styles)
            gradients = sum(b.seconds for b in step.buckets)
            lines.append(f"  layers without parameters: compute {rest * 1e3:.3f} ms")
            lines.append(
                f"  gradient all-reduces: {gradients * 1e3:.3f} ms, {step.exposed_gradient_s * 1e3:.3f} ms of it "
                "exposed after backward"
            )
            lines.append(
                f"  predicted step {step.step_s * 1e3:.3f} ms = compute {step.compute_s * 1e3:.3f} ms + exposed "
                f"communication {step.exposed_communication_s * 1e3:.3f} ms (world {step.world}, micro-batch "
                f"{step.micro_batch})"
            )
        if self.alternatives:
            lines.append("  candidates (predicted step ms; the one chosen, then the others fastest first):")
            for index, c in enumerate(self.alternatives):  # the first is the one chosen
                note = "  <- chosen" if index == 0 else ""
                if index and c.overlapped_step_s is not None and c.step_s < self.alternatives[0].step_s:
                    note = (
                        f"  (not taken: {c.overlapped_step_s * 1e3:.3f} ms with the gradients overlapping backward, "
                        "no faster than a fixed strategy's plan)"
                    )
                lines.append(f"    {c.step_s * 1e3:10.3f}  {c.label}{note}")
        return "\n".join(lines)

    __str__ = describe


def check_strategies(strategies, argument: str = "strategies") -> None:
    """Raise, naming ``argument``, unless ``strategies`` is a non-empty sequence of dp, hybrid and mp."""
    if isinstance(strategies, str) or not strategies or any(s not in STRATEGIES for s in strategies):
        raise ValueError(f"{argument} must name some of dp, hybrid, mp; got {strategies!r}")


def _divisors(world: int) -> list[int]:
    return [m for m in range(2, world + 1) if world % m == 0]


def choose_plan(
    model: nn.Module,
    table: LayerTable,
    world: int,
    micro_batch: int | None = None,
    mp_sizes: list[int] | tuple[int, ...] | None = None,
    grad_algorithm: str = "butterfly",
    bucket_bytes: int = 25 << 20,
    links: Links | None = None,
    network_constants=None,
    compute_scale: float = 1.0,
    cores_busy: bool = False,
    strategies: tuple[str, ...] = SAME_BATCH_STRATEGIES,
    constants=None,
    cpu_sharing: float | None = None,
) -> AutoPlan:
    """The candidate with the least predicted step (see the module docstring), from ``table``'s layer times.

    Deterministic: ranks given the same table choose the same plan. ``mp_sizes``: the group sizes to consider
    (default: every divisor of ``world`` above 1). ``strategies``: which of ``dp``, ``hybrid`` and ``mp`` to weigh
    (default dp and hybrid, under which every rank passes its own micro-batch; ``mp`` — every layer split, every
    rank passing the same global batch — only where the caller feeds it so, and only at ``mp_size`` = ``world``).
    ``constants``, ``network_constants``: α, β, γ of the transport inside a host and of the link between hosts
    (default: the saved calibrations, else the built-in constants); ``compute_scale``, ``cpu_sharing``,
    ``cores_busy``: as :func:`~hybrid_ext.parallel.step_model.predict_step`'s."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    check_strategies(strategies)
    micro_batch = table.micro_batch if micro_batch is None else micro_batch
    if mp_sizes is None:
        mp_sizes = _divisors(world)
    for m in mp_sizes:
        if m < 1 or world % m:
            raise ValueError(f"mp_size={m} does not divide the world size {world}")
    mp_sizes = [m for m in mp_sizes if m > 1]
    modules = dict(model.named_modules())
    linears = {p for p, m in modules.items() if p and isinstance(m, nn.Linear)}
    chains = _linear_chains(modules, linears)

    memo: dict = {}  # what candidates share: a schedule chosen for a size, a layer's traffic in its group

    def predict(strategy: str, m: int, plan: PartitionPlan, overlap_wire: bool = False) -> StepPrediction:
        return predict_step(
            model, table, plan.styles, strategy, world, m, micro_batch, grad_algorithm, bucket_bytes, links,
            constants=constants, network_constants=network_constants, compute_scale=compute_scale,
            cores_busy=cores_busy, memo=memo, cpu_sharing=cpu_sharing, overlap_wire=overlap_wire,
        )  # fmt: skip

    # (strategy, mp_size, sharded chains by first layer, split convolutions) -> its prediction, None if unfit
    results: dict[tuple, tuple[Candidate, PartitionPlan, StepPrediction] | None] = {}

    def consider(key: tuple, plan: PartitionPlan):
        """``plan`` predicted and kept under ``key`` (strategy, mp_size, the chains it shards, the convolutions it
        splits); None where a layer is too narrow for mp_size shards."""
        strategy, m, split, convolutions = key
        if m > 1:
            try:
                check_shardable(model, plan, m)
            except ValueError:
                results[key] = None
                return None
        step = predict(strategy, m, plan)
        candidate = Candidate(
            strategy, m, split, step.step_s, step.compute_s, step.exposed_communication_s, convolutions
        )
        results[key] = (candidate, plan, step)
        return results[key]

    def evaluate(m: int, sharded: tuple[int, ...], split_convs: tuple[str, ...] = ()):
        heads = tuple(chains[i][0] for i in sorted(sharded))
        key = ("hybrid", m, heads, split_convs) if sharded or split_convs else ("dp", 1, (), ())
        if key in results:
            return results[key]
        if not sharded and not split_convs:
            return consider(key, plan_by_rules(model, "dp"))
        rules = {p: "dp" for i, chain in enumerate(chains) if i not in sharded for p in chain}
        rules.update({p: "mp" for p in split_convs})
        return consider(key, plan_by_rules(model, "hybrid", rules))

    def faster(trial, best) -> bool:
        return trial is not None and (best is None or trial[0].step_s < best[0].step_s)

    if "dp" in strategies:
        evaluate(1, ())
    if "mp" in strategies and world in mp_sizes:
        plan = plan_by_rules(model, "mp")
        consider(("mp", world, tuple(p for p, style in plan.styles.items() if style != "dp"), ()), plan)
    for m in mp_sizes if "hybrid" in strategies else ():
        if len(chains) <= MAX_EXHAUSTIVE_CHAINS:
            first = 0 if "dp" in strategies else 1  # no chain sharded is dp's plan
            subsets = [
                s for count in range(first, len(chains) + 1) for s in itertools.combinations(range(len(chains)), count)
            ]
            current, best = (), None
            for subset in subsets:
                trial = evaluate(m, subset)
                if faster(trial, best):
                    current, best = subset, trial
        else:
            current = tuple(range(len(chains)))
            best = evaluate(m, current)
            for i in range(len(chains)):
                trial_chains = tuple(sorted(set(current) ^ {i}))
                trial = evaluate(m, trial_chains)
                if faster(trial, best):
                    current, best = trial_chains, trial
        # Then each convolution that might pay, most weight per activation first, split where the step drops.
        split_convs: tuple[str, ...] = ()
        for path in convolution_candidates(model, table, micro_batch, m):
            trial_convs = tuple(sorted((*split_convs, path)))
            trial = evaluate(m, current, trial_convs)
            if faster(trial, best):
                split_convs, best = trial_convs, trial
    found = [r for r in results.values() if r is not None]
    if not found:
        raise ValueError(
            f"strategy='auto': no plan of {', '.join(strategies)} fits this model on {world} ranks "
            f"(mp_size {', '.join(map(str, mp_sizes)) or 'none'}); a layer is too narrow to split"
        )
    found.sort(key=lambda r: (r[0].step_s, len(r[0].sharded), len(r[0].convolutions), r[0].mp_size))
    chosen = found[0]
    if cores_busy:
        chosen, found = _robust_to_overlap(found, chains, predict)
    candidate, plan, step = chosen
    return AutoPlan(
        plan.strategy,
        dict(plan.styles),
        dict(plan.parameters),
        mp_size=candidate.mp_size,
        prediction=step,
        alternatives=[candidate] + [r[0] for r in found if r is not chosen],  # the one chosen first
    )


def _robust_to_overlap(found: list, chains: list, predict) -> tuple[tuple, list]:
    """(the fastest of ``found`` that is a fixed strategy's plan — dp, or hybrid's or mp's own at an mp_size — or
    that beats them under the other bound of what busy cores overlap too, ``found`` with that bound noted).

    Where every core computes, the step model charges the gradients' all-reduces as if nothing overlapped backward
    (what the steps measured across emulated hosts came to), though the phases show it running during backward: a
    plan that wins only by moving fewer gradient bytes (a convolution split) may win by nothing if they do overlap
    (vgg11 at 2 × 2 and 3 × 2: such splits measured 0.97–1.06× hybrid). So a plan beyond the fixed strategies is
    taken only where it is also the faster with the gradients overlapping backward (``overlap_wire``)."""
    every_chain = tuple(chain[0] for chain in chains)
    fixed = {
        id(r) for r in found if r[0].strategy in ("dp", "mp") or (r[0].sharded, r[0].convolutions) == (every_chain, ())
    }
    if not fixed or id(found[0]) in fixed:
        return found[0], found
    bound = {}

    def overlapped(entry) -> float:
        if id(entry) not in bound:
            candidate, plan, _ = entry
            bound[id(entry)] = predict(candidate.strategy, candidate.mp_size, plan, overlap_wire=True).step_s
        return bound[id(entry)]

    best_fixed = min(overlapped(r) for r in found if id(r) in fixed)
    at = next(i for i, r in enumerate(found) if id(r) in fixed or overlapped(r) < best_fixed)
    noted = [(replace(r[0], overlapped_step_s=bound[id(r)]), *r[1:]) if id(r) in bound else r for r in found]
    return noted[at], noted


def convolution_candidates(model: nn.Module, table: LayerTable, micro_batch: int, mp_size: int) -> list[str]:
    """The convolutions auto tries splitting by output channels under hybrid, most weight per activation first:
    those with at least ``mp_size`` output channels, groups=1, zero padding, and weights outweighing a quarter of
    the activations a split moves (b samples' input and output; the step model decides, this only spares it the
    convolutions that cannot pay, on large feature maps)."""
    modules = dict(model.named_modules())
    ratios = {}
    for path, record in table.layers.items():
        conv = modules.get(path)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        if conv.out_channels < mp_size or not conv.weight.requires_grad:
            continue
        moved = micro_batch * (math.prod(record.input_shape) + math.prod(record.output_shape))
        weights = sum(p.numel() for p in conv.parameters(recurse=False) if p.requires_grad)
        if 4 * weights >= moved:
            ratios[path] = weights / moved
    return sorted(ratios, key=lambda p: (-ratios[p], p))


def _needs_example(example_input) -> None:
    if example_input is None:
        raise ValueError(
            "strategy='auto' needs example_input: a micro-batch as each rank will pass it (its batch size is the "
            "micro-batch the step is predicted for); the layers are profiled on it"
        )


def make_plan(
    model: nn.Module,
    strategy: str,
    rules: dict[str, str] | None = None,
    example_input=None,
    world: int | None = None,
) -> PartitionPlan:
    """Decide every parameterised layer's style without changing the model: what ``parallelize`` would shard.

    Args:
        model (nn.Module): the model, before any wrapping.
        strategy (str): ``"dp"``, ``"hybrid"`` or ``"mp"`` (the rules of :func:`~hybrid_ext.parallel.plan.
            plan_by_rules`), or ``"auto"``: the plan with the least predicted step, its layers profiled in this
            process (:func:`plan_alone`).
        rules (dict or None): module path pattern (``fnmatch``) → style, overriding the rules' choice (not with
            ``"auto"``).
        example_input (torch.Tensor or None): a micro-batch the model accepts; lets the rules measure parameters
            per FLOP; needed by ``"auto"``.
        world (int or None): the number of ranks the plan is for; needed by ``"auto"``.

    Returns:
        PartitionPlan: each layer's style (an :class:`AutoPlan`, with its prediction, for ``"auto"``).

    Raises:
        ValueError: an unknown strategy or rule, or ``"auto"`` without ``example_input`` or ``world``.
    """
    if strategy == "auto":
        return plan_alone(model, example_input, world, rules)
    return plan_by_rules(model, strategy, rules, example_input)  # it names an unknown strategy


def plan_alone(model: nn.Module, example_input, world: int, rules=None) -> AutoPlan:
    """``make_plan(model, "auto", example_input=..., world=...)``: profiled in this process, no agreement."""
    _needs_example(example_input)
    if rules:
        raise ValueError("rules are not supported with strategy='auto'; use an explicit strategy with rules")
    if world is None:
        raise ValueError("make_plan(model, 'auto') needs world: the number of ranks the plan is for")
    return choose_plan(model, profile_layers(model, example_input), world)


def agree_on_times(table: LayerTable, world) -> LayerTable:
    """Every time of the table (each layer's forward and backward seconds and their fixed parts, the glue between
    layers, the optimizer's seconds per element, the copy and reducer rates): the median over the ranks of
    ``world`` (a Communicator). Not the maximum: over ranks that profile at once it adds up every layer's worst
    disturbance (AlexNet, 4 ranks on 2 cores: the per-entry maxima 1.29× one rank alone × 2, the medians 1.15×),
    and which layer drew one changes from run to run, and the plan with it."""
    cpu = torch.device("cpu")
    counts = world.row_counts(len(table.layers), device=cpu, name="auto plan layer counts")
    if len(set(counts)) > 1:
        raise ValueError(f"strategy='auto': ranks profiled different numbers of layers {list(counts)}")
    # every time a record or the table holds, whatever a calibration format adds
    timed = tuple(f.name for f in fields(LayerRecord) if f.name.endswith("_s"))
    whole = tuple(f.name for f in fields(LayerTable) if f.name.endswith(("_s", "_per_element", "_per_byte")))
    values = [getattr(r, f) for r in table.layers.values() for f in timed] + [getattr(table, f) for f in whole]
    agreed = world.median_over_ranks(values, name="auto plan layer times")
    layers = {
        path: replace(record, **dict(zip(timed, agreed[len(timed) * i : len(timed) * (i + 1)], strict=True)))
        for i, (path, record) in enumerate(table.layers.items())
    }
    return LayerTable(table.micro_batch, table.device, layers, **dict(zip(whole, agreed[-len(whole) :])))


def links_of(topology) -> Links:
    """The links of a group as its communicator sees them (a :class:`~hybrid_ext.comm.topology.Topology`): on several
    hosts, its ranks' hosts, the transport inside a host and the one between, so that messages to other hosts are
    priced as the network's; on one host, the group's transport."""
    if not topology.spans_hosts:
        return Links(topology.transport)
    return Links(topology.local or topology.transport, hosts=tuple(topology.hosts), network=topology.network)


def agree_on_links(links: Links, world):
    """(the constants of the transport inside a host, of the link between hosts or None on one host), each the
    maximum over the ranks of ``world``: ranks whose hosts saved different calibrations price messages alike."""
    own = [cost_model.default_model(links.transport)]
    if links.hosts is not None:
        own.append(cost_model.network_model(links.network))
    values = [v for m in own for v in astuple(m)]
    agreed = world.max_over_ranks(values, name="auto plan links")
    width = len(fields(cost_model.CostModel))
    models = [cost_model.CostModel(*agreed[i : i + width]) for i in range(0, len(agreed), width)]
    return models[0], (models[1] if len(models) > 1 else None)


def agree_on_sharing(links: Links, world, on_cpu: bool) -> tuple[float, bool]:
    """(ranks × threads per core, whether every core computes) of the most-shared host, the same on every rank of
    ``world`` (:func:`~hybrid_ext.parallel.step_model.host_sharing` of this rank's host, maximum over the ranks)."""
    on_host = world.size if links.hosts is None else Counter(links.hosts)[links.hosts[world.rank]]
    own = host_sharing(on_host, torch.get_num_threads(), host_cores.usable_cores(), on_cpu)
    sharing, busy = world.max_over_ranks([own["cpu_sharing"], float(own["cores_busy"])], name="auto plan sharing")
    return sharing, busy > 0


def check_same_plan(plan: AutoPlan, world) -> None:
    """Raise on every rank if the ranks chose different plans (their fingerprints differ)."""
    prints = world.row_counts(plan.fingerprint(), device="cpu", name="auto plan fingerprint")
    if len(set(prints)) > 1:
        raise RuntimeError(
            f"strategy='auto' chose different plans on different ranks (fingerprints {[hex(p) for p in prints]}; "
            f"this rank: {plan.strategy}, mp_size={plan.mp_size}); the ranks must decide from the same layer "
            "times — pass an explicit strategy and mp_size"
        )


def plan_on_ranks(
    model: nn.Module,
    example_input,
    groups,
    mp_size: int | None,
    rules,
    grad_algorithm: str,
    bucket_bytes: int,
    strategies: tuple[str, ...] = SAME_BATCH_STRATEGIES,
) -> AutoPlan:
    """``parallelize(strategy="auto")``'s plan: profiled on every rank, times agreed, the choice checked."""
    _needs_example(example_input)
    check_strategies(strategies, "auto_strategies")
    if rules:
        raise ValueError("rules are not supported with strategy='auto'; use an explicit strategy with rules")
    if groups is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first, or pass groups")
        from hybrid_ext.comm import communicator

        world_comm, world = communicator(None, torch.device("cpu")), dist.get_world_size()
        mp_sizes = None if mp_size is None else [mp_size]
    else:
        world_comm, world = groups.world, groups.dims.world
        mp_sizes = [groups.dims.mp]
    table = agree_on_times(profile_layers(model, example_input), world_comm)
    saved = config.get("HYBRID_EXT_AUTO_TABLE")
    if saved is not None and world_comm.rank == 0:  # what the choice was made from, to predict it again
        save_calibration(table, saved)
    # The job's own layout: ranks on several hosts send to each other over the network (its calibrated link, if any).
    links = links_of(world_comm.topology)
    constants, network_constants = agree_on_links(links, world_comm)
    cpu_sharing, cores_busy = agree_on_sharing(links, world_comm, example_input.device.type == "cpu")
    plan = choose_plan(
        model, table, world, mp_sizes=mp_sizes, grad_algorithm=grad_algorithm, bucket_bytes=bucket_bytes,
        links=links, constants=constants, network_constants=network_constants, strategies=tuple(strategies),
        cpu_sharing=cpu_sharing, cores_busy=cores_busy,
    )  # fmt: skip
    check_same_plan(plan, world_comm)
    return plan
