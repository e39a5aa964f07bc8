"""How a tensor's device meets a group's backend: one table over every combination, decided before anything is
sent (:mod:`hybrid_ext.comm.device_route`). A wrong "direct" here is what aborted processes on GPUs: gloo handed a
CUDA tensor writes its device pointer to a socket."""

from __future__ import annotations

import pytest

from hybrid_ext.comm.device_route import DIRECT, STAGE, DeviceRouteError, route

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
