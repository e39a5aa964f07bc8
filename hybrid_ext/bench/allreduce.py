"""``hybrid-ext bench allreduce``: time the allreduce algorithms against torch's own, in one run.

The ranks are spawned here (processes over gloo, one compute thread each). For every size the algorithms are
interleaved — round i runs each of them in turn, in an order rotated by i — so that a machine that gets
busier or quieter during the run shifts all of them alike. A round is a barrier, then ``inner`` calls back to
back (as a training step issues them); a call's time is the round's time / ``inner`` on the slowest rank.
Reported per size and algorithm: the median time over rounds, algbw = bytes / time, busbw = algbw · 2(P-1)/P
(the bandwidth on the busiest link, comparable across P, as in nccl-tests), and the ratio of the median to
``native`` (``dist.all_reduce`` on the same group: gloo, or NCCL for CUDA tensors where each rank has a GPU of its
own) measured in the same run. The ``ran`` column says what each call ran: a schedule, or ``native/<backend>``
where ``auto`` chose the group's own allreduce. ``--device cuda`` (or ``auto`` on a GPU machine) times CUDA
tensors, one GPU per rank where there are enough (:mod:`hybrid_ext.train.device`).

Started by a launcher (``torchrun``, ``deepspeed``, ``mpirun``...: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set), it spawns nothing: every launched process is one rank, and rank 0 prints. With ``--hosts H``
it runs that way on an emulated cluster (:mod:`hybrid_ext.launch.cluster`, egress shaped to ``--nic``): one
``torchrun`` per host, ``--np`` ranks spread over the hosts. Across hosts each row adds the bytes per call that left
the busiest host's interface (its kernel counter, headers included) and what the plan sends from that host, both
per message byte n (any allreduce needs 2(H-1)/H), and the time as a multiple of the link bound
2(H-1)/H·n / rate. ``auto`` and ``butterfly`` are timed after the tuner's trials (:mod:`hybrid_ext.comm.tuner`).

``--calibrate`` fits the cost model's α, β, γ (:mod:`hybrid_ext.comm.cost_model`) to the recursive-doubling and
Rabenseifner timings by least squares and saves them for ``auto``, and the native allreduce's own from its rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_ext import comm, config
from hybrid_ext.comm import cost_model, host_cores
from hybrid_ext.launch import spawn
from hybrid_ext.launch.spawn import leave_process_group

TUNING_CALLS_CAP = 64  # more than any candidate list's trials
# DeepSpeed's shared-memory allreduce on its CPU accelerator (deepspeed.comm.inference_all_reduce, a C++ op DeepSpeed
# builds on first use): the strongest one-host allreduce a user of this stack already has.
DEEPSPEED_SHM = "deepspeed-shm"
ALGORITHM_CHOICES = (
    "auto",
    "butterfly",
    "rabenseifner",
    "recursive_doubling",
    "ring",
    *(f"hierarchical/{a}" for a in ("rabenseifner", "recursive_doubling", "ring")),
    "direct",
    "native",
    DEEPSPEED_SHM,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchRow:
    size_bytes: int
    algorithm: str
    ranks: int
    median_ms: float
    algbw_gbps: float
    busbw_gbps: float
    ratio_to_native: float | None
    chosen: str  # what actually ran: a schedule (auto / butterfly resolve to one), native/<backend>, or the backend
    # On several hosts (--hosts): bytes per call out of the busiest host's interface, read from its counters
    # (headers included), and what the plan sends from that host to others; time as a multiple of the link bound.
    hosts: int | None = None
    nic_bytes: float | None = None
    plan_nic_bytes: float | None = None
    link_bound_ratio: float | None = None


def parse_size(text: str) -> int:
    """'1K' -> 1024, '16M' -> 16 MiB, '4096' -> 4096 (bytes)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def format_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def _bench_rank(
    rank: int,
    p: int,
    sizes: list[int],
    algorithms: list[str],
    rounds: int,
    warmup: int,
    inner: int,
    interface: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """This rank's timings; with ``interface``, also its host's interface byte counts per timed round."""
    import socket

    from hybrid_ext.comm import metrics
    from hybrid_ext.comm.transports._c10d_private import backend_name
    from hybrid_ext.train.device import this_rank_device

    where = this_rank_device(device)
    kind = DTYPES[dtype]
    deepspeed_allreduce = _deepspeed_shm_allreduce(p) if DEEPSPEED_SHM in algorithms else None
    communicator = comm.communicator(None, where)
    backend = backend_name(dist.group.WORLD, where)

    times: dict[tuple[int, str], list[float]] = {}
    chosen: dict[tuple[int, str], str] = {}
    sent: dict[tuple[int, str], list[int]] = {}  # bytes out of this host's interface per round
    plan_sent: dict[tuple[int, str], int] = {}  # bytes this rank's plan sends to other hosts per call
    for size in sizes:
        n = max(size // kind.itemsize, 1)
        buffers = {a: torch.ones(n, device=where, dtype=kind) for a in algorithms}
        for algorithm in algorithms:  # auto / butterfly: past the tuner's trials first (it decides once per run)
            for _ in range(TUNING_CALLS_CAP):
                if algorithm in ("native", DEEPSPEED_SHM) or not communicator.tuning(algorithm, n * kind.itemsize):
                    break
                comm.allreduce(buffers[algorithm], algorithm=algorithm)
                buffers[algorithm].fill_(1.0)
        for i in range(warmup + rounds):
            shift = i % len(algorithms)
            for algorithm in algorithms[shift:] + algorithms[:shift]:
                buf = buffers[algorithm]
                dist.barrier()
                before = _tx_bytes(interface)
                start = time.perf_counter()
                for _ in range(inner):  # back to back, as training issues them: skew is paid once per round
                    if algorithm == "native":
                        dist.all_reduce(buf)
                    elif algorithm == DEEPSPEED_SHM:
                        deepspeed_allreduce(buf)
                    else:
                        comm.allreduce(buf, algorithm=algorithm)
                if where.type == "cuda":
                    torch.cuda.synchronize(where)  # NCCL returns once the work is queued
                elapsed = (time.perf_counter() - start) / inner
                if interface:
                    dist.barrier()  # every rank of the host has sent all it will before the counter is read
                after = _tx_bytes(interface)
                if algorithm not in ("native", DEEPSPEED_SHM):  # what ran, not what a model would pick
                    chosen[(size, algorithm)] = _ran(metrics.last())
                buf.fill_(1.0)  # keep values bounded
                if i >= warmup:
                    times.setdefault((size, algorithm), []).append(elapsed)
                    if before is not None and after is not None:
                        sent.setdefault((size, algorithm), []).append(after - before)
        for algorithm in algorithms:
            chosen.setdefault((size, algorithm), "deepspeed shm" if algorithm == DEEPSPEED_SHM else backend)
            if interface and not chosen[(size, algorithm)].startswith(("native", backend)):  # a plan of ours ran
                plan_sent[(size, algorithm)] = _bytes_to_other_hosts(chosen[(size, algorithm)], n) * kind.itemsize
    if deepspeed_allreduce is not None:
        dist.barrier()  # every rank is done with every rank's buffer
        _remove_deepspeed_shm_buffer(rank)
    return {
        "times": times,
        "chosen": chosen,
        "transport": communicator.transport.name,
        "host": socket.gethostname(),
        "sent": sent,
        "plan_sent": plan_sent,
        "inner": inner,
    }


def _deepspeed_shm_allreduce(ranks: int):
    """DeepSpeed's shared-memory allreduce on this job's ranks, set up as its launcher would (all ranks local).

    It needs the process group initialized (DeepSpeed reuses it), ``LOCAL_SIZE`` equal to the world size, and a C++
    compiler on first use. Refused, loudly, where DeepSpeed would fall back to the process group's allreduce.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_SIZE"] = str(ranks)
    try:
        import deepspeed
        import deepspeed.comm as deepspeed_comm
    except ImportError as exc:
        raise RuntimeError(f"--algorithms {DEEPSPEED_SHM} needs DeepSpeed (pip install deepspeed): {exc}") from exc
    from deepspeed.comm import comm as deepspeed_state

    deepspeed.init_distributed(dist_backend="gloo")
    backend = deepspeed_state.cdb
    if getattr(backend, "shm_comm_op", None) is None:
        raise RuntimeError(f"{DEEPSPEED_SHM}: DeepSpeed could not build its shared-memory op on this machine")

    def allreduce(tensor: torch.Tensor) -> None:
        deepspeed_comm.inference_all_reduce(tensor)

    return allreduce


def _remove_deepspeed_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace (~66 MB), which DeepSpeed itself never removes."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def _ran(record) -> str:
    """What a hybrid-ext call ran, for a row: its schedule, or native/<backend> where auto chose the group's own."""
    if record.algorithm == cost_model.NATIVE:
        return f"native/{record.transport.removeprefix('torch-')}"
    return record.algorithm


def _tx_bytes(interface: str | None) -> int | None:
    """Bytes this host has sent on ``interface`` (its kernel counter), or None."""
    if not interface:
        return None
    try:
        return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())
    except (OSError, ValueError):
        return None


def _bytes_to_other_hosts(schedule: str, count: int) -> int:
    """Elements this rank's plan for ``schedule`` sends to ranks on other hosts (one call)."""
    communicator = comm.communicator()
    hosts = communicator.topology.hosts
    if hosts is None:
        return 0
    plan = communicator.allreduce_plan(schedule, count)
    return sum(
        step.send[1] - step.send[0]
        for step in plan.steps
        if step.send is not None and hosts[step.send_to] != hosts[communicator.rank]
    )


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when a launcher started this process as one rank of a job (torchrun's environment)."""
    return all(var in os.environ for var in LAUNCHER_VARIABLES)


@contextlib.contextmanager
def leaving_a_launched_job() -> Iterator[None]:
    """Around a benchmark: a rank a launcher started leaves its process group before the process exits
    (:func:`hybrid_ext.launch.spawn.leave_process_group` says why)."""
    try:
        yield
    finally:
        if launched() and dist.is_available() and dist.is_initialized():
            leave_process_group()


def _bench_launched_rank(
    sizes, algorithms, rounds, warmup, inner, interface=None, device="cpu", dtype="float32"
) -> list[dict]:
    """This process's rank of a launched job: every rank's timings, gathered on every rank."""
    from datetime import timedelta

    from hybrid_ext.train.device import local_rank_and_size, this_job_backend

    if not dist.is_initialized():
        backend = this_job_backend(device, local_rank_and_size()[1])
        dist.init_process_group(backend, timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mine = _bench_rank(rank, world, sizes, algorithms, rounds, warmup, inner, interface, device, dtype)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def run_allreduce_bench(
    np: int,
    sizes: list[int],
    algorithms: list[str],
    iterations: int = 20,
    warmup: int = 3,
    inner: int = 5,
    transport: str = "auto",
    timeout: float = 1800,
    interface: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[list[BenchRow], str]:
    """Rows per (size, algorithm), and the name of the transport hybrid-ext used.

    ``interface``: count the bytes leaving each host on it (launched across hosts; see :class:`BenchRow`).
    ``device``: cpu, cuda or auto (:mod:`hybrid_ext.train.device`); ``dtype``: a name in :data:`DTYPES`.
    """
    if launched():  # the launcher made the ranks: this process is one of them
        config.set_for_process(HYBRID_EXT_TRANSPORT=transport)
        results = _bench_launched_rank(sizes, algorithms, iterations, warmup, inner, interface, device, dtype)
        np = len(results)
    else:
        from hybrid_ext.train.device import this_job_backend

        env = {"HYBRID_EXT_TRANSPORT": transport}
        results = spawn(
            _bench_rank, np, sizes, algorithms, iterations, warmup, inner, None, device, dtype,
            timeout=timeout, env=env, backend=this_job_backend(device, np),
        )  # fmt: skip
    return rows_from(results, sizes, algorithms), results[0]["transport"]


def rows_from(results: list[dict], sizes: list[int], algorithms: list[str]) -> list[BenchRow]:
    """Rows per (size, algorithm) from every rank's timings (the slowest rank per round, median over rounds)."""
    np = len(results)
    first_of_host: dict[str, dict] = {}  # one rank per host reads that host's counter
    ranks_of_host: dict[str, list[dict]] = {}
    for r in results:
        first_of_host.setdefault(r.get("host", ""), r)
        ranks_of_host.setdefault(r.get("host", ""), []).append(r)
    rows = []
    for size in sizes:
        medians = {}
        for algorithm in algorithms:
            per_iteration = zip(*(r["times"][(size, algorithm)] for r in results))
            slowest = [max(ts) for ts in per_iteration]
            medians[algorithm] = statistics.median(slowest)
        for algorithm in algorithms:
            seconds = medians[algorithm]
            algbw = size / seconds / 1e9
            rows.append(
                BenchRow(
                    size_bytes=size,
                    algorithm=algorithm,
                    ranks=np,
                    median_ms=seconds * 1e3,
                    algbw_gbps=algbw,
                    busbw_gbps=algbw * 2 * (np - 1) / np,
                    ratio_to_native=seconds / medians["native"] if "native" in medians else None,
                    chosen=results[0]["chosen"][(size, algorithm)],
                    **_host_traffic(first_of_host, ranks_of_host, (size, algorithm)),
                )
            )
    return rows


def _host_traffic(first_of_host: dict[str, dict], ranks_of_host: dict[str, list[dict]], key) -> dict:
    """BenchRow's per-host fields for one (size, algorithm): the busiest host's bytes per call."""
    counted = {host: r["sent"][key] for host, r in first_of_host.items() if r.get("sent", {}).get(key)}
    if len(first_of_host) < 2 or not counted:
        return {}
    inner = next(iter(first_of_host.values()))["inner"]
    measured = max(statistics.median(rounds) / inner for rounds in counted.values())
    planned = None
    if any(key in r.get("plan_sent", {}) for ranks in ranks_of_host.values() for r in ranks):  # not native's
        planned = max(sum(r["plan_sent"].get(key, 0) for r in ranks) for ranks in ranks_of_host.values())
    return {"hosts": len(first_of_host), "nic_bytes": measured, "plan_nic_bytes": planned}


def link_bound_seconds(nbytes: int, hosts: int, bytes_per_second: float) -> float:
    """The least time any allreduce of ``nbytes`` over ``hosts`` hosts needs: 2(H-1)/H·n out of each host link."""
    return 2 * (hosts - 1) / hosts * nbytes / bytes_per_second


def format_table(rows: list[BenchRow]) -> str:
    hosts = any(row.hosts for row in rows)
    header = (
        f"{'size':>6}  {'algorithm':<19} {'ran':<31} {'median ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11} "
        f"{'/native':>8}"
    )
    if hosts:
        header += f" {'host NIC/n':>10} {'plan/n':>7} {'/bound':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row.ratio_to_native:.2f}" if row.ratio_to_native is not None else "-"
        line = (
            f"{format_size(row.size_bytes):>6}  {row.algorithm:<19} {row.chosen:<31} {row.median_ms:>10.3f} "
            f"{row.algbw_gbps:>11.3f} {row.busbw_gbps:>11.3f} {ratio:>8}"
        )
        if hosts:
            line += f" {_per_n(row.nic_bytes, row):>10} {_per_n(row.plan_nic_bytes, row):>7} {_ratio(row):>7}"
        lines.append(line)
    return "\n".join(lines)


def _per_n(nbytes: float | None, row: BenchRow) -> str:
    return f"{nbytes / row.size_bytes:.2f}" if nbytes is not None and row.size_bytes else "-"


def _ratio(row: BenchRow) -> str:
    return f"{row.link_bound_ratio:.2f}" if row.link_bound_ratio is not None else "-"


def format_markdown(rows: list[BenchRow]) -> str:
    hosts = any(row.hosts for row in rows)
    extra = " bytes out of busiest host / n (counters) | plan / n | × link bound |" if hosts else ""
    lines = [
        "| size | algorithm | ran | median ms | busbw GB/s | × native |" + extra,
        "|---:|---|---|---:|---:|---:|" + ("---:|---:|---:|" if hosts else ""),
    ]
    for row in rows:
        ratio = f"{row.ratio_to_native:.2f}" if row.ratio_to_native is not None else "-"
        line = (
            f"| {format_size(row.size_bytes)} | {row.algorithm} | {row.chosen} | {row.median_ms:.2f} | "
            f"{row.busbw_gbps:.3f} | {ratio} |"
        )
        if hosts:
            line += f" {_per_n(row.nic_bytes, row)} | {_per_n(row.plan_nic_bytes, row)} | {_ratio(row)} |"
        lines.append(line)
    return "\n".join(lines)


def calibrate(rows: list[BenchRow]) -> cost_model.CostModel:
    """Least-squares α, β, γ (clipped at zero) from the butterfly rows of a bench run."""
    schedules = [(r.chosen, r) for r in rows if r.chosen in ("recursive_doubling", "rabenseifner", "ring")]
    return _fit([(name, row) for name, row in schedules if row.algorithm != "native"], "(algorithm, size) pairs")


def calibrate_native(rows: list[BenchRow]) -> cost_model.CostModel | None:
    """The native allreduce's α, β, γ from its rows (its cost formula: the ring's), or None with fewer than 3 sizes."""
    native = [(cost_model.NATIVE, row) for row in rows if row.algorithm == "native"]
    return _fit(native, "sizes") if len({row.size_bytes for _, row in native}) >= 3 else None


CALIBRATION_SMALL_BYTES = 4 << 10  # a size --calibrate across hosts always times (the link's α)
LATENCY_ROWS_UP_TO = 64 << 10  # rows this small time the link's α (their bytes' terms are small); larger ones β
NETWORK_FIT_ROUNDS = 8


def hosts_of_ranks(ranks: int, hosts: int) -> tuple[int, ...]:
    """The host of each rank of a run across ``hosts`` emulated hosts, as the launcher spreads them (consecutive
    ranks per host, :func:`hybrid_ext.launch.launchers.ranks_per_host`: 5 over 2 is 3 + 2)."""
    from hybrid_ext.launch.launchers import ranks_per_host

    return tuple(h for h, count in enumerate(ranks_per_host(ranks, hosts)) for _ in range(count))


def calibrate_network(
    rows: list[BenchRow],
    transport: str,
    bytes_per_second: float | None = None,
    itemsize: int = 4,
    cpu_per_byte: float = 0.0,
) -> cost_model.CostModel | None:
    """The link between hosts' constants from the hierarchical rows of a run across hosts (None without any).

    ``transport`` is the run's (``shm+torch-gloo``: inside a host, between hosts). None too without a hierarchical
    row of at most :data:`LATENCY_ROWS_UP_TO` bytes: nothing else times α. Each row's time, less what its
    messages inside a host cost by that transport's constants (calibrated, else built in: the step model prices
    them so too), is the time its messages to other hosts took, the slowest rank's (the row times the slowest
    rank): α·k + β·n·L for k messages and n bytes to other hosts, L ranks per host sharing the host's link. α is
    the median over the rows of at most :data:`LATENCY_ROWS_UP_TO` bytes, β the median over the larger rows, or
    the payload's at ``bytes_per_second`` on the wire where the link's rate is known (``--nic``:
    :func:`~hybrid_ext.comm.cost_model.beta_at_line_rate`). γ stays the transport's: reductions run
    inside a host. ``cpu_per_byte``: the hosts' CPU per byte sent, measured apart (:mod:`hybrid_ext.bench.link_cpu`)."""
    from hybrid_ext.parallel.step_traffic import Links, allreduce_transfer

    local_name, _, network_name = transport.rpartition("+")
    hierarchical = [r for r in rows if r.hosts and r.chosen.startswith(cost_model.HIERARCHICAL_PREFIX)]
    if not local_name or not any(row.size_bytes <= LATENCY_ROWS_UP_TO for row in hierarchical):
        return None  # one host, or no row times the link's α (the rows of any size have it to subtract)
    local, known = cost_model.default_model(local_name), cost_model.network_model(network_name)
    per_rank = []  # (row, [(seconds inside a host, messages to other hosts, bytes on the link) of every rank])
    for row in hierarchical:
        links = Links(local_name, hosts=hosts_of_ranks(row.ranks, row.hosts), network=network_name)
        ranks = []
        for rank in range(row.ranks):
            t = allreduce_transfer("bench", "gradients", row.chosen, row.size_bytes // itemsize, itemsize,
                                   links.group(list(range(row.ranks)), rank))  # fmt: skip
            near = (
                local.alpha * (t.messages - t.network_messages)
                + local.beta * (t.bytes_sent - t.network_bytes)
                + local.gamma * t.bytes_reduced
            )
            ranks.append((near, t.network_messages, t.network_bytes * links.ranks_per_link))
        per_rank.append((row, ranks))
    alpha, beta = known.alpha, cost_model.beta_at_line_rate(bytes_per_second) if bytes_per_second else known.beta
    # Each estimate leans a little on the other (a small row's few bytes, a large row's few messages), and which
    # rank is slowest on both: a few rounds settle them.
    for _ in range(NETWORK_FIT_ROUNDS):
        small, large = [], []
        for row, ranks in per_rank:
            near, k, n = max(ranks, key=lambda r: r[0] + alpha * r[1] + beta * r[2])
            left = row.median_ms / 1e3 - near
            if row.size_bytes <= LATENCY_ROWS_UP_TO and k:
                small.append((left, k, n))
            elif row.size_bytes > LATENCY_ROWS_UP_TO and n:
                large.append((left, k, n))
        if small:
            alpha = max(statistics.median((left - beta * n) / k for left, k, n in small), 1e-9)
        if large and not bytes_per_second:
            beta = max(statistics.median((left - alpha * k) / n for left, k, n in large), 1e-12)
    return cost_model.CostModel(alpha=alpha, beta=beta, gamma=known.gamma, cpu_per_byte=cpu_per_byte)


def save_calibrations(
    rows: list[BenchRow],
    transport: str,
    native_backend: str,
    bytes_per_second: float | None = None,
    itemsize: int = 4,
    link_cpu_per_byte: float = 0.0,
    sharing: float = 0.0,
) -> list[str]:
    """Fit and save what ``--calibrate`` measures: the transport's constants, the native allreduce's (three sizes
    or more), the link between hosts' (a run across hosts). ``sharing``: ranks per core while they ran (kept with
    the constants inside a host, :func:`~hybrid_ext.comm.cost_model.at_sharing`). Returns one line per saved set."""
    model = replace(calibrate(rows), sharing=sharing)
    path = cost_model.save_model(transport, model)
    said = [
        f"calibrated α={model.alpha * 1e6:.1f} µs, β={model.beta * 1e9:.3f} ns/B, γ={model.gamma * 1e9:.3f} ns/B "
        f"({sharing:.3g} ranks per core)",
        f"saved for transport {transport!r} to {path} (used by algorithm='auto')",
    ]
    native = calibrate_native(rows)
    if native is not None:
        native = replace(native, sharing=sharing)
        key = cost_model.native_model_key(f"torch-{native_backend}")
        cost_model.save_model(key, native)
        said.append(f"native: α={native.alpha * 1e6:.1f} µs, β={native.beta * 1e9:.3f} ns/B, saved as {key!r}")
    network = calibrate_network(rows, transport, bytes_per_second, itemsize, link_cpu_per_byte)
    if network is not None:
        key = cost_model.network_model_key(transport.rpartition("+")[2])
        cost_model.save_model(key, network)
        rate = " (the link's rate)" if bytes_per_second else ""
        said.append(
            f"between hosts: α={network.alpha * 1e6:.1f} µs, β={network.beta * 1e9:.3f} ns/B{rate}, the hosts' CPU "
            f"{network.cpu_per_byte * 1e9:.3f} ns/B, saved as {key!r} (used by the hierarchical allreduce's choice "
            "and by hybrid-ext plan)"
        )
    return said


def _fit(timed: list[tuple[str, BenchRow]], what: str) -> cost_model.CostModel:
    import numpy as np

    a, b = [], []
    for name, row in timed:
        a.append(cost_model.CostModel().terms(name, row.size_bytes, row.ranks))
        b.append(row.median_ms / 1e3)
    if len(a) < 3:
        raise ValueError(f"calibration needs timings of at least 3 {what}")
    matrix, target = np.array(a), np.array(b)
    # Relative error matters at every size: weight each equation by 1/t.
    weights = 1.0 / target
    solution, *_ = np.linalg.lstsq(matrix * weights[:, None], target * weights, rcond=None)
    alpha, beta, gamma = (max(float(v), 1e-12) for v in solution)
    return cost_model.CostModel(alpha=alpha, beta=beta, gamma=gamma)


def main(args) -> int:
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(
            f"hybrid-ext bench allreduce: --sizes {args.sizes!r}: expected sizes such as 1K,64K,1M"
        ) from None
    if any(size < 0 for size in sizes):
        raise SystemExit(f"hybrid-ext bench allreduce: --sizes {args.sizes!r}: sizes must be >= 0")
    algorithms = [a.strip() for a in args.algorithms.split(",")]
    unknown = [a for a in algorithms if a not in ALGORITHM_CHOICES]
    if unknown:
        raise SystemExit(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHM_CHOICES)}")
    if args.calibrate:
        algorithms = list(dict.fromkeys([*algorithms, "recursive_doubling", "rabenseifner"]))
        if getattr(args, "hosts", None):  # the link between hosts is fitted from the hierarchical rows, small ones too
            hierarchical = [cost_model.HIERARCHICAL_PREFIX + name for name in cost_model.BUTTERFLIES]
            algorithms = list(dict.fromkeys([*algorithms, *hierarchical]))
            sizes = sorted({*sizes, CALIBRATION_SMALL_BYTES})
    if "native" not in algorithms:
        algorithms.append("native")
    link_cpu_per_byte = 0.0
    if getattr(args, "hosts", None):
        rows, transport, link_cpu_per_byte = _run_on_emulated_cluster(args, sizes, algorithms)
        where = f"{args.np} ranks on {args.hosts} emulated hosts (egress {args.nic or 'unshaped'})"
    else:
        rows, transport = run_allreduce_bench(
            args.np,
            sizes,
            algorithms,
            iterations=args.iters,
            warmup=args.warmup,
            inner=args.inner,
            transport=args.transport,
            interface=getattr(args, "count_bytes_on", None),
            device=getattr(args, "device", "cpu"),
            dtype=getattr(args, "dtype", "float32"),
        )
        if launched() and dist.get_rank() != 0:
            from hybrid_ext.launch import report_result

            report_result({"rows": [asdict(r) for r in rows], "transport": transport})
            return 0
        where = f"{rows[0].ranks} ranks" + (" (launched)" if launched() else "")
    from hybrid_ext.train.device import cuda_facts, resolve_device

    device = resolve_device(getattr(args, "device", "cpu"), *cuda_facts(), 0).type
    rounds = f"median of {args.iters} rounds of {args.inner} calls"
    print(f"allreduce, {where}, {device} tensors, 1 compute thread each, {rounds}")
    native_backend = next(row.chosen for row in rows if row.algorithm == "native")
    print(f"hybrid-ext transport: {transport}; native: torch.distributed.all_reduce on {native_backend}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(rows) + "\n")
        print(f"wrote {args.markdown}")
    if args.calibrate:
        rate = None
        if getattr(args, "hosts", None) and args.nic:
            from hybrid_ext.launch.cluster import rate_bytes_per_second

            rate = rate_bytes_per_second(args.nic)
        itemsize = DTYPES[getattr(args, "dtype", "float32")].itemsize
        # Launched ranks share their host's cores (torchrun's LOCAL_WORLD_SIZE); emulated hosts, this machine's, or
        # each its own quota.
        here = int(os.environ.get("LOCAL_WORLD_SIZE", rows[0].ranks)) if launched() else rows[0].ranks
        cores = host_cores.usable_cores()
        if getattr(args, "hosts", None) and getattr(args, "cpus_per_host", None):
            here, cores = rows[0].ranks / args.hosts, args.cpus_per_host
        sharing = max(1.0, here / cores)
        said = save_calibrations(rows, transport, native_backend, rate, itemsize, link_cpu_per_byte, sharing)
        print("\n".join(said))
    if launched():
        from hybrid_ext.launch import report_result

        report_result({"rows": [asdict(r) for r in rows], "transport": transport})
    return 0


def _run_on_emulated_cluster(args, sizes: list[int], algorithms: list[str]) -> tuple[list[BenchRow], str, float]:
    """This benchmark under torchrun on ``args.hosts`` emulated hosts (``args.np`` ranks spread over them), with
    the bytes out of each host's interface counted and, with ``--nic``, times against the link bound; with
    ``--calibrate``, the hosts' CPU per byte sent over the link too (else 0)."""
    from hybrid_ext.bench import link_cpu
    from hybrid_ext.launch import cluster, run_torchrun

    command = ["-m", "hybrid_ext.cli", "bench", "allreduce", "--sizes", ",".join(map(str, sizes)),
               "--algorithms", ",".join(algorithms), "--iters", str(args.iters), "--inner", str(args.inner),
               "--warmup", str(args.warmup), "--transport", args.transport,
               "--device", getattr(args, "device", "cpu"), "--dtype", getattr(args, "dtype", "float32"),
               "--count-bytes-on", cluster.INTERFACE]  # fmt: skip
    with cluster.emulated_cluster(args.hosts, args.nic, getattr(args, "cpus_per_host", None)) as hosts:
        results = run_torchrun(command, args.np, cluster=hosts, nodes=args.hosts, timeout=1800)
        rate = cluster.rate_bytes_per_second(args.nic) if args.nic else None
        cpu_per_byte = 0.0
        if args.calibrate and args.hosts >= 2:
            try:
                cpu_per_byte = link_cpu.measure(hosts, link_cpu.probe_bytes(rate))
            except (RuntimeError, OSError) as error:  # the rows are still worth saving: the link's CPU reads as free
                print(f"hybrid-ext bench allreduce: the link's CPU per byte not measured ({error}); saved as 0",
                      file=sys.stderr)  # fmt: skip
    rows = [BenchRow(**row) for row in results[0]["rows"]]
    if rate:
        for row in rows:
            if row.hosts:
                row.link_bound_ratio = row.median_ms / 1e3 / link_bound_seconds(row.size_bytes, row.hosts, rate)
    return rows, results[0]["transport"], cpu_per_byte
