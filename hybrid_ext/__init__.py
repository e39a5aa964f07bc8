"""hybrid-ext: butterfly reduction and hybrid parallelism (data-parallel conv layers, model-parallel FC layers).

The core imports only torch; Horovod, DeepSpeed and torchvision are imported by the modules that need them.
Importing hybrid_ext registers the ``butterfly`` torch.distributed backend.

Layers, one package each: :mod:`hybrid_ext.comm` (schedules, transports, collectives), :mod:`hybrid_ext.parallel`
(the partitioner), ``hybrid_ext.integrations`` (Horovod, DeepSpeed, torch.distributed adapters),
:mod:`hybrid_ext.train` (the training loop the demo and recipes share), :mod:`hybrid_ext.bench`,
:mod:`hybrid_ext.launch` (starting ranks) and :mod:`hybrid_ext.tools`.
"""


def _load_integrations_from_checkout() -> None:
    """Make ``hybrid_ext.integrations`` importable when running from a source checkout.

    setup.py installs the top-level ``integrations/`` as ``hybrid_ext.integrations``; in a checkout (say,
    ``python -m hybrid_ext`` from the repository root, which puts the source tree first on sys.path) it is
    beside this package instead, so load it from there under its installed name.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("hybrid_ext.integrations") is not None:
        return
    beside = Path(__file__).resolve().parent.parent / "integrations"
    spec = importlib.util.spec_from_file_location(
        "hybrid_ext.integrations", beside / "__init__.py", submodule_search_locations=[str(beside)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"hybrid_ext.integrations is neither installed nor at {beside}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_integrations_from_checkout()

# ruff: noqa: E402 - the imports below need the integrations found first
from hybrid_ext.comm import (
    CollectiveMismatchError,
    Handle,
    PeerError,
    Transport,
    allgather,
    allreduce,
    allreduce_async,
    allreduce_coalesced,
    allreduce_coalesced_async,
    metrics,
    reduce_scatter,
    set_check,
)
from hybrid_ext.integrations.torch import register_backend  # importing it registers "butterfly"
from hybrid_ext.parallel import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    parallelize,
)
from hybrid_ext.parallel.nonfinite import NonFiniteGuard
from hybrid_ext.version import __version__

del register_backend

__all__ = [
    "CollectiveMismatchError",
    "Handle",
    "NonFiniteGuard",
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
