"""The transport factory's choices that need no processes: what ``compose`` returns without shared memory to set up."""

from __future__ import annotations

import pytest

from hybrid_ext import config
from hybrid_ext.comm.transports import factory
from hybrid_ext.comm.transports.loopback import LoopbackGroup

pytestmark = pytest.mark.timeout(60)


def _never(*_):
    raise AssertionError("no set-up exchange for a group that needs no shared memory")


@pytest.mark.parametrize("choice", ["auto", "shm", "torch"])
def test_a_group_of_one_takes_its_network_transport_whatever_the_choice(choice):
    alone = LoopbackGroup(1).endpoint(0)
    with config.override(HYBRID_EXT_TRANSPORT=choice):
        assert factory.compose(lambda: alone, 0, 1, "cpu", choice, _never, _never, 5.0) is alone


def test_device_tensors_and_send_recv_skip_shared_memory():
    network = LoopbackGroup(2).endpoint(0)
    assert factory.compose(lambda: network, 0, 2, "cuda", "auto", _never, _never, 5.0) is network
    assert factory.compose(lambda: network, 0, 2, "cpu", "torch", _never, _never, 5.0) is network
