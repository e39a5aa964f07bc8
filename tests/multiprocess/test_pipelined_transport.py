"""The network transport pipelines large messages: both ends split a message by its size alone, the receiver
reduces each chunk as it lands while later chunks are still on the wire, and results stay exact (gloo, real ranks;
the order of waits and reductions checked on a stand-in group)."""

from __future__ import annotations

import pytest
import torch

from hybrid_ext.comm.transports.torch_p2p import PIPELINE_CHUNK_BYTES, TorchTransport, _chunks


def test_messages_split_by_size_alone_and_small_ones_stay_whole():
    step = PIPELINE_CHUNK_BYTES // 4
    assert len(_chunks(torch.empty(2 * step - 1), True)) == 1  # below two chunks: one message, as before
    parts = _chunks(torch.empty(3 * step + 5), True)
    assert [p.numel() for p in parts] == [step, step, step, 5]
    assert len(_chunks(torch.empty(10 * step), False)) == 1  # coalescing backends (NCCL) pipeline themselves
    # A receiver of another dtype's width splits at the same bytes: float64 chunks hold half the elements.
    assert _chunks(torch.empty(4 * step, dtype=torch.float64), True)[0].numel() == step // 2


class _Work:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait(self, timeout=None):
        self.log.append(f"wait {self.name}")
        return True


class _StandInGroup:
    """Posts each op as it comes (like gloo); its receives fill the buffer with the peer's value when posted."""

    def __init__(self, log):
        self.log = log
        self.received = 0

    def rank(self):
        return 0

    def size(self):
        return 2

    def name(self):
        return "stand-in"

    def recv(self, tensors, src, tag):
        tensors[0].fill_(2.0)
        self.received += 1
        return _Work(self.log, f"recv{self.received - 1}")

    def send(self, tensors, dst, tag):
        return _Work(self.log, "send")


def test_each_received_chunk_is_reduced_right_after_its_wait_before_later_chunks_are_waited_for():
    log: list[str] = []
    transport = TorchTransport(_StandInGroup(log), timeout=5)
    step = PIPELINE_CHUNK_BYTES // 4
    target = torch.ones(3 * step)

    def reduce(dst, src):
        log.append(f"reduce {dst.numel()}")
        dst.add_(src)

    transport.exchange_reduce(torch.zeros(3 * step), 1, target, 1, reduce)
    assert log == [
        "wait recv0", f"reduce {step}", "wait recv1", f"reduce {step}", "wait recv2", f"reduce {step}",
        "wait send", "wait send", "wait send",
    ]  # fmt: skip
    assert torch.equal(target, torch.full_like(target, 3.0))


def _exchange_rank(rank: int, world: int, counts: list[int]) -> list[bool]:
    import torch.distributed as dist

    transport = TorchTransport(dist.group.WORLD._get_backend(torch.device("cpu")))
    peer = 1 - rank
    ok = []
    for count in counts:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            mine = (torch.arange(count, dtype=torch.float64) % 251 + rank).to(dtype)
            theirs = (torch.arange(count, dtype=torch.float64) % 251 + peer).to(dtype)
            target = torch.full((count,), 7, dtype=dtype)
            transport.exchange_reduce(mine, peer, target, peer, lambda d, s: d.add_(s))
            ok.append(torch.equal(target, theirs + 7))
            got = torch.empty(count, dtype=dtype)
            transport.exchange(mine, peer, got, peer)  # plain exchange: same framing both ways
            ok.append(torch.equal(got, theirs))
    return ok


@pytest.mark.timeout(120)
def test_pipelined_exchanges_over_gloo_are_exact_for_every_size_and_dtype(spawn_ranks):
    step = PIPELINE_CHUNK_BYTES // 4
    counts = [0, 1, 2 * step - 1, 2 * step, 3 * step + 17, 9 * step + 1]
    for rank, ok in enumerate(spawn_ranks(_exchange_rank, 2, counts)):
        assert all(ok), (rank, ok)


def _allreduce_rank(rank: int, world: int, count: int) -> dict:
    import hybrid_ext

    out = {}
    for algorithm in ("recursive_doubling", "rabenseifner", "ring"):
        x = torch.arange(count, dtype=torch.float64) % 1000 * (rank + 1)
        hybrid_ext.allreduce(x, algorithm=algorithm)
        out[algorithm] = torch.equal(x, torch.arange(count, dtype=torch.float64) % 1000 * sum(range(1, world + 1)))
    return out


@pytest.mark.timeout(180)
def test_allreduce_over_the_pipelined_network_transport_is_exact(spawn_ranks):
    count = 5 * PIPELINE_CHUNK_BYTES // 8 * 3 + 11  # several chunks per step at 3 ranks (the fold too)
    env = {"HYBRID_EXT_TRANSPORT": "torch"}
    for rank, out in enumerate(spawn_ranks(_allreduce_rank, 3, count, env=env)):
        assert all(out.values()), (rank, out)
