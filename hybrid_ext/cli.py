"""The ``hybrid-ext`` command line: ``demo``, ``smoke``, ``bench``, ``plan``, ``cluster``, ``install-horovod``, ..."""

from __future__ import annotations

import argparse
import sys

from hybrid_ext.train.device import add_device_argument
from hybrid_ext.version import __version__


def _cmd_smoke(args: argparse.Namespace) -> int:
    from hybrid_ext.tools.smoke import run_checks

    print(f"hybrid-ext {__version__}: checking the stack with {args.np} ranks", flush=True)
    return 0 if run_checks(args.checks, np=args.np) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from hybrid_ext.train import demo

    return demo.main(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from hybrid_ext.train import compare

    return compare.main(args)


def _cmd_install_horovod(args: argparse.Namespace) -> int:
    from hybrid_ext.tools import horovod_wheel

    return horovod_wheel.main(["--rebuild"] if args.rebuild else [])


def _cmd_bench_allreduce(args: argparse.Namespace) -> int:
    from hybrid_ext.bench import allreduce

    with allreduce.leaving_a_launched_job():
        return allreduce.main(args)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from hybrid_ext.bench import allreduce, train

    with allreduce.leaving_a_launched_job():
        return train.main(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from hybrid_ext import plan_command

    return plan_command.main(args)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from hybrid_ext.launch import cluster

    return cluster.main(args)


def _cmd_bench_horovod(args: argparse.Namespace) -> int:
    import subprocess

    from hybrid_ext.launch import launcher_path

    command = [launcher_path("horovodrun"), "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo",
               sys.executable, "-m", "hybrid_ext.integrations.horovod.bench", "--sizes", args.sizes,
               "--reps", str(args.reps)]  # fmt: skip
    if args.json:
        command += ["--json", args.json]
    return subprocess.run(command).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-ext",
        description="Butterfly allreduce and hybrid (data + model) parallelism for Horovod, DeepSpeed and torch.",
    )
    parser.add_argument("--version", action="version", version=f"hybrid-ext {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the main job: compare dp / mp / hybrid x reducers on the embedded digits set",
        description="Spawn ranks, train an FC-heavy CNN under each strategy and reducer, compare them.",
    )
    demo.add_argument("--np", type=positive_int, default=4, help="ranks (default: 4)")
    demo.add_argument("--epochs", type=positive_int, default=5, help="epochs per run (default: 5)")
    demo.add_argument("--strategies", help="comma-separated: dp, mp, hybrid")
    demo.add_argument("--reducers", help="comma-separated: butterfly, ring, native, rabenseifner, recursive_doubling")
    demo.add_argument("--all", action="store_true", help="every strategy x reducer (butterfly, ring, native)")
    demo.add_argument("--model", default="digits_alexnet", help="digits_alexnet (default), alexnet, vgg11")
    demo.add_argument("--data", metavar="PATH", help="an ImageFolder or CIFAR-10 folder instead of the digits")
    demo.add_argument("--micro-batch", type=positive_int, default=16, help="samples per rank per step (default: 16)")
    demo.add_argument(
        "--mp-size", type=positive_int, default=None, help="model-parallel group size (default: all ranks)"
    )
    demo.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    demo.add_argument("--timeout", type=float, default=1200, help="seconds per run before it is killed")
    demo.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    demo.add_argument(
        "--hosts",
        type=positive_int,
        help="run each job under torchrun on this many emulated hosts (hybrid-ext cluster)",
    )
    demo.add_argument("--nic", metavar="RATE", help="with --hosts: each host's egress rate (tc syntax: 1gbit)")
    add_cpus_per_host_argument(demo)
    add_device_argument(demo)
    demo.set_defaults(handler=_cmd_demo)

    compare = commands.add_parser(
        "compare",
        help="compare runs from their TensorBoard event files",
        description="Read TensorBoard event files written by hybrid-ext runs; print the table, write plots.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUNS_DIR")
    compare.add_argument("--png", metavar="FILE", help="write plots (FILE-loss.png, FILE-samples_per_sec.png)")
    compare.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    compare.set_defaults(handler=_cmd_compare)

    checks = ["gloo", "horovod", "deepspeed"]
    smoke = commands.add_parser("smoke", help="check that gloo, horovodrun and the deepspeed launcher work here")
    smoke.add_argument("--np", type=positive_int, default=2, help="ranks per job (default: 2)")
    smoke.add_argument("--checks", nargs="+", choices=checks, default=checks, help="which parts to check")
    smoke.set_defaults(handler=_cmd_smoke)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks measured in one run.")
    bench_kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    allreduce = bench_kinds.add_parser(
        "allreduce",
        help="time allreduce algorithms against torch's own all_reduce (gloo; NCCL for CUDA tensors)",
        description="Spawn N ranks and time each algorithm, interleaved, against dist.all_reduce. Under a "
        "launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) each launched process is a rank instead.",
    )
    allreduce.add_argument("--np", type=positive_int, default=4, help="ranks (default: 4)")
    allreduce.add_argument("--sizes", default="1K,64K,1M,16M,64M", help="message sizes in bytes (K, M suffixes)")
    allreduce.add_argument(
        "--algorithms",
        default="butterfly,rabenseifner,recursive_doubling,ring,native",
        help="comma-separated: auto, butterfly, rabenseifner, recursive_doubling, ring, hierarchical/<one of those 3> "
        "(across hosts), direct (one host: shared memory in one pass), native, deepspeed-shm (DeepSpeed's "
        "shared-memory allreduce on its CPU accelerator; one host)",
    )
    allreduce.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the tensors' dtype"
    )
    allreduce.add_argument("--iters", type=positive_int, default=10, help="timed rounds per size (default: 10)")
    allreduce.add_argument("--inner", type=positive_int, default=5, help="calls per round, back to back (default: 5)")
    allreduce.add_argument("--warmup", type=int, default=2, help="untimed rounds per size (default: 2)")
    allreduce.add_argument(
        "--transport", choices=["auto", "shm", "torch"], default="auto", help="hybrid-ext's transport (default: auto)"
    )
    allreduce.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    allreduce.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    allreduce.add_argument("--calibrate", action="store_true", help="fit and save the cost model used by auto")
    allreduce.add_argument(
        "--hosts", type=positive_int, help="run under torchrun on this many emulated hosts (hybrid-ext cluster; root)"
    )
    allreduce.add_argument("--nic", metavar="RATE", help="with --hosts: each host's egress rate (tc syntax: 1gbit)")
    add_cpus_per_host_argument(allreduce)
    allreduce.add_argument(
        "--count-bytes-on",
        metavar="IFACE",
        help="count the bytes leaving each host on this interface, from its counters (--hosts sets it)",
    )
    add_device_argument(allreduce)
    allreduce.set_defaults(handler=_cmd_bench_allreduce)

    train = bench_kinds.add_parser(
        "train",
        help="samples/s and bytes per step of dp / mp / hybrid on one model",
        description="Train a torchvision CNN for a few steps under each run, with compute-only as the limit.",
    )
    train.add_argument("--model", default="alexnet", choices=["alexnet", "vgg11", "resnet18", "digits_alexnet"])
    train.add_argument("--np", type=positive_int, default=4, help="ranks (default: 4)")
    train.add_argument(
        "--runs",
        default="dp-butterfly,hybrid-butterfly,compute-only",
        help="comma-separated STRATEGY-REDUCER[@MP_SIZE] (dp-native, hybrid-butterfly, mp-butterfly, "
        "hybrid-butterfly@2: on model-parallel groups of 2...), compute-only, or ddp (torch's "
        "DistributedDataParallel: the peer)",
    )
    train.add_argument("--micro-batch", type=positive_int, default=16, help="samples per rank per step (default: 16)")
    train.add_argument("--size", type=int, default=64, help="input height and width (default: 64)")
    train.add_argument("--steps", type=positive_int, default=5, help="timed steps per run (default: 5)")
    train.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="run every run this many times, interleaved, each in fresh processes (across hosts one torchrun job per "
        "run and repeat); the step is the median of the repeats' (default: 1)",
    )
    train.add_argument(
        "--mp-size", type=positive_int, default=None, help="model-parallel group size (default: all ranks)"
    )
    train.add_argument(
        "--hosts", type=positive_int, help="run under torchrun on this many emulated hosts (hybrid-ext cluster)"
    )
    train.add_argument("--nic", metavar="RATE", help="with --hosts: each host's egress rate (tc syntax: 1gbit)")
    add_cpus_per_host_argument(train)
    train.add_argument("--json", metavar="FILE")
    train.add_argument("--markdown", metavar="FILE")
    add_device_argument(train)
    train.set_defaults(handler=_cmd_bench_train)

    horovod = bench_kinds.add_parser(
        "horovod",
        help="butterfly candidates under horovodrun against hvd.allreduce",
        description="Run horovodrun -np N --gloo on this host and time every way to run a butterfly under Horovod.",
    )
    horovod.add_argument("--np", type=positive_int, default=4, help="ranks (default: 4)")
    horovod.add_argument("--sizes", default="1K,16K,256K,1M,4M,16M,64M", help="message sizes in bytes")
    horovod.add_argument("--reps", type=int, default=10, help="timed repetitions per size (default: 10)")
    horovod.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    horovod.set_defaults(handler=_cmd_bench_horovod)

    _add_cluster_parser(commands)

    from hybrid_ext import plan_command

    plan = commands.add_parser(
        "plan",
        help="predicted step time of dp / hybrid / mp on one model, from per-layer times and the plan's bytes",
        description="Predict one training step per strategy: compute per layer, bytes per rank, exposed communication.",
    )
    plan_command.add_arguments(plan, positive_int, positive_float)
    plan.set_defaults(handler=_cmd_plan)

    install = commands.add_parser(
        "install-horovod",
        help="build (once, cached) and install Horovod 0.28.1 for the installed torch",
        description="Build a Horovod 0.28.1 wheel patched for current torch (C++20), cache it, install it.",
    )
    install.add_argument("--rebuild", action="store_true", help="build again even if a cached wheel exists")
    install.set_defaults(handler=_cmd_install_horovod)

    settings = commands.add_parser(
        "config",
        help="the HYBRID_EXT_* environment variables: their values here, or the reference page",
        description="Print each HYBRID_EXT_* variable's value here (see docs/configuration.md).",
    )
    settings.add_argument("--markdown", action="store_true", help="print the reference page, docs/configuration.md")
    settings.set_defaults(handler=_cmd_config)
    return parser


