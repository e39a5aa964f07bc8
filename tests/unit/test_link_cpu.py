"""The link's CPU probe's arithmetic (the probe itself runs across emulated hosts: tests/cluster)."""

from __future__ import annotations

import os

import pytest

from hybrid_ext.bench import link_cpu

pytestmark = pytest.mark.timeout(30)


def test_busy_time_counts_user_nice_system_irq_softirq_not_idle_or_iowait():
    stat = "cpu  100 20 30 5000 40 5 6 7 0 0\ncpu0 50 10 15 2500 20 2 3 3 0 0\n"
    assert link_cpu.busy_seconds(stat) == pytest.approx((100 + 20 + 30 + 5 + 6) / os.sysconf("SC_CLK_TCK"))
    with pytest.raises(ValueError, match="not /proc/stat"):
        link_cpu.busy_seconds("intr 1 2 3\n")


def test_the_probe_sends_about_two_seconds_of_the_links_rate():
    assert link_cpu.probe_bytes(125e6) == 59 * link_cpu.CHUNK  # 250 MB at 1 Gbit/s, in whole 4 MiB chunks
    assert link_cpu.probe_bytes(1e6) == link_cpu.MIN_BYTES  # a slow link: still enough bytes to count
    assert link_cpu.probe_bytes(None) == link_cpu.probe_bytes(1e12) == link_cpu.MAX_BYTES  # unshaped
