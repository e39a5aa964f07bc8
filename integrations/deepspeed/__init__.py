"""DeepSpeed integration: the butterfly as DeepSpeed's allreduce, and hybrid parallelism inside a DeepSpeed engine.

One line switches a DeepSpeed job's allreduce (``deepspeed.comm`` and the engine's gradient reduction alike)::

    from hybrid_ext.integrations import deepspeed as hx_deepspeed

    hx_deepspeed.init_distributed(reducer="butterfly")  # instead of deepspeed.init_distributed()

and a ``"hybrid_ext"`` section in the ds_config picks the strategy::

    "hybrid_ext": {"reducer": "butterfly", "strategy": "hybrid", "mp_size": 2}

    engine, optimizer, _, _ = hx_deepspeed.initialize(args=args, model=model, config="ds_config.json")

See :mod:`.engine` for how the work is split between hybrid-ext and DeepSpeed at each ZeRO stage.
"""

from hybrid_ext.integrations.deepspeed.config import SECTION, HybridSection, split_config
from hybrid_ext.integrations.deepspeed.engine import init_distributed, initialize, parallelize_for_deepspeed
from hybrid_ext.integrations.deepspeed.mpu import GridMPU

__all__ = [
    "SECTION",
    "GridMPU",
    "HybridSection",
    "init_distributed",
    "initialize",
    "parallelize_for_deepspeed",
    "split_config",
]
