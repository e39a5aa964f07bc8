"""How a tensor on a given device reaches a process group's backend: as it is, staged through host memory, or not
at all — decided before anything is sent.

A backend's send/recv takes tensors of some device types only: gloo's (and MPI's, without a CUDA-aware build)
take host memory alone, and handed a CUDA tensor gloo writes the device pointer to a socket, which aborts the
process (``writev ... Bad address``) instead of raising. NCCL's take CUDA tensors alone. :func:`route` is the one
place that knows this; the transports follow it.
"""

from __future__ import annotations

DIRECT = "direct"  # the tensors travel as they are
STAGE = "stage"  # device tensors are copied to host buffers, and the host buffers travel

# Backends whose send/recv take host tensors only. MPI can take CUDA tensors only when built CUDA-aware, which
# torch does not tell reliably: staging is right either way.
HOST_ONLY = frozenset({"gloo", "mpi"})
# Backends whose send/recv take tensors of their one device type only.
DEVICE_ONLY = {"nccl": "cuda", "xccl": "xpu"}
# Backends whose send/recv take both host and CUDA tensors.
HOST_AND_CUDA = frozenset({"ucc"})
# Device types without data to send.
NO_DATA = frozenset({"meta"})


# NCCL refuses two ranks on one GPU, except from 2.30 on where the job sets this switch.
NCCL_MULTI_RANK_ENV = "NCCL_MULTI_RANK_GPU_ENABLE"
NCCL_MULTI_RANK_VERSION = (2, 30)


class DeviceRouteError(TypeError):
    """Tensors of this device type cannot travel on this group's backend."""


def route(device_type: str, backend: str, one_host: bool = False, rank: int | None = None) -> str:
    """:data:`DIRECT` or :data:`STAGE` for tensors on ``device_type`` over a group whose backend for that device is
    ``backend``; raises :class:`DeviceRouteError` naming both where they cannot travel at all.

    ``one_host``: every rank of the group shares this host's shared memory, which carries host tensors between
    them, so they never reach the backend (how host tensors travel on an NCCL group). ``rank`` only goes into the
    error message. Backends not known here get host tensors as they are and device tensors staged: a host copy
    can go anywhere a host tensor can, a device pointer cannot.
    """
    device_type, backend = device_type.lower(), backend.lower()
    where = f"rank {rank}: " if rank is not None else ""
    if device_type in NO_DATA:
        raise DeviceRouteError(f"{where}a tensor on {device_type} holds no data to send (backend {backend})")
    if backend in DEVICE_ONLY:
        own = DEVICE_ONLY[backend]
        if device_type == own or (device_type == "cpu" and one_host):
            return DIRECT
        reach = " except through shared memory between the ranks of one host" if device_type == "cpu" else ""
        raise DeviceRouteError(
            f"{where}a tensor on {device_type} cannot travel on a {backend} group{reach}: {backend} sends {own} "
            f"tensors only. Move the tensor to {own}, or use a group whose backend sends {device_type} tensors "
            "(gloo for cpu)"
        )
    if device_type == "cpu" or (device_type == "cuda" and backend in HOST_AND_CUDA):
        return DIRECT
    return STAGE


def nccl_shares_gpus(nccl_version: tuple[int, ...] | None, multi_rank_switch: bool) -> bool:
    """Whether this NCCL lets several ranks use one GPU: 2.30 or later, with :data:`NCCL_MULTI_RANK_ENV` set to 1."""
    return multi_rank_switch and nccl_version is not None and tuple(nccl_version[:2]) >= NCCL_MULTI_RANK_VERSION


def ranks_share_gpus(hosts_and_gpus: list[tuple[str, int]]) -> bool:
    """Whether some host has more ranks than GPUs, given each rank's (host, GPUs it sees)."""
    ranks: dict[str, int] = {}
    gpus: dict[str, int] = {}
    for host, count in hosts_and_gpus:
        ranks[host] = ranks.get(host, 0) + 1
        gpus[host] = min(gpus.get(host, count), count)
    return any(ranks[host] > gpus[host] for host in ranks)


def nccl_usable(
    cuda_available: bool,
    nccl_available: bool,
    nccl_version: tuple[int, ...] | None,
    multi_rank_switch: bool,
    ranks_share_gpus: bool,
) -> bool:
    """Whether a group's CUDA tensors can travel on NCCL; where not, they take gloo and are staged (:func:`route`).

    ``nccl_version`` is None where torch does not tell it (an int code from an old torch): no multi-rank switch then.
    """
    if not (cuda_available and nccl_available):
        return False
    return not ranks_share_gpus or nccl_shares_gpus(nccl_version, multi_rank_switch)
