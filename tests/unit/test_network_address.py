"""The address a host advertises: the interface variables users set for gloo and NCCL are honoured."""

from __future__ import annotations

import pytest

from hybrid_ext.comm.transports import network_address

ADDRESSES = {"lo": "127.0.0.1", "eth0": "192.0.2.10", "eth1": "198.51.100.7", "ib0": "203.0.113.5"}


@pytest.fixture
def interfaces(monkeypatch):
    monkeypatch.setattr(network_address, "interface_addresses", lambda: dict(ADDRESSES))
    monkeypatch.setattr(network_address, "default_route_interface", lambda: "eth0")
    for env in network_address.IFNAME_ENVS:
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "value", "address"),
    [
        ("GLOO_SOCKET_IFNAME", "eth1", "198.51.100.7"),
        ("GLOO_SOCKET_IFNAME", "eth1,eth0", "198.51.100.7"),
        ("NCCL_SOCKET_IFNAME", "ib", "203.0.113.5"),  # NCCL's prefix match
        ("NCCL_SOCKET_IFNAME", "=eth1", "198.51.100.7"),  # NCCL's exact match
        ("NCCL_SOCKET_IFNAME", "^docker", "192.0.2.10"),  # an exclusion names nothing: the default route
    ],
)
def test_the_interface_variables_pick_the_address(interfaces, env, value, address):
    interfaces.setenv(env, value)
    assert network_address.advertised_address() == address


def test_without_variables_the_default_route_decides(interfaces):
    assert network_address.advertised_address() == "192.0.2.10"


def test_an_interface_that_does_not_exist_is_named_with_the_ones_that_do(interfaces):
    interfaces.setenv("GLOO_SOCKET_IFNAME", "eth9")
    with pytest.raises(RuntimeError, match=r"GLOO_SOCKET_IFNAME='eth9'.*eth0 \(192.0.2.10\)"):
        network_address.advertised_address()
