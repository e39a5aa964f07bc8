"""GPU paths: run whenever CUDA devices exist, and say why they skipped otherwise.

Two or more GPUs: real NCCL between ranks — every collective and the partitioner exact against the same
computation on gloo / the single-process reference. One GPU: the device path of a single rank — CUDA
communicators, stream order, 16-bit wire staging on the device, shared memory never handed CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_one = pytest.mark.skipif(GPUS < 1, reason="no CUDA device here: the GPU paths were not run")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"{GPUS} CUDA device(s) here: real NCCL needs two or more")


class _Mirror:
    """A one-peer stand-in transport on the device: the 'peer' sends back what this rank sent."""

    name, rank, size, timeout = "mirror", 0, 2, 30.0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        if recv is not None:
            recv.copy_(send) if send is not None and send.numel() == recv.numel() else recv.zero_()


@needs_one
def test_the_device_path_on_one_gpu():
    from hybrid_ext.comm import Communicator
    from hybrid_ext.comm.streams import CudaStreamOrder

    device = torch.device("cuda", 0)
    comm = Communicator(_Mirror(), device)
    assert isinstance(comm.streams, CudaStreamOrder)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # produced on a stream other than the communicator's
        x = torch.arange(1 << 20, device=device, dtype=torch.float16) % 7
        handle = comm.submit(lambda: comm.allreduce_now([x], "sum", "rabenseifner"))
        handle.wait()
        expected = (torch.arange(1 << 20, device=device, dtype=torch.float32) % 7) * 2
        torch.testing.assert_close(x.float(), expected)
    # CUDA tensors are never given to shared memory: a CUDA group's transport is the process group's own.
    import hybrid_ext.comm.shm_transport as shm

    assert not isinstance(comm.transport, shm.ShmTransport)


def _nccl_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import hybrid_ext

    device = torch.device("cuda", torch.cuda.current_device())
    failures = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for algorithm in ("recursive_doubling", "rabenseifner", "ring"):
            for n in (1, 1000, (1 << 20) + 3):
                x = torch.randn(n, generator=torch.Generator().manual_seed(rank + n)).to(device, dtype)
                ours = hybrid_ext.allreduce(x.clone(), algorithm=algorithm, wire_dtype=torch.float32)
                theirs = x.float().clone()
                dist.all_reduce(theirs)
                if not torch.allclose(ours.float(), theirs, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2):
                    failures.append(f"{dtype} {algorithm} n={n}")
    rows = torch.full((rank + 1, 3), float(rank), device=device)
    gathered = hybrid_ext.allgather(rows)
    expected_rows = sum(r + 1 for r in range(world))
    if gathered.shape != (expected_rows, 3):
        failures.append(f"allgather shape {tuple(gathered.shape)}")
    return {"failures": failures}


@needs_two
def test_real_nccl_collectives_equal_nccls_own(spawn_ranks):
    results = spawn_ranks(_nccl_rank, min(GPUS, 4), backend="nccl", timeout=300)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: {result['failures']}"


def _partitioner_rank(rank: int, world: int) -> dict:
    import torch.nn.functional as F
    from parallel_reference import MICRO_BATCH, MODELS, global_batch

    import hybrid_ext

    device = torch.device("cuda", torch.cuda.current_device())
    build, shape, classes = MODELS["small_cnn"]
    model = hybrid_ext.parallelize(build().to(device), strategy="hybrid", reducer="butterfly")
    x, y = global_batch(world, shape, classes)
    mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x[mine].to(device)), y[mine].to(device))
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    hybrid_ext.allreduce(total, op="avg", group=model.groups.world)
    return {"loss": total.item(), "state": {k: v.cpu() for k, v in hybrid_ext.full_state_dict(model).items()}}


@needs_two
def test_the_partitioner_on_nccl_equals_the_reference(spawn_ranks):
    from parallel_reference import reference

    world = min(GPUS, 4)
    loss, _, state = reference("small_cnn", world)
    for result in spawn_ranks(_partitioner_rank, world, backend="nccl", timeout=300):
        assert result["loss"] == pytest.approx(loss, rel=1e-4)
        for key, value in state.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5)
