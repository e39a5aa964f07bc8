"""A transport's topology: hosts and route names come from its declared capabilities, nothing else."""

from __future__ import annotations

import torch

from hybrid_ext.comm.topology import Topology
from hybrid_ext.comm.transports.contract import HostRoutes
from hybrid_ext.comm.transports.loopback import LoopbackGroup
from hybrid_ext.comm.transports.staged import StagedRoutedTransport, StagedTransport


def test_a_loopback_group_without_hosts_is_one_host_of_its_own_transport():
    topology = Topology.of(LoopbackGroup(3).endpoint(0))
    assert topology == Topology(size=3, transport="loopback", hosts=None, local=None, network="loopback")
    assert not topology.spans_hosts
    assert topology.host_count == 1
    assert topology.lanes == 3


def test_a_loopback_group_labelled_with_hosts_routes_both_ways_over_its_queues():
    endpoint = LoopbackGroup(5, hosts=("a", "a", "a", "b", "b")).endpoint(3)
    assert isinstance(endpoint, HostRoutes)
    topology = Topology.of(endpoint)
    assert topology.hosts == ("a", "a", "a", "b", "b")
    assert (topology.local, topology.network) == ("loopback", "loopback")
    assert topology.spans_hosts and topology.host_count == 2 and topology.lanes == 3


class _Named:
    def __init__(self, name: str, rank: int = 0, size: int = 4) -> None:
        self.name, self.rank, self.size, self.timeout = name, rank, size, 1.0

    def exchange(self, send, send_to, recv, recv_from) -> None:
        raise AssertionError("a topology sends nothing")


class _Routed(_Named):
    """Routed-like: shared memory between host-mates (or none), the network between hosts."""

    def __init__(self, hosts: tuple[int, ...], local: _Named | None) -> None:
        super().__init__(f"{local.name}+torch-gloo" if local else "torch-gloo", size=len(hosts))
        self.hosts, self.local, self.network = hosts, local, _Named("torch-gloo", size=len(hosts))


def test_a_routed_transport_names_its_local_and_network_routes():
    topology = Topology.of(_Routed((0, 0, 1, 1), _Named("shm", size=2)))
    expected = Topology(size=4, transport="shm+torch-gloo", hosts=(0, 0, 1, 1), local="shm", network="torch-gloo")
    assert topology == expected
    assert topology.spans_hosts and topology.host_count == 2 and topology.lanes == 2


def test_a_routed_transport_without_shared_memory_has_no_local_route():
    topology = Topology.of(_Routed((0, 1, 1), None))
    assert topology.local is None and topology.network == "torch-gloo" and topology.lanes == 2


def test_a_transport_with_only_some_route_attributes_declares_no_routes():
    partial = _Named("partial")
    partial.hosts = (0, 1, 2, 3)  # no local/network: not HostRoutes, so not planned as spanning hosts
    assert Topology.of(partial).hosts is None


def test_staging_over_a_routed_transport_keeps_its_hosts_and_is_its_own_network_route():
    routed = _Routed((0, 0, 1, 1), _Named("shm", size=2))
    staged = StagedTransport(routed, torch.device("cpu"))
    assert isinstance(staged, StagedRoutedTransport)
    topology = Topology.of(staged)
    assert topology.hosts == (0, 0, 1, 1) and topology.local is None
    assert topology.network == topology.transport == "cpu-staged+shm+torch-gloo"
    flat = StagedTransport(_Named("torch-gloo"), torch.device("cpu"))
    assert type(flat) is StagedTransport and Topology.of(flat).hosts is None


def test_the_transports_declare_their_capabilities():
    from hybrid_ext.comm.transports.contract import FusedReduce, HasDirect, HasNative, OwnsCommunicator
    from hybrid_ext.comm.transports.loopback import LoopbackHostsTransport, LoopbackTransport
    from hybrid_ext.comm.transports.routed import RoutedTransport
    from hybrid_ext.comm.transports.shm import ShmTransport
    from hybrid_ext.comm.transports.torch_p2p import TorchTransport
    from hybrid_ext.integrations.horovod.transport import HorovodAlltoallTransport
    from hybrid_ext.integrations.torch.backend import ButterflyProcessGroup

    for fused in (ShmTransport, TorchTransport, RoutedTransport, StagedTransport, StagedRoutedTransport):
        assert FusedReduce in fused.__mro__, fused
    assert HostRoutes in RoutedTransport.__mro__ and HostRoutes in StagedRoutedTransport.__mro__
    assert HostRoutes in LoopbackHostsTransport.__mro__ and not issubclass(LoopbackTransport, FusedReduce)
    assert HasDirect in ShmTransport.__mro__ and HasNative in HorovodAlltoallTransport.__mro__
    assert issubclass(ButterflyProcessGroup, OwnsCommunicator)  # by its members: the backend's own class


def test_a_wrapper_that_forwards_a_fused_reduce_still_fuses():
    """The executor checks the class first, then the instance's members (fault injection wraps transports so)."""
    from hybrid_ext.comm.transports.contract import FusedReduce

    class Forwarding(_Named):
        def __init__(self, inner) -> None:
            super().__init__(inner.name)
            self.inner = inner

        def __getattr__(self, name: str):
            if name != "exchange_reduce":
                raise AttributeError(name)
            return self.inner.exchange_reduce

    class Fused(_Named):
        def exchange_reduce(self, send, send_to, target, recv_from, reduce) -> None: ...

    assert not issubclass(Forwarding, FusedReduce)
    assert isinstance(Forwarding(Fused("shm")), FusedReduce)
    assert not isinstance(Forwarding(_Named("plain")), FusedReduce)
