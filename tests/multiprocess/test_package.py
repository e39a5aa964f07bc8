"""Packaging: the core imports no optional framework, integrations install under hybrid_ext, the CLI answers."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hybrid_ext.tools import horovod_wheel
from hybrid_ext.version import __version__


def _python(code: str, cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_core_import_pulls_in_no_optional_framework(tmp_path):
    loaded = _python(
        "import sys, hybrid_ext, hybrid_ext.integrations; "
        "print(sorted(m for m in ('horovod', 'deepspeed', 'torchvision', 'tensorboard') if m in sys.modules))",
        tmp_path,
    )
    assert loaded == "[]"


def test_integrations_install_as_a_subpackage(tmp_path):
    # Run outside the repository so that only the installed package is visible.
    found = _python(
        "import importlib.util, hybrid_ext.integrations as i, hybrid_ext.integrations.torch as t; "
        "print(importlib.util.find_spec('integrations') is None, i.__name__, t.__name__, "
        "'site-packages' in t.__file__)",
        tmp_path,
    )
    assert found == "True hybrid_ext.integrations hybrid_ext.integrations.torch True"


def test_cli_version_and_help(tmp_path):
    out = subprocess.run(["hybrid-ext", "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == f"hybrid-ext {__version__}"
    help_text = subprocess.run(["hybrid-ext", "--help"], capture_output=True, text=True, check=True, timeout=60)
    assert "demo" in help_text.stdout and "install-horovod" in help_text.stdout


def test_horovod_patch_sets_cxx20_and_refuses_unknown_sources(tmp_path):
    (tmp_path / "horovod" / "torch").mkdir(parents=True)
    for relative in horovod_wheel.CXX_STANDARD_FILES:
        (tmp_path / relative).write_text("x\nset(CMAKE_CXX_STANDARD 14)\ny\n")
    horovod_wheel.patch_cxx_standard(tmp_path)
    for relative in horovod_wheel.CXX_STANDARD_FILES:
        assert (tmp_path / relative).read_text() == "x\nset(CMAKE_CXX_STANDARD 20)\ny\n"
    with pytest.raises(SystemExit, match="expected the line"):
        horovod_wheel.patch_cxx_standard(tmp_path)  # already patched: not the source we know


def test_horovod_wheel_cache_is_keyed_by_what_the_build_depends_on(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_EXT_CACHE", str(tmp_path))
    key = horovod_wheel.build_key()
    assert key.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-torch")
    assert horovod_wheel.cached_wheel_dir() == tmp_path / "wheels" / "horovod-0.28.1" / key
    assert horovod_wheel.find_cached_wheel() is None
    wheel_dir = horovod_wheel.cached_wheel_dir()
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    (wheel_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.partial").write_bytes(b"")
    assert horovod_wheel.find_cached_wheel().name.endswith(".whl")


def test_horovod_is_installed_in_this_environment():
    # The suite runs on the real stack; a missing Horovod is a set-up failure, not a skip.
    assert horovod_wheel.installed_horovod_works()


def test_horovod_gets_nccl_gpu_operations_where_a_gpu_is_asked_for(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("HYBRID_EXT_HOROVOD_GPU", "0")
    cpu_key = horovod_wheel.build_key()
    monkeypatch.setenv("HYBRID_EXT_HOROVOD_GPU", "1")
    platform = sysconfig.get_platform()
    assert horovod_wheel.build_key() == cpu_key.replace(f"-{platform}", f"-nccl-{platform}")  # cached apart
    if not torch.version.cuda:
        pytest.skip("a CPU-only torch builds no GPU operations")
    nccl = tmp_path / "nccl"
    (nccl / "include").mkdir(parents=True)
    (nccl / "include" / "nccl.h").write_text("")
    (nccl / "lib").mkdir()
    (nccl / "lib" / "libnccl.so.2").write_text("")
    monkeypatch.setenv("NCCL_HOME", str(nccl))
    env = horovod_wheel.build_environment(tmp_path)
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL" and env["HOROVOD_NCCL_LINK"] == "SHARED"
    assert env["HOROVOD_NCCL_INCLUDE"] == str(nccl / "include")
    assert (Path(env["HOROVOD_NCCL_LIB"]) / "libnccl.so").resolve() == (nccl / "lib" / "libnccl.so.2").resolve()
    assert "75" in env["HOROVOD_BUILD_CUDA_CC_LIST"] and "90" in env["HOROVOD_BUILD_CUDA_CC_LIST"]
    monkeypatch.setenv("HYBRID_EXT_HOROVOD_GPU", "0")
    assert "HOROVOD_GPU_OPERATIONS" not in horovod_wheel.build_environment(tmp_path)
