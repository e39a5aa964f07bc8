"""``hybrid-ext demo``: which strategy and which reduction is fastest here, and does it still learn?

Spawns its own ranks (default 4, gloo; no launcher), trains the FC-heavy ``digits_alexnet`` on the embedded
digits set under each run, then prints and writes the comparison (Markdown table, PNG plots) read back from
the TensorBoard event files under ``<out>/runs/<strategy>-<reducer>-np<N>/``. With ``--hosts H [--nic RATE]``
each run is a torchrun job on an emulated cluster (:mod:`hybrid_ext.launch.cluster`): one torchrun per host,
the ranks spread over the hosts, each host's egress shaped to RATE (``python -m hybrid_ext.train.demo CONFIG``
is what every rank runs there).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from hybrid_ext.launch import spawn
from hybrid_ext.parallel.plan import STRATEGIES
from hybrid_ext.train.compare import compare
from hybrid_ext.train.device import this_job_backend
from hybrid_ext.train.loop import TrainConfig, train

DEFAULT_RUNS = (("dp", "native"), ("dp", "butterfly"), ("mp", "butterfly"), ("hybrid", "butterfly"), ("hybrid", "ring"))
DEMO_GRAD_ALGORITHMS = ("butterfly", "ring", "native")


def _demo_rank(rank: int, world: int, config: TrainConfig) -> dict:
    return train(config)


def runs_from_args(args) -> list[tuple[str, str]]:
    if args.all:
        return [(s, r) for s in STRATEGIES for r in DEMO_GRAD_ALGORITHMS]
    if args.strategies or args.reducers:
        strategies = args.strategies.split(",") if args.strategies else ["dp", "hybrid"]
        reducers = args.reducers.split(",") if args.reducers else ["butterfly"]
        return [(s, r) for s in strategies for r in reducers]
    return list(DEFAULT_RUNS)


def main(args) -> int:
    if getattr(args, "nic", None) and not getattr(args, "hosts", None):
        raise SystemExit("hybrid-ext demo: --nic shapes the emulated hosts' links: give --hosts too")
    out = Path(args.out).resolve()  # the hosts of an emulated cluster see this machine's files at the same paths
    logdir = out / "runs"
    if logdir.exists():
        shutil.rmtree(logdir)  # a fresh comparison: old runs of other settings would mix in
    base = TrainConfig(
        model=args.model, epochs=args.epochs, data=args.data, logdir=str(logdir), micro_batch=args.micro_batch,
        max_steps=args.max_steps, mp_size=args.mp_size, device=getattr(args, "device", "auto"),
    )  # fmt: skip
    runs = runs_from_args(args)
    where = f" on {args.hosts} emulated hosts (egress {args.nic or 'unshaped'})" if getattr(args, "hosts", None) else ""
    print(
        f"hybrid-ext demo: {len(runs)} runs × {args.np} ranks{where}, {args.epochs} epochs of {args.data or 'digits'}"
        f", device {base.device}"
    )
    start = time.perf_counter()
    with _ranks(args) as run_job:
        for strategy, reducer in runs:
            config = replace(base, strategy=strategy, reducer=reducer)
            t0 = time.perf_counter()
            final = run_job(config)
            _print_run(final, t0)
    table = compare([logdir], png=out / "demo.png", markdown=out / "demo.md")
    print()
    print(table)
    pngs = ", ".join(
        str(out / f"demo-{kind}.png") for kind in ("loss", "samples_per_sec", "time_to_accuracy", "step_split")
    )
    print(f"\nwrote {out / 'demo.md'}, {pngs}")
    print(f"TensorBoard: tensorboard --logdir {logdir}    (total {time.perf_counter() - start:.0f} s)")
    return 0


@contextlib.contextmanager
def _ranks(args):
    """``run_job(config) -> final metrics``: spawned ranks here, or torchrun jobs on an emulated cluster."""
    if not getattr(args, "hosts", None):
        backend = this_job_backend(getattr(args, "device", "auto"), args.np)
        yield lambda config: spawn(
            _demo_rank, args.np, config, timeout=args.timeout, capture_output=False, backend=backend
        )[0]
        return
    from hybrid_ext.launch import cluster, run_torchrun

    with cluster.emulated_cluster(args.hosts, args.nic, getattr(args, "cpus_per_host", None)) as hosts:

        def run_job(config: TrainConfig) -> dict:
            command = ["-m", "hybrid_ext.train.demo", json.dumps(asdict(config))]
            return run_torchrun(command, args.np, cluster=hosts, nodes=args.hosts, timeout=args.timeout)[0]

        yield run_job


def _print_run(final: dict, t0: float) -> None:
    print(
        f"  {final['run']:<24} {final['device']:<7} test accuracy {final['final/eval_accuracy'] * 100:5.1f} %   "
        f"{final['final/samples_per_sec']:7.1f} samples/s   ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


def _launched_rank(config_json: str) -> None:
    """One rank of a demo run under torchrun (``--hosts``): train, hand the final metrics back."""
    import torch.distributed as dist

    from hybrid_ext.launch import report_result
    from hybrid_ext.train.device import local_rank_and_size

    config = TrainConfig(**json.loads(config_json))
    dist.init_process_group(this_job_backend(config.device, local_rank_and_size()[1]))
    try:
        report_result(train(config))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _launched_rank(sys.argv[1])
