"""The cores a rank may compute on (hybrid_ext/comm/host_cores.py) and the emulated hosts' CPU quota
(hybrid_ext/launch/cpu_quota.py), read from cgroup trees made under tmp_path: v1's cpu controller, v2's cpu.max,
no limit, and no controller at all."""

from __future__ import annotations

import os

import pytest

from hybrid_ext.cli import main
from hybrid_ext.comm import host_cores
from hybrid_ext.launch import cpu_quota


def _v1(root, path: str, quota: int, period: int = 100_000) -> None:
    group = root / "cpu" / path.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (group / "cpu.cfs_period_us").write_text(f"{period}\n")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A cgroup root under tmp_path, this process in cgroup /job of every hierarchy."""
    monkeypatch.setattr(host_cores, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(host_cores, "_own_cgroups", lambda: {"cpu": "/job", "memory": "/job", "": "/job"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    return tmp_path


def test_a_v1_quota_caps_the_affinity_and_may_be_a_fraction(tree):
    _v1(tree, "/", quota=-1)  # the hierarchy's root: no limit
    _v1(tree, "/job", quota=150_000)
    assert host_cores.own_cpu_limit() == 1.5
    assert host_cores.usable_cores() == 1.5
    _v1(tree, "/job", quota=800_000)  # a quota above the affinity: the affinity counts
    assert host_cores.usable_cores() == 4.0


def test_no_quota_means_the_affinity(tree):
    _v1(tree, "/", quota=-1)
    _v1(tree, "/job", quota=-1)
    assert host_cores.own_cpu_limit() is None
    assert host_cores.usable_cores() == 4.0


def test_v2_reads_cpu_max(tree):
    (tree / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tree / "job").mkdir()
    (tree / "job" / "cpu.max").write_text("66700 100000\n")
    assert host_cores.cpu_cgroup() == (tree / "job", 2)
    assert host_cores.usable_cores() == pytest.approx(0.667)
    (tree / "job" / "cpu.max").write_text("max 100000\n")
    assert host_cores.usable_cores() == 4.0


def test_no_cpu_controller_means_the_affinity_and_no_quota_for_hosts(tree):
    (tree / "cgroup.controllers").write_text("memory pids\n")
    assert host_cores.cpu_cgroup() is None
    assert host_cores.usable_cores() == 4.0
    assert "cgroup cpu controller" in cpu_quota.missing()


def test_a_host_group_gets_its_quota_and_what_enters_it_inherits_it(tree):
    _v1(tree, "/", quota=-1)
    _v1(tree, "/job", quota=-1)
    procs = cpu_quota.create("hxc-node0", 0.667)
    group = tree / "cpu" / "job" / "hxc-node0"
    assert procs == group / "cgroup.procs"
    assert (int((group / "cpu.cfs_quota_us").read_text()), int((group / "cpu.cfs_period_us").read_text())) == (
        6670,
        cpu_quota.PERIOD_US,
    )
    argv = cpu_quota.entering(procs, ["nsenter", "-t", "1", "--", "hostname"])
    assert argv[:2] == ["sh", "-c"] and argv[3] == str(procs) and argv[4:] == ["nsenter", "-t", "1", "--", "hostname"]
    (group / "cpu.cfs_quota_us").unlink()  # rmdir of a real cgroup removes its files with it
    (group / "cpu.cfs_period_us").unlink()
    assert cpu_quota.remove("hxc-") and not group.exists()
    assert not cpu_quota.remove("hxc-")


def test_v2_host_group_writes_cpu_max(tree):
    (tree / "cgroup.controllers").write_text("cpu memory\n")
    (tree / "job").mkdir()
    cpu_quota.create("hxc-node1", 2)
    assert (tree / "job" / "hxc-node1" / "cpu.max").read_text() == f"{2 * cpu_quota.PERIOD_US} {cpu_quota.PERIOD_US}"
    assert (tree / "job" / "cgroup.subtree_control").read_text() == "+cpu"


def test_a_group_that_cannot_take_a_quota_is_named(tree):
    (tree / "cgroup.controllers").write_text("cpu memory\n")
    (tree / "job" / "hxc-node0" / "cpu.max").mkdir(parents=True)  # unwritable as a file, as an undelegated cpu.max
    with pytest.raises(OSError, match=r"hxc-node0 a CPU quota of 0\.5 cores"):
        cpu_quota.create("hxc-node0", 0.5)


@pytest.mark.parametrize("cores", [0, -1, float("nan")])
def test_a_quota_of_no_cores_is_refused(cores):
    with pytest.raises(ValueError, match="--cpus-per-host"):
        cpu_quota.quota_us(cores)


@pytest.mark.parametrize("value", ["0", "-2", "inf", "two"])
def test_the_command_line_names_a_bad_cpus_per_host(value, capsys):
    with pytest.raises(SystemExit):
        main(["cluster", "up", "--cpus-per-host", value])
    assert "--cpus-per-host" in capsys.readouterr().err
