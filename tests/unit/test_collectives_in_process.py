"""The communicator, the executor and the schedules end to end on 1..8 ranks as threads (the loopback transport):
every algorithm × op × dtype against a float64 reference, all-gather and reduce-scatter, the wire dtype, the
hierarchical schedules and their segments, check mode and failures. Over real processes:
tests/multiprocess/test_collective.py."""

from __future__ import annotations

import importlib

import pytest
import torch

import hybrid_ext
from hybrid_ext import config
from hybrid_ext.comm.communicator import GATHER_CHOICES, SCATTER_CHOICES, Communicator
from hybrid_ext.comm.consistency import CHECK_ENV, CollectiveMismatchError
from hybrid_ext.comm.executor import OPS, SUPPORTED_DTYPES
from hybrid_ext.comm.schedule import ALGORITHMS
from hybrid_ext.comm.transports.contract import PeerError
from hybrid_ext.comm.transports.loopback import LoopbackGroup, LoopbackTransport, RankError, run_ranks

# hybrid_ext.comm exports a function of the module's name: the module itself, for monkeypatching
communicator_module = importlib.import_module("hybrid_ext.comm.communicator")
RANKS = range(1, 9)
COUNTS = (0, 1, 64, 1000)  # Gloo's counts: none, fewer elements than ranks, a power of two, neither
INTEGER_DTYPES = (torch.int32, torch.int64)


def _values(rank: int, count: int) -> torch.Tensor:
    """Rank ``rank``'s input as float64: small integers, so that every sum of up to 8 of them is exact in every
    supported dtype (bfloat16 holds the integers up to 256) and any difference from the reference is an error."""
    i = torch.arange(count, dtype=torch.float64)
    return (i * 7 + rank * 13) % 17 - 8


def _reference(op: str, size: int, count: int) -> torch.Tensor:
    stacked = torch.stack([_values(rank, count) for rank in range(size)])
    if op in ("sum", "avg"):
        total = stacked.sum(0)
        return total / size if op == "avg" else total
    return stacked.amin(0) if op == "min" else stacked.amax(0)


def _cases():
    for op in OPS:
        for dtype in SUPPORTED_DTYPES:
            if op == "avg" and dtype in INTEGER_DTYPES:
                continue  # refused: an integer average is not an integer
            for count in COUNTS:
                yield op, dtype, count


def _allreduce_every_case(transport: LoopbackTransport, algorithm: str) -> list:
    comm = Communicator(transport)
    out = []
    for op, dtype, count in _cases():
        tensor = _values(transport.rank, count).to(dtype)
        hybrid_ext.allreduce(tensor, op=op, algorithm=algorithm, group=comm)
        out.append(((op, dtype, count), tensor))
    return out


def _expected(op: str, dtype: torch.dtype, size: int, count: int) -> torch.Tensor:
    reference = _reference(op, size, count)
    if op == "avg" and dtype in (torch.float16, torch.bfloat16):
        # 16-bit values are reduced in float32 and the average divided there, then rounded once to the dtype.
        return reference.to(torch.float32).to(dtype)
    return reference.to(dtype)


@pytest.mark.parametrize("size", RANKS)
@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "auto", "butterfly"])
def test_every_algorithm_op_and_dtype_equals_the_float64_reference_on_every_rank(algorithm, size):
    results = run_ranks(_allreduce_every_case, size, algorithm)
    for index, ((op, dtype, count), _) in enumerate(results[0]):
        expected = _expected(op, dtype, size, count)
        for rank in range(size):
            got = results[rank][index][1]
            assert got.dtype == dtype and torch.equal(got, expected), (algorithm, size, rank, op, dtype, count)


def _coalesced(transport: LoopbackTransport, algorithm: str) -> list[torch.Tensor]:
    rank = transport.rank
    strided = _values(rank, 60).float().view(6, 10).t()  # not contiguous: gathered into the buffer, copied back
    tensors = [_values(rank + 1, 5).float(), strided, _values(rank, 0).float()]
    hybrid_ext.allreduce_coalesced(tensors, op="avg", algorithm=algorithm, group=Communicator(transport))
    return tensors


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_coalesced_tensors_strided_and_empty_ones_too_are_reduced_as_one_vector(algorithm):
    size = 5
    for first, strided, empty in run_ranks(_coalesced, size, algorithm):
        assert torch.equal(first, (sum(_values(r + 1, 5) for r in range(size)) / size).float())
        whole = (sum(_values(r, 60) for r in range(size)) / size).float().view(6, 10).t()
        assert torch.equal(strided, whole) and not strided.is_contiguous()
        assert empty.numel() == 0


