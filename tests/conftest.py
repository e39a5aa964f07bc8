"""Multi-rank test harness: run code on N real ranks (gloo processes, horovodrun, deepspeed) with hard timeouts.

Fixtures hand tests the launchers from :mod:`hybrid_ext.launch` with test-sized timeouts, so a hang fails the
test with every rank's output instead of blocking CI. Functions given to ``spawn_ranks`` must be defined at
module level (they are pickled into new processes).

Tests live in folders by cost, and a test's folder is its tier: ``unit/`` (in this process; spawning is refused
there, see unit/conftest.py), ``multiprocess/`` (spawned gloo ranks, or a command in a process of its own),
``launchers/`` (real torchrun, horovodrun and deepspeed jobs), ``cluster/`` (the emulated multi-host cluster; needs
root) and ``gpu/`` (CUDA). ``pytest tests/unit`` is the fast tier. Every test outside ``unit/`` is also marked
``multiprocess`` (and ``launchers``, ``cluster`` or ``gpu`` after its folder), so ``-m "not multiprocess"`` selects
the same fast tier. ``--soak`` makes the fault and resource tests run their long versions (``tox -e soak``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from hybrid_ext import launch

# Generous for a loaded 2-core machine, far below CI's budget.
SPAWN_TIMEOUT = 90.0
LAUNCHER_TIMEOUT = 240.0


# A test's folder under tests/ -> the markers it gets. unit/ gets none: it is what "not multiprocess" selects.
FOLDER_MARKERS = {
    "multiprocess": ("multiprocess",),
    "launchers": ("multiprocess", "launchers"),
    "cluster": ("multiprocess", "cluster"),
    "gpu": ("multiprocess", "gpu"),
}
TIERS = ("unit", *FOLDER_MARKERS)
TESTS = Path(__file__).resolve().parent
CLUSTER_HOSTS = 2

# The online tuner (on by default for users) times candidate schedules and keeps the fastest, so which schedule
# `auto` runs depends on the machine's load. Tests that compare runs bitwise or count a schedule's bytes need the
# model's fixed choice; the tuner's own tests (tests/unit/test_tuner.py, tests/multiprocess/test_tuner_ranks.py)
# turn it on.
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
        "markers", "multiprocess: starts processes: every test outside tests/unit (deselect with -m 'not multiprocess')"
    )
    config.addinivalue_line("markers", "launchers: runs real torchrun, horovodrun or deepspeed jobs (tests/launchers)")
    config.addinivalue_line("markers", "cluster: runs on the emulated multi-host cluster (tests/cluster)")
    config.addinivalue_line("markers", "gpu: needs CUDA (tests/gpu)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS not in path.parents:
            continue  # collected from elsewhere in the same run
        for marker in FOLDER_MARKERS.get(tier_of(path), ()):
            item.add_marker(marker)


def tier_of(path: Path) -> str:
    """The tier folder a test file lives in; a test file anywhere else under tests/ is an error, so no test can sit
    outside every tier."""
    parts = path.relative_to(TESTS).parts
    if len(parts) < 2 or parts[0] not in TIERS:
        raise pytest.UsageError(f"{path}: test files belong in one of tests/{{{','.join(TIERS)}}}/ (its cost tier)")
    return parts[0]


@pytest.fixture
def isolated_cost_models(monkeypatch, tmp_path):
    """Calibrated cost-model constants read from and saved to this test's own file, no ``HYBRID_EXT_ALGO``."""
    from hybrid_ext.comm import cost_model

    monkeypatch.setenv("HYBRID_EXT_COST_MODEL", str(tmp_path / "cost_model.json"))
    monkeypatch.delenv("HYBRID_EXT_ALGO", raising=False)
    cost_model._models = None
    yield
    cost_model._models = None


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
