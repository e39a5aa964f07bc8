"""``hybrid-ext plan``: the predicted training step of dp, hybrid, mp and auto side by side, before anything runs.

Per-layer compute times are measured here, in one process on ``--device`` (:func:`hybrid_ext.parallel.layer_profile.
profile_layers`, at the micro-batch asked for), or read from a calibration file saved with ``--save-calibration``
(on a GPU machine, say); bytes and their cost come from :mod:`hybrid_ext.parallel.step_model`. Models are those
of ``hybrid-ext bench train`` (3-channel inputs of ``--size``), so its measurements compare with these figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

STRATEGIES = ("dp", "hybrid", "mp")
MODELS = ("alexnet", "vgg11", "resnet18", "digits_alexnet")
SCALING_RANKS = tuple(1 << k for k in range(11))  # the --png plot: 1 to 1,024 ranks


def model_spec(text: str) -> str:
    """``--model``: a built-in name, or ``module:factory`` (a function of no arguments that returns the model)."""
    module, _, factory = text.partition(":")
    if text in MODELS or (module and factory and all(part.isidentifier() for part in module.split("."))):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose {', '.join(MODELS)}, or module:factory for a model of your own)"
    )


def build_planned_model(spec: str):
    """The model ``--model`` names: a built-in one (3-channel inputs) or ``factory()`` of ``module:factory``."""
    import importlib

    import torch

    if spec in MODELS:
        from hybrid_ext.bench.train import build_model

        return build_model(spec)
    module_name, _, factory_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {module_name!r} has no function {factory_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def add_arguments(parser: argparse.ArgumentParser, positive_int, positive_float) -> None:
    from hybrid_ext.train.device import add_device_argument

    parser.add_argument(
        "--model",
        required=True,
        type=model_spec,
        help=f"{', '.join(MODELS)}, or module:factory (a function returning your model; 3-channel inputs of --size)",
    )
    parser.add_argument("--np", type=positive_int, help="ranks (default: --hosts × --ranks-per-host)")
    parser.add_argument(
        "--mp-size", type=positive_int, help="model-parallel group size for hybrid and mp (default: all)"
    )
    parser.add_argument("--micro-batch", type=positive_int, default=16, help="samples per rank (default: 16)")
    parser.add_argument("--size", type=positive_int, default=64, help="input height and width (default: 64)")
    parser.add_argument(
        "--reducer", default="butterfly", help="gradient allreduce, as parallelize's (default: butterfly)"
    )
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size (default: 25)")
    parser.add_argument("--transport", default="shm", help="the transport inside a host: its constants (default: shm)")
    parser.add_argument(
        "--hosts", type=positive_int, help="hosts the ranks are spread over, --np/H consecutive ranks each"
    )
    parser.add_argument(
        "--ranks-per-host", type=positive_int, help="ranks on each host (with --hosts, --np is their product)"
    )
    parser.add_argument("--network", default="torch-gloo", help="the transport between hosts (default: torch-gloo)")
    parser.add_argument("--nic", metavar="RATE", help="with --hosts: each host's link rate (tc syntax: 1gbit)")
    parser.add_argument("--calibration", metavar="FILE", help="per-layer times saved by --save-calibration")
    parser.add_argument("--save-calibration", metavar="FILE", help="write the per-layer times measured here")
    parser.add_argument("--profile-steps", type=positive_int, default=3, help="timed runs per layer (default: 3)")
    parser.add_argument(
        "--cores",
        type=positive_float,
        help="CPU cores per host the ranks share (default: those this process may use, its affinity and CPU quota, "
        "as the ranks count them; cpu only; may be a fraction, as `hybrid-ext cluster up --cpus-per-host` gives)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads per rank while profiling (default: 1, as ranks run)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure, one entry per strategy")
    parser.add_argument(
        "--compare",
        metavar="FILE",
        help="measured steps (`hybrid-ext bench train --json FILE`, same model and layout): each strategy's error, "
        "the ranking, and how far auto's choice ran from the fastest",
    )
    parser.add_argument(
        "--png",
        metavar="FILE",
        help="plot the predicted samples/s of each strategy from 1 to 1,024 ranks, --ranks-per-host to a host",
    )
    parser.add_argument(
        "--measure-sharing",
        action="store_true",
        help="cpu, for layouts whose ranks all run on this machine (one host, or hosts emulated on it): measure how "
        "much slower each rank computes with all --np at once (training steps in lockstep, each at its slowest "
        "rank, against one process alone) instead of taking ranks per host × threads / cores",
    )
    parser.add_argument(
        "--auto-strategies",
        type=_strategy_list,
        default=("dp", "hybrid"),
        help="what auto weighs, as parallelize's auto_strategies (default: dp,hybrid; add mp where the script "
        "passes every rank the global batch under mp)",
    )
    parser.add_argument("--layers", action="store_true", help="also print each strategy's step layer by layer")
    add_device_argument(parser)  # where the layers are profiled


def _core_sharing(args: argparse.Namespace, table, per_host: int) -> dict:
    """:func:`~hybrid_ext.parallel.step_model.host_sharing` of ``per_host`` ranks on ``--cores``, ``--threads``."""
    from hybrid_ext.comm.host_cores import usable_cores
    from hybrid_ext.parallel.step_model import host_sharing

    return host_sharing(per_host, args.threads, args.cores or usable_cores(), table.device.startswith("cpu"))


SHARING_STEPS = 5  # the fewest lockstep steps σ is timed over: a median of maxima over ranks needs a few


def measured_sharing(model_spec: str, ranks: int, example, threads: int = 1, steps: int = 3) -> float:
    """σ measured: training steps of the model (forward, backward and SGD with momentum's update, what σ scales)
    on ``example``, on ``ranks`` processes of this machine in lockstep — a barrier before each step, as the ranks of
    a synchronous step start it together — each step as long as its slowest rank (as ``bench train`` counts a
    step); their median against the same steps of one process alone, spawned alike. Emulated hosts share this
    machine, so every rank of the layout counts."""
    from hybrid_ext.launch import spawn

    steps = max(steps, SHARING_STEPS)
    (alone,) = spawn(_sharing_rank, 1, model_spec, example, steps, threads=threads, timeout=1800)
    together = spawn(_sharing_rank, ranks, model_spec, example, steps, threads=threads, timeout=1800)
    slowest = [max(step) for step in zip(*together)]
    return max(1.0, statistics.median(slowest) / statistics.median(alone))


def _sharing_rank(rank: int, world: int, model_spec: str, example, steps: int) -> list[float]:
    """This rank's seconds of each of ``steps`` training steps, each started together with the other ranks."""
    import torch
    import torch.distributed as dist

    from hybrid_ext.parallel.layer_profile import first_tensor

    model = build_planned_model(model_spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        first_tensor(model(example)).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()  # warm up (the optimizer's state, the allocator) before the ranks start together
    seconds = []
    for _ in range(steps):
        dist.barrier()
        began = time.perf_counter()
        train_step()
        seconds.append(time.perf_counter() - began)
    return seconds


def _strategy_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(STRATEGIES)}, comma-separated; got {text!r}")
    return names


def predictions(args: argparse.Namespace) -> tuple[dict, list]:
    """(every strategy's predicted step as one JSON-ready dict, the :class:`~hybrid_ext.parallel.step_model.
    StepPrediction` of each)."""
    import torch

    from hybrid_ext.launch.heap import steady_heap
    from hybrid_ext.parallel.auto_plan import choose_plan
    from hybrid_ext.parallel.dims import ParallelDims
    from hybrid_ext.parallel.layer_profile import load_calibration, profile_layers, save_calibration
    from hybrid_ext.parallel.plan import check_shardable, plan_by_rules
    from hybrid_ext.parallel.step_model import predict_step
    from hybrid_ext.train.device import this_rank_device

    mp_size = args.mp_size or args.np
    ParallelDims(args.np, mp_size)  # names the valid choices when mp_size does not divide the world
    links, network_constants = _links(args)
    device = this_rank_device(args.device)
    model = build_planned_model(args.model).to(device)
    example = torch.randn(args.micro_batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    example = example.to(device)
    if args.calibration:
        table = load_calibration(args.calibration, model, example)
        source = f"calibration {args.calibration} ({table.device}, micro-batch {table.micro_batch})"
    else:
        # Ranks of a job run one CPU thread each (torchrun's OMP_NUM_THREADS=1, hybrid-ext's spawn): profile so,
        # on the heap hybrid-ext's ranks run on (HYBRID_EXT_HEAP).
        steady_heap()
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            table = profile_layers(model, example, steps=args.profile_steps)
        finally:
            torch.set_num_threads(threads)
        source = f"measured here ({table.device}, {args.threads} thread(s), micro-batch {table.micro_batch})"
    if args.save_calibration:
        save_calibration(table, args.save_calibration)
    entries, steps = [], []
    # Ranks of one host share its cores: each computes R·t/C times slower than the profile measured it alone.
    per_host = args.np // (args.hosts or 1)
    shared = _core_sharing(args, table, per_host)
    sharing = "ranks × threads / cores"
    if args.measure_sharing:
        if not table.device.startswith("cpu"):
            raise ValueError(
                f"--measure-sharing times ranks sharing this machine's CPU; the layer times are {table.device}'s"
            )
        # The cores' share is a floor: N ranks busy on C cores cannot each compute faster than C/N of alone (what
        # a measure below it says is noise, ±10 % here); the measure adds what the share cannot see (memory
        # bandwidth, caches, the hypervisor).
        measured = measured_sharing(args.model, args.np, example, args.threads, args.profile_steps)
        sharing = f"measured: {args.np} ranks at once against one alone"
        if measured < shared["compute_scale"]:
            sharing += f", {measured:.2f}, below the cores' share, which is kept"
        shared["compute_scale"] = max(shared["compute_scale"], measured)
    for strategy in STRATEGIES:
        plan = plan_by_rules(model, strategy)
        size = 1 if strategy == "dp" else mp_size
        check_shardable(model, plan, size)
        step = predict_step(
            model, table, plan.styles, strategy, args.np, size, args.micro_batch, args.reducer,
            int(args.bucket_mb * (1 << 20)), links, network_constants=network_constants, **shared,
        )  # fmt: skip
        steps.append(step)
        entries.append(_entry(strategy, size, step))
    # auto: each Linear chain sharded or replicated, convolutions split where they pay, and mp_size, for the least
    # step the same model predicts
    chosen = choose_plan(
        model, table, args.np, args.micro_batch, [args.mp_size] if args.mp_size else None, args.reducer,
        int(args.bucket_mb * (1 << 20)), links, network_constants=network_constants, strategies=args.auto_strategies,
        **shared,
    )  # fmt: skip
    steps.append(chosen.prediction)
    best = chosen.alternatives[0]
    entries.append(
        {
            **_entry("auto", chosen.mp_size, chosen.prediction),
            "chose": chosen.strategy,
            "plan": best.label,
            "sharded_chains": list(best.sharded),
            "split_convolutions": list(best.convolutions),
            # whether the explicit strategy's run (at auto's mp_size) trains this very plan, and so measures it
            "same_as_strategy": chosen.styles == plan_by_rules(model, chosen.strategy).styles,
        }
    )
    scaling = _scaling(args, model, table) if args.png else None
    return {
        "model": args.model,
        "world": args.np,
        "micro_batch": args.micro_batch,
        "size": args.size,
        "reducer": args.reducer,
        "transport": args.transport,
        "hosts": args.hosts or 1,
        "network": args.network if args.hosts else None,
        "nic": args.nic,
        "link": _link_entry(args) if args.hosts else None,
        "layer_times": source,
        "compute_scale": shared["compute_scale"],
        "compute_scale_source": sharing,
        "cpu_sharing": shared["cpu_sharing"],
        "cores_busy": shared["cores_busy"],
        "strategies": entries,
        **({"scaling": scaling} if scaling is not None else {}),
    }, steps


def _scaling(args: argparse.Namespace, model, table) -> list[dict]:
    """Predicted samples/s of dp, hybrid, mp and auto at 1 to 1,024 ranks, ``--ranks-per-host`` to a host (a
    strategy its layers cannot take at a size, such as 10 classes over 16 ranks, has no point there)."""
    from hybrid_ext.parallel.auto_plan import choose_plan
    from hybrid_ext.parallel.plan import check_shardable, plan_by_rules
    from hybrid_ext.parallel.step_model import predict_step
    from hybrid_ext.parallel.step_traffic import Links

    per_host = args.ranks_per_host or args.np // (args.hosts or 1)
    network_constants = _network_constants(args)
    bucket = int(args.bucket_mb * (1 << 20))
    points = []
    for world in SCALING_RANKS:
        local = min(world, per_host)
        hosts = tuple(r // local for r in range(world)) if world > local else None
        links = Links(args.transport, hosts=hosts, network=args.network) if hosts else Links(args.transport)
        shared = _core_sharing(args, table, local)
        shard = min(args.mp_size or local, world)
        point: dict = {"ranks": world, "hosts": world // local}
        for strategy, size in (("dp", 1), ("hybrid", shard), ("mp", world)):
            plan = plan_by_rules(model, strategy)
            try:
                if world % size:
                    raise ValueError("mp_size does not divide the ranks")
                check_shardable(model, plan, size)
            except ValueError:
                point[strategy] = None
                continue
            step = predict_step(
                model, table, plan.styles, strategy, world, size, args.micro_batch, args.reducer, bucket, links,
                network_constants=network_constants, **shared,
            )  # fmt: skip
            point[strategy] = step.samples_per_s
        candidates = [shard] if world % shard == 0 else None
        chosen = choose_plan(
            model, table, world, args.micro_batch, candidates, args.reducer, bucket, links,
            network_constants=network_constants, strategies=args.auto_strategies, **shared,
        )  # fmt: skip
        point["auto"] = chosen.prediction.samples_per_s
        point["auto_chose"] = f"{chosen.strategy} (mp_size {chosen.mp_size})"
        points.append(point)
    return points


def plot_scaling(result: dict, path: str) -> None:
    """The ``--png`` plot: predicted samples/s against ranks, one line per strategy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError(f"--png needs matplotlib (pip install 'hybrid-ext[vision]'): {exc}") from exc
    points = result["scaling"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for strategy, style in (("dp", "o-"), ("hybrid", "s-"), ("mp", "^-"), ("auto", "k--")):
        xs = [p["ranks"] for p in points if p.get(strategy)]
        axes.plot(xs, [p[strategy] for p in points if p.get(strategy)], style, label=strategy, markersize=4)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("ranks")
    axes.set_ylabel("predicted samples/s")
    link = f", {result['nic']} between hosts" if result.get("nic") else ""
    per_host = points[-1]["ranks"] // points[-1]["hosts"]
    axes.set_title(f"{result['model']}, micro-batch {result['micro_batch']}, {per_host} ranks per host{link}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _entry(strategy: str, size: int, step) -> dict:
    return {
        "strategy": strategy,
        "mp_size": size,
        "step_ms": step.step_s * 1e3,
        "compute_ms": step.compute_s * 1e3,
        "optimizer_ms": step.optimizer_s * 1e3,
        "reducer_ms": step.reducer_s * 1e3,
        "exposed_communication_ms": step.exposed_communication_s * 1e3,
        "bytes_per_rank": step.bytes_sent,
        "bytes_per_host_link": step.host_link_bytes,
        "samples_per_s": step.samples_per_s,
        "slowest_rank": step.rank,
        "layers": [
            {
                "path": layer.path,
                "style": layer.style,
                "forward_ms": layer.forward_s * 1e3,
                "backward_ms": layer.backward_s * 1e3,
                "communication_ms": layer.communication_s * 1e3,
                "bytes": layer.bytes_sent,
            }
            for layer in step.layers
        ],
        "gradient_buckets": [
            {"name": b.transfer.name, "bytes": b.transfer.bytes_sent, "ms": b.seconds * 1e3} for b in step.buckets
        ],
    }


def _links(args: argparse.Namespace):
    """(the links of ``--hosts`` hosts with ``--np``/H consecutive ranks each, the network's constants at ``--nic``)."""
    from hybrid_ext.parallel.step_traffic import Links

    if not args.hosts:
        if args.nic:
            raise ValueError("--nic is the rate of the links between hosts: give --hosts too")
        return Links(args.transport), None
    if args.np % args.hosts:
        raise ValueError(f"--np {args.np} ranks do not spread evenly over --hosts {args.hosts}")
    per_host = args.np // args.hosts
    links = Links(args.transport, hosts=tuple(r // per_host for r in range(args.np)), network=args.network)
    return links, _network_constants(args)


def _link_entry(args: argparse.Namespace) -> dict:
    """What a message between hosts costs in these predictions, and where its constants come from."""
    from hybrid_ext.comm import cost_model

    constants = _network_constants(args) or cost_model.network_model(args.network)
    if cost_model.network_calibrated(args.network):
        source = f"calibrated ({cost_model.network_model_key(args.network)})"
    else:
        source = f"{args.network}'s own, not calibrated between hosts (bench allreduce --hosts H --calibrate)"
    return {
        "alpha_s": constants.alpha,
        "beta_s_per_byte": constants.beta,
        "cpu_s_per_byte": constants.cpu_per_byte,
        "source": source,
    }


def _network_constants(args: argparse.Namespace):
    """The constants of a message between hosts: the link's calibration (``bench allreduce --hosts H --calibrate``)
    or the network transport's, with β at ``--nic``'s rate where given (else None: the step model looks them up)."""
    if not args.nic:
        return None
    from dataclasses import replace

    from hybrid_ext.comm import cost_model
    from hybrid_ext.launch.cluster import rate_bytes_per_second

    return replace(
        cost_model.network_model(args.network), beta=cost_model.beta_at_line_rate(rate_bytes_per_second(args.nic))
    )


def table_text(result: dict) -> str:
    spread = ""
    if result["hosts"] > 1:
        link = result["link"]
        spread = (
            f" on {result['hosts']} hosts ({result['network']}{', ' + result['nic'] if result['nic'] else ''}; "
            f"a message between hosts {link['alpha_s'] * 1e3:.3g} ms, the hosts' CPU "
            f"{link.get('cpu_s_per_byte', 0.0) * 1e9:.2g} ns a byte, {link['source']})"
        )
    busy = " (every core computing: the gradients' copies and reductions cannot overlap)" * result["cores_busy"]
    lines = [
        f"hybrid-ext plan: {result['model']} ({result['size']}×{result['size']}), {result['world']} ranks{spread}, "
        f"micro-batch {result['micro_batch']}; layer times {result['layer_times']}, ×{result['compute_scale']:.3g} for "
        f"ranks sharing cores ({result.get('compute_scale_source', 'ranks × threads / cores')}){busy}; inside a host "
        f"{result['transport']}",
        f"  {'strategy':<11}{'mp_size':>8}{'step ms':>11}{'compute ms':>12}{'exposed comm ms':>17}"
        f"{'bytes/rank':>14}{'bytes/host link':>17}{'samples/s':>12}",
    ]
    for e in result["strategies"]:
        name = f"auto:{e['chose']}" if e["strategy"] == "auto" else e["strategy"]
        lines.append(
            f"  {name:<11}{e['mp_size']:>8}{e['step_ms']:>11.2f}{e['compute_ms']:>12.2f}"
            f"{e['exposed_communication_ms']:>17.2f}{e['bytes_per_rank']:>14,}{e['bytes_per_host_link']:>17,}"
            f"{e['samples_per_s']:>12.1f}"
        )
    lines += [f"  auto chose {e['plan']}" for e in result["strategies"] if e["strategy"] == "auto" and e.get("plan")]
    return "\n".join(lines)


def compare(result: dict, measured_rows: list[dict], grad_algorithm: str) -> dict:
    """Predicted against measured step ms per strategy (bench train rows named ``<strategy>-<grad algorithm>``,
    at the mp_size this plan gives the strategy; a row without ``mp_size`` is taken to be at it): each error, their
    mean absolute and worst, whether the two rank the strategies alike, and the measured step of auto's choice
    against the fastest measured (ValueError: no row to compare). Auto's choice is measured by bench train's own
    auto run where there is one (``auto-butterfly``: what ``parallelize(strategy="auto")`` chose on those ranks,
    named in ``auto_run_chose``), else by the row of its strategy at its mp_size (``hybrid-butterfly@2``, say) where
    that trains the same plan; the fastest is over every row of the reducer, other mp_sizes and auto's included.
    Rows measured with ``--repeats`` carry each repeat's step: two strategies whose repeats' ranges overlap are
    tied, and the ranking is right when every pair it orders otherwise than the measurements is tied
    (``ranking_exact``: the orders are the same); auto's choice is tied with the fastest likewise."""
    planned = {e["strategy"]: e for e in result["strategies"]}
    measured, spread, repeats, auto_row = {}, {}, {}, None
    at_mp_size: dict[tuple[str, int], float] = {}  # (strategy, mp_size) -> measured ms, every mp_size
    ranges: dict[tuple[str, int], tuple[float, float]] = {}  # the range its repeats spanned (bench train --repeats)
    for row in measured_rows:
        strategy, _, algorithm = str(row.get("run", "")).partition("@")[0].partition("-")
        if strategy not in (*STRATEGIES, "auto") or (algorithm or "butterfly") != grad_algorithm:
            continue
        if strategy == "auto":  # bench train's own auto run: what parallelize(strategy="auto") chose there, trained
            if auto_row is not None:
                raise ValueError(f"--compare: more than one auto run of --reducer {grad_algorithm}: {row.get('run')}")
            auto_row, plan_mp_size = row, None
            key = ("auto", row.get("mp_size"))
        else:
            plan_mp_size = planned[strategy]["mp_size"] if strategy in planned else None
            key = (strategy, row.get("mp_size") or plan_mp_size)
        at_mp_size[key] = float(row["step_ms"])
        runs = [float(ms) for ms in row.get("step_ms_runs") or []]
        if len(runs) >= 2:
            ranges[key] = (min(runs), max(runs))
        if strategy == "auto" or key[1] != plan_mp_size:
            continue
        measured[strategy] = float(row["step_ms"])
        repeats[strategy] = max(1, len(runs))
        spread[strategy] = ranges.get(key)
    predicted = {e["strategy"]: e["step_ms"] for e in result["strategies"] if e["strategy"] in measured}
    if not predicted:
        names = sorted(str(row.get("run")) for row in measured_rows)
        raise ValueError(
            f"--compare: no measured run of {', '.join(STRATEGIES)} with --reducer {grad_algorithm} at the plan's "
            f"mp_size: {names}"
        )
    errors = {s: (predicted[s] - measured[s]) / measured[s] for s in predicted}
    by_prediction = sorted(predicted, key=predicted.get)
    by_measurement = sorted(predicted, key=measured.get)
    # Two strategies whose repeated measurements overlap are tied: no order between them was measured.
    ties = [(a, b) for a, b in itertools.combinations(by_measurement, 2) if _overlap(spread[a], spread[b])]
    swapped = [
        (a, b)
        for a, b in itertools.combinations(by_measurement, 2)
        if predicted[a] > predicted[b] and (a, b) not in ties
    ]
    auto = planned["auto"]
    chose = auto["chose"]
    # Measured where bench train ran auto itself, else by the run of its strategy at its mp_size where that trains
    # the same plan (not where auto split only some layers: a convolution, or some of the chains).
    if auto_row is not None:
        auto_key = ("auto", auto_row.get("mp_size"))
    elif auto.get("same_as_strategy", True):
        auto_key = (chose, 1 if chose == "dp" else auto["mp_size"])
    else:
        auto_key = None
    auto_ms = at_mp_size.get(auto_key)
    fastest = min(at_mp_size, key=at_mp_size.get)
    # As two strategies are: tied with the fastest (being another row) where their repeats' ranges overlap.
    auto_tied = auto_key != fastest and _overlap(ranges.get(auto_key), ranges.get(fastest))
    # The prediction of auto's plan is checked only where the measured run trained that plan in every repeat.
    if auto_row is not None:
        same_plan = set(auto_row.get("chose_runs") or [auto_row.get("chose")]) == {auto.get("plan")}
    else:
        same_plan = auto_key is not None
    auto_error = (auto["step_ms"] - auto_ms) / auto_ms if auto_ms is not None and same_plan else None
    return {
        "rows": [
            {"strategy": s, "predicted_ms": predicted[s], "measured_ms": measured[s], "error": errors[s]}
            for s in predicted
        ],
        "mean_absolute_error": sum(abs(e) for e in errors.values()) / len(errors),
        "worst_error": max(errors.values(), key=abs),
        "ranking_right": not swapped,
        "ranking_exact": by_prediction == by_measurement,
        "ties": [list(pair) for pair in ties],
        "repeats": repeats,
        "auto_chose": auto.get("plan") or (chose if chose == "dp" else f"{chose} (mp_size {auto['mp_size']})"),
        "auto_measured_ms": auto_ms,
        "auto_over_fastest": auto_ms / at_mp_size[fastest] if auto_ms is not None else None,
        "auto_tied_with_fastest": auto_tied,
        "auto_run_chose": auto_row.get("chose") if auto_row else None,
        "auto_run_same_plan": same_plan if auto_row else None,  # whether the ranks trained the plan predicted here
        "auto_predicted_ms": auto["step_ms"],
        "auto_error": auto_error,  # None where the measured run trained another plan (or none)
        # each repeat of an auto run profiles and decides anew: its median may mix plans
        "auto_run_choices_differ": bool(auto_row) and len(set(auto_row.get("chose_runs") or [])) > 1,
    }


def _overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two runs' ranges of repeated steps overlap (a run measured once has none: it overlaps nothing)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def comparison_text(comparison: dict) -> str:
    lines = [f"  {'strategy':<11}{'predicted ms':>14}{'measured ms':>13}{'error':>9}"]
    for row in comparison["rows"]:
        lines.append(
            f"  {row['strategy']:<11}{row['predicted_ms']:>14.1f}{row['measured_ms']:>13.1f}{row['error']:>+9.1%}"
        )
    auto = comparison["auto_over_fastest"]
    ties = "".join(f" ({a} and {b} tied)" for a, b in comparison.get("ties", []))
    measured = (f", measured {auto:.3f}× the fastest" if auto is not None else " (not measured)") + (
        " (their repeats overlap: tied)" if comparison.get("auto_tied_with_fastest") else ""
    )
    run = (
        f"; bench train's auto run chose {comparison['auto_run_chose']}"
        + (" (its repeats chose differently)" if comparison.get("auto_run_choices_differ") else "")
        if comparison.get("auto_run_chose")
        else ""
    )
    if run and comparison.get("auto_run_same_plan") is False:  # the measurement is of the plan the ranks trained
        auto_text = f"auto chose {comparison['auto_chose']}{run}{measured}"
    else:
        predicted = (
            f", predicted {comparison['auto_predicted_ms']:.1f} ms: {comparison['auto_error']:+.1%}"
            if comparison.get("auto_error") is not None
            else ""
        )
        auto_text = f"auto chose {comparison['auto_chose']}{measured}{predicted}{run}"
    lines.append(
        f"  mean |error| {comparison['mean_absolute_error']:.1%}, worst {comparison['worst_error']:+.1%}; ranking "
        f"{'right' if comparison['ranking_right'] else 'WRONG'}{ties}; {auto_text}"
    )
    return "\n".join(lines)


def _layout(args: argparse.Namespace) -> None:
    """``--np`` from ``--hosts`` × ``--ranks-per-host`` where it is not given; ValueError where they disagree."""
    if args.ranks_per_host:
        if args.np is None:
            if not args.hosts:
                raise ValueError("--ranks-per-host: give --hosts (or --np) too")
            args.np = args.hosts * args.ranks_per_host
        elif args.np % args.ranks_per_host:
            raise ValueError(f"--np {args.np} is not a multiple of --ranks-per-host {args.ranks_per_host}")
        elif args.hosts and args.hosts * args.ranks_per_host != args.np:
            raise ValueError(f"--np {args.np} is not --hosts {args.hosts} × --ranks-per-host {args.ranks_per_host}")
        elif not args.hosts and args.np > args.ranks_per_host:
            args.hosts = args.np // args.ranks_per_host
    if args.np is None:
        raise ValueError("give --np, or --hosts and --ranks-per-host")


def main(args: argparse.Namespace) -> int:
    try:
        _layout(args)
        result, steps = predictions(args)
        if args.compare:
            try:
                rows = json.loads(Path(args.compare).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"--compare {args.compare}: {exc}") from exc
            result["comparison"] = compare(result, rows, args.reducer)
        if args.png:
            plot_scaling(result, args.png)
    except ValueError as exc:
        print(f"hybrid-ext plan: {exc}", file=sys.stderr)
        return 2
    print(table_text(result))
    if "comparison" in result:
        print(f"against {args.compare}:\n{comparison_text(result['comparison'])}")
    if args.layers:
        for step in steps:
            print(f"\n{step.describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
