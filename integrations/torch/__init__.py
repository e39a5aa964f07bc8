"""torch.distributed integration: the ``butterfly`` backend and a DDP communication hook (the transport over a
process group's send/recv is part of the core: :mod:`hybrid_ext.comm.transports.torch_p2p`, re-exported here).

Importing this module registers the ``butterfly`` backend, so ``dist.init_process_group("butterfly")`` works.
"""

from hybrid_ext.comm.transports.torch_p2p import TorchTransport
from hybrid_ext.integrations.torch.backend import ButterflyProcessGroup, register_backend
from hybrid_ext.integrations.torch.comm_hook import ButterflyHookState, butterfly_hook

register_backend()

__all__ = ["ButterflyHookState", "ButterflyProcessGroup", "TorchTransport", "butterfly_hook", "register_backend"]
