"""Horovod integration: ``hvd.Butterfly`` and the partitioner under ``horovodrun``.

import horovod.torch as hvd
import hybrid_ext.integrations.horovod as hxh

hvd.init()
hxh.register()  # hvd.Butterfly (average) and hvd.ButterflySum next to hvd.Average / hvd.Sum
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Butterfly)

# or hybrid parallelism (conv data-parallel, FC model-parallel) over Horovod's ranks:
model = hybrid_ext.parallelize(model, strategy="hybrid", reducer="butterfly", groups=hxh.horovod_groups())
"""

from hybrid_ext.integrations.horovod.groups import horovod_groups
from hybrid_ext.integrations.horovod.op import Butterfly, ButterflyHandle, ButterflyOp, ButterflySum, register
from hybrid_ext.integrations.horovod.session import reset
from hybrid_ext.integrations.horovod.transport import (
    HorovodAlltoallTransport,
    communicator_for,
    process_set_for,
    side_channel,
)

__all__ = [
    "Butterfly",
    "ButterflyHandle",
    "ButterflyOp",
    "ButterflySum",
    "HorovodAlltoallTransport",
    "communicator_for",
    "horovod_groups",
    "process_set_for",
    "register",
    "reset",
    "side_channel",
]