def _through_the_transport(transport: LoopbackTransport) -> torch.Tensor:
    tensor = _values(transport.rank, 10)
    hybrid_ext.allreduce(tensor, group=transport)  # a transport object is a group: the registry makes its communicator
    return tensor


def test_a_transport_object_serves_as_the_group():
    for tensor in run_ranks(_through_the_transport, 3):
        assert torch.equal(tensor, _reference("sum", 3, 10))


# ---------------------------------------------------------------------------------- all-gather, reduce-scatter


def _rows(size: int) -> tuple[int, ...]:
    return tuple((rank * 3) % 4 for rank in range(size))  # uneven, zeros among them


def _gather_and_scatter(transport: LoopbackTransport, gather: str, scatter: str, known: bool) -> tuple:
    comm = Communicator(transport)
    rank, counts = transport.rank, _rows(transport.size)
    mine = _values(rank, counts[rank] * 3).view(counts[rank], 3).float()
    gathered = hybrid_ext.allgather(mine, counts=counts if known else None, algorithm=gather, group=comm)
    full = _values(rank, sum(counts) * 3).view(sum(counts), 3)
    scattered = {
        op: hybrid_ext.reduce_scatter(full.float(), counts=counts, op=op, algorithm=scatter, group=comm) for op in OPS
    }
    return gathered, scattered


@pytest.mark.parametrize("size", RANKS)
@pytest.mark.parametrize(("gather", "scatter"), list(zip(GATHER_CHOICES, SCATTER_CHOICES)))
def test_allgather_and_reduce_scatter_of_uneven_blocks_equal_the_reference(gather, scatter, size):
    counts = _rows(size)
    offsets = [sum(counts[:rank]) for rank in range(size + 1)]
    for known in (True, False):
        results = run_ranks(_gather_and_scatter, size, gather, scatter, known)
        expected_gather = torch.cat([_values(r, counts[r] * 3).view(counts[r], 3) for r in range(size)]).float()
        for rank, (gathered, scattered) in enumerate(results):
            assert torch.equal(gathered, expected_gather)
            for op in OPS:
                reference = _reference(op, size, sum(counts) * 3).view(sum(counts), 3)
                block = reference[offsets[rank] : offsets[rank + 1]].float()
                assert torch.equal(scattered[op], block), (gather, scatter, size, rank, op)


# ---------------------------------------------------------------------------------- the wire dtype


def _over_a_narrow_wire(transport: LoopbackTransport, algorithm: str, dtype, wire) -> tuple:
    comm = Communicator(transport)
    exact = _values(transport.rank, 300).to(dtype)
    hybrid_ext.allreduce(exact, algorithm=algorithm, group=comm, wire_dtype=wire)
    generator = torch.Generator().manual_seed(transport.rank)
    rough = torch.randn(300, generator=generator, dtype=torch.float64).to(dtype)
    hybrid_ext.allreduce(rough, op="avg", algorithm=algorithm, group=comm, wire_dtype=wire)
    return exact, rough


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("dtype", "wire"),
    [(torch.float32, torch.float16), (torch.float32, "bfloat16"), (torch.float16, "float32"), (torch.bfloat16, None)],
)
def test_a_wire_dtype_keeps_ranks_bitwise_equal_and_values_as_exact_as_the_wire(algorithm, dtype, wire):
    size = 6
    results = run_ranks(_over_a_narrow_wire, size, algorithm, dtype, wire)
    reference = sum(
        torch.randn(300, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(size)
    )
    narrow = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: dtype}.get(wire, wire)
    for exact, rough in results:
        assert torch.equal(exact, _reference("sum", size, 300).to(dtype))  # small integers: exact on any wire
        assert torch.equal(rough, results[0][1])  # every rank holds the same bits
        tolerance = 2 * torch.finfo(min(narrow, dtype, key=lambda d: torch.finfo(d).bits)).eps
        assert torch.allclose(rough.double(), reference / size, rtol=0, atol=tolerance * 8)


# ---------------------------------------------------------------------------------- hierarchical and segments

HOST_LAYOUTS = [(0, 0, 1, 1), (0, 0, 0, 1, 1, 1), (0, 0, 0, 1, 1), (0, 1, 0, 1, 2, 2, 2, 2)]


def _hierarchical(transport: LoopbackTransport, algorithms: list[str], count: int) -> list[torch.Tensor]:
    comm = Communicator(transport)
    out = []
    for algorithm in algorithms:
        tensor = _values(transport.rank, count).float()
        hybrid_ext.allreduce(tensor, op="sum", algorithm=algorithm, group=comm)
        out.append(tensor)
    return out