def _cmd_config(args) -> int:
    from hybrid_ext import config

    print(config.markdown() if args.markdown else config.describe(), end="")
    return 0


def _add_cluster_parser(commands) -> None:
    cluster = commands.add_parser(
        "cluster",
        help="an emulated cluster on this Linux machine: hosts with their own network, hostname and sshd (root)",
        description="Hosts as network namespaces on a bridge (10.213.0.0/24), each with sshd, for launchers.",
    )
    actions = cluster.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start node0..node<H-1> (installs openssh-server and pdsh if missing)")
    up.add_argument("--hosts", type=positive_int, default=2, help="hosts (default: 2)")
    up.add_argument("--nic", metavar="RATE", help="shape each host's egress to RATE with tbf (tc syntax: 1gbit)")
    add_cpus_per_host_argument(up)
    run = actions.add_parser("run", help="run a command on a host, in this directory: run node1 -- CMD")
    run.add_argument("host", help="a host's name (node1) or index (1)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command (default: a shell)")
    actions.add_parser("down", help="stop the cluster and remove everything it made")
    actions.add_parser("status", help="list the hosts")
    cluster.set_defaults(handler=_cmd_cluster)


def add_cpus_per_host_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus-per-host",
        type=positive_float,
        metavar="CORES",
        help="limit each emulated host to this many cores' worth of CPU time (a cgroup quota; may be a fraction, "
        "e.g. 0.667); default: the hosts share every core of the machine",
    )


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a count that must be at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
