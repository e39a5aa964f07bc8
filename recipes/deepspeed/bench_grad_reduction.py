"""DeepSpeed's gradient-reduction time per step: the butterfly backend against plain gloo, in one run.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 recipes/deepspeed/bench_grad_reduction.py --algorithms auto,ring

Every rank holds two DeepSpeed engines (ZeRO-0, fp32) on the same model — torchvision ResNet-50 by default,
25.6 M parameters — and a step of each is taken in turn, so both see the same machine noise:

- ``butterfly-<algorithm>``: DeepSpeed's data-parallel group is the default group of a job started with
  ``hybrid_ext.integrations.deepspeed.init_distributed(reducer="auto")``; its gradient allreduce goes
  through the butterfly (``HYBRID_EXT_ALGO`` switched per step for each algorithm asked for), hybrid-ext
  gathering, scaling and copying back the bucket segment by segment while other segments are on the wire
  (:mod:`hybrid_ext.integrations.deepspeed.grad_reduction`);
- ``butterfly-<algorithm>/deepspeed-copies`` (with ``--deepspeed-copies``): the same backend under DeepSpeed's
  own flatten, scale and copy-back of the whole bucket (``HYBRID_EXT_DEEPSPEED_REDUCTION=deepspeed``);
- ``gloo``: the engine gets an ``mpu`` whose data-parallel group is a plain gloo group over the same ranks, so
  every gradient reduction of that engine runs on gloo's own allreduce.

``auto`` and ``butterfly`` are timed after the online tuner's trials (:mod:`hybrid_ext.comm.tuner`). Per step,
``backward`` runs inside ``engine.no_sync()``; then, after a barrier, each rank times DeepSpeed's
own reduction, ``engine.allreduce_gradients()`` (one flat buffer here), ``--repeats`` times. The table reports
the median over the steps (the first one is warm-up) of the slowest rank's time, the bytes reduced, and the
ratio to gloo; for the butterfly rows also the allreduce alone (rank 0, from hybrid-ext's metrics; with
DeepSpeed's copies, the rest is its flatten, scale and copy-back of the bucket, the same as gloo's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


class GlooDataParallel:
    """An ``mpu`` with mp = 1 whose data-parallel group is a plain gloo group over all ranks."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp = dist.new_group(backend="gloo")
        self.mp = [dist.new_group([r], backend="gloo") for r in range(self.world)][self.rank]

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self):
        return self.mp

    def get_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.world

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.world))


OWN_COPIES = "/deepspeed-copies"


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)()  # ImageNet head: ResNet-50 has 25.6 M parameters


