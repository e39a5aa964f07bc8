"""The emulated cluster (hybrid_ext/launch/cluster.py): each host a machine of its own, reachable by name over ssh,
egress shaped with --nic, nothing left after down or a crash, and bad input explained.

Needs root and namespaces; elsewhere the tests that start hosts skip with the reason (conftest's cluster fixture).
Every address these tests send to is inside the cluster's own namespaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_ext.bench import link_cpu
from hybrid_ext.launch import cluster as emulated

from helpers import ROOT

CLI = [sys.executable, "-m", "hybrid_ext.cli", "cluster"]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def _on(cluster, host, script: str) -> str:
    done = cluster.run(host, ["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(120)
def test_each_host_is_a_machine_of_its_own(cluster, tmp_path):
    hosts = cluster.hosts[:2]
    for host in hosts:
        assert _on(cluster, host.name, "hostname") == host.name
        # Every name resolves to its bridge address (where gloo binds), in every host.
        for other in hosts:
            assert _on(cluster, host.name, f"getent hosts {other.name}").split()[0] == other.address
        assert _on(cluster, host.name, f"ip -4 -o addr show {cluster.interface}").split()[3] == host.address + "/24"
        # Its own PID namespace: this test process is not in it.
        assert _on(cluster, host.name, f"test -e /proc/{os.getpid()} && echo seen || echo unseen") == "unseen"
    # The working directory is kept.
    assert cluster.run(1, ["pwd"], cwd=tmp_path, capture_output=True, text=True).stdout.strip() == str(tmp_path)
    # Private /dev/shm: a file made on node0 is not on node1, nor here.
    name = f"hybrid-ext-test-{os.getpid()}"
    _on(cluster, 0, f"touch /dev/shm/{name}")
    assert _on(cluster, 1, f"test -e /dev/shm/{name} && echo seen || echo unseen") == "unseen"
    assert not Path("/dev/shm", name).exists()
    # ssh by name both ways, with the cluster's key and known_hosts (not ~/.ssh's).
    assert _on(cluster, 0, f"ssh {hosts[1].name} hostname") == hosts[1].name
    assert _on(cluster, 1, f"ssh {hosts[0].name} hostname") == hosts[0].name
    settings = _on(cluster, 0, f"ssh -G {hosts[1].name}")
    assert f"identityfile {cluster.state_dir / 'id_ed25519'}" in settings
    assert f"userknownhostsfile {cluster.state_dir / 'known_hosts'}" in settings
    # This namespace stays off the subnet: no address or route in it here.
    assert emulated.SUBNET_PREFIX not in subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout
    assert emulated.SUBNET_PREFIX not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout


@pytest.mark.timeout(120)
def test_cli_run_keeps_the_directory_and_the_exit_status_and_names_the_hosts(cluster, tmp_path):
    done = _cli("run", "node1", "--", "sh", "-c", "hostname; pwd; exit 3", cwd=tmp_path)
    assert done.returncode == 3 and done.stdout.split() == ["node1", str(tmp_path)], done
    assert _cli("run", "0", "--", "hostname").stdout.strip() == "node0"
    unknown = _cli("run", "node9", "--", "true")
    assert unknown.returncode == 1 and "no host 'node9'" in unknown.stderr and "node0, node1" in unknown.stderr
    again = _cli("up", "--hosts", "2")
    assert again.returncode == 1 and "already up" in again.stderr and "hybrid-ext cluster down" in again.stderr
    assert "node1" in _cli("status").stdout


def test_up_says_exactly_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(emulated.ClusterUnavailable, match=r"missing: root: the cluster creates network namespaces"):
        emulated.up(2)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = emulated.shutil.which
    monkeypatch.setattr(emulated.shutil, "which", lambda tool: None if tool in ("tc", "nsenter") else real_which(tool))
    with pytest.raises(emulated.ClusterUnavailable) as raised:
        emulated.up(2, nic="1gbit")
    assert "`nsenter` (Debian package util-linux)" in str(raised.value)
    assert "`tc` (Debian package iproute2 (for --nic))" in str(raised.value)
    with pytest.raises(ValueError, match="give a rate as tc writes it"):
        emulated.up(2, nic="fast")
    with pytest.raises(ValueError, match="--hosts must be between 1 and"):
        emulated.up(0)


def test_tbf_burst_is_200_microseconds_of_the_rate_and_at_least_one_gso_segment():
    assert emulated._tbf_burst("10gbit") == 250_000  # 200 µs at 1.25 GB/s
    assert emulated._tbf_burst("1gbit") == 73728  # 200 µs would be 25 kB: the floor
    assert emulated._tbf_burst("250mbit") == 73728
    assert emulated._tbf_burst("3200mbps") == 640_000


@pytest.fixture
def scratch_cluster(cluster_session):
    """For tests that stop the cluster: only where this session started it; brought back up afterwards."""
    handle, started_here = cluster_session
    if not started_here:
        pytest.skip("the emulated cluster was already up before the tests: left alone")
    yield handle
    emulated.down()
    emulated.up(2)


# One message at a time between two hosts, each acknowledged, after an idle spell (median of 3 per size; the
# 32 MiB row is the link's rate over a long stream).
_LINK_PROBE = [sys.executable, str(ROOT / "benchmarks" / "link_probe.py")]


@pytest.mark.timeout(180)
def test_a_crashed_cluster_leaves_nothing_up_trips_on_and_nic_shapes_egress(scratch_cluster):
    for host in scratch_cluster.hosts:  # a crash: every keeper killed, nothing cleaned
        os.kill(host.pid, signal.SIGKILL)
    time.sleep(0.2)
    assert emulated.current() is None
    shaped = emulated.up(2, nic="1gbit")
    assert "tbf" in _on(shaped, 1, f"tc qdisc show dev {shaped.interface}")
    before = shaped.traffic(1)
    address = shaped.hosts[0].address
    receiver = shaped.popen(0, [*_LINK_PROBE, "serve", address])
    try:
        probe = [*_LINK_PROBE, "send", address, "--idle", "0.2", "--tries", "3"]
        done = shaped.run(1, probe, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = {int(kib): (float(ms), float(mbit)) for kib, ms, mbit in (line.split() for line in
                done.stdout.splitlines()[1:])}  # fmt: skip
        short, rate = rows[1024][0] / 1e3, rows[32768][1] * 1e6
    finally:
        receiver.kill()
        receiver.wait()
    sent = shaped.traffic(1)["tx_bytes"] - before["tx_bytes"]
    assert sent >= 32 << 20  # the stream left node1 through its interface on the bridge
    assert 20e6 < rate < 1.2e9, f"{rate / 1e6:.1f} Mbit/s through a 1gbit tbf"
    # Like a NIC, not a bucket: after an idle spell 1 MiB still waits for the rate (8.4 ms at 1 Gbit/s; tbf's burst
    # lets 72 KiB pass at once). A burst of 10 ms of the rate, as before, sent it in 2.4 ms.
    assert short > 0.6 * (1 << 23) / 1e9, f"1 MiB in {short * 1e3:.2f} ms through a 1gbit tbf"
    # and sends whole GSO segments: a burst under one makes tbf split each into packets, at 13× the CPU per byte
    cpu_per_byte = link_cpu.measure(shaped, 32 << 20, repeats=1)
    assert cpu_per_byte < 3e-9, f"{cpu_per_byte * 1e9:.1f} ns of CPU per byte sent through a 1gbit tbf"
    assert emulated.down()
    assert not emulated._list_netns() and not emulated._list_links() and not emulated.state_dir().exists()
    assert not emulated.down()  # nothing left to remove


_BUSY = "import time\nstart = time.time()\nwhile time.time() - start < {seconds}: pass\nprint(time.process_time())"


@pytest.mark.timeout(180)
def test_cpus_per_host_limits_each_host_and_its_ranks_read_the_limit(scratch_cluster):
    from hybrid_ext.comm.host_cores import cpu_cgroup

    emulated.down()
    limited = emulated.up(2, cpus_per_host=0.5)
    assert "0.5 cores each" in emulated.describe(limited)
    read = [sys.executable, "-c", "from hybrid_ext.comm.host_cores import usable_cores; print(usable_cores())"]
    env = f"cd {ROOT} && PYTHONPATH={ROOT}"
    assert _on(limited, 0, f"{env} {' '.join(read[:2])} '{read[2]}'") == "0.5"
    # ranks that a launcher starts over ssh land in the host's group too (sshd runs in it)
    assert _on(limited, 1, f"ssh node0 \"{env} {read[0]} -c '{read[2]}'\"") == "0.5"
    # two busy processes on node0 share half a core between them; node1 is not limited by them
    seconds = 2.0
    busy = [limited.popen(0, [sys.executable, "-c", _BUSY.format(seconds=seconds)], stdout=subprocess.PIPE, text=True)]
    busy.append(
        limited.popen(0, [sys.executable, "-c", _BUSY.format(seconds=seconds)], stdout=subprocess.PIPE, text=True)
    )
    cpu = sum(float(p.communicate(timeout=60)[0]) for p in busy)
    assert cpu < 0.5 * seconds * 1.3, f"node0's two processes used {cpu:.2f} CPU seconds in {seconds} s at 0.5 cores"
    groups = cpu_cgroup()[0]
    assert sorted(g.name for g in groups.glob(f"{emulated.NAME_PREFIX}*")) == ["hxc-node0", "hxc-node1"]
    assert emulated.down()
    assert not list(groups.glob(f"{emulated.NAME_PREFIX}*")), "down left the hosts' cgroups"
