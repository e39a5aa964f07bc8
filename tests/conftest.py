"""Multi-rank test harness: run code on N real ranks (gloo processes, horovodrun, deepspeed) with hard timeouts.

Fixtures hand tests the launchers from :mod:`hybrid_ext.launch` with test-sized timeouts, so a hang fails the
test with every rank's output instead of blocking CI. Functions given to ``spawn_ranks`` must be defined at
module level (they are pickled into new processes).

Markers: ``multiprocess`` marks every test that starts ranks or launcher jobs (added here for tests that use the
fixtures below; modules and tests that start them otherwise carry it themselves). ``pytest -m "not multiprocess"``
runs the fast in-process tests alone (schedules simulated in one process, cost model, plans, parsing).
``--soak`` makes the fault and resource tests run their long versions (``tox -e soak``).
"""

from __future__ import annotations

import functools
import os

import pytest

from hybrid_ext import launch

# Generous for a loaded 2-core machine, far below CI's budget.
SPAWN_TIMEOUT = 90.0
LAUNCHER_TIMEOUT = 240.0


# The harness fixtures, and the module-scoped job fixtures of test_horovod / test_deepspeed / test_demo; the
# emulated cluster (its hosts run sshd and keeper processes) and test_multihost's launcher jobs on it.
MULTIPROCESS_FIXTURES = frozenset(
    {"spawn_ranks", "horovodrun", "deepspeed_job", "job", "job_np2", "job_np4", "demo_runs"}
    | {"cluster", "cluster_session", "torchrun_jobs", "horovod_job", "deepspeed_cluster_job"}
)
CLUSTER_HOSTS = 2

# The online tuner (on by default for users) times candidate schedules and keeps the fastest, so which schedule
# `auto` runs depends on the machine's load. Tests that compare runs bitwise or count a schedule's bytes need the
# model's fixed choice; the tuner's own tests (tests/test_tuner.py) turn it on.
os.environ.setdefault("HYBRID_EXT_TUNE", "off")


def pytest_addoption(parser):
    parser.addoption(
        "--soak", action="store_true", help="run the long fault and resource soaks (tox -e soak) instead of the short"
    )


@pytest.fixture
def soak(request) -> bool:
    """Whether this run is the long soak (``pytest --soak``)."""
    return request.config.getoption("--soak")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multiprocess: starts ranks or launcher jobs (deselect with -m 'not multiprocess')"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MULTIPROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture
def spawn_ranks():
    """``spawn_ranks(fn, world_size, *args, **kw)`` -> list of ``fn(rank, world_size, *args)`` results."""
    return _spawn_with_default_timeout


def _spawn_with_default_timeout(fn, world_size, *args, **kwargs):
    kwargs.setdefault("timeout", SPAWN_TIMEOUT)
    return launch.spawn(fn, world_size, *args, **kwargs)


@pytest.fixture
def horovodrun():
    """``horovodrun(command, np)`` -> each rank's ``report_result`` from a real ``horovodrun --gloo`` job."""
    return functools.partial(launch.run_horovodrun, timeout=LAUNCHER_TIMEOUT)


@pytest.fixture
def deepspeed_job():
    """``deepspeed_job(command, np)`` -> each rank's ``report_result`` from a real ``deepspeed`` launcher job."""
    return functools.partial(launch.run_deepspeed, timeout=LAUNCHER_TIMEOUT)


@pytest.fixture(scope="session")
def cluster_session():
    """``(cluster, started_here)``: the emulated cluster of :mod:`hybrid_ext.launch.cluster` with CLUSTER_HOSTS
    hosts. A live one (started with ``hybrid-ext cluster up``) is used and left up; otherwise one is started for
    the session and removed at its end. Skips, with the reason, where this machine cannot run one (no root,
    namespaces or tools)."""
    from hybrid_ext.launch import cluster as emulated

    reason = emulated.unavailable_reason()
    if reason:
        pytest.skip(f"no emulated cluster on this machine: {reason}")
    live = emulated.current()
    if live is not None and len(live.hosts) >= CLUSTER_HOSTS:
        yield live, False
        return
    try:
        handle = emulated.up(CLUSTER_HOSTS)
    except emulated.ClusterUnavailable as exc:
        pytest.skip(f"no emulated cluster on this machine: {exc}")
    try:
        yield handle, True
    finally:
        emulated.down()


@pytest.fixture(scope="session")
def cluster(cluster_session):
    """The emulated cluster (a :class:`~hybrid_ext.launch.cluster.Cluster`): hosts node0, node1 with sshd."""
    return cluster_session[0]
