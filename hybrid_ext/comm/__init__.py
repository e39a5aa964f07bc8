"""The communication core: plans, transports, and the collectives that run plans over transports.

Layers, bottom up (nothing here imports the partitioner, the integrations or the tools):

- :mod:`~hybrid_ext.comm.schedule` — pure plans: who sends which slice to whom (no processes, no tensors);
- :mod:`~hybrid_ext.comm.cost_model` — α-β-γ costs per transport; picks the algorithm for ``auto``;
- :mod:`~hybrid_ext.comm.transports` — moving the bytes: :mod:`~hybrid_ext.comm.transports.contract` (the one
  contract every transport implements, and its optional capabilities), :mod:`~hybrid_ext.comm.transports.shm`
  (ranks on one host), :mod:`~hybrid_ext.comm.transports.torch_p2p` (a torch.distributed process group's
  send/recv), :mod:`~hybrid_ext.comm.transports.routed` (both, for a group that spans hosts),
  :mod:`~hybrid_ext.comm.transports.staged` (device tensors through host memory),
  :mod:`~hybrid_ext.comm.transports.loopback` (ranks as threads), :mod:`~hybrid_ext.comm.transports.native` (a
  group's own allreduce, which ``auto`` weighs beside the schedules), and
  :mod:`~hybrid_ext.comm.transports.factory`, which builds a group's transport (from a process group, or from a
  store through :mod:`~hybrid_ext.comm.transports.side_channel`);
- :mod:`~hybrid_ext.comm.topology` — a transport's hosts and routes, as the planner reads them;
- :mod:`~hybrid_ext.comm.executor` runs one rank's plan over a transport; :mod:`~hybrid_ext.comm.ordering`
  keeps a group's collectives in issue order; :mod:`~hybrid_ext.comm.buffers` reuses receive buffers;
  :mod:`~hybrid_ext.comm.communicator` puts them together per group; :mod:`~hybrid_ext.comm.registry` finds a
  group's communicator;
- :mod:`~hybrid_ext.comm.api` — the public collectives (``hybrid_ext.allreduce`` & co.);
- :mod:`~hybrid_ext.comm.consistency` (check mode) and :mod:`~hybrid_ext.comm.metrics` (a record per call).
"""

from hybrid_ext.comm import metrics
from hybrid_ext.comm.api import (
    allgather,
    allreduce,
    allreduce_async,
    allreduce_coalesced,
    allreduce_coalesced_async,
    reduce_scatter,
)
from hybrid_ext.comm.communicator import Communicator
from hybrid_ext.comm.consistency import CollectiveMismatchError, set_check
from hybrid_ext.comm.executor import OPS, SUPPORTED_DTYPES
from hybrid_ext.comm.ordering import Handle
from hybrid_ext.comm.registry import communicator
from hybrid_ext.comm.transports.contract import PeerError, Transport

__all__ = [
    "OPS",
    "SUPPORTED_DTYPES",
    "CollectiveMismatchError",
    "Communicator",
    "Handle",
    "PeerError",
    "Transport",
    "allgather",
    "allreduce",
    "allreduce_async",
    "allreduce_coalesced",
    "allreduce_coalesced_async",
    "communicator",
    "metrics",
    "reduce_scatter",
    "set_check",
]
