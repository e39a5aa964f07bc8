"""The fast tier runs in this process: starting a process here fails the test, so a slow test put in tests/unit
fails loudly instead of quietly making the tier slow. Ranks for these tests are threads
(:mod:`hybrid_ext.comm.transports.loopback`)."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest

from hybrid_ext import launch

try:  # matplotlib's first import on a machine asks fc-list for the fonts: let it, before the guard below is on
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager
except ImportError:
    pass


class ProcessStartedInUnitTest(AssertionError):
    """A test in tests/unit started a process; it belongs in tests/multiprocess (or a slower tier)."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise ProcessStartedInUnitTest(
            f"{what} in a test under tests/unit: tests there run in one process; move it to tests/multiprocess"
        )

    return refuse


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    """Every way the suite starts processes raises: the harness's spawn, subprocess (run, check_output and the rest
    go through Popen), multiprocessing (every context's Process.start) and fork/exec at the os level."""
    monkeypatch.setattr(launch, "spawn", _refuse("hybrid_ext.launch.spawn"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("subprocess.Popen"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("multiprocessing Process.start"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"os.{name}"))
