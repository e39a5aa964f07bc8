"""Measure every way to run a butterfly under Horovod against ``hvd.allreduce``; run under horovodrun.

    horovodrun -np 4 -H localhost:4 --gloo python -m hybrid_ext.integrations.horovod.bench --sizes 1K,1M,64M
    hybrid-ext bench horovod --np 4                     # the same, launching horovodrun itself

Candidates (each checked against ``hvd.allreduce`` before it is timed):

- ``hvd.Butterfly``: the registered op — the butterfly over the side channel (shared memory on one host);
- ``side channel, gloo``: the same schedule over the side channel's gloo pairs (what ranks on several hosts use);
- ``hvd.alltoall``: each butterfly step one ``hvd.alltoall`` with splits to the partner only (power-of-two p);
- ``pair process sets``: Rabenseifner as Horovod collectives — per level one ``hvd.reducescatter`` over the
  2-rank set {r, r xor 2^k}, then ``hvd.allgather`` back (power-of-two p; needs dynamic process sets).

Prints a Markdown table of median times (the slowest rank's) and ratios to ``hvd.allreduce``; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from hybrid_ext.bench.allreduce import format_size, parse_size

CANDIDATES = ("hvd.allreduce", "hvd.Butterfly", "side channel, gloo", "hvd.alltoall", "pair process sets")


def _time(fn: Callable[[], object], reps: int) -> float:
    import horovod.torch as hvd

    fn()  # warm-up: connections, buffers, negotiation caches
    samples = []
    for _ in range(reps):
        hvd.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    slowest = hvd.allreduce(torch.tensor([statistics.median(samples)]), op=hvd.Max, name="bench.max")
    return slowest.item()


def _on(comm, x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    comm.allreduce([y], op="avg", name="bench.butterfly")
    return y


def _pair_sets(hvd) -> list:
    """Per level k, the 2-rank process set this rank is in (every rank adds every pair, in the same order)."""
    p, rank = hvd.size(), hvd.rank()
    mine = []
    for k in range(p.bit_length() - 1):
        for r in range(p):
            partner = r ^ (1 << k)
            if r < partner:
                created = hvd.add_process_set([r, partner])
                if rank in (r, partner):
                    mine.append(created)
    return mine


def _rabenseifner_with_process_sets(hvd, x: torch.Tensor, sets: list) -> torch.Tensor:
    segment = x
    for pset in sets:  # recursive halving: each reducescatter keeps this rank's half, summed over the pair
        segment = hvd.reducescatter(segment, op=hvd.Sum, process_set=pset)
    for pset in reversed(sets):  # recursive doubling: the halves come back in rank order
        segment = hvd.allgather(segment, process_set=pset)
    return segment / hvd.size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1K,16K,256K,1M,4M,16M,64M", help="message sizes in bytes (float32)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per size (fewer above 4 MiB)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")  # the pair-process-set candidate adds sets

    import horovod.torch as hvd

    import hybrid_ext.integrations.horovod as hxh
    from hybrid_ext.comm import Communicator

    hvd.init()
    hxh.register()
    p = hvd.size()
    power_of_two = p & (p - 1) == 0
    channel = hxh.side_channel()
    gloo = Communicator(channel.transport(torch.device("cpu"), choice="torch"))
    alltoall = Communicator(hxh.HorovodAlltoallTransport()) if power_of_two else None
    try:
        pair_sets = _pair_sets(hvd) if power_of_two else None
    except (ValueError, RuntimeError):
        pair_sets = None  # dynamic process sets are off in this job

    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        n = max(1, size // 4)
        reps = args.reps if size <= 4 << 20 else max(3, args.reps // 3)
        x = torch.randn(n, generator=torch.Generator().manual_seed(hvd.rank()))
        expected = hvd.allreduce(x, op=hvd.Average)

        runs: dict[str, Callable[[], torch.Tensor] | None] = {
            "hvd.allreduce": functools.partial(hvd.allreduce, x, op=hvd.Average),
            "hvd.Butterfly": functools.partial(hvd.allreduce, x, op=hvd.Butterfly),
            "side channel, gloo": functools.partial(_on, gloo, x),
            "hvd.alltoall": functools.partial(_on, alltoall, x) if alltoall else None,
            "pair process sets": functools.partial(_rabenseifner_with_process_sets, hvd, x, pair_sets)
            if pair_sets
            else None,
        }
        row = {"bytes": n * 4}
        for name, run in runs.items():
            if run is None:
                row[name] = None
                continue
            torch.testing.assert_close(run(), expected, rtol=1e-5, atol=1e-6, msg=f"{name} is wrong at {n} elements")
            row[name] = _time(run, reps)
        rows.append(row)
        if hvd.rank() == 0:
            print(_format_row(row), flush=True)
    if hvd.rank() == 0:
        print()
        print(markdown(rows, p))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": p, "rows": rows}, f, indent=1)


def _format_row(row: dict) -> str:
    cells = [f"{name} {row[name] * 1e3:.2f} ms" for name in CANDIDATES if row.get(name) is not None]
    return f"{row['bytes']:>10} B: " + ", ".join(cells)


def markdown(rows: list[dict], p: int) -> str:
    head = f"| bytes (p={p}) | " + " | ".join(CANDIDATES) + " |"
    lines = [head, "|---:|" + "---:|" * len(CANDIDATES)]
    for row in rows:
        base = row["hvd.allreduce"]
        cells = []
        for name in CANDIDATES:
            t = row.get(name)
            if t is None:
                cells.append("—")
            elif name == "hvd.allreduce":
                cells.append(f"{t * 1e3:.2f} ms")
            else:
                cells.append(f"{t * 1e3:.2f} ms ({t / base:.2f}×)")
        lines.append(f"| {format_size(row['bytes'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
