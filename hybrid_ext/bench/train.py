"""``hybrid-ext bench train``: samples/s and bytes per step of dp / mp / hybrid on one model, in one run.

Every strategy trains the same model on the same global batch (W ranks × micro-batch; under ``mp`` every
rank processes the whole global batch). ``ddp`` is the peer: torch's own ``DistributedDataParallel`` on the same
process group, the data-parallel step users already have. Also measured, as the limit: ``compute-only`` — each rank does
exactly the per-rank work of ``hybrid`` (its conv micro-batch, its FC shards on the group's batch) with every
message skipped (:class:`MirrorTransport`). Bytes come from hybrid-ext's metrics (sent per rank per step;
``native`` reductions record what a ring allreduce of their buffers sends). The timed steps follow at least 2
warm-up steps and the online tuner's trials (:mod:`hybrid_ext.comm.tuner`): they run what training runs.

``--device`` (cpu, cuda, auto: :mod:`hybrid_ext.train.device`) says where the model and its batches live.

Under a launcher (torchrun's ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) the launched processes
are the ranks and rank 0 prints; ``--hosts H [--nic RATE]`` runs it so, under torchrun, on an emulated cluster.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_ext.bench.mirror_transport import MirrorTransport
from hybrid_ext.comm import metrics, tuner
from hybrid_ext.launch import spawn
from hybrid_ext.launch.heap import steady_heap


def build_model(name: str, classes: int = 10) -> nn.Module:
    """alexnet / vgg11 / resnet18 (torchvision, RGB input), or the demo's small digits_alexnet (3 channels here)."""
    from hybrid_ext.train import models

    if name not in ("alexnet", "vgg11", "resnet18", "digits_alexnet"):
        raise ValueError(f"unknown model {name!r}; choose alexnet, vgg11, resnet18 or digits_alexnet")
    return models.build(name, channels=3, classes=classes)


@dataclass
class TrainRow:
    run: str
    world: int
    samples_per_sec: float
    step_ms: float
    bytes_per_step: float
    messages_per_step: float
    step_ms_runs: list[float] = field(default_factory=list)  # each repeat's median step (--repeats)
    mp_size: int | None = None  # the model-parallel group size the run used (1 under dp)
    chose: str | None = None  # an auto run: the plan it chose (its strategy, mp_size, what it split)
    chose_runs: list[str] = field(default_factory=list)  # an auto run: each repeat's choice (each decides anew)
    # Where the step went (CPU runs only: on a GPU the host reaches each point before the kernels end): forward with
    # the loss, backward with the reducer's waits, the optimizer, and the collectives' time from launch to result
    # (overlapping the others); each the median over steps of the slowest rank's, over the repeats.
    phases_ms: dict[str, float] | None = None


def parse_runs(text: str, world: int) -> list[tuple[str, str, str, int | None]]:
    """``--runs``: comma-separated ``STRATEGY-REDUCER[@MP_SIZE]`` (``hybrid-butterfly@2``: hybrid on groups of 2
    ranks; ``auto-butterfly``: ``parallelize(strategy="auto")``'s choice, ``@MP_SIZE`` fixing its group size) or
    ``compute-only[@MP_SIZE]``, or ``ddp`` (torch's DistributedDataParallel, its own allreduce), as (label, strategy,
    reducer, mp_size or None for ``--mp-size``'s); ValueError naming the run that cannot be run."""
    from hybrid_ext.parallel.reducer import GRAD_ALGORITHMS

    runs = []
    for item in text.split(","):
        label = item.strip()
        name, at, size = (part.strip() for part in label.partition("@"))
        if _is_compute_only(label):
            strategy, grad_algorithm = "hybrid", "butterfly"
        elif name == "ddp":
            strategy, grad_algorithm = "ddp", "native"
        else:
            strategy, _, grad_algorithm = name.partition("-")
            grad_algorithm = grad_algorithm or "butterfly"
            if strategy not in ("dp", "hybrid", "mp", "auto"):
                raise ValueError(
                    f"--runs: unknown strategy in {label!r}; expected dp, hybrid, mp or auto (dp-butterfly)"
                )
            if grad_algorithm not in GRAD_ALGORITHMS:
                raise ValueError(f"--runs: unknown reducer in {label!r}; expected one of {', '.join(GRAD_ALGORITHMS)}")
        mp_size = None
        if at:
            if strategy in ("dp", "ddp"):
                raise ValueError(
                    f"--runs: {label!r}: {strategy} has no model-parallel groups; @MP_SIZE is for hybrid and mp"
                )
            if not size.isdigit() or int(size) < 1 or world % int(size):
                raise ValueError(f"--runs: {label!r}: the mp_size after @ must divide the {world} ranks")
            mp_size = int(size)
        runs.append((label, strategy, grad_algorithm, mp_size))
    return runs


