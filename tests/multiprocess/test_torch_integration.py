"""torch.distributed integration: the `butterfly` backend under DDP, the DDP comm hook, fallbacks, private pins."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hybrid_ext
from hybrid_ext.comm.transports import _c10d_private as c10d
from hybrid_ext.integrations.torch import ButterflyProcessGroup

from helpers.ddp_reference import reference_params, train_ddp


@pytest.mark.parametrize("p", [2, 3])
def test_ddp_on_the_butterfly_backend_equals_gloo_and_the_reference(spawn_ranks, p):
    butterfly = spawn_ranks(train_ddp, p, False, backend="butterfly")
    gloo = spawn_ranks(train_ddp, p, False, backend="gloo")
    reference = reference_params(p)
    assert butterfly[0]["backend"] == "butterfly" and gloo[0]["backend"] == "gloo"
    assert butterfly[0]["butterfly_calls"] >= 4  # at least one bucket per step
    assert gloo[0]["butterfly_calls"] == 0
    for result in butterfly:  # identical bits on every rank
        for mine, first in zip(result["params"], butterfly[0]["params"]):
            assert torch.equal(mine, first)
    for ours, theirs, ref in zip(butterfly[0]["params"], gloo[0]["params"], reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_ddp_comm_hook_on_gloo_equals_plain_gloo(spawn_ranks):
    hooked = spawn_ranks(train_ddp, 3, True, backend="gloo")
    assert hooked[0]["butterfly_calls"] >= 4
    for ours, ref in zip(hooked[0]["params"], reference_params(3)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for result in hooked:
        assert all(torch.equal(a, b) for a, b in zip(result["params"], hooked[0]["params"]))


def _fallbacks(rank: int, p: int) -> dict:
    out = {}
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, op=dist.ReduceOp.PRODUCT)  # not a butterfly op: inner gloo
    out["product"] = t.item()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, op=dist.ReduceOp.AVG)  # gloo lacks AVG; the butterfly has it
    out["avg"] = t.item()
    b = torch.tensor([float(rank)])
    dist.broadcast(b, src=p - 1)
    out["broadcast"] = b.item()
    gathered = [torch.zeros(1) for _ in range(p)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    out["all_gather"] = [g.item() for g in gathered]
    flat = torch.zeros(p)
    dist.all_gather_into_tensor(flat, torch.tensor([float(rank)]))
    out["all_gather_into_tensor"] = flat.tolist()
    a2a = torch.zeros(p)
    dist.all_to_all_single(a2a, torch.arange(p, dtype=torch.float32) + 10 * rank)
    out["all_to_all_single"] = a2a.tolist()
    red = torch.tensor([float(rank + 1)])
    dist.reduce(red, dst=0)
    out["reduce"] = red.item() if rank == 0 else None
    if rank == 0:
        dist.send(torch.tensor([42.0]), dst=1)
    elif rank == 1:
        r = torch.zeros(1)
        dist.recv(r, src=0)
        out["recv"] = r.item()
    dist.barrier()
    objs = [None] * p
    dist.all_gather_object(objs, {"rank": rank})
    out["objects"] = objs
    i = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(i)
    out["int_sum"] = i.item()
    return out


def test_the_backend_falls_back_to_gloo_for_everything_else(spawn_ranks):
    p = 3
    results = spawn_ranks(_fallbacks, p, backend="butterfly")
    for rank, out in enumerate(results):
        assert out["product"] == 6.0 and out["avg"] == 2.0 and out["broadcast"] == 2.0
        assert out["all_gather"] == [0.0, 1.0, 2.0] == out["all_gather_into_tensor"]
        assert out["all_to_all_single"] == [float(rank + 10 * s) for s in range(p)]
        assert out["objects"] == [{"rank": r} for r in range(p)]
        assert out["int_sum"] == 6
    assert results[0]["reduce"] == 6.0 and results[1]["recv"] == 42.0


def _back_to_back_fallbacks(rank: int, p: int) -> int:
    # Small gloo collectives in a row on fresh tensors: each is issued while a gloo worker thread may still hold
    # the previous one. Left to torch's Python-process-group trampoline, that deadlocked (the caller holds the GIL
    # and waits for gloo's queue mutex; gloo's thread holds the mutex and waits for the GIL to free the previous
    # collective's tensors; see backend._to_inner) within a few hundred rounds.
    rounds = 300
    for i in range(rounds):
        gathered = [torch.zeros(1) for _ in range(p)]
        dist.all_gather(gathered, torch.tensor([float(rank)]))
        b = torch.tensor([float(rank)])
        dist.broadcast(b, src=i % p)
        assert [g.item() for g in gathered] == [float(r) for r in range(p)] and b.item() == i % p
    dist.barrier()
    return rounds


def test_back_to_back_fallback_collectives_do_not_deadlock(spawn_ranks):
    assert spawn_ranks(_back_to_back_fallbacks, 3, backend="butterfly") == [300] * 3


# ------------------------------------------------------------------ pins on torch's private surface


def test_private_c10d_pieces_exist():
    from torch.futures import Future

    # post_grouped brackets NCCL's point-to-point ops with these (no device argument on a Backend).
    for name in ("_start_coalescing", "_end_coalescing", "supports_coalescing"):
        assert hasattr(dist.ProcessGroupGloo, name), name

    future = Future()
    future.set_result([torch.ones(1)])
    work = c10d.work_from_future(future)
    assert work.wait()
    assert work.get_future().value()[0].item() == 1.0
    assert c10d.backend_registered("butterfly")
    assert hasattr(dist.ProcessGroup, "_register_backend") and hasattr(dist.ProcessGroup, "_set_default_backend")
    assert isinstance(dist.ProcessGroup.BackendType.GLOO, dist.ProcessGroup.BackendType)


def test_python_process_group_overrides_are_dispatched():
    # torch must route allreduce on a Python ProcessGroup subclass to the Python method.
    class Probe(dist.ProcessGroup):
        called = False

        def allreduce(self, tensors, opts):
            Probe.called = True
            future = torch.futures.Future()
            future.set_result(tensors)
            return c10d.work_from_future(future)

        def getBackendName(self):
            return "probe"

    pg = Probe(0, 1)
    pg.allreduce([torch.ones(1)], dist.AllreduceOptions()).wait()
    assert Probe.called
    assert issubclass(ButterflyProcessGroup, dist.ProcessGroup)


def _mesh_and_subgroups(rank: int, p: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (p,))
    whole = torch.ones(3)
    dist.all_reduce(whole, group=mesh.get_group())
    pair = dist.new_group([0, 1])
    part = torch.full((2,), float(rank + 1))
    if rank < 2:
        with hybrid_ext.metrics.capture() as records:
            dist.all_reduce(part, group=pair)
        assert records and records[0].world_size == 2
    return {"backend": dist.get_backend(mesh.get_group()), "whole": whole.tolist(), "part": part.tolist()}


def test_device_mesh_and_subgroups_on_the_butterfly_backend(spawn_ranks):
    results = spawn_ranks(_mesh_and_subgroups, 3, backend="butterfly")
    for out in results:
        assert out["backend"] == "butterfly" and out["whole"] == [3.0] * 3
        assert out["part"] == [3.0, 3.0]  # ranks 0, 1: 1 + 2; rank 2 kept its own 3


class _CoalescingBackend:
    """Stands in for NCCL's backend: records what post_grouped does around the posted ops."""

    supports_coalescing = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _start_coalescing(self) -> None:
        self.calls.append("start")

    def _end_coalescing(self):
        self.calls.append("end")
        return "group-work"

    def recv(self, tensors, src, tag):
        self.calls.append(f"recv {src}")
        return "recv-work"

    def send(self, tensors, dst, tag):
        self.calls.append(f"send {dst}")
        return "send-work"


