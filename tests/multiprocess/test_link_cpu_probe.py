"""The link's CPU probe end to end between two processes on loopback (across emulated hosts: tests/cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybrid_ext.bench import link_cpu
from hybrid_ext.launch.cluster import Host

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


class _LocalHosts:
    """Two 'hosts' that are this machine (loopback): the probe's processes run here, as the cluster would run them."""

    def __init__(self, receiver_argv=None):
        self.receiver_argv = receiver_argv
        self.killed = []

    def host(self, ref):
        return Host(f"node{ref}", "127.0.0.1", 0)

    def popen(self, ref, argv, **kwargs):
        if ref == 1 and self.receiver_argv is not None:
            argv = self.receiver_argv
        return subprocess.Popen(argv, **kwargs)

    def kill_strays(self, names):
        self.killed.append(names)


def test_the_probe_streams_between_its_processes_and_counts_cpu_per_byte():
    seconds_per_byte = link_cpu._one_stream(_LocalHosts(), 8 * link_cpu.CHUNK, idle_seconds=0.2)
    assert 0.0 <= seconds_per_byte < 1e-6  # a loopback byte costs nanoseconds, never a microsecond


def test_a_probe_whose_receiver_fails_says_so_and_leaves_nothing_running():
    hosts = _LocalHosts([sys.executable, "-c", "import sys; sys.exit('cannot bind')"])
    with pytest.raises(RuntimeError, match="no receiver on node1: cannot bind"):
        link_cpu._one_stream(hosts, link_cpu.CHUNK, idle_seconds=0.1)
    assert hosts.killed == []  # it had ended on its own
