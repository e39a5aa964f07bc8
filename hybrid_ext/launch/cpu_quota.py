"""A CPU quota per emulated host: a cgroup whose CFS bandwidth limit is the host's cores.

Without one, the emulated hosts share every core of the machine, and a host whose ranks wait on the network hands
its cores to the others: a step that on real hosts computes at R ranks per host's cores computes faster here.
With ``hybrid-ext cluster up --cpus-per-host C`` each host runs at most C cores' worth at any time, as a real host
of C cores does, and its ranks read C as their cores (:func:`hybrid_ext.comm.host_cores.usable_cores`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from hybrid_ext.comm import host_cores

PERIOD_US = 10_000  # a host over its quota waits at most this long: about a scheduler's time slice, not 100 ms
MIN_QUOTA_US = 1_000  # the kernel's least quota


def missing() -> str | None:
    """Why no host can get a CPU quota here (a sentence), or None."""
    found = host_cores.cpu_cgroup()
    if found is None:
        controllers = host_cores.CGROUP_ROOT / "cgroup.controllers"
        return f"a cgroup cpu controller (cgroup v1's `cpu`, or v2 with `cpu` in {controllers})"
    if not os.access(found[0], os.W_OK):
        return f"write access to {found[0]} (to make a cgroup per host with its CPU quota)"
    return None


def quota_us(cores: float) -> int:
    """The CFS quota per :data:`PERIOD_US` of ``cores`` cores."""
    if not cores > 0:
        raise ValueError(f"--cpus-per-host must be a positive number of cores, got {cores}")
    return max(MIN_QUOTA_US, round(cores * PERIOD_US))


def create(name: str, cores: float) -> Path:
    """A cgroup ``name`` beside this process's own, limited to ``cores`` cores; returns its ``cgroup.procs``."""
    found = host_cores.cpu_cgroup()
    if found is None:
        raise OSError(missing())
    parent, version = found
    group = parent / name
    try:
        group.mkdir(exist_ok=True)
        if version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us(cores)))
        else:
            with contextlib.suppress(OSError):  # already delegated where the parent's own processes allow it
                (parent / "cgroup.subtree_control").write_text("+cpu")
            (group / "cpu.max").write_text(f"{quota_us(cores)} {PERIOD_US}")
    except OSError as exc:  # e.g. v2 with the cpu controller not delegated below a cgroup that holds processes
        raise OSError(f"could not give cgroup {group} a CPU quota of {cores:g} cores: {exc}") from None
    return group / "cgroup.procs"


def remove(prefix: str) -> bool:
    """Remove every cgroup named ``prefix…`` beside this process's own (killing what still runs in one); True if
    any was there."""
    found = host_cores.cpu_cgroup()
    if found is None:
        return False
    groups = [g for g in found[0].glob(f"{prefix}*") if g.is_dir()]
    for group in groups:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # busy: processes still in it
                for pid in _pids(group):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
    return bool(groups)


def mounts() -> list[tuple[str, str, str]]:
    """(type, target, options) of the mounts a process needs to read its CPU quota (the cgroup root's tmpfs under
    v1, and the cpu hierarchy), as this mount namespace has them."""
    found = host_cores.cpu_cgroup()
    if found is None:
        return []
    wanted = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, target, kind, options = line.split()[:4]
            if target == str(host_cores.CGROUP_ROOT) or (kind.startswith("cgroup") and found[0].is_relative_to(target)):
                wanted.append((kind, target, options))
    return wanted


def entering(procs: str | os.PathLike, argv: list[str]) -> list[str]:
    """``argv`` run inside the cgroup of ``procs`` (its ``cgroup.procs``): a shell writes its own pid there, then
    becomes ``argv``; everything it starts stays in the cgroup."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.fspath(procs), *argv]


def _pids(group: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    return []
