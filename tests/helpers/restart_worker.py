"""One rank of the restart test (tests/cluster/test_restarts.py) under ``torchrun --max-restarts``.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/helpers/restart_worker.py CKPT_DIR --kill-step 9 --kill-rank 1

The small CNN of tests/helpers/parallel_reference.py, parallelized (hybrid strategy, butterfly reducer over a gloo
group), trains ``EPOCHS`` epochs of ``STEPS_PER_EPOCH`` steps. The data order is fixed: epoch ``e`` visits the sample
pool in the permutation seeded by ``e``, ``GLOBAL_BATCH`` samples a step, each rank its contiguous share. Every
``--every`` steps the full (unsharded) model and optimizer state and the step count are written to
``CKPT_DIR/last.pt`` (rank 0 writes a temporary file and renames it, so a rank killed while it is written leaves
the previous checkpoint whole). A rank starts from that checkpoint if there is one.

With ``--kill-step S --kill-rank R``, on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), rank R
SIGKILLs itself at step S between forward and backward — its peer is then waiting in the gradient reduction.
Every rank of every attempt writes ``CKPT_DIR/attempt<A>-rank<R>.pid`` (for the test's shared-memory check);
the victim writes ``CKPT_DIR/killed`` just before it dies. The last attempt's ranks report their final state.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import hybrid_ext
from hybrid_ext.launch import report_result
from hybrid_ext.parallel.checkpoint import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)

EPOCHS = 2
STEPS_PER_EPOCH = 6
GLOBAL_BATCH = 16
POOL = STEPS_PER_EPOCH * GLOBAL_BATCH


def sample_pool() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    return torch.randn(POOL, 3, 16, 16, generator=g), torch.randint(0, 10, (POOL,), generator=g)


def batch(pool, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global step ``step``: the same samples in the same order whenever it runs."""
    epoch, within = divmod(step, STEPS_PER_EPOCH)
    order = torch.randperm(POOL, generator=torch.Generator().manual_seed(epoch))
    index = order[within * GLOBAL_BATCH : (within + 1) * GLOBAL_BATCH]
    share = GLOBAL_BATCH // world
    index = index[rank * share : (rank + 1) * share]
    return pool[0][index], pool[1][index]


def main() -> None:
    from parallel_reference import small_cnn

    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    (args.ckpt_dir / f"attempt{attempt}-rank{rank}.pid").write_text(str(os.getpid()))
    print(f"rank {rank}: attempt {attempt} (TORCHELASTIC_RESTART_COUNT={attempt})", flush=True)

    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid", reducer="butterfly")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpoint = args.ckpt_dir / "last.pt"
    start = 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        load_full_state_dict(model, saved["model"])
        load_full_optimizer_state_dict(model, optimizer, saved["optimizer"])
        start = saved["step"]
        print(f"rank {rank}: resumed from the checkpoint of step {start}", flush=True)

    pool = sample_pool()
    losses = {}
    for step in range(start, EPOCHS * STEPS_PER_EPOCH):
        x, y = batch(pool, step, rank, world)
        loss = F.cross_entropy(model(x), y)
        if attempt == 0 and step == args.kill_step and rank == args.kill_rank:
            (args.ckpt_dir / "killed").write_text(f"rank {rank} step {step} pid {os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses[step] = loss.item()
        if (step + 1) % args.every == 0:
            state = {
                "model": full_state_dict(model),  # collective: every rank gathers the FC shards
                "optimizer": full_optimizer_state_dict(model, optimizer),
                "step": step + 1,
            }
            if rank == 0:
                partial = checkpoint.with_suffix(".partial")
                torch.save(state, partial)
                os.replace(partial, checkpoint)
            dist.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet

    result = {
        "attempt": attempt,
        "start": start,
        "losses": losses,
        "state": full_state_dict(model),
        "optimizer": full_optimizer_state_dict(model, optimizer),
    }
    dist.barrier()
    report_result(result, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
