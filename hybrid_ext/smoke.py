"""Stack check: a 2-rank gloo allreduce, a 2-rank ``horovodrun`` job and a 2-rank ``deepspeed`` job.

``hybrid-ext smoke`` runs all three and says which parts of the stack work. This module is also the script
the launched ranks run (``python -m hybrid_ext.smoke horovod-worker`` / ``deepspeed-worker``): each rank
computes something with its framework and reports it back; the parent checks the numbers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from hybrid_ext.launch import report_result, run_deepspeed, run_horovodrun, spawn


def _gloo_rank(rank: int, world_size: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    return {"rank": rank, "allreduce": t.tolist()}


def horovod_worker() -> None:
    """One rank of the Horovod smoke job: allreduce, alltoall with splits, one DistributedOptimizer step."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    summed = hvd.allreduce(torch.full((3,), float(rank + 1)), op=hvd.Sum)
    # Rank r sends (j + 1) elements of value r to rank j.
    splits = torch.arange(1, size + 1, dtype=torch.int32)
    send = torch.full((int(splits.sum()),), float(rank))
    received, received_splits = hvd.alltoall(send, splits=splits)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    x = torch.full((8, 4), float(rank + 1))
    model(x).sum().backward()
    optimizer.step()
    report_result(
        {
            "rank": rank,
            "size": size,
            "allreduce": summed.tolist(),
            "alltoall": received.tolist(),
            "alltoall_splits": received_splits.tolist(),
            "weight": model.weight.detach().clone(),
        }
    )


def deepspeed_worker() -> None:
    """One rank of the DeepSpeed smoke job: deepspeed.comm all_reduce and one engine step (ZeRO 0, gloo)."""
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    rank, size = ds_comm.get_rank(), ds_comm.get_world_size()
    t = torch.full((3,), float(rank + 1))
    ds_comm.all_reduce(t)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.full((8, 4), float(rank + 1))
    loss = engine(x).sum()
    engine.backward(loss)
    engine.step()
    report_result(
        {"rank": rank, "size": size, "allreduce": t.tolist(), "weight": engine.module.weight.detach().clone()}
    )


def check_gloo(np: int = 2) -> str:
    results = spawn(_gloo_rank, np, timeout=60)
    expected = float(np * (np + 1) // 2)
    assert all(r["allreduce"] == [expected] * 4 for r in results), results
    return f"gloo allreduce over {np} ranks = {expected:g} on every rank"


def check_horovod(np: int = 2) -> str:
    results = run_horovodrun([sys.executable, "-m", "hybrid_ext.smoke", "horovod-worker"], np, timeout=180)
    expected = float(np * (np + 1) // 2)
    assert all(r["allreduce"] == [expected] * 3 for r in results), results
    assert all(r["weight"].equal(results[0]["weight"]) for r in results), "Horovod ranks disagree on weights"
    return f"horovodrun -np {np} --gloo: allreduce = {expected:g}, alltoall and DistributedOptimizer agree"


def check_deepspeed(np: int = 2) -> str:
    results = run_deepspeed(["--module", "hybrid_ext.smoke", "deepspeed-worker"], np, timeout=240)
    expected = float(np * (np + 1) // 2)
    assert all(r["allreduce"] == [expected] * 3 for r in results), results
    assert all(r["weight"].equal(results[0]["weight"]) for r in results), "DeepSpeed ranks disagree on weights"
    return f"deepspeed --num_gpus {np} (CPU, gloo): all_reduce = {expected:g}, engine step agrees"


CHECKS: dict[str, Callable[[int], str]] = {"gloo": check_gloo, "horovod": check_horovod, "deepspeed": check_deepspeed}


def run_checks(names: list[str], np: int = 2) -> bool:
    ok = True
    for name in names:
        start = time.perf_counter()
        try:
            message = CHECKS[name](np)
            print(f"  ok    {name:<10} {message} ({time.perf_counter() - start:.1f}s)", flush=True)
        except Exception as exc:  # report every part of the stack, then fail
            ok = False
            print(f"  FAIL  {name:<10} {type(exc).__name__}: {exc}", flush=True)
    return ok


if __name__ == "__main__":
    # The deepspeed launcher adds --local_rank=N before our own arguments.
    role = next((arg for arg in sys.argv[1:] if not arg.startswith("--")), "")
    workers = {"horovod-worker": horovod_worker, "deepspeed-worker": deepspeed_worker}
    if role not in workers:
        raise SystemExit(f"usage: python -m hybrid_ext.smoke {{{','.join(workers)}}}")
    workers[role]()
