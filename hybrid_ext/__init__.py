"""hybrid-ext: butterfly reduction and hybrid parallelism (data-parallel conv layers, model-parallel FC layers).

The core imports only torch; Horovod, DeepSpeed and torchvision are imported by the modules that need them.
Importing hybrid_ext registers the ``butterfly`` torch.distributed backend.
"""

from hybrid_ext import _checkout, metrics  # _checkout first: finds integrations/ in a source checkout
from hybrid_ext.collective import (
    Handle,
    allgather,
    allreduce,
    allreduce_async,
    allreduce_coalesced,
    allreduce_coalesced_async,
    reduce_scatter,
)
from hybrid_ext.consistency import CollectiveMismatchError, set_check
from hybrid_ext.integrations.torch import register_backend  # importing it registers "butterfly"
from hybrid_ext.parallel import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    parallelize,
)
from hybrid_ext.transport import PeerError, Transport
from hybrid_ext.version import __version__

del _checkout, register_backend

__all__ = [
    "CollectiveMismatchError",
    "Handle",
    "PeerError",
    "Transport",
    "__version__",
    "allgather",
    "allreduce",
    "allreduce_async",
    "allreduce_coalesced",
    "allreduce_coalesced_async",
    "full_optimizer_state_dict",
    "full_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "metrics",
    "parallelize",
    "reduce_scatter",
    "set_check",
]
