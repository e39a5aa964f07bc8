"""Stack check: a 2-rank gloo allreduce, a 2-rank ``horovodrun`` job and a 2-rank ``deepspeed`` job.

``hybrid-ext smoke`` runs all three and says which parts of the stack work. The launched ranks run
:mod:`hybrid_ext.tools.smoke_horovod_worker` / :mod:`hybrid_ext.tools.smoke_deepspeed_worker`: each rank computes
something with its framework and reports it back; this module checks the numbers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from hybrid_ext.launch import run_deepspeed, run_horovodrun, spawn


def _gloo_rank(rank: int, world_size: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    return {"rank": rank, "allreduce": t.tolist()}


def check_gloo(np: int = 2) -> str:
    results = spawn(_gloo_rank, np, timeout=60)
    expected = float(np * (np + 1) // 2)
    assert all(r["allreduce"] == [expected] * 4 for r in results), results
    return f"gloo allreduce over {np} ranks = {expected:g} on every rank"


def check_horovod(np: int = 2) -> str:
    results = run_horovodrun([sys.executable, "-m", "hybrid_ext.tools.smoke_horovod_worker"], np, timeout=180)
    expected = float(np * (np + 1) // 2)
    assert all(r["allreduce"] == [expected] * 3 for r in results), results
    assert all(r["weight"].equal(results[0]["weight"]) for r in results), "Horovod ranks disagree on weights"
    return f"horovodrun -np {np} --gloo: allreduce = {expected:g}, alltoall and DistributedOptimizer agree"


def check_deepspeed(np: int = 2) -> str:
    results = run_deepspeed(["--module", "hybrid_ext.tools.smoke_deepspeed_worker"], np, timeout=240)
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