def make_engine(model_name: str, mpu=None):
    import deepspeed
    import deepspeed.utils.groups

    deepspeed.utils.groups.mpu = None  # each engine its own groups (DeepSpeed keeps the last mpu otherwise)
    model = build_model(model_name)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1_000_000,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def timed_step(engine, x, y, bookkeeping, repeats: int) -> list[float]:
    """One step; returns the slowest rank's seconds in each of ``repeats`` runs of DeepSpeed's gradient reduction.

    Averaging gradients that are already equal on every rank leaves them as they are, so the repeats time the
    same reduction again without changing what the step does (up to rounding)."""
    with engine.no_sync():
        engine.backward(F.cross_entropy(engine(x), y))
    elapsed = torch.zeros(repeats, dtype=torch.float64)
    for i in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        engine.allreduce_gradients()
        elapsed[i] = time.perf_counter() - start
    engine.step()
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=bookkeeping)
    return elapsed.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (default: 25.6 M params)")
    parser.add_argument("--steps", type=int, default=5, help="steps per row (the first is warm-up)")
    parser.add_argument("--algorithms", default="auto", help="butterfly algorithms, e.g. auto,rabenseifner,ring")
    parser.add_argument("--repeats", type=int, default=3, help="timed reductions per step")
    parser.add_argument("--size", type=int, default=32, help="input image side")
    parser.add_argument(
        "--deepspeed-copies", action="store_true", help="also time DeepSpeed's own flatten / scale / copy-back"
    )
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import hybrid_ext
    from hybrid_ext.config import override
    from hybrid_ext.integrations import deepspeed as hx_deepspeed

    hx_deepspeed.init_distributed(reducer="auto")
    rank, world = dist.get_rank(), dist.get_world_size()
    bookkeeping = dist.new_group(backend="gloo")  # the bench's own max over ranks stays off the metrics
    algorithms = [a for a in args.algorithms.split(",") if a]
    engines = {"gloo": make_engine(args.model, GlooDataParallel())}
    butterfly_engine = make_engine(args.model)
    own = [f"butterfly-{a}{OWN_COPIES}" for a in algorithms] if args.deepspeed_copies else []
    rows = [f"butterfly-{a}" for a in algorithms] + own + ["gloo"]
    params = sum(p.numel() for p in butterfly_engine.module.parameters())
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {row: [] for row in rows}
    ran: dict[str, set[str]] = {row: set() for row in rows}
    collective: dict[str, list[float]] = {row: [] for row in rows}  # the butterfly allreduce alone (rank 0)
    x = torch.randn(2, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    from hybrid_ext.comm import tuner

    for algorithm in algorithms:  # auto / butterfly: past the tuner's trials before timing (it decides once)
        if algorithm in ("auto", "butterfly") and tuner.tune_mode() != "off":
            calls = tuner.trials_for(params * 4) * tuner.MAX_CANDIDATES + 1  # + the first call's agreement
            with override(HYBRID_EXT_ALGO=algorithm):
                for _ in range(-(-calls // args.repeats)):
                    timed_step(butterfly_engine, x, y, bookkeeping, args.repeats)
    for _ in range(args.steps):
        x = torch.randn(2, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        for row in rows:  # interleaved: every row sees the same stretch of machine noise
            if row == "gloo":
                times[row] += timed_step(engines["gloo"], x, y, bookkeeping, args.repeats)
                continue
            requested = row.removeprefix("butterfly-").removesuffix(OWN_COPIES)
            reduction = "deepspeed" if row.endswith(OWN_COPIES) else "hybrid-ext"
            setting = override(HYBRID_EXT_ALGO=requested, HYBRID_EXT_DEEPSPEED_REDUCTION=reduction)
            with setting, hybrid_ext.metrics.capture() as records:
                times[row] += timed_step(butterfly_engine, x, y, bookkeeping, args.repeats)
            big = [r for r in records if r.collective == "allreduce" and r.elements >= params]
            ran[row] |= {r.algorithm for r in big}
            collective[row] += [r.seconds for r in big]
    if rank == 0:
        warm = args.repeats  # the first step's reductions are warm-up
        gloo = statistics.median(times["gloo"][warm:] or times["gloo"])
        mb = params * 4 / 1e6
        print(f"\n{args.model}: {params / 1e6:.1f} M parameters ({mb:.1f} MB fp32 gradients), W={world}, ZeRO-0")
        print("| reduction | ran | median ms | min ms | of which allreduce ms | GB/s (algbw) | × gloo |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for row in rows:
            values = times[row][warm:] or times[row]
            median = statistics.median(values)
            label = ",".join(sorted(ran[row])) or ("gloo" if row == "gloo" else "?")
            inner = collective[row][warm:] or collective[row]
            inner_ms = f"{statistics.median(inner) * 1e3:.1f}" if inner else "-"
            print(
                f"| {row} | {label} | {median * 1e3:.1f} | {min(values) * 1e3:.1f} | {inner_ms} "
                f"| {mb / 1e3 / median:.3f} | {median / gloo:.2f} |"
            )
    from hybrid_ext.launch import report_result

    report_result({"times": times, "params": params})


if __name__ == "__main__":
    main()
