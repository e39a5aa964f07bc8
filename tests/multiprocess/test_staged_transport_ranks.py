"""The staged transport (tests/unit/test_staged_transport.py) on real gloo ranks over shared memory: collectives
equal gloo's."""

from __future__ import annotations

import pytest
import torch

from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.transports import staged
from hybrid_ext.comm.transports.factory import transport_for
from hybrid_ext.comm.transports.staged import StagedTransport


def _staged_collectives_rank(rank: int, world: int) -> list[str]:
    """Real gloo ranks: the staged transport over what CPU tensors take here (shared memory), against gloo."""
    import torch.distributed as dist

    staged.STAGE_CHUNK_BYTES = 16 << 10  # several chunks per message, slots reused
    host = transport_for(dist.group.WORLD, torch.device("cpu"))
    comm = Communicator(StagedTransport(host, torch.device("cpu")), "cpu")
    failures = []
    for n in (1, 1000, 20_000):
        for algorithm in ("recursive_doubling", "rabenseifner", "ring"):
            x = torch.randn(n, generator=torch.Generator().manual_seed(rank * 7 + n)).double()
            reference = x.clone()
            dist.all_reduce(reference)
            comm.allreduce([x], algorithm=algorithm)
            if not torch.allclose(x, reference, rtol=1e-12, atol=1e-12):
                failures.append(f"{algorithm} n={n}")
    return failures


@pytest.mark.timeout(120)
def test_staging_over_real_gloo_ranks_and_shared_memory_is_exact(spawn_ranks):
    for rank, failures in enumerate(spawn_ranks(_staged_collectives_rank, 3)):
        assert failures == [], (rank, failures)