def _is_compute_only(label: str) -> bool:
    """Whether a run (its ``--runs`` label) is ``compute-only``, at its own mp_size or not."""
    return label.partition("@")[0].strip() == "compute-only"


def _mirror_groups(world: int, mp_size: int, rank: int, device: torch.device):
    from hybrid_ext.comm import Communicator
    from hybrid_ext.parallel.dims import Groups, ParallelDims

    dims = ParallelDims(world, mp_size)
    return Groups(
        dims=dims,
        rank=rank,
        world=Communicator(MirrorTransport(rank, world), device),
        mp=Communicator(MirrorTransport(rank % mp_size, mp_size), device),
        dp=Communicator(MirrorTransport(rank // mp_size, dims.dp), device),
    )


MAX_WARMUP_STEPS = 100  # a bound on the tuner's warm-up (a model with many bucket sizes tunes each)


def warm_up(one_step: Callable[[], object], warmup: int, trial_calls: Callable[[], int], on_any_rank) -> int:
    """Steps until the online tuner has stopped trying schedules, at least ``warmup``, so that the timed steps run
    what training will run; returns how many. A step ends the warm-up when no rank made a trial call in it
    (``on_any_rank(flag)``: the flag or-ed over the ranks): each rank has its own trials (a rank's groups are not
    its neighbour's: with mp_size 3 of 6, ranks 0 and 2 share a model-parallel group but not a data-parallel
    one), and ranks that stopped at different steps would wait for each other's collectives for ever."""
    for step in range(MAX_WARMUP_STEPS):
        before = trial_calls()
        one_step()
        if not on_any_rank(trial_calls() != before) and step + 1 >= warmup:
            return step + 1
    return MAX_WARMUP_STEPS


def _on_any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the job's ranks (one small all-reduce on the default process group)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _train_rank(
    rank, world, model_name, strategy, grad_algorithm, mp_size, steps, warmup, micro_batch, size, mirror, device="cpu"
):
    import hybrid_ext
    from hybrid_ext.train.device import this_rank_device

    steady_heap()  # every step's large tensors reused, not mapped afresh (HYBRID_EXT_HEAP): as plan's profile
    where = this_rank_device(device)
    groups = _mirror_groups(world, mp_size or world, rank, where) if mirror else None
    if mirror:  # no messages move, so ranks cannot compare fingerprints either
        hybrid_ext.set_check(False)
    batch = micro_batch * world if strategy == "mp" else micro_batch
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, size, size, generator=g).to(where)
    y = torch.randint(0, 10, (batch,), generator=g).to(where)
    if strategy == "ddp":
        model = _torch_ddp(build_model(model_name).to(where), where)
    else:
        model = hybrid_ext.parallelize(
            build_model(model_name).to(where), strategy=strategy, reducer=grad_algorithm,
            mp_size=None if mirror else mp_size, groups=groups, sync_initial_weights=not mirror,
            example_input=x if strategy == "auto" else None,
        )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, sent, messages, phases = [], [], [], []

    def one_step():
        with metrics.capture() as records:
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            forward_end = time.perf_counter()
            loss.backward()
            backward_end = time.perf_counter()
            optimizer.step()
            if where.type == "cuda":
                torch.cuda.synchronize(where)  # the step's kernels are queued, not done, when step() returns
            end = time.perf_counter()
        phase = {"forward": forward_end - start, "backward": backward_end - forward_end}
        phase["optimizer"] = end - backward_end
        if strategy != "ddp":  # torch's DDP records none of its allreduces: no time to show
            phase["collectives"] = sum(r.seconds for r in records)
        return end - start, records, phase

    # Mirror ranks send nothing, so they have no trials to agree on (and no process group).
    warm_up(one_step, warmup, tuner.trial_calls, (lambda tried: tried) if mirror else _on_any_rank)
    ddp_allreduces = _ddp_allreduces(model, rank, world) if strategy == "ddp" else None
    for _ in range(steps):
        elapsed, records, phase = one_step()
        times.append(elapsed)
        phases.append(phase)
        if ddp_allreduces is not None:  # torch's DDP records nothing
            records = ddp_allreduces
        sent.append(sum(r.bytes_sent for r in records))  # native reductions record a ring's traffic too
        messages.append(sum(r.messages_sent for r in records))
    chose = None
    if strategy == "auto":  # what auto chose, as its plan names it
        chose = model.plan.alternatives[0].label
    mp = 1 if strategy == "ddp" else model.groups.dims.mp
    timed = phases if where.type == "cpu" else []
    return {"times": times, "bytes": sent, "messages": messages, "mp_size": mp, "chose": chose, "phases": timed}


