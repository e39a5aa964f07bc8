"""``hybrid-ext plan``: the predicted training step of dp, hybrid and mp side by side, before anything runs.

Per-layer compute times are measured here, in one process on ``--device`` (:func:`hybrid_ext.parallel.layer_profile.
profile_layers`, at the micro-batch asked for), or read from a calibration file saved with ``--save-calibration``
(on a GPU machine, say); bytes and their cost come from :mod:`hybrid_ext.parallel.step_model`. Models are those
of ``hybrid-ext bench train`` (3-channel inputs of ``--size``), so its measurements compare with these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STRATEGIES = ("dp", "hybrid", "mp")
MODELS = ("alexnet", "vgg11", "digits_alexnet")


def add_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    from hybrid_ext.train.device import add_device_argument

    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--np", type=positive_int, required=True, help="ranks")
    parser.add_argument(
        "--mp-size", type=positive_int, help="model-parallel group size for hybrid and mp (default: all)"
    )
    parser.add_argument("--micro-batch", type=positive_int, default=16, help="samples per rank (default: 16)")
    parser.add_argument("--size", type=positive_int, default=64, help="input height and width (default: 64)")
    parser.add_argument(
        "--reducer", default="butterfly", help="gradient allreduce, as parallelize's (default: butterfly)"
    )
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size (default: 25)")
    parser.add_argument("--transport", default="shm", help="whose cost-model constants price messages (default: shm)")
    parser.add_argument("--calibration", metavar="FILE", help="per-layer times saved by --save-calibration")
    parser.add_argument("--save-calibration", metavar="FILE", help="write the per-layer times measured here")
    parser.add_argument("--profile-steps", type=positive_int, default=3, help="timed runs per layer (default: 3)")
    parser.add_argument("--json", metavar="FILE", help="write every figure, one entry per strategy")
    add_device_argument(parser)  # where the layers are profiled


def predictions(args: argparse.Namespace) -> dict:
    """Every strategy's predicted step as one JSON-ready dict (see :func:`main`)."""
    import torch

    from hybrid_ext.bench.train import build_model
    from hybrid_ext.parallel.dims import ParallelDims
    from hybrid_ext.parallel.layer_profile import load_calibration, profile_layers, save_calibration
    from hybrid_ext.parallel.plan import check_shardable, make_plan
    from hybrid_ext.parallel.step_model import predict_step
    from hybrid_ext.parallel.step_traffic import Links
    from hybrid_ext.train.device import this_rank_device

    mp_size = args.mp_size or args.np
    ParallelDims(args.np, mp_size)  # names the valid choices when mp_size does not divide the world
    device = this_rank_device(args.device)
    model = build_model(args.model).to(device)
    example = torch.randn(args.micro_batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    example = example.to(device)
    if args.calibration:
        table = load_calibration(args.calibration, model, example)
        source = f"calibration {args.calibration} ({table.device}, micro-batch {table.micro_batch})"
    else:
        table = profile_layers(model, example, steps=args.profile_steps)
        source = f"measured here ({table.device}, micro-batch {table.micro_batch})"
    if args.save_calibration:
        save_calibration(table, args.save_calibration)
    entries = []
    for strategy in STRATEGIES:
        plan = make_plan(model, strategy)
        size = 1 if strategy == "dp" else mp_size
        check_shardable(model, plan, size)
        step = predict_step(
            model, table, plan.styles, strategy, args.np, size, args.micro_batch, args.reducer,
            int(args.bucket_mb * (1 << 20)), Links(args.transport),
        )  # fmt: skip
        entries.append(
            {
                "strategy": strategy,
                "mp_size": size,
                "step_ms": step.step_s * 1e3,
                "compute_ms": step.compute_s * 1e3,
                "exposed_communication_ms": step.exposed_communication_s * 1e3,
                "bytes_per_rank": step.bytes_sent,
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
                    {"name": b.transfer.name, "bytes": b.transfer.bytes_sent, "ms": b.seconds * 1e3}
                    for b in step.buckets
                ],
            }
        )
    return {
        "model": args.model,
        "world": args.np,
        "micro_batch": args.micro_batch,
        "size": args.size,
        "reducer": args.reducer,
        "transport": args.transport,
        "layer_times": source,
        "strategies": entries,
    }


def table_text(result: dict) -> str:
    lines = [
        f"hybrid-ext plan: {result['model']} ({result['size']}×{result['size']}), {result['world']} ranks, "
        f"micro-batch {result['micro_batch']}; layer times {result['layer_times']}; messages priced as "
        f"{result['transport']}",
        f"  {'strategy':<9}{'mp_size':>8}{'step ms':>11}{'compute ms':>12}{'exposed comm ms':>17}"
        f"{'bytes/rank':>14}{'samples/s':>12}",
    ]
    for e in result["strategies"]:
        lines.append(
            f"  {e['strategy']:<9}{e['mp_size']:>8}{e['step_ms']:>11.2f}{e['compute_ms']:>12.2f}"
            f"{e['exposed_communication_ms']:>17.2f}{e['bytes_per_rank']:>14,}{e['samples_per_s']:>12.1f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        result = predictions(args)
    except ValueError as exc:
        print(f"hybrid-ext plan: {exc}", file=sys.stderr)
        return 2
    print(table_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
