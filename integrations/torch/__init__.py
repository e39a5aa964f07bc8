"""torch.distributed integration: a transport, the ``butterfly`` backend, and a DDP communication hook.

Importing this module registers the ``butterfly`` backend, so ``dist.init_process_group("butterfly")`` works.
"""

from hybrid_ext.integrations.torch.backend import ButterflyProcessGroup, register_backend
from hybrid_ext.integrations.torch.comm_hook import ButterflyHookState, butterfly_hook
from hybrid_ext.integrations.torch.transport import TorchTransport

register_backend()

__all__ = ["ButterflyHookState", "ButterflyProcessGroup", "TorchTransport", "butterfly_hook", "register_backend"]