def _torch_ddp(model: nn.Module, where: torch.device) -> nn.Module:
    """``model`` under torch's DistributedDataParallel on the default process group, as its users build it."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[where.index] if where.type == "cuda" else None)


def _ddp_allreduces(model: nn.Module, rank: int, world: int) -> list[metrics.CollectiveRecord]:
    """What DDP's allreduces send in a step: one per bucket, as its logging data lists their bytes (fixed once the
    first steps have run), counted as native reductions are (a ring's)."""
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    sizes = [int(b) for b in str(model._get_ddp_logging_data().get("bucket_sizes", "")).split(",") if b.strip()]
    return [metrics.native_allreduce_record("torch", rank, world, b // dtype.itemsize, dtype, 0.0) for b in sizes]


def run_train_bench(
    model: str,
    world: int,
    runs: list[tuple[str, str, str]],
    micro_batch: int,
    size: int,
    steps: int,
    mp_size=None,
    device: str = "cpu",
    repeats: int = 1,
) -> list[TrainRow]:
    """Each run ``repeats`` times, the runs interleaved (A B C A B C: a machine that slows down or speeds up during
    the benchmark shifts every run alike); a row's step is the median of its repeats' median steps. A run is
    (label, strategy, reducer) or, with its own model-parallel group size, (label, strategy, reducer, mp_size)."""
    from hybrid_ext.bench.allreduce import launched
    from hybrid_ext.train.device import local_rank_and_size, this_job_backend

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    measured: list[list[list[dict]]] = [[] for _ in runs]  # run -> repeat -> every rank's result
    mp_sizes = [run[3] if len(run) > 3 and run[3] else mp_size for run in runs]  # a run's own, else --mp-size's
    for _repeat, (index, (label, strategy, grad_algorithm, *_)) in itertools.product(range(repeats), enumerate(runs)):
        mirror = _is_compute_only(label)
        run_mp_size = mp_sizes[index]
        if launched():  # this process is one rank of the launcher's job
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(this_job_backend(device, local_rank_and_size()[1]))
            torch.set_num_threads(1)
            world = dist.get_world_size()
            mine = _train_rank(dist.get_rank(), world, model, strategy, grad_algorithm, run_mp_size, steps, 2,
                               micro_batch, size, mirror, device)  # fmt: skip
            results: list = [None] * world
            dist.all_gather_object(results, mine)
        else:
            results = spawn(
                _train_rank, world, model, strategy, grad_algorithm, run_mp_size, steps, 2, micro_batch, size, mirror,
                device, backend=None if mirror else this_job_backend(device, world), timeout=1800,
            )  # fmt: skip
        measured[index].append(results)
    rows = []
    for (label, strategy, *_), run_mp_size, repeated in zip(runs, mp_sizes, measured):
        # A step lasts as long as its slowest rank; each repeat's median step, then their median.
        medians = [statistics.median(max(ts) for ts in zip(*(r["times"] for r in results))) for results in repeated]
        step = statistics.median(medians)
        rows.append(
            TrainRow(
                run=label,
                world=world,
                samples_per_sec=micro_batch * world / step,
                step_ms=step * 1e3,
                bytes_per_step=statistics.mean(repeated[0][0]["bytes"]),
                messages_per_step=statistics.mean(repeated[0][0]["messages"]),
                step_ms_runs=[m * 1e3 for m in medians],
                mp_size=_run_mp_size(strategy, run_mp_size, world, repeated[0][0]),
                chose=repeated[0][0].get("chose"),
                chose_runs=[results[0]["chose"] for results in repeated if results[0].get("chose")],
                phases_ms=_phases_ms(repeated),
            )
        )
    return rows


def _phases_ms(repeated: list[list[dict]]) -> dict[str, float] | None:
    """Each phase of the step in ms: per step the slowest rank's, the median over a repeat's steps, then over the
    repeats; None where the ranks timed none (a GPU run)."""
    if not all(rank.get("phases") for results in repeated for rank in results):
        return None
    names = repeated[0][0]["phases"][0].keys()
    per_repeat = {name: [] for name in names}
    for results in repeated:
        for name in names:
            slowest = [max(step[name] for step in steps) for steps in zip(*(rank["phases"] for rank in results))]
            per_repeat[name].append(statistics.median(slowest))
    return {name: statistics.median(values) * 1e3 for name, values in per_repeat.items()}


def _run_mp_size(strategy: str, asked: int | None, world: int, result: dict) -> int:
    """The model-parallel group size a run trained with: auto's choice (1 where it chose dp), else the one asked."""
    if strategy == "auto":
        return 1 if result["chose"] == "dp" else result["mp_size"]
    return 1 if strategy in ("dp", "ddp") else asked or world


def format_markdown(rows: list[TrainRow]) -> str:
    base = next((r for r in rows if r.run.startswith("dp")), rows[0])
    lines = [
        "| run | samples/s | step ms | MB sent per rank per step | × dp bytes | × dp samples/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if _is_compute_only(r.run):  # the messages hybrid would send, skipped
            sent, ratio = "0 (skipped)", "-"
        else:
            sent = f"{r.bytes_per_step / 1e6:.2f}"
            ratio = f"{r.bytes_per_step / base.bytes_per_step:.3f}" if base.bytes_per_step else "-"
        lines.append(
            f"| {r.run} | {r.samples_per_sec:.1f} | {r.step_ms:.0f} | {sent} | {ratio} | "
            f"{r.samples_per_sec / base.samples_per_sec:.2f} |"
        )
    timed = [r for r in rows if r.phases_ms]
    if timed:
        lines.append("\nwhere the step went, ms (collectives: launch to result, overlapping backward):")
        lines += [f"{r.run}: " + ", ".join(f"{name} {ms:.0f}" for name, ms in r.phases_ms.items()) for r in timed]
    for r in (r for r in rows if r.chose):
        choices = list(dict.fromkeys(r.chose_runs or [r.chose]))
        lines.append(f"\n{r.run} chose: {r.chose}")
        if len(choices) > 1:  # each repeat profiled and decided anew
            lines.append(f"{r.run}'s repeats chose differently: " + " | ".join(choices))
    return "\n".join(lines)


def main(args) -> int:
    from hybrid_ext.bench.allreduce import launched

    world = int(os.environ["WORLD_SIZE"]) if launched() else args.np  # launched: the launcher's variables are set
    try:
        runs = parse_runs(args.runs, world)
    except ValueError as error:
        print(f"hybrid-ext bench train: {error}", file=sys.stderr)
        return 2
    if getattr(args, "hosts", None):
        rows = _run_on_emulated_cluster(args)
        print(f"{args.np} ranks on {args.hosts} emulated hosts (egress {args.nic or 'unshaped'})")
    else:
        device = getattr(args, "device", "cpu")
        rows = run_train_bench(
            args.model, args.np, runs, args.micro_batch, args.size, args.steps, args.mp_size, device,
            getattr(args, "repeats", 1),
        )  # fmt: skip
        if launched():
            import torch.distributed as dist

            from hybrid_ext.launch import report_result

            report_result([asdict(r) for r in rows])
            if dist.get_rank() != 0:
                return 0
    from hybrid_ext.train.device import cuda_facts, resolve_device

    table = format_markdown(rows)
    print(f"device: {resolve_device(getattr(args, 'device', 'cpu'), *cuda_facts(), 0).type}")
    print(table)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(table + "\n")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


def _run_on_emulated_cluster(args) -> list[TrainRow]:
    """This benchmark under torchrun on ``args.hosts`` emulated hosts (``args.np`` ranks spread over them): one job
    per run and repeat, interleaved as on one host, so that a run starts in fresh processes (as a user's training
    job does) and holds no memory an earlier run left behind (six ranks of vgg11 did not fit in one job)."""
    from hybrid_ext.launch import cluster, run_torchrun

    labels = [label.strip() for label in args.runs.split(",") if label.strip()]
    repeats = getattr(args, "repeats", 1)
    measured: dict[str, list[TrainRow]] = {label: [] for label in labels}
    with cluster.emulated_cluster(args.hosts, args.nic, getattr(args, "cpus_per_host", None)) as hosts:
        for _repeat, label in itertools.product(range(repeats), labels):
            command = ["-m", "hybrid_ext.cli", "bench", "train", "--model", args.model, "--runs", label,
                       "--micro-batch", str(args.micro_batch), "--size", str(args.size),
                       "--steps", str(args.steps), "--device", getattr(args, "device", "cpu"),
                       "--repeats", "1"]  # fmt: skip
            if args.mp_size:
                command += ["--mp-size", str(args.mp_size)]
            results = run_torchrun(command, args.np, cluster=hosts, nodes=args.hosts, timeout=3600)
            measured[label].append(TrainRow(**results[0][0]))
    return [merge_repeats(rows) for rows in measured.values()]


def merge_repeats(rows: list[TrainRow]) -> TrainRow:
    """One run's rows of single repeats as one row: as :func:`run_train_bench` reports repeats run in one job (the
    step the median of the repeats' steps, each phase the median of the repeats', bytes of the first)."""
    first = rows[0]
    step_ms_runs = [ms for row in rows for ms in row.step_ms_runs]
    step_ms = statistics.median(step_ms_runs)
    phases = None
    if all(row.phases_ms for row in rows):
        phases = {name: statistics.median(row.phases_ms[name] for row in rows) for name in first.phases_ms}
    return TrainRow(
        run=first.run,
        world=first.world,
        samples_per_sec=first.samples_per_sec * first.step_ms / step_ms,
        step_ms=step_ms,
        bytes_per_step=first.bytes_per_step,
        messages_per_step=first.messages_per_step,
        step_ms_runs=step_ms_runs,
        mp_size=first.mp_size,
        chose=first.chose,
        chose_runs=[choice for row in rows for choice in row.chose_runs],
        phases_ms=phases,
    )