def test_a_receive_and_a_send_are_posted_as_one_group_where_the_backend_needs_it():
    backend = _CoalescingBackend()
    works = c10d.post_grouped(backend, torch.device("cpu"), lambda: [backend.recv([], 1, 0), backend.send([], 2, 0)])
    assert backend.calls == ["start", "recv 1", "send 2", "end"]
    assert works == ["recv-work", "send-work", "group-work"]
    backend.supports_coalescing = False  # gloo: posted one by one, no bracket
    backend.calls.clear()
    c10d.post_grouped(backend, torch.device("cpu"), lambda: [backend.send([], 0, 0)])
    assert backend.calls == ["send 0"]


def test_the_backend_for_a_device_is_named_by_the_group_that_carries_it():
    from datetime import timedelta

    store = dist.HashStore()
    gloo = dist.ProcessGroupGloo(store, 0, 1, timedelta(seconds=10))
    assert c10d.backend_name(gloo, torch.device("cuda")) == "gloo"  # a backend object answers for itself
    group = dist.ProcessGroup(store, 0, 1)
    c10d.attach_backend(group, torch.device("cpu"), c10d.BackendType.GLOO, gloo)
    assert c10d.backend_name(group, torch.device("cpu")) == "gloo"
    assert c10d.backend_name(group, torch.device("cuda")) == group.name().lower()  # none registered: the group's