@pytest.mark.parametrize("hosts", HOST_LAYOUTS, ids=lambda h: "hosts-" + "".join(map(str, h)))
def test_hierarchical_schedules_over_hosts_equal_the_reference(hosts):
    algorithms = ["hierarchical", "auto", *(f"hierarchical/{name}" for name in ALGORITHMS)]
    count = 20_000  # 80 KB: past the size where auto stages through the hosts (HIERARCHY_MIN_BYTES)
    for tensors in run_ranks(_hierarchical, len(hosts), algorithms, count, hosts=hosts):
        for algorithm, tensor in zip(algorithms, tensors):
            assert torch.equal(tensor, _reference("sum", len(hosts), count).float()), algorithm


def test_a_large_hierarchical_allreduce_runs_in_segments_and_equals_the_reference(monkeypatch):
    segmented = []
    real = communicator_module.execute_segments

    def counting(segments, *args, **kwargs):
        segmented.append(len(segments))
        return real(segments, *args, **kwargs)

    monkeypatch.setattr(communicator_module, "execute_segments", counting)
    hosts, count = (0, 0, 1, 1), 50_000
    algorithms = [f"hierarchical/{name}" for name in ALGORITHMS]
    with config.override(HYBRID_EXT_SEGMENT_BYTES=16 << 10):
        results = run_ranks(_hierarchical, len(hosts), algorithms, count, hosts=hosts)
    assert segmented and all(n >= 2 for n in segmented) and len(segmented) == len(hosts) * len(algorithms)
    for tensors in results:
        for tensor in tensors:
            assert torch.equal(tensor, _reference("sum", len(hosts), count).float())


# ---------------------------------------------------------------------------------- check mode and failures


def _mismatched(transport: LoopbackTransport, shape_of, name_of) -> Exception:
    comm = Communicator(transport)
    try:
        hybrid_ext.allreduce(torch.zeros(shape_of(transport.rank)), group=comm, name=name_of(transport.rank))
    except CollectiveMismatchError as exc:
        return exc
    raise AssertionError(f"rank {transport.rank}: no CollectiveMismatchError")


@pytest.mark.parametrize("size", [2, 3, 5])
def test_check_mode_names_the_ranks_that_disagree_on_every_rank(size):
    last = size - 1
    with config.override(**{CHECK_ENV: True}):
        shapes = run_ranks(_mismatched, size, lambda rank: 5 if rank == last else 4, lambda rank: "grads")
        names = run_ranks(_mismatched, size, lambda rank: 4, lambda rank: "weights" if rank == 1 else "grads")
    for error in shapes:
        assert f"ranks [{last}]: allreduce(op=sum, name='grads') of 1 tensor(s), 5 elements" in str(error)
        assert "allreduce(op=sum, name='grads') of 1 tensor(s), 4 elements" in str(error)
    for error in names:
        assert "ranks [1]: allreduce(op=sum, name='weights') of 1 tensor(s), 4 elements" in str(error)
        assert "allreduce(op=sum, name='grads') of 1 tensor(s), 4 elements" in str(error)


def _peer_fails_before_sending(transport: LoopbackTransport, algorithm: str) -> tuple[str, torch.Tensor]:
    tensor = _values(transport.rank, 32).float()
    if transport.rank == 1:
        raise RuntimeError("rank 1 stopped before its first message")
    try:
        hybrid_ext.allreduce(tensor, algorithm=algorithm, group=Communicator(transport))
    except PeerError as exc:
        return str(exc), tensor
    raise AssertionError("rank 0: no PeerError")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_peer_that_fails_before_sending_is_a_peer_error_naming_the_step_and_leaves_the_tensor(algorithm):
    with config.override(**{CHECK_ENV: False}), pytest.raises(RankError, match="rank 1 of 2: RuntimeError") as caught:
        run_ranks(_peer_fails_before_sending, 2, algorithm)
    assert set(caught.value.errors) == {1}  # rank 0 returned what it caught
    # rank 0's own result is not returned through the error: run it again, alone with a dead peer
    with config.override(**{CHECK_ENV: False}):
        group = LoopbackGroup(2, timeout=0.2)
        tensor = _values(0, 32).float()
        with pytest.raises(PeerError, match=rf"{algorithm} allreduce of 32 elements, step 0 .* on rank 0 of 2"):
            hybrid_ext.allreduce(tensor, algorithm=algorithm, group=Communicator(group.endpoint(0)))
    assert torch.equal(tensor, _values(0, 32).float())  # a failure in the first step leaves the caller's tensor
