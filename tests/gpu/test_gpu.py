"""GPU paths: run whenever CUDA devices exist, and say why they skipped otherwise.

One GPU: the device path of a single rank (CUDA communicators, stream order, 16-bit wire staging on the device);
2 and 4 ranks sharing it over gloo, where CUDA tensors are staged through host memory (gloo sends host tensors
only) — every collective, dtype, size and schedule, the partitioner, DDP's comm hook, check mode; NCCL with 2
ranks on it where torch's NCCL is 2.30 or newer (its multi-rank switch). Two or more GPUs: real NCCL between
ranks — every collective and the partitioner exact against NCCL's own / the single-process reference.
"""

from __future__ import annotations

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_one = pytest.mark.skipif(GPUS < 1, reason="no CUDA device here: the GPU paths were not run")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"{GPUS} CUDA device(s) here: real NCCL needs two or more")


def _nccl_version() -> tuple[int, ...]:
    """The NCCL torch loads, as (major, minor, patch); () without CUDA or NCCL."""
    if GPUS < 1:
        return ()
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return ()
    if isinstance(version, int):  # older torch: major * 10000 + minor * 100 + patch (NCCL >= 2.9)
        return (version // 10000, version // 100 % 100, version % 100)
    return tuple(version)


NCCL = _nccl_version()
# Ranks may share one GPU on NCCL from 2.30, with NCCL_MULTI_RANK_GPU_ENABLE=1; older NCCL refuses a shared GPU.
NCCL_SHARES_GPUS = NCCL >= (2, 30)
needs_nccl_pair = pytest.mark.skipif(
    GPUS < 2 and not (GPUS == 1 and NCCL_SHARES_GPUS),
    reason=f"{GPUS} CUDA device(s), NCCL {'.'.join(map(str, NCCL)) or 'absent'} here: two NCCL ranks need two "
    "GPUs, or one GPU and NCCL >= 2.30",
)
SPAWN_SECONDS = 300


def _nccl_env(world: int) -> dict[str, str]:
    """What NCCL ranks need where there are fewer GPUs than ranks (they share: NCCL's multi-rank switch)."""
    return {"NCCL_MULTI_RANK_GPU_ENABLE": "1"} if world > GPUS else {}


def _exact_ints(rank: int, n: int) -> torch.Tensor:
    """Small integers, float64 on the host: their sums over 4 ranks are exact in float16 and bfloat16 too."""
    return torch.randint(-8, 9, (n,), generator=torch.Generator().manual_seed(1000 * rank + n)).double()


def _tf32_off() -> None:
    """TF32 rounds matmul and convolution inputs to 10 mantissa bits: off, so GPU steps compare to the CPU's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class _Mirror:
    """A one-peer stand-in transport on the device: the 'peer' sends back what this rank sent (so a sum is x * 2
    only where both halves of x are equal: the peer's half is this rank's own other half)."""

    name, rank, size, timeout = "mirror", 0, 2, 30.0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        if recv is not None:
            recv.copy_(send) if send is not None and send.numel() == recv.numel() else recv.zero_()


@needs_one
@pytest.mark.timeout(120)
@pytest.mark.parametrize("issue", ["blocking", "async-from-a-side-stream"])
@pytest.mark.parametrize("algorithm", ["recursive_doubling", "rabenseifner"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_device_path_on_one_gpu(dtype, algorithm, issue):
    from hybrid_ext.comm import Communicator
    from hybrid_ext.comm.streams import CudaStreamOrder

    device = torch.device("cuda", 0)
    comm = Communicator(_Mirror(), device)
    assert isinstance(comm.streams, CudaStreamOrder)
    # Two equal halves of small integers, built in float32 and then cast: exact in every dtype (arange(2**20) in
    # float16 itself overflows to inf, and inf % 7 is NaN).
    half = torch.arange(1 << 19, dtype=torch.float32) % 7
    expected = (torch.cat([half, half]) * 2).to(device)
    if issue == "blocking":
        x = torch.cat([half, half]).to(device, dtype)
        comm.allreduce([x], algorithm=algorithm)
        torch.testing.assert_close(x.float(), expected, rtol=0, atol=0)
        return
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # produced on a stream other than the communicator's
        x = torch.cat([half, half]).to(device, dtype)
        handle = comm.allreduce([x], algorithm=algorithm, async_op=True)
        handle.wait()  # the side stream now waits for the collective's end
        torch.testing.assert_close(x.float(), expected, rtol=0, atol=0)


def _collectives_rank(rank: int, world: int, staged: bool) -> list[str]:
    """Every collective x dtype x size x schedule on CUDA tensors, each exact against the host's own sum."""
    import hybrid_ext
    from hybrid_ext.comm.transports.staged import StagedTransport

    hybrid_ext.set_check(True)  # check mode with CUDA tensors: its fingerprints travel the same route
    device = torch.device("cuda", torch.cuda.current_device())
    failures = []
    transport = hybrid_ext.comm.communicator(None, device).transport
    if isinstance(transport, StagedTransport) != staged:
        failures.append(f"transport {transport.name}: expected {'a' if staged else 'no'} staged one")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 1000, (1 << 20) + 3):
            inputs = [_exact_ints(r, n) for r in range(world)]
            expected = torch.stack(inputs).sum(0)
            for algorithm in ("recursive_doubling", "rabenseifner", "ring", "auto"):
                x = inputs[rank].to(device, dtype)
                hybrid_ext.allreduce(x, algorithm=algorithm)
                if not torch.equal(x.cpu().double(), expected):
                    failures.append(f"allreduce {dtype} {algorithm} n={n}")
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):  # async, issued from a stream other than the communicator's
                x = inputs[rank].to(device, dtype)
                hybrid_ext.allreduce_async(x, algorithm="rabenseifner").wait()
                if not torch.equal(x.cpu().double(), expected):
                    failures.append(f"allreduce_async {dtype} n={n}")
            rows = max(n // (3 * world), 1)
            counts = tuple((r + 1) * rows for r in range(world))
            blocks = [(torch.arange(c * 3) % 251 + r).double().view(c, 3) for r, c in enumerate(counts)]
            for algorithm in ("recursive_doubling", "ring", "auto"):
                got = hybrid_ext.allgather(blocks[rank].to(device, dtype), algorithm=algorithm)
                if not torch.equal(got.cpu().double(), torch.cat(blocks)):
                    failures.append(f"allgather {dtype} {algorithm} n={n}")
            full = [_exact_ints(r, sum(counts) * 3).view(-1, 3) for r in range(world)]
            mine = torch.stack(full).sum(0)[sum(counts[:rank]) : sum(counts[: rank + 1])]
            for algorithm in ("recursive_halving", "ring", "auto"):
                got = hybrid_ext.reduce_scatter(full[rank].to(device, dtype), counts=counts, algorithm=algorithm)
                if not torch.equal(got.cpu().double(), mine):
                    failures.append(f"reduce_scatter {dtype} {algorithm} n={n}")
    return failures


@needs_one
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("route", ["auto", "torch"], ids=["shared-memory", "gloo-send-recv"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_sharing_one_gpu_over_gloo_stage_every_collective_exactly(spawn_ranks, world, route):
    env = {"HYBRID_EXT_TRANSPORT": route}
    results = spawn_ranks(_collectives_rank, world, True, backend="gloo", env=env, timeout=SPAWN_SECONDS)
    for rank, failures in enumerate(results):
        assert failures == [], f"rank {rank}: {failures}"


@needs_nccl_pair
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_two_nccl_ranks_run_every_collective_exactly(spawn_ranks):
    results = spawn_ranks(_collectives_rank, 2, False, backend="nccl", env=_nccl_env(2), timeout=SPAWN_SECONDS)
    for rank, failures in enumerate(results):
        assert failures == [], f"rank {rank}: {failures}"


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
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_real_nccl_collectives_equal_nccls_own(spawn_ranks):
    results = spawn_ranks(_nccl_rank, min(GPUS, 4), backend="nccl", timeout=SPAWN_SECONDS)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: {result['failures']}"


def _partitioner_rank(rank: int, world: int, strategy: str) -> dict:
    import torch.nn.functional as F

    import hybrid_ext

    from helpers.parallel_reference import MICRO_BATCH, MODELS, global_batch

    _tf32_off()
    device = torch.device("cuda", torch.cuda.current_device())
    build, shape, classes = MODELS["small_cnn"]
    model = hybrid_ext.parallelize(build().to(device), strategy=strategy, reducer="butterfly")
    x, y = global_batch(world, shape, classes)
    if strategy != "mp":  # each rank its own micro-batch
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    if strategy != "mp":
        hybrid_ext.allreduce(total, op="avg", group=model.groups.world)
    return {"loss": total.item(), "state": {k: v.cpu() for k, v in hybrid_ext.full_state_dict(model).items()}}


def _assert_partitioner_equals_the_reference(results: list[dict], world: int) -> None:
    from helpers.parallel_reference import reference

    loss, _, state = reference("small_cnn", world)
    for result in results:
        assert result["loss"] == pytest.approx(loss, rel=1e-4)
        for key, value in state.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5)


@needs_one
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["dp", "hybrid", "mp"])
@pytest.mark.parametrize("world", [2, 4])
def test_the_partitioner_on_ranks_sharing_one_gpu_over_gloo_equals_the_reference(spawn_ranks, world, strategy):
    results = spawn_ranks(_partitioner_rank, world, strategy, backend="gloo", timeout=SPAWN_SECONDS)
    _assert_partitioner_equals_the_reference(results, world)


@needs_two
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["dp", "hybrid"])
def test_the_partitioner_on_nccl_equals_the_reference(spawn_ranks, strategy):
    world = min(GPUS, 4)
    results = spawn_ranks(_partitioner_rank, world, strategy, backend="nccl", timeout=SPAWN_SECONDS)
    _assert_partitioner_equals_the_reference(results, world)


