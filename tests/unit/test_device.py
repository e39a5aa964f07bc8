"""``--device cpu|cuda|auto``: which device a rank takes (a pure table), which backend its job gets, and the option
on every command that trains or benchmarks — refused up front, by name, where CUDA is asked for and absent."""

from __future__ import annotations

import argparse

import pytest
import torch

from hybrid_ext.cli import build_parser
from hybrid_ext.train import device as devices
from hybrid_ext.train.device import DeviceUnavailableError, process_group_backend, resolve_device

# (requested, CUDA available, device count, local rank) -> device
TABLE = [
    ("cpu", False, 0, 0, "cpu"),
    ("cpu", True, 4, 3, "cpu"),
    ("auto", False, 0, 2, "cpu"),
    ("auto", True, 0, 0, "cpu"),  # CUDA built in but no device to be had
    ("auto", True, 1, 0, "cuda:0"),
    ("auto", True, 4, 2, "cuda:2"),  # one GPU per rank
    ("auto", True, 2, 3, "cuda:1"),  # 4 ranks on 2 GPUs: local rank modulo the device count
    ("cuda", True, 1, 3, "cuda:0"),  # every rank on the one GPU
    ("cuda", True, 8, 5, "cuda:5"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("requested", "available", "count", "local_rank", "expected"), TABLE)
def test_each_rank_gets_its_device(requested, available, count, local_rank, expected):
    assert resolve_device(requested, available, count, local_rank) == torch.device(expected)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("available", "count"), [(False, 0), (True, 0)])
def test_cuda_asked_for_where_there_is_none_is_refused_by_name(available, count):
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        resolve_device("cuda", available, count, 0)
    with pytest.raises(ValueError, match="choose auto, cpu, cuda"):
        resolve_device("gpu", available, count, 0)


# (device, ranks on the host, GPUs, NCCL version, NCCL's multi-rank switch on) -> backend
BACKENDS = [
    ("cpu", 4, 0, None, False, "gloo"),
    ("cpu", 4, 4, (2, 28), False, "gloo"),
    ("cuda:0", 2, 2, (2, 28), False, "cpu:gloo,cuda:nccl"),  # one GPU per rank
    ("cuda:0", 4, 8, (2, 28), False, "cpu:gloo,cuda:nccl"),
    ("cuda:0", 4, 2, (2, 28), False, "gloo"),  # shared GPUs: NCCL refuses them
    ("cuda:0", 2, 1, (2, 30), False, "gloo"),  # the switch is off
    ("cuda:0", 2, 1, (2, 30, 7), True, "cpu:gloo,cuda:nccl"),  # NCCL >= 2.30 with its switch shares a GPU
    ("cuda:0", 2, 1, (2, 28, 9), True, "gloo"),  # too old for the switch
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("device", "ranks", "count", "nccl", "switch", "expected"), BACKENDS)
def test_the_job_backend_follows_the_device_and_whether_ranks_share_gpus(device, ranks, count, nccl, switch, expected):
    assert process_group_backend(torch.device(device), ranks, count, nccl, switch) == expected


@pytest.mark.timeout(30)
def test_a_rank_reads_its_place_on_the_host_from_its_launcher(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK", raising=False)
    assert devices.local_rank_and_size() == (0, 1)
    monkeypatch.setenv("HOROVOD_LOCAL_RANK", "3")
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "4")
    assert devices.local_rank_and_size() == (3, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.local_rank_and_size() == (1, 2)


# ------------------------------------------------------------------ the option on every command

COMMANDS = [
    ["demo"],
    ["bench", "allreduce"],
    ["bench", "train"],
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_device_and_defaults_to_auto(command, monkeypatch):
    monkeypatch.setattr(devices, "cuda_facts", lambda: (False, 0))
    parser = build_parser()
    assert parser.parse_args(command).device == "auto"
    assert parser.parse_args([*command, "--device", "cpu"]).device == "cpu"
    monkeypatch.setattr(devices, "cuda_facts", lambda: (True, 2))
    assert parser.parse_args([*command, "--device", "cuda"]).device == "cuda"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_device_cuda_without_cuda_is_a_usage_error_not_a_traceback(command, monkeypatch, capsys):
    monkeypatch.setattr(devices, "cuda_facts", lambda: (False, 0))
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "no CUDA device" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--device", "tpu"])


@pytest.mark.timeout(30)
def test_the_recipe_options_carry_the_device_into_the_config(monkeypatch):
    from hybrid_ext.train.recipe_cli import add_train_arguments, train_config

    monkeypatch.setattr(devices, "cuda_facts", lambda: (False, 0))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert train_config(parser.parse_args([]), framework="torchrun").device == "auto"
    assert train_config(parser.parse_args(["--device", "cpu"]), framework="horovod").device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda"])
