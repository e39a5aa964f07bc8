"""hybrid-ext: butterfly reduction and hybrid parallelism (data-parallel conv layers, model-parallel FC layers).

The core imports only torch; Horovod, DeepSpeed and torchvision are imported by the modules that need them.
"""

from hybrid_ext.version import __version__

__all__ = ["__version__"]
