"""CUDA tensors on a gloo group are staged through host buffers: the group's send/recv is only ever handed host
tensors (the test that would have caught gloo writing device pointers to a socket and aborting), messages arrive
exact in any number of chunks, and a tensor the backend cannot take is refused before anything is posted.

No CUDA here: the transport for a "cuda" device on a gloo group is built all the same (nothing in the build
touches a GPU) and driven with host tensors, which it stages exactly as it stages CUDA tensors, only with
synchronous copies and unpinned slots. A recording stand-in group of two ranks (threads) carries the messages.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.transports import device_route, staged
from hybrid_ext.comm.transports.device_route import DeviceRouteError
from hybrid_ext.comm.transports.factory import transport_for
from hybrid_ext.comm.transports.staged import STAGE_SLOTS, StagedTransport
from hybrid_ext.comm.transports.torch_p2p import TorchTransport


class _Work:
    def __init__(self, finish=None):
        self._finish = finish

    def wait(self, timeout=None):
        if self._finish is not None:
            self._finish(timeout)
        return True


class _RecordingGloo:
    """One rank of an in-memory two-rank 'gloo' group: posts each op as it comes, like gloo, and records the
    device and storage of every tensor it is handed."""

    def __init__(self, rank: int, mailboxes: dict[tuple[int, int], queue.Queue]):
        self._rank, self._mail = rank, mailboxes
        self.handed: list[tuple[str, torch.device, int]] = []  # (op, device, data_ptr)

    def rank(self):
        return self._rank

    def size(self):
        return 2

    def name(self):
        return "gloo"

    def send(self, tensors, dst, tag):
        self.handed.append(("send", tensors[0].device, tensors[0].data_ptr()))
        self._mail[self._rank, dst].put(tensors[0].clone())
        return _Work()

    def recv(self, tensors, src, tag):
        self.handed.append(("recv", tensors[0].device, tensors[0].data_ptr()))
        into = tensors[0]

        def finish(timeout):
            into.copy_(self._mail[src, self._rank].get(timeout=10))

        return _Work(finish)


def _pair() -> list[_RecordingGloo]:
    mail = {(a, b): queue.Queue() for a in range(2) for b in range(2)}
    return [_RecordingGloo(r, mail) for r in range(2)]


def _staged_for_cuda(group, monkeypatch) -> StagedTransport:
    """What ``transport_for`` builds for CUDA tensors on this gloo group (shared memory off: the stand-in is the
    only wire)."""
    monkeypatch.setenv("HYBRID_EXT_TRANSPORT", "torch")
    transport = transport_for(group, torch.device("cuda"), all_gather=lambda obj: [obj, obj], barrier=lambda: None)
    assert isinstance(transport, StagedTransport), type(transport)
    return transport


def _on_both(fn):
    """Run ``fn(rank)`` for ranks 0 and 1 on two threads; their results by rank."""
    results: list = [None, None]
    errors: list = []

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # surfaced in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def _inside(ptr: int, tensors: list[torch.Tensor]) -> bool:
    return any(t.data_ptr() <= ptr < t.data_ptr() + t.numel() * t.element_size() for t in tensors)


@pytest.mark.timeout(60)
def test_a_gloo_group_builds_a_staged_transport_for_cuda_and_plain_send_recv_for_cpu(monkeypatch):
    group = _pair()[0]
    transport = _staged_for_cuda(group, monkeypatch)
    assert isinstance(transport.host, TorchTransport) and transport.host.group is group
    assert transport.name == "cuda-staged+torch-gloo"
    assert (transport.rank, transport.size) == (0, 2)
    assert isinstance(transport_for(group, torch.device("cpu"), lambda o: [o, o], lambda: None), TorchTransport)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunk_bytes", [8, 40, 1 << 20], ids=["many-chunks", "slots-reused", "one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_the_group_is_only_handed_staging_buffers_and_messages_arrive_exact(monkeypatch, chunk_bytes, dtype):
    monkeypatch.setattr(staged, "STAGE_CHUNK_BYTES", chunk_bytes)
    groups = _pair()
    transports = [_staged_for_cuda(g, monkeypatch) for g in groups]
    sizes = (0, 1, 7, 10 * STAGE_SLOTS + 3)

    callers: list[list[torch.Tensor]] = [[], []]  # the caller's tensors, kept alive: their memory stays theirs

    def rank_fn(rank):
        peer, got = 1 - rank, []
        for n in sizes:
            mine = (torch.arange(n) * 3 + rank).to(dtype)
            recv = torch.full((n,), -1, dtype=dtype)
            target = torch.ones(n, dtype=dtype)
            callers[rank] += [mine, recv, target]
            transports[rank].exchange(mine, peer, recv, peer)
            got.append(torch.equal(recv, (torch.arange(n) * 3 + peer).to(dtype)))
            # The fused path: each chunk reduced once it is on the device.
            transports[rank].exchange_reduce(mine, peer, target, peer, lambda d, s: d.add_(s))
            got.append(torch.equal(target, 1 + (torch.arange(n) * 3 + peer).to(dtype)))
            transports[rank].exchange(mine if rank == 0 else None, peer, None if rank == 0 else recv, peer)
            got.append(rank == 0 or torch.equal(recv, (torch.arange(n) * 3 + peer).to(dtype)))
        return got

    for rank, got in enumerate(_on_both(rank_fn)):
        assert all(got), (rank, got)
    for group, own in zip(groups, callers):
        assert group.handed, "nothing was sent"
        assert {device.type for _, device, _ in group.handed} == {"cpu"}
        # The group saw only the transport's host slots, never the caller's tensors (which stand in for CUDA ones).
        assert not [ptr for _, _, ptr in group.handed if ptr and _inside(ptr, own)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", ["recursive_doubling", "rabenseifner", "ring"])
def test_collectives_over_a_staged_gloo_group_equal_the_reference(monkeypatch, algorithm):
    monkeypatch.setattr(staged, "STAGE_CHUNK_BYTES", 64)  # many chunks per message
    groups = _pair()
    transports = [_staged_for_cuda(g, monkeypatch) for g in groups]
    inputs = [torch.arange(1001, dtype=torch.float32) % 13 + r for r in range(2)]

    def rank_fn(rank):
        comm = Communicator(transports[rank], "cpu")
        x = inputs[rank].clone()
        comm.allreduce([x], algorithm=algorithm)
        rows = torch.full((rank + 2, 3), float(rank))
        gathered = comm.allgather(rows)
        scattered = comm.reduce_scatter(torch.ones(4, 5) * (rank + 1), counts=(2, 2))
        return x, gathered, scattered

    expected_rows = torch.cat([torch.zeros(2, 3), torch.ones(3, 3)])
    for x, gathered, scattered in _on_both(rank_fn):
        assert torch.equal(x, inputs[0] + inputs[1])
        assert torch.equal(gathered, expected_rows)
        assert torch.equal(scattered, torch.full((2, 5), 3.0))
    for group in groups:
        assert {device.type for _, device, _ in group.handed} == {"cpu"}


@pytest.mark.timeout(60)
def test_a_tensor_gloo_cannot_take_is_refused_before_anything_is_posted():
    group = _pair()[0]
    transport = TorchTransport(group, timeout=5)
    with pytest.raises(DeviceRouteError) as caught:
        transport.exchange(torch.empty(4, device="meta"), 1, torch.empty(4), 1)
    message = str(caught.value)
    assert all(text in message for text in ("rank 0", "send to rank 1", "meta", "gloo")), message
    assert group.handed == []


@pytest.mark.timeout(60)
def test_a_tensor_the_route_says_to_stage_is_refused_by_plain_send_recv(monkeypatch):
    """What gloo handed a CUDA tensor without staging now does: a Python error naming both, nothing posted (the
    route is injected so that host tensors stand in for CUDA ones)."""
    real = device_route.route

    def stage_host_tensors(device_type, backend, one_host=False, rank=None):
        return device_route.STAGE if device_type == "cpu" else real(device_type, backend, one_host, rank)

    monkeypatch.setattr(device_route, "route", stage_host_tensors)
    group = _pair()[0]
    transport = TorchTransport(group, timeout=5)
    with pytest.raises(DeviceRouteError) as caught:
        transport.exchange(None, None, torch.empty(4), 1)
    message = str(caught.value)
    assert all(text in message for text in ("rank 0", "receive from rank 1", "cpu", "gloo", "staged")), message
    assert group.handed == []


@pytest.mark.timeout(60)
def test_host_tensors_on_an_nccl_group_across_hosts_are_refused_before_set_up_sends_anything(monkeypatch):
    class _Nccl(_RecordingGloo):
        def name(self):
            return "nccl"

    group = _Nccl(0, {})
    monkeypatch.setenv("HYBRID_EXT_TRANSPORT", "torch")  # no shared memory to carry host tensors
    with pytest.raises(DeviceRouteError, match="cpu cannot travel on a nccl group"):
        transport_for(group, torch.device("cpu"), all_gather=lambda obj: [obj, obj], barrier=lambda: None)
    assert group.handed == []
    with pytest.raises(DeviceRouteError, match="mps cannot travel on a nccl group"):
        transport_for(group, torch.device("mps"), all_gather=lambda obj: [obj, obj], barrier=lambda: None)
