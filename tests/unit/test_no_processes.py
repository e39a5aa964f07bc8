"""The guard of the fast tier (tests/unit/conftest.py): each way of starting a process fails a unit test."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from hybrid_ext import launch


def _rank(rank: int, world_size: int) -> int:
    return rank


def test_the_harness_spawn_is_refused():
    with pytest.raises(AssertionError, match="move it to tests/multiprocess"):
        launch.spawn(_rank, 2)


def test_subprocess_is_refused():
    with pytest.raises(AssertionError, match=r"subprocess\.Popen in a test under tests/unit"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_multiprocessing_is_refused_for_every_start_method(method):
    process = multiprocessing.get_context(method).Process(target=print)
    with pytest.raises(AssertionError, match=r"Process\.start in a test under tests/unit"):
        process.start()


def test_fork_is_refused():
    with pytest.raises(AssertionError, match=r"os\.fork in a test under tests/unit"):
        os.fork()
