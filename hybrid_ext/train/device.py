"""Which device a rank trains and benchmarks on: ``--device cpu|cuda|auto`` for the recipes, the demo and the benches.

``auto`` (the default) is CUDA where there is a GPU, else the CPU. A rank takes GPU ``local rank % device count``:
one GPU per rank where a host has at least as many GPUs as ranks, otherwise ranks share GPUs. The decision is
:func:`resolve_device`, a pure function of (requested, CUDA available, device count, local rank) so that CPU
machines test it; :func:`this_rank_device` feeds it this process's facts.

The process group follows (:func:`process_group_backend`): gloo for CPU runs; with one GPU per rank NCCL for CUDA
tensors (gloo beside it for CPU ones); ranks that share a GPU use gloo, which reaches CUDA tensors through host
memory — or NCCL, from 2.30 on, where the job turned on NCCL's switch for several ranks on one GPU.

torch is imported only where a device is resolved: the command line adds ``--device`` without loading it.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from hybrid_ext.comm.transports.device_route import NCCL_MULTI_RANK_ENV, nccl_shares_gpus

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Where launchers put a rank's place on its host: torchrun / deepspeed / spawn, horovodrun, mpirun (Open MPI).
LOCAL_RANK_ENVS = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
                   ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))  # fmt: skip


class DeviceUnavailableError(ValueError):
    """The requested device is not on this machine."""


def resolve_device(requested: str, cuda_available: bool, device_count: int, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its host, for a ``requested`` device (see the module docstring)."""
    import torch

    if requested not in DEVICE_CHOICES:
        raise ValueError(f"device {requested!r}: choose {', '.join(DEVICE_CHOICES)}")
    has_gpu = cuda_available and device_count > 0
    if requested == "cpu" or (requested == "auto" and not has_gpu):
        return torch.device("cpu")
    if not has_gpu:
        raise DeviceUnavailableError(
            f"device 'cuda' asked for, but this machine has no CUDA device (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}; torch.cuda.is_available() is {cuda_available}): use cpu or auto"
        )
    return torch.device("cuda", local_rank % device_count)


def shares_gpus(ranks_on_host: int, device_count: int) -> bool:
    """Whether the ranks of a host must share GPUs (more ranks than GPUs)."""
    return ranks_on_host > device_count


def process_group_backend(
    device: torch.device,
    ranks_on_host: int,
    device_count: int,
    nccl_version: tuple[int, ...] | None = None,
    multi_rank_switch: bool = False,
) -> str:
    """The torch.distributed backend for ranks on ``device`` (``ranks_on_host`` ranks on ``device_count`` GPUs)."""
    if device.type != "cuda":
        return "gloo"
    if shares_gpus(ranks_on_host, device_count) and not nccl_shares_gpus(nccl_version, multi_rank_switch):
        return "gloo"  # NCCL refuses two ranks on one GPU; gloo stages CUDA tensors through host memory
    return "cpu:gloo,cuda:nccl"  # CUDA tensors on NCCL; hybrid-ext's set-up and CPU tensors on gloo


def local_rank_and_size() -> tuple[int, int]:
    """(this process's rank on its host, ranks on its host) from the launcher's environment; (0, 1) alone."""
    for rank_env, size_env in LOCAL_RANK_ENVS:
        if rank_env in os.environ:
            return int(os.environ[rank_env]), int(os.environ.get(size_env, "1"))
    return 0, 1


def cuda_facts() -> tuple[bool, int]:
    """(CUDA available, device count) on this machine."""
    import torch

    available = torch.cuda.is_available()
    return available, torch.cuda.device_count() if available else 0


def this_rank_device(requested: str) -> torch.device:
    """This rank's device (its GPU becomes the current one, so NCCL and new CUDA tensors use it)."""
    import torch

    local_rank, _ = local_rank_and_size()
    device = resolve_device(requested, *cuda_facts(), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def this_job_backend(requested: str, ranks_on_host: int) -> str:
    """The backend for a job of ``ranks_on_host`` ranks per host here, asking for ``requested`` (cpu / cuda / auto)."""
    available, count = cuda_facts()
    device = resolve_device(requested, available, count, 0)
    import torch
    import torch.distributed as dist

    nccl = None
    if device.type == "cuda" and dist.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = tuple(version[:2]) if isinstance(version, tuple) else None  # old torch: an int code, no switch then
    switch = os.environ.get(NCCL_MULTI_RANK_ENV, "") == "1"
    return process_group_backend(device, ranks_on_host, count, nccl, switch)


def requested_device(text: str) -> str:
    """An argparse type for ``--device``: the request, refused at once where it cannot be had here."""
    try:
        resolve_device(text, *cuda_facts(), 0)
    except ValueError as exc:  # DeviceUnavailableError included: argparse names the option and exits
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=requested_device,
        default="auto",
        metavar="{auto,cpu,cuda}",
        help="auto (default): CUDA where there is a GPU, else the CPU; each rank takes GPU local rank %% GPU count",
    )
