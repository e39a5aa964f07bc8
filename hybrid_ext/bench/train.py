"""``hybrid-ext bench train``: samples/s and bytes per step of dp / mp / hybrid on one model, in one run.

Every strategy trains the same model on the same global batch (W ranks × micro-batch; under ``mp`` every
rank processes the whole global batch). Also measured, as the limit: ``compute-only`` — each rank does
exactly the per-rank work of ``hybrid`` (its conv micro-batch, its FC shards on the group's batch) with every
message skipped (:class:`MirrorTransport`). Bytes come from hybrid-ext's metrics (sent per rank per step);
``native`` reductions are recorded with a ring allreduce's traffic (what gloo and NCCL run for large buffers).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_ext.bench.mirror_transport import MirrorTransport
from hybrid_ext.comm import metrics
from hybrid_ext.launch import spawn


def build_model(name: str, classes: int = 10) -> nn.Module:
    """alexnet / vgg11 (torchvision, RGB input), or the demo's small digits_alexnet (3 input channels here)."""
    from hybrid_ext.train import models

    if name not in ("alexnet", "vgg11", "digits_alexnet"):
        raise ValueError(f"unknown model {name!r}; choose alexnet, vgg11 or digits_alexnet")
    return models.build(name, channels=3, classes=classes)


@dataclass
class TrainRow:
    run: str
    world: int
    samples_per_sec: float
    step_ms: float
    bytes_per_step: float
    messages_per_step: float


def _mirror_groups(world: int, mp_size: int, rank: int):
    from hybrid_ext.comm import Communicator
    from hybrid_ext.parallel.dims import Groups, ParallelDims

    dims = ParallelDims(world, mp_size)
    return Groups(
        dims=dims,
        rank=rank,
        world=Communicator(MirrorTransport(rank, world)),
        mp=Communicator(MirrorTransport(rank % mp_size, mp_size)),
        dp=Communicator(MirrorTransport(rank // mp_size, dims.dp)),
    )


def _train_rank(rank, world, model_name, strategy, reducer, mp_size, steps, warmup, micro_batch, size, mirror):
    import hybrid_ext

    groups = _mirror_groups(world, mp_size or world, rank) if mirror else None
    if mirror:  # no messages move, so ranks cannot compare fingerprints either
        hybrid_ext.set_check(False)
    model = hybrid_ext.parallelize(
        build_model(model_name), strategy=strategy, reducer=reducer, mp_size=None if mirror else mp_size,
        groups=groups, sync_initial_weights=not mirror,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = micro_batch * world if strategy == "mp" else micro_batch
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times, sent, messages = [], [], []
    for step in range(warmup + steps):
        with metrics.capture() as records:
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
        if step >= warmup:
            times.append(elapsed)
            # Native reductions are in the records too (metrics.record_native_allreduce): each byte counted once.
            sent.append(sum(r.bytes_sent for r in records))
            messages.append(sum(r.messages_sent for r in records))
    return {"times": times, "bytes": sent, "messages": messages}


def run_train_bench(
    model: str, world: int, runs: list[tuple[str, str, str]], micro_batch: int, size: int, steps: int, mp_size=None
) -> list[TrainRow]:
    rows = []
    for label, strategy, reducer in runs:
        mirror = label == "compute-only"
        results = spawn(
            _train_rank, world, model, strategy, reducer, mp_size, steps, 2, micro_batch, size, mirror,
            backend=None if mirror else "gloo", timeout=1800,
        )  # fmt: skip
        per_step = [max(ts) for ts in zip(*(r["times"] for r in results))]
        step = statistics.median(per_step)
        global_batch = micro_batch * world
        rows.append(
            TrainRow(
                run=label,
                world=world,
                samples_per_sec=global_batch / step,
                step_ms=step * 1e3,
                bytes_per_step=statistics.mean(results[0]["bytes"]),
                messages_per_step=statistics.mean(results[0]["messages"]),
            )
        )
    return rows


def format_markdown(rows: list[TrainRow]) -> str:
    base = next((r for r in rows if r.run.startswith("dp")), rows[0])
    lines = [
        "| run | samples/s | step ms | MB sent per rank per step | × dp bytes | × dp samples/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.run == "compute-only":  # the messages hybrid would send, skipped
            sent, ratio = "0 (skipped)", "-"
        else:
            sent = f"{r.bytes_per_step / 1e6:.2f}"
            ratio = f"{r.bytes_per_step / base.bytes_per_step:.3f}" if base.bytes_per_step else "-"
        lines.append(
            f"| {r.run} | {r.samples_per_sec:.1f} | {r.step_ms:.0f} | {sent} | {ratio} | "
            f"{r.samples_per_sec / base.samples_per_sec:.2f} |"
        )
    return "\n".join(lines)


def main(args) -> int:
    runs = []
    for item in args.runs.split(","):
        label = item.strip()
        if label == "compute-only":
            runs.append((label, "hybrid", "butterfly"))
        else:
            strategy, _, reducer = label.partition("-")
            runs.append((label, strategy, reducer or "butterfly"))
    rows = run_train_bench(args.model, args.np, runs, args.micro_batch, args.size, args.steps, args.mp_size)
    table = format_markdown(rows)
    print(table)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(table + "\n")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
