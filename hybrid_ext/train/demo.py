"""``hybrid-ext demo``: which strategy and which reduction is fastest here, and does it still learn?

Spawns its own ranks (default 4, gloo; no launcher), trains the FC-heavy ``digits_alexnet`` on the embedded
digits set under each run, then prints and writes the comparison (Markdown table, PNG plots) read back from
the TensorBoard event files under ``<out>/runs/<strategy>-<reducer>-np<N>/``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from hybrid_ext.launch import spawn
from hybrid_ext.parallel.plan import STRATEGIES
from hybrid_ext.train.compare import compare
from hybrid_ext.train.loop import TrainConfig, train

DEFAULT_RUNS = (("dp", "native"), ("dp", "butterfly"), ("mp", "butterfly"), ("hybrid", "butterfly"), ("hybrid", "ring"))
REDUCERS = ("butterfly", "ring", "native")


def _demo_rank(rank: int, world: int, config: TrainConfig) -> dict:
    return train(config)


def runs_from_args(args) -> list[tuple[str, str]]:
    if args.all:
        return [(s, r) for s in STRATEGIES for r in REDUCERS]
    if args.strategies or args.reducers:
        strategies = args.strategies.split(",") if args.strategies else ["dp", "hybrid"]
        reducers = args.reducers.split(",") if args.reducers else ["butterfly"]
        return [(s, r) for s in strategies for r in reducers]
    return list(DEFAULT_RUNS)


def main(args) -> int:
    out = Path(args.out)
    logdir = out / "runs"
    if logdir.exists():
        shutil.rmtree(logdir)  # a fresh comparison: old runs of other settings would mix in
    base = TrainConfig(
        model=args.model, epochs=args.epochs, data=args.data, logdir=str(logdir), micro_batch=args.micro_batch,
        max_steps=args.max_steps, mp_size=args.mp_size,
    )  # fmt: skip
    runs = runs_from_args(args)
    print(f"hybrid-ext demo: {len(runs)} runs × {args.np} ranks, {args.epochs} epochs of {args.data or 'digits'}")
    start = time.perf_counter()
    for strategy, reducer in runs:
        config = replace(base, strategy=strategy, reducer=reducer)
        t0 = time.perf_counter()
        final = spawn(_demo_rank, args.np, config, timeout=args.timeout, capture_output=False)[0]
        print(
            f"  {final['run']:<24} test accuracy {final['final/eval_accuracy'] * 100:5.1f} %   "
            f"{final['final/samples_per_sec']:7.1f} samples/s   ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    table = compare([logdir], png=out / "demo.png", markdown=out / "demo.md")
    print()
    print(table)
    pngs = ", ".join(
        str(out / f"demo-{kind}.png") for kind in ("loss", "samples_per_sec", "time_to_accuracy", "step_split")
    )
    print(f"\nwrote {out / 'demo.md'}, {pngs}")
    print(f"TensorBoard: tensorboard --logdir {logdir}    (total {time.perf_counter() - start:.0f} s)")
    return 0
