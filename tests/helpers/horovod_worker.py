"""One rank of the Horovod integration tests; run under a real ``horovodrun`` by tests/launchers/test_horovod.py.

    horovodrun -np 3 -H localhost:3 --gloo python tests/helpers/horovod_worker.py ops optimizer partitioner:hybrid:none

Each scenario returns plain data (differences, parameters); the test process checks them and computes the
single-process references. Nothing here asserts, so a failure reports every number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hybrid_ext
import hybrid_ext.integrations.horovod as hxh
from hybrid_ext.launch import report_result

SIZES = (0, 1, 7, (1 << 20) + 3)


def _inputs(n: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * hvd.rank() + n + salt)
    return torch.randn(n, generator=g).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def ops() -> dict:
    """Every allreduce entry point with hvd.Butterfly against the same call with hvd.Average."""
    out: dict = {"errors": {}, "untouched": {}}
    errors = out["errors"]
    with hybrid_ext.metrics.capture() as records:
        for dtype in (torch.float32, torch.float16):
            for n in SIZES:
                key = f"{str(dtype).removeprefix('torch.')}-{n}"
                x = _inputs(n, dtype)
                expected = hvd.allreduce(x, op=hvd.Average)
                errors[f"allreduce-{key}"] = _rel(hvd.allreduce(x, op=hvd.Butterfly), expected)
                inplace = x.clone()
                returned = hvd.allreduce_(inplace, op=hvd.Butterfly)
                errors[f"allreduce_-{key}"] = max(_rel(inplace, expected), 0.0 if returned is inplace else 1.0)
                handle = hvd.allreduce_async(x, op=hvd.Butterfly)
                errors[f"allreduce_async-{key}"] = _rel(hvd.synchronize(handle), expected)
                y = x.clone()
                handle = hvd.allreduce_async_(y, op=hvd.Butterfly)
                while not hvd.poll(handle):
                    pass
                errors[f"allreduce_async_-{key}"] = _rel(hvd.synchronize(handle), expected)
                errors[f"sum-{key}"] = _rel(hvd.allreduce(x, op=hvd.ButterflySum), hvd.allreduce(x, op=hvd.Sum))
                errors[f"scaled-{key}"] = _rel(
                    hvd.allreduce(x, op=hvd.Butterfly, prescale_factor=0.5, postscale_factor=3.0),
                    hvd.allreduce(x, op=hvd.Average, prescale_factor=0.5, postscale_factor=3.0),
                )
        group = [_inputs(5, torch.float32, 1), _inputs(3000, torch.float32, 2), _inputs(1, torch.float64, 3)]
        ours = hvd.grouped_allreduce(group, op=hvd.Butterfly)
        theirs = hvd.grouped_allreduce(group, op=hvd.Average)
        errors["grouped_allreduce"] = max(_rel(a, b) for a, b in zip(ours, theirs))
        handle = hvd.grouped_allreduce_async(group, op=hvd.Butterfly)
        errors["grouped_allreduce_async"] = max(_rel(a, b) for a, b in zip(hvd.synchronize(handle), theirs))
        copies = [t.clone() for t in group]
        hvd.grouped_allreduce_(copies, op=hvd.Butterfly)
        errors["grouped_allreduce_"] = max(_rel(a, b) for a, b in zip(copies, theirs))
        # Gradients flow through hvd.allreduce(op=Butterfly) as through Average: d(avg)/dx = 1/size per rank... summed.
        leaf = _inputs(4, torch.float32, 4).requires_grad_()
        (hvd.allreduce(leaf, op=hvd.Butterfly) * torch.arange(4.0)).sum().backward()
        ref_leaf = leaf.detach().clone().requires_grad_()
        (hvd.allreduce(ref_leaf, op=hvd.Average) * torch.arange(4.0)).sum().backward()
        errors["autograd"] = _rel(leaf.grad, ref_leaf.grad)
    out["butterfly_records"] = len(records)
    out["transports"] = sorted({r.transport for r in records})
    # Horovod's own calls keep working, and the op is Average to Horovod's Python layer.
    r = torch.tensor([float(hvd.rank())])
    out["untouched"]["broadcast"] = hvd.broadcast(r, root_rank=hvd.size() - 1).item()
    out["untouched"]["allgather"] = hvd.allgather(r).tolist()
    out["untouched"]["min"] = hvd.allreduce(r + 1, op=hvd.Min).item()
    splits = torch.ones(hvd.size(), dtype=torch.int32)
    received, _ = hvd.alltoall(torch.full((hvd.size(),), float(hvd.rank())), splits=splits)
    out["untouched"]["alltoall"] = received.tolist()
    out["equal_to_average"] = hvd.Butterfly == hvd.Average and hvd.ButterflySum == hvd.Sum
    out["repr"] = repr(hvd.Butterfly)
    hxh.register()  # idempotent
    out["still_registered"] = hvd.mpi_ops._allreduce_async is hxh.op._allreduce_async
    try:
        hvd.allreduce(torch.ones(2, dtype=torch.int32), op=hvd.Butterfly)
        out["int_average_error"] = None
    except TypeError as exc:
        out["int_average_error"] = str(exc)
    return out


def process_set() -> dict:
    """hvd.Butterfly over a process set of ranks {0, 2}: its own side channel; the other ranks are refused.

    The native partitioner scenario added {0, 2} already (a dp group): process_set_for finds it."""
    pset = hxh.process_set_for([0, 2])
    x = _inputs(1000, torch.float32)
    if hvd.rank() in (0, 2):
        ours = hvd.allreduce(x, op=hvd.Butterfly, process_set=pset)
        return {"error": _rel(ours, hvd.allreduce(x, op=hvd.Average, process_set=pset))}
    try:
        hvd.allreduce(x, op=hvd.Butterfly, process_set=pset)
    except ValueError as exc:
        return {"refused": str(exc)}
    return {"refused": None}


def transports() -> dict:
    """The other transports under Horovod: the side channel's gloo pairs, and hvd.alltoall (power-of-two p)."""
    from hybrid_ext.comm import Communicator

    out = {}
    x = _inputs(1001, torch.float32, 5)
    expected = hvd.allreduce(x, op=hvd.Average)
    candidates = {"gloo": hxh.side_channel().transport(torch.device("cpu"), choice="torch")}
    if hvd.size() & (hvd.size() - 1) == 0:
        candidates["alltoall"] = hxh.HorovodAlltoallTransport()
    for name, transport in candidates.items():
        comm, y = Communicator(transport), x.clone()
        comm.allreduce([y], op="avg", algorithm="rabenseifner")
        out[name] = {"error": _rel(y, expected), "transport": transport.name}
    return out


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _train(op, passes: int = 1, predivide: float = 1.0, compression=None) -> list[torch.Tensor]:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        op=op,
        backward_passes_per_step=passes,
        gradient_predivide_factor=predivide,
        compression=compression or hvd.Compression.none,
    )
    g = torch.Generator().manual_seed(hvd.rank())
    for _ in range(3):
        optimizer.zero_grad()
        for _ in range(passes):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            F.mse_loss(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def optimizer() -> dict:
    """DistributedOptimizer(op=Butterfly) against op=Average, plain and with Horovod's options."""
    out = {}
    variants = {
        "plain": {},
        "passes2": {"passes": 2},
        "predivide": {"predivide": 2.0},
        "fp16": {"compression": hvd.Compression.fp16},
    }
    for name, kwargs in variants.items():
        with hybrid_ext.metrics.capture() as records:
            ours = _train(hvd.Butterfly, **kwargs)
        out[name] = {"butterfly": ours, "average": _train(hvd.Average, **kwargs), "records": len(records)}
    return out


def partitioner(strategy: str, mp: str, reducer: str) -> dict:
    """tests/multiprocess/test_parallel.py's one step on small_cnn, over Horovod's groups."""
    sys.path.insert(0, str(Path(__file__).parent))
    from parallel_reference import step_rank

    mp_size = None if mp == "none" else int(mp)
    groups = hxh.horovod_groups(mp_size)
    return step_rank(hvd.rank(), hvd.size(), "small_cnn", strategy, mp_size, reducer, groups=groups)


def accumulation(mp: str) -> dict:
    """Two backward passes before one step over Horovod's groups: plain, the first inside model.no_sync(), and
    with hvd.DistributedOptimizer(backward_passes_per_step=2) around the optimizer (the partitioner reduces its own
    gradients: Horovod's optimizer hands the optimizer back instead of reducing them again)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from parallel_reference import accumulate_rank

    mp_size = None if mp == "none" else int(mp)
    groups = hxh.horovod_groups(mp_size)
    results = {
        mode: accumulate_rank(hvd.rank(), hvd.size(), "hybrid", mp_size, mode, groups=groups)
        for mode in ("plain", "no_sync")
    }

    def horovod_optimizer(optimizer, model):  # what a Horovod script does, backward_passes_per_step included
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), backward_passes_per_step=2, op=hvd.Butterfly
        )

    results["hvd.DistributedOptimizer"] = accumulate_rank(
        hvd.rank(), hvd.size(), "hybrid", mp_size, "plain", groups=groups, wrap_optimizer=horovod_optimizer
    )
    return results


def usual_lines(mp: str) -> dict:
    """A Horovod script's usual lines around the one-line swap: optimizer before the wrap, hvd.broadcast_parameters
    of the model's state dict, hvd.broadcast_optimizer_state (before training and after some), DistributedOptimizer."""
    sys.path.insert(0, str(Path(__file__).parent))
    from parallel_reference import MICRO_BATCH, global_batch, small_cnn

    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    mp_size = None if mp == "none" else int(mp)
    model = hybrid_ext.parallelize(plain, strategy="hybrid", groups=hxh.horovod_groups(mp_size))
    initial = {k: v.clone() for k, v in model.module.state_dict().items()}
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    after_broadcast = {k: v.clone() for k, v in model.module.state_dict().items()}
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Butterfly)
    x, y = global_batch(hvd.size(), (3, 16, 16), 10)
    rank = hvd.rank()
    x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step == 0:
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    return {
        "initial": initial,
        "after_broadcast": after_broadcast,
        "state": model.module.state_dict(),
        "optimizer": optimizer.state_dict(),
    }


SCENARIOS = {
    "ops": ops,
    "transports": transports,
    "optimizer": optimizer,
    "partitioner": partitioner,
    "accumulation": accumulation,
    "usual_lines": usual_lines,
    "process_set": process_set,
}


def main(scenarios: list[str]) -> None:
    hvd.init()
    hxh.register()
    hybrid_ext.set_check(True)
    result = {}
    for scenario in scenarios:
        name, *args = scenario.split(":")
        result[scenario] = SCENARIOS[name](*args)
    hvd.barrier()  # a rank that left early would shut Horovod down under the others' last collectives
    report_result(result, hvd.rank())


if __name__ == "__main__":
    main(sys.argv[1:])
