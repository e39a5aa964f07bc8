"""The cores this process may compute on: its affinity, and its cgroup's CPU quota where it has one.

A container limited to C CPUs (Docker's ``--cpus``, a Kubernetes CPU limit), or a host of the emulated cluster
started with ``--cpus-per-host C``, may run on every core of the machine but only C cores' worth of time per
period: ranks that count the affinity alone would think they have the machine to themselves. Both cgroup versions
are read: v1's ``cpu`` controller (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``) and v2's ``cpu.max``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> float:
    """The cores this process may run on (what the ranks of a host share): its affinity, capped by its cgroup's
    CPU quota (which may be a fraction)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = own_cpu_limit()
    return min(float(affinity), limit) if limit else float(affinity)


def cpu_cgroup() -> tuple[Path, int] | None:
    """(the directory of this process's own cgroup in the hierarchy with the cpu controller, the cgroup version),
    or None where no cpu controller is mounted."""
    own = _own_cgroups()
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists():  # v2 alone (unified)
        if "cpu" not in controllers.read_text().split():
            return None
        return CGROUP_ROOT / own.get("", "/").lstrip("/"), 2
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (CGROUP_ROOT / mount / "cpu.cfs_quota_us").exists():
            path = next((p for names, p in own.items() if "cpu" in names.split(",")), "/")
            return CGROUP_ROOT / mount / path.lstrip("/"), 1
    return None


def own_cpu_limit() -> float | None:
    """The cores' worth of time this process's cgroup may use per period (its CFS quota), or None: no limit."""
    found = cpu_cgroup()
    if found is None:
        return None
    group, version = found
    try:
        if version == 1:
            quota = int((group / "cpu.cfs_quota_us").read_text())
            period = int((group / "cpu.cfs_period_us").read_text())
        else:
            quota_text, period_text = (group / "cpu.max").read_text().split()[:2]
            if quota_text == "max":
                return None
            quota, period = int(quota_text), int(period_text)
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy, from /proc/self/cgroup: controllers ('' for v2) -> path."""
    groups = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            groups[names] = path
    return groups
