"""One rank of the torchrun jobs (tests/cluster/test_multihost.py):
``torchrun ... tests/helpers/torchrun_worker.py BACKEND``.

With ``butterfly``, DDP runs on the ``butterfly`` backend; with ``gloo``, DDP on gloo with the butterfly comm hook.
Either way the job then takes one step of the partitioner's hybrid strategy. Each rank reports its numbers, host
and transports; the test compares them with the single-process references. Nothing here asserts.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import hybrid_ext  # registers the butterfly backend
from hybrid_ext.launch import report_result


def main(backend: str) -> None:
    from ddp_reference import train_ddp
    from parallel_reference import step_rank

    torch.set_num_threads(1)
    dist.init_process_group(backend)  # env:// — torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    hybrid_ext.set_check(True)
    result = {
        "host": socket.gethostname(),
        "ddp": train_ddp(rank, world, use_hook=backend != "butterfly"),
        "hybrid": step_rank(rank, world, "small_cnn", "hybrid", None, "butterfly"),
    }
    dist.barrier()
    report_result(result, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