def _ddp_rank(rank: int, world: int, use_hook: bool) -> dict:
    """DDP on CUDA: tests/helpers/ddp_reference.py's 4 steps, reduced by the default group's backend (the ``butterfly``
    one) or by the butterfly comm hook."""
    from helpers.ddp_reference import train_ddp

    _tf32_off()
    return train_ddp(rank, world, use_hook, torch.device("cuda", torch.cuda.current_device()))


def _assert_ddp_equals_the_reference(results: list[dict], world: int) -> None:
    from helpers.ddp_reference import reference_params

    assert results[0]["butterfly_calls"] >= 4  # at least one bucket per step went through hybrid-ext
    for result in results:
        for ours, ref in zip(result["params"], reference_params(world)):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@needs_one
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ddps_comm_hook_on_ranks_sharing_one_gpu_over_gloo_equals_the_reference(spawn_ranks):
    results = spawn_ranks(_ddp_rank, 2, True, backend="gloo", timeout=SPAWN_SECONDS)
    _assert_ddp_equals_the_reference(results, 2)


@needs_nccl_pair
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ddp_on_the_butterfly_backend_with_cuda_tensors_equals_the_reference(spawn_ranks):
    # The butterfly backend reduces CUDA tensors over its inner NCCL group: two GPUs, or ranks sharing one.
    results = spawn_ranks(_ddp_rank, 2, False, backend="butterfly", env=_nccl_env(2), timeout=SPAWN_SECONDS)
    assert {r["backend"] for r in results} == {"butterfly"}
    _assert_ddp_equals_the_reference(results, 2)


@needs_one
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ddp_on_the_butterfly_backend_with_ranks_sharing_one_gpu_stages_over_gloo(spawn_ranks):
    # One rank more than GPUs (two share GPU 0) and NCCL's multi-rank switch off: NCCL cannot serve the job, so the
    # backend's CUDA entry is a gloo group with staging. A butterfly schedule, not auto, so that every reduction
    # takes the staged transport (auto may pick gloo's own allreduce).
    world = GPUS + 1
    env = {"NCCL_MULTI_RANK_GPU_ENABLE": "0", "HYBRID_EXT_ALGO": "recursive_doubling"}
    results = spawn_ranks(_ddp_rank, world, False, backend="butterfly", env=env, timeout=SPAWN_SECONDS)
    assert {r["backend"] for r in results} == {"butterfly"}
    names = {name for r in results for name in r["transports"]}
    assert names and all(name.startswith("cuda-staged+") for name in names), names
    _assert_ddp_equals_the_reference(results, world)
