"""What a transport's group looks like to the planner: its size, its hosts, and the routes between its ranks.

:meth:`Topology.of` is the one place that reads a transport's optional capabilities for this (the
:class:`~hybrid_ext.comm.transports.contract.HostRoutes` protocol); the communicator and the cost model read the
topology.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from hybrid_ext.comm.transports.contract import HostRoutes, Transport


@dataclass(frozen=True)
class Topology:
    """A group's layout over hosts and the names of its routes (the cost model's keys)."""

    size: int
    transport: str  # the transport's name
    hosts: tuple[Hashable, ...] | None  # every group rank's host label where the transport knows them, else None
    local: str | None  # the route between ranks of one host where the transport has a separate one ("shm")
    network: str  # the route between hosts (the transport's own name where it does not route by host)

    @property
    def spans_hosts(self) -> bool:
        return self.hosts is not None and len(set(self.hosts)) > 1

    @property
    def host_count(self) -> int:
        return len(set(self.hosts)) if self.hosts is not None else 1

    @property
    def lanes(self) -> int:
        """The most ranks on one host: the parallel streams between hosts of a hierarchical schedule (the group's
        size where the hosts are unknown, as if it were one host)."""
        if self.hosts is None:
            return self.size
        return max(Counter(self.hosts).values())  # not tuple.count per host: groups of 1,024 ranks are planned

    @classmethod
    def of(cls, transport: Transport) -> Topology:
        if isinstance(transport, HostRoutes):
            hosts = tuple(transport.hosts)
            local = transport.local.name if transport.local is not None else None
            network = transport.network.name
        else:
            hosts, local, network = None, None, transport.name
        return cls(size=transport.size, transport=transport.name, hosts=hosts, local=local, network=network)


__all__ = ["Topology"]
