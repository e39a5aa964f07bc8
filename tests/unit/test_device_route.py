"""How a tensor's device meets a group's backend: one table over every combination, decided before anything is
sent (:mod:`hybrid_ext.comm.transports.device_route`). A wrong "direct" here is what aborted processes on GPUs: gloo
handed a CUDA tensor writes its device pointer to a socket."""

from __future__ import annotations

import pytest

from hybrid_ext.comm.transports.device_route import (
    DIRECT,
    STAGE,
    DeviceRouteError,
    nccl_usable,
    ranks_share_gpus,
    route,
)

DEVICES = ("cpu", "cuda", "xpu", "mps", "meta")
BACKENDS = ("gloo", "mpi", "nccl", "xccl", "ucc", "butterfly", "custom")
ERROR = "error"

# (device, backend) -> route on a group that spans hosts; one_host changes only host tensors on NCCL / XCCL.
EXPECTED = {
    **{(device, "gloo"): STAGE for device in DEVICES},
    **{(device, "mpi"): STAGE for device in DEVICES},
    **{(device, "butterfly"): STAGE for device in DEVICES},
    **{(device, "custom"): STAGE for device in DEVICES},
    **{(device, "ucc"): STAGE for device in DEVICES},
    **{(device, "nccl"): ERROR for device in DEVICES},
    **{(device, "xccl"): ERROR for device in DEVICES},
    **{("cpu", backend): DIRECT for backend in ("gloo", "mpi", "ucc", "butterfly", "custom")},
    **{(device, backend): ERROR for device in ("meta",) for backend in BACKENDS},
    ("cuda", "nccl"): DIRECT,
    ("xpu", "xccl"): DIRECT,
    ("cuda", "ucc"): DIRECT,
}
ONE_HOST_CHANGES = {("cpu", "nccl"): DIRECT, ("cpu", "xccl"): DIRECT}


def _outcome(device: str, backend: str, one_host: bool) -> str:
    try:
        return route(device, backend, one_host=one_host)
    except DeviceRouteError:
        return ERROR


@pytest.mark.timeout(30)
@pytest.mark.parametrize("one_host", [False, True], ids=["hosts", "one-host"])
def test_every_device_and_backend_has_the_route_that_can_carry_it(one_host):
    assert len(EXPECTED) == len(DEVICES) * len(BACKENDS)
    expected = {**EXPECTED, **(ONE_HOST_CHANGES if one_host else {})}
    got = {(device, backend): _outcome(device, backend, one_host) for device, backend in expected}
    assert got == expected


@pytest.mark.timeout(30)
def test_no_device_tensor_ever_goes_directly_to_a_host_only_backend():
    for device in DEVICES:
        for backend in ("gloo", "mpi"):
            assert _outcome(device, backend, True) in ((DIRECT,) if device == "cpu" else (STAGE, ERROR))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("device", "backend", "says"),
    [
        ("cpu", "nccl", ["rank 3", "cpu", "nccl", "cuda tensors only", "shared memory"]),
        ("mps", "nccl", ["rank 3", "mps", "nccl"]),
        ("meta", "gloo", ["rank 3", "meta", "gloo", "no data"]),
    ],
)
def test_an_impossible_route_says_the_rank_the_device_and_the_backend(device, backend, says):
    with pytest.raises(DeviceRouteError) as caught:
        route(device, backend, rank=3)
    assert all(text in str(caught.value) for text in says), str(caught.value)
    assert isinstance(caught.value, TypeError)  # bad input, as the public entry points report it


@pytest.mark.timeout(30)
def test_names_are_read_without_regard_to_case():
    assert route("CUDA", "GLOO") == STAGE
    assert route("cuda", "NCCL") == DIRECT


# (CUDA, NCCL available, NCCL version, NCCL_MULTI_RANK_GPU_ENABLE=1, ranks share a GPU) -> NCCL carries CUDA tensors
NCCL_USABLE = [
    (False, False, None, False, False, False),  # no CUDA
    (True, False, None, False, False, False),  # torch without NCCL
    (True, False, (2, 30, 7), True, True, False),
    (True, True, (2, 28, 9), False, False, True),  # one GPU per rank
    (True, True, None, False, False, True),  # version untold: fine without sharing
    (True, True, (2, 28, 9), False, True, False),  # shared GPU: NCCL refuses it
    (True, True, (2, 28, 9), True, True, False),  # the switch needs 2.30
    (True, True, (2, 30, 7), False, True, False),  # the switch is off
    (True, True, (2, 30), True, True, True),  # 2.30 with its switch shares a GPU
    (True, True, (3, 0, 0), True, True, True),
    (True, True, None, True, True, False),  # version untold: no switch to rely on
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("cuda", "nccl", "version", "switch", "shared", "expected"), NCCL_USABLE)
def test_nccl_carries_cuda_tensors_only_where_it_takes_the_ranks_gpus(cuda, nccl, version, switch, shared, expected):
    assert nccl_usable(cuda, nccl, version, switch, shared) is expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("hosts_and_gpus", "expected"),
    [
        ([("a", 1)], False),
        ([("a", 0)], True),  # a rank on a host without GPUs has none of its own
        ([("a", 2), ("a", 2)], False),
        ([("a", 1), ("a", 1)], True),
        ([("a", 1), ("b", 1)], False),  # one rank on each host
        ([("a", 2), ("a", 2), ("a", 2), ("b", 8)], True),
        ([("a", 2), ("a", 1)], True),  # ranks that see fewer GPUs (CUDA_VISIBLE_DEVICES) count with their fewest
        ([], False),
    ],
)
def test_ranks_share_gpus_where_a_host_has_more_ranks_than_gpus(hosts_and_gpus, expected):
    assert ranks_share_gpus(hosts_and_gpus) is expected