def _two_threads(fn):
    """``fn(rank)`` on ranks 0 and 1 at once, in this process; their results, or the first rank's error."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return [f.result(timeout=60) for f in [pool.submit(fn, rank) for rank in (0, 1)]]


def _one_gpu_facts(version, switch):
    """Two ranks on one host with one GPU, as :func:`this_rank_gpu_facts` would see it."""
    facts = {"host": "h", "cuda": True, "gpus": 1, "nccl": True, "nccl_version": version, "switch": switch}
    return lambda: dict(facts)


@pytest.mark.timeout(90)
def test_ranks_sharing_a_gpu_that_nccl_refuses_get_a_staged_cuda_communicator_over_gloo(monkeypatch):
    from datetime import timedelta

    from hybrid_ext.comm.transports import side_channel
    from hybrid_ext.comm.transports.staged import StagedTransport

    monkeypatch.setattr(side_channel, "this_rank_gpu_facts", _one_gpu_facts((2, 28, 9), True))  # 2.28: refused
    monkeypatch.setattr(ButterflyProcessGroup, "cuda_entry_device", torch.device("cpu"))  # host tensors, staged
    monkeypatch.setenv("HYBRID_EXT_TRANSPORT", "torch")  # both ranks are threads of this process: no shm
    store = dist.HashStore()

    def rank_fn(rank):
        group = ButterflyProcessGroup(store, rank, 2, timedelta(seconds=30))
        cuda_comm = group._comms["cuda"]
        assert isinstance(cuda_comm.transport, StagedTransport)
        assert c10d.backend_name(group._inner["cuda"], torch.device("cuda")) == "gloo"
        assert group._inner["cuda"] is not group._inner["cpu"]  # CPU and CUDA collectives never pair up on one
        t = torch.arange(10, dtype=torch.float32) * (rank + 1)
        cuda_comm.allreduce([t], algorithm="recursive_doubling")
        return t

    for t in _two_threads(rank_fn):
        assert torch.equal(t, torch.arange(10, dtype=torch.float32) * 3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ([_one_gpu_facts((2, 28, 9), True)()] * 2, (True, False)),  # two ranks, one GPU, NCCL 2.28
        ([_one_gpu_facts((2, 30, 7), True)()] * 2, (True, True)),  # NCCL 2.30 with its switch
        ([_one_gpu_facts((2, 30, 7), True)(), _one_gpu_facts((2, 30, 7), False)()], (True, False)),  # one switch off
        ([{**_one_gpu_facts((2, 28, 9), False)(), "host": h} for h in "ab"], (True, True)),  # a GPU each
        (
            [_one_gpu_facts(None, False)(), {**_one_gpu_facts(None, False)(), "cuda": False, "host": "b"}],
            (False, False),
        ),
    ],
)
def test_every_rank_gets_one_answer_whether_nccl_serves_the_group(facts, expected):
    from hybrid_ext.comm.transports.side_channel import nccl_usable_for

    assert nccl_usable_for(lambda mine: facts) == expected
