"""The communication core: plans, transports, and the collectives that run plans over transports.

Layers, bottom up (nothing here imports the partitioner, the integrations or the tools):

- :mod:`~hybrid_ext.comm.schedule` — pure plans: who sends which slice to whom (no processes, no tensors);
- :mod:`~hybrid_ext.comm.cost_model` — α-β-γ costs per transport; picks the algorithm for ``auto``;
- :mod:`~hybrid_ext.comm.transport` — the one contract every transport implements, with
  :mod:`~hybrid_ext.comm.shm_transport` (ranks on one host) and :mod:`~hybrid_ext.comm.torch_transport`
  (a torch.distributed process group's send/recv), and :mod:`~hybrid_ext.comm.native` (a group's own allreduce,
  which ``auto`` weighs beside the schedules);
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
from hybrid_ext.comm.transport import PeerError, Transport

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
