"""Groups that span hosts: shared memory between ranks of one host, the network to the others.

Hosts are told apart by their shared-memory mount (:func:`shm_domain`); here each rank is given the domain of its
pretend host, so the routing is exercised on one machine (the emulated cluster runs it across real namespaces).
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import hybrid_ext
from hybrid_ext.comm.transports import shm as shm_transport


def _pretend_hosts(rank: int, hosts: list[int]) -> None:
    shm_transport.shm_domain = lambda: f"pretend-host-{hosts[rank]}"


def _routed_rank(rank: int, p: int, hosts: list[int]) -> dict:
    _pretend_hosts(rank, hosts)
    hybrid_ext.set_check(True)
    failures, digest, transports, algorithms = [], hashlib.sha256(), set(), set()
    for n in (0, 1, p + 1, 1000, (1 << 18) + 5):
        inputs = [torch.randn(n, generator=torch.Generator().manual_seed(31 * r + n)) for r in range(p)]
        expected = torch.stack([t.double() for t in inputs]).sum(0)
        for algorithm in ("recursive_doubling", "rabenseifner", "ring", "auto", "hierarchical", "hierarchical/ring"):
            with hybrid_ext.metrics.capture() as records:
                got = hybrid_ext.allreduce(inputs[rank].clone(), algorithm=algorithm)
            transports |= {r.transport for r in records}
            algorithms |= {(algorithm, n, r.algorithm) for r in records}
            digest.update(got.numpy().tobytes())
            if not torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5):
                failures.append(f"n={n} {algorithm}: max error {(got.double() - expected).abs().max():.3g}")
    rows = torch.full((rank + 1, 2), float(rank))
    gathered = hybrid_ext.allgather(rows)
    if gathered[:, 0].tolist() != [float(r) for r in range(p) for _ in range(r + 1)]:
        failures.append(f"allgather gave {gathered[:, 0].tolist()}")
    return {
        "failures": failures,
        "digest": digest.hexdigest(),
        "transports": sorted(transports),
        "algorithms": sorted(algorithms),
    }


@pytest.mark.parametrize("hosts", [[0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1], [0, 1, 0, 1]], ids=str)
def test_ranks_of_one_host_use_shared_memory_and_the_network_between_hosts(spawn_ranks, hosts):
    p = len(hosts)
    results = spawn_ranks(_routed_rank, p, hosts, timeout=240)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: {result['failures'][:10]}"
        assert result["digest"] == results[0]["digest"], f"rank {rank} is not bitwise equal to rank 0"
        alone = hosts.count(hosts[rank]) == 1
        assert result["transports"] == (["torch-gloo"] if alone else ["shm+torch-gloo"]), result["transports"]
    ran = {(asked, n): algorithm for asked, n, algorithm in results[0]["algorithms"]}
    large = (1 << 18) + 5
    # Large messages on a group that spans hosts: reduce-scatter in each host, allreduce between, all-gather.
    assert ran[("auto", large)].startswith("hierarchical/") and ran[("hierarchical", large)].startswith("hierarchical/")
    assert not ran[("auto", 1000)].startswith("hierarchical")  # small ones: the flat, latency-bound schedules
    # A named schedule between hosts runs as named, at every size.
    assert {ran[("hierarchical/ring", n)] for n in (1, p + 1, 1000, large)} == {"hierarchical/ring"}


def _domain_rank(rank: int, p: int) -> dict:
    return {"domain": shm_transport.shm_domain(), "transport": hybrid_ext.comm.communicator().transport.name}


def test_ranks_that_share_dev_shm_are_one_host(spawn_ranks):
    results = spawn_ranks(_domain_rank, 2)
    assert results[0]["domain"] == results[1]["domain"]
    assert [r["transport"] for r in results] == ["shm", "shm"]


def test_a_full_dev_shm_is_an_error_at_set_up_not_a_sigbus(tmp_path, monkeypatch):
    too_big = 1 << 62
    problem = shm_transport._allocate(tmp_path / "segment", too_big)
    assert problem is not None and "cannot hold" in problem


def _segmented_rank(rank: int, p: int, hosts: list[int]) -> dict:
    import threading

    _pretend_hosts(rank, hosts)
    failures, digest = [], hashlib.sha256()
    for n in (4096, 40_000, 100_003):  # 16 KiB segments (set by the test): 1, 2 and 6+ segments of float32
        for dtype, op in ((torch.int64, "sum"), (torch.float32, "sum"), (torch.float64, "max"), (torch.float32, "avg")):
            inputs = [(torch.arange(n) * (r + 1) % 1009 - 500).to(dtype) for r in range(p)]
            reduce = {"sum": torch.sum, "avg": torch.sum, "max": lambda t, dim: t.max(dim).values}[op]
            expected = reduce(torch.stack([t.double() for t in inputs]), dim=0) / (p if op == "avg" else 1)
            for inter in ("rabenseifner", "ring", "recursive_doubling"):
                got = inputs[rank].clone()
                hybrid_ext.allreduce(got, op=op, algorithm=f"hierarchical/{inter}")
                digest.update(got.numpy().tobytes())
                if not torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6):
                    failures.append(f"n={n} {dtype} {op} {inter}: max error {(got.double() - expected).abs().max()}")
    failures += _coalesced_and_scaled(rank, p, digest)
    network_threads = [t.name for t in threading.enumerate() if t.name.startswith("hybrid-ext-network")]
    return {"failures": failures, "digest": digest.hexdigest(), "network_threads": network_threads}


def _coalesced_and_scaled(rank: int, p: int, digest) -> list[str]:
    """Several tensors in one segmented allreduce: each segment is gathered from them and copied back on its own,
    across tensor edges (a strided one, an empty one, 16-bit ones reduced in float32), scaled before and after."""
    from hybrid_ext.comm.registry import communicator

    failures = []
    shapes = [(3,), (70, 71), (0,), (1,), (9000,), (40, 333), (5,)]  # ~27 K elements: 7 segments of 16 KiB (fp32)
    comm = communicator(None)
    for dtype in (torch.float32, torch.bfloat16):
        for prescale, postscale in ((None, None), (0.5, 0.25)):
            inputs = [
                [(torch.arange(math.prod(s)) * (r + 3) % 61 - 30).to(dtype).reshape(s) for s in shapes]
                for r in range(p)
            ]
            expected = [sum(t[i].double() for t in inputs) for i in range(len(shapes))]
            scale = (prescale or 1.0) * (postscale or 1.0)
            mine = [t.clone() for t in inputs[rank]]
            mine[1] = mine[1].t()  # strided: reduced through the working buffer and copied back whole
            expected[1] = expected[1].t()
            comm.allreduce(mine, algorithm="hierarchical/ring", prescale=prescale, postscale=postscale)
            for index, (got, want) in enumerate(zip(mine, expected)):
                digest.update(got.float().numpy().tobytes())
                if got.shape != want.shape or not torch.equal(got.double(), want * scale):
                    failures.append(f"coalesced {dtype} scale {scale}: tensor {index} differs")
    return failures


@pytest.mark.parametrize("hosts", [[0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 1, 0, 1]], ids=str)
def test_segmented_hierarchical_allreduce_overlaps_stages_and_stays_exact_and_identical(spawn_ranks, hosts):
    results = spawn_ranks(_segmented_rank, len(hosts), hosts, env={"HYBRID_EXT_SEGMENT_BYTES": "16384"}, timeout=240)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: {result['failures'][:10]}"
        assert result["digest"] == results[0]["digest"], f"rank {rank} is not bitwise equal to rank 0"
        alone = hosts.count(hosts[rank]) == 1
        # The network stages ran on the helper thread wherever there was a shared-memory stage to overlap.
        assert bool(result["network_threads"]) is not alone, result["network_threads"]


def _block_collectives_rank(rank: int, p: int, hosts: list[int]) -> dict:
    """All-gather and reduce-scatter of uneven row blocks (one empty), small and large, by every name."""
    _pretend_hosts(rank, hosts)
    failures, ran = [], set()
    for rows_per_rank in ((0, 3, 1, 2, 5)[:p], (0, 300, 700, 50, 900)[:p]):  # 16 floats a row: ~0.1 / 30+ KiB
        for algorithm in ("auto", "hierarchical", "recursive_doubling", "ring"):
            mine = torch.full((rows_per_rank[rank], 64), float(rank + 1))
            with hybrid_ext.metrics.capture() as records:
                gathered = hybrid_ext.allgather(mine, counts=rows_per_rank, algorithm=algorithm)
            expected = torch.cat([torch.full((c, 64), float(r + 1)) for r, c in enumerate(rows_per_rank)])
            if not torch.equal(gathered, expected):
                failures.append(f"allgather {algorithm} rows {rows_per_rank}")
            ran |= {("allgather", algorithm, sum(rows_per_rank), r.algorithm) for r in records}
        for algorithm in ("auto", "hierarchical", "recursive_halving", "ring"):
            total = sum(rows_per_rank)
            full = (torch.arange(total * 64).reshape(total, 64) % 97 + rank).float()
            with hybrid_ext.metrics.capture() as records:
                got = hybrid_ext.reduce_scatter(full, counts=rows_per_rank, algorithm=algorithm)
            first = sum(rows_per_rank[:rank])
            expected = sum((torch.arange(total * 64).reshape(total, 64) % 97 + r).float() for r in range(p))
            if not torch.equal(got, expected[first : first + rows_per_rank[rank]]):
                failures.append(f"reduce_scatter {algorithm} rows {rows_per_rank}")
            ran |= {("reduce_scatter", algorithm, total, r.algorithm) for r in records}
    return {"failures": failures, "ran": sorted(ran)}


@pytest.mark.parametrize("hosts", [[0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1, 1]], ids=str)
def test_allgather_and_reduce_scatter_send_each_block_out_of_its_host_once_on_equal_hosts(spawn_ranks, hosts):
    results = spawn_ranks(_block_collectives_rank, len(hosts), hosts, timeout=240)
    for rank, result in enumerate(results):
        assert result["failures"] == [], f"rank {rank}: {result['failures']}"
    ran = {(kind, asked, total): algorithm for kind, asked, total, algorithm in results[0]["ran"]}
    equal = len(hosts) == 4
    for kind in ("allgather", "reduce_scatter"):
        flat = "recursive_doubling" if kind == "allgather" else "recursive_halving"
        small, large = sorted({total for k, _, total in ran if k == kind})
        assert ran[(kind, "auto", small)] == flat  # latency-bound: the flat butterfly
        assert ran[(kind, "auto", large)] == ("hierarchical" if equal else flat)
        assert ran[(kind, "hierarchical", small)] == ("hierarchical" if equal else flat)  # unequal hosts: flat
