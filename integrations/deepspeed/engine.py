"""Start DeepSpeed on the butterfly, and put hybrid-ext's partitioner inside a DeepSpeed engine.

The backend: DeepSpeed 0.19 has no registry of communication backends;
``deepspeed.init_distributed(dist_backend=name)`` builds its ``TorchBackend`` over
``torch.distributed.init_process_group(name)``. hybrid-ext registers a torch.distributed backend named
``butterfly`` (all_reduce through the butterfly, everything else through an inner gloo / NCCL group), so
passing that name is all it takes, and every ``deepspeed.comm`` call keeps working. On such a group the
engine's gradient buckets are reduced by hybrid-ext itself, copies included (:mod:`.grad_reduction`).

One private DeepSpeed name is touched, listed in :data:`DEEPSPEED_PRIVATE` and pinned by
``tests/launchers/test_deepspeed.py``: :func:`initialize` resets the module global ``deepspeed.utils.groups.mpu``
before a dp engine (DeepSpeed keeps the last engine's mpu there and its group getters read it).

The partitioner (Megatron-LM's way): DeepSpeed averages every gradient over its ``mpu``'s data-parallel group
(dp = world / mp ranks), and ZeRO-1/2 partition over it. :func:`parallelize_for_deepspeed` leaves that to
DeepSpeed (``parallelize(..., host_reduces_data_parallel=True)``) and prepares the gradients for it:

- replicated (conv) gradients are averaged over the model-parallel group first — its ranks saw different
  micro-batches — so that DeepSpeed's average over dp completes the average over all W ranks;
- FC-shard gradients (each already the sum over its model-parallel group's losses) are scaled by 1/mp, so
  that DeepSpeed's average over the dp replicas gives their sum / W, as the partitioner defines it.

When that happens matters. At ZeRO-0 DeepSpeed reduces after ``loss.backward()`` returns, so hybrid-ext's
bucketed reduction (finished by an end-of-backward callback inside ``loss.backward()``) is done first. ZeRO-1/2
register a post-accumulate-grad hook on every parameter (``create_gradient_handling_hooks`` in
``runtime/zero/stage_1_and_2.py``); ZeRO-2 (and ZeRO-1 with ``overlap_comm``) copy the gradient into their own
buckets right there, during backward, and even at plain ZeRO-1 a direct ``loss.backward()`` runs DeepSpeed's
reduction from a callback queued by its first hook — possibly before hybrid-ext's. With the bucketed
reduction the two would race, and DeepSpeed could read a gradient before hybrid-ext has pre-reduced it. So from
ZeRO-1 on the pre-reduction is *blocking and per parameter, in a tensor hook* (``blocking_reduction=True``):
tensor hooks run before ``AccumulateGrad``, hence before any post-accumulate-grad hook of that parameter,
whichever was registered first (``tests/launchers/test_deepspeed.py`` compares ZeRO-1 and -2 with the reference).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from hybrid_ext.config import set_for_process
from hybrid_ext.integrations.deepspeed import grad_reduction
from hybrid_ext.integrations.deepspeed.batch import batch_settings_for_hybrid, sample_loader
from hybrid_ext.integrations.deepspeed.config import SECTION, HybridSection, split_config
from hybrid_ext.integrations.deepspeed.mpu import GridMPU, mark_model_parallel
from hybrid_ext.parallel.api import GRAD_ALGORITHMS, ParallelModel, parallelize
from hybrid_ext.parallel.dims import Groups, ParallelDims, torch_groups

BUTTERFLY_BACKEND = "butterfly"

# Private DeepSpeed names this module touches (module -> names); tests pin that they still exist and are read.
DEEPSPEED_PRIVATE = {"deepspeed.utils.groups": ("mpu",)}


def backend_for(grad_algorithm: str) -> str | None:
    """The torch.distributed backend for a gradient algorithm: ``butterfly``, or None (DeepSpeed's own)."""
    if grad_algorithm not in GRAD_ALGORITHMS:
        raise ValueError(f"unknown reducer {grad_algorithm!r}; choose one of {', '.join(GRAD_ALGORITHMS)}")
    return None if grad_algorithm == "native" else BUTTERFLY_BACKEND


def init_distributed(reducer: str = "butterfly", **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` on the butterfly: the one line that switches a DeepSpeed job's allreduce.

    Args:
        reducer (str): ``"butterfly"`` (default), ``"rabenseifner"``, ``"recursive_doubling"`` or ``"ring"`` run
            the ``butterfly`` backend with that algorithm (``HYBRID_EXT_ALGO`` set for this process in
            :mod:`hybrid_ext.config`, which the backend reads at every call); ``"auto"`` lets the cost model choose
            per message (or ``HYBRID_EXT_ALGO``, if set); ``"native"`` is DeepSpeed's own backend for the
            accelerator (gloo on CPU, NCCL on CUDA).
        **kwargs: passed to ``deepspeed.init_distributed`` (``timeout``, ``init_method``, ...).

    Raises:
        ValueError: an unknown ``reducer``.
        TypeError: ``dist_backend`` was passed (``reducer`` chooses it).
    """
    if "dist_backend" in kwargs:
        raise TypeError("init_distributed() chooses dist_backend from reducer=; do not pass dist_backend")
    backend = backend_for(reducer)
    import deepspeed

    if backend == BUTTERFLY_BACKEND:  # registered when hybrid_ext (this module's package) was imported
        if reducer != "auto":
            set_for_process(HYBRID_EXT_ALGO=reducer)
        grad_reduction.install()  # the engine's gradient buckets reduced by hybrid-ext, copies included
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


def parallelize_for_deepspeed(
    model: nn.Module,
    strategy: str = "hybrid",
    reducer: str = "butterfly",
    mp_size: int | None = None,
    zero_stage: int = 0,
    groups: Groups | None = None,
    **parallelize_kwargs: Any,
) -> tuple[ParallelModel, GridMPU]:
    """Shard ``model`` for a DeepSpeed engine; returns the model and the ``mpu`` to hand ``deepspeed.initialize``.

    See the module docstring for how the gradients are split between hybrid-ext and DeepSpeed, and why ZeRO >= 1
    makes the pre-reduction blocking.

    Args:
        model (nn.Module): the model, as for :func:`hybrid_ext.parallelize`.
        strategy (str): ``"hybrid"`` (default), ``"dp"`` or ``"mp"``. Under ``dp`` the grid has mp = 1 (DeepSpeed
            does everything).
        reducer (str): the algorithm of hybrid-ext's part of the gradient reduction, as for ``parallelize``.
        mp_size (int or None): ranks per model-parallel group under ``mp`` and ``hybrid`` (default: all ranks).
        zero_stage (int): the ds_config's ZeRO stage (0, 1 or 2; 3 only under ``dp``).
        groups (Groups or None): the grid; default: built over torch.distributed's default group.
        **parallelize_kwargs: passed to :func:`hybrid_ext.parallelize`.

    Returns:
        tuple[ParallelModel, GridMPU]: the sharded model and the ``mpu`` for ``deepspeed.initialize``.

    Raises:
        ValueError: a bad strategy, reducer or mp_size (named as the ds_config section's keys), or ZeRO stage 3
            with a sharding strategy.
        RuntimeError: torch.distributed is not initialized and no ``groups`` were given.
    """
    import torch.distributed as dist

    HybridSection.from_dict({"strategy": strategy, "reducer": reducer, "mp_size": mp_size})  # same checks
    if zero_stage >= 3 and strategy != "dp":
        raise ValueError(
            f"ZeRO stage {zero_stage} partitions the parameters themselves, which sharded layers do not support: "
            f'use stage 0, 1 or 2 with strategy "{strategy}"'
        )
    if groups is None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_distributed() first")
        world = dist.get_world_size()
        mp = 1 if strategy == "dp" else (world if mp_size is None else mp_size)
        try:
            dims = ParallelDims(world, mp)
        except ValueError as exc:
            raise ValueError(f'"{SECTION}.mp_size": {exc}') from None
        groups = torch_groups(dims)
    parallel = parallelize(
        model,
        strategy=strategy,
        reducer=reducer,
        groups=groups,
        host_reduces_data_parallel=True,
        blocking_reduction=zero_stage >= 1,
        **parallelize_kwargs,
    )
    mark_model_parallel(parallel, groups.dims.mp)
    return parallel, GridMPU(groups)


def zero_stage_of(ds_config: dict) -> int:
    zero = ds_config.get("zero_optimization", {})
    if isinstance(zero, bool):  # DeepSpeed's legacy form
        return int(zero)
    return int(zero.get("stage", 0))


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    config: str | dict | None = None,
    **kwargs: Any,
):
    """``deepspeed.initialize`` with the ds_config's ``"hybrid_ext"`` section applied; returns what it returns.

    Reads the ds_config (``config``: a dict or a JSON path, or ``args.deepspeed_config``), takes the section
    out (see :mod:`.config`), starts torch.distributed on the section's reducer if nothing has started it yet,
    shards the model (``mp`` / ``hybrid``; under ``dp`` the model is passed on unchanged, with no ``mpu``), and
    calls ``deepspeed.initialize(..., mpu=...)``. DeepSpeed's own settings — ZeRO, fp16/bf16,
    ``gradient_predivide_factor``, ``communication_data_type``, ``comms_logger`` — keep their meaning.

    Under hybrid, ``train_batch_size`` and ``training_data=`` keep their DeepSpeed meaning — one global batch over
    all ranks, every rank its own samples (conv layers are data-parallel over all of them): see :mod:`.batch`.

    Args:
        args: DeepSpeed's ``args``; its ``deepspeed_config`` is read when ``config`` is None.
        model (nn.Module or ParallelModel): the model, or one built by :func:`parallelize_for_deepspeed` (the
            section's strategy is then ignored).
        optimizer: a client optimizer, which must be built on the *sharded* model's parameters: pass a callable
            (``lambda params: torch.optim.Adam(params)``), which DeepSpeed calls with them. Default: the
            ds_config's.
        model_parameters: as for ``deepspeed.initialize`` (default: the sharded model's parameters).
        config (str, dict or None): the ds_config, a dict or a JSON path.
        **kwargs: passed to ``deepspeed.initialize``.

    Returns:
        tuple: what ``deepspeed.initialize`` returns — ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Raises:
        ValueError: no model, no ds_config or two of them, a bad ``"hybrid_ext"`` section, or a
            :class:`ParallelModel` that reduces over the data-parallel group itself (DeepSpeed would reduce again).
        TypeError: ``mpu`` was passed (the section builds it).
    """
    import deepspeed
    import torch.distributed as dist

    if model is None:
        raise ValueError("initialize() needs a model")
    if "mpu" in kwargs:
        raise TypeError("initialize() builds the mpu from the hybrid_ext section; do not pass mpu")
    ds_config, given = split_config(config if config is not None else kwargs.pop("config_params", None), args)
    section = given or HybridSection()
    if getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # the config now travels as a dict
    if not dist.is_initialized():
        init_distributed(section.reducer)
    else:
        if given is not None:
            _warn_if_backend_differs(section.reducer)
        grad_reduction.install()  # acts only on groups that run the butterfly backend
    mpu = None
    if isinstance(model, ParallelModel):
        if not model.host_reduces_data_parallel:
            raise ValueError(
                "this ParallelModel reduces over the data-parallel group itself, and DeepSpeed would reduce "
                "again: build it with parallelize_for_deepspeed() (or parallelize(host_reduces_data_parallel=True))"
            )
        mpu = GridMPU(model.groups)
    elif section.strategy != "dp":
        model, mpu = parallelize_for_deepspeed(
            model, section.strategy, section.reducer, section.mp_size, zero_stage_of(ds_config)
        )
        if model_parameters is not None:
            model_parameters = list(model_parameters)  # a generator would be used up by the check
        _check_parameters_belong(model, model_parameters, optimizer)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    samples_over_all_ranks = isinstance(model, ParallelModel) and model.strategy == "hybrid"
    training_data = kwargs.pop("training_data", None) if samples_over_all_ranks else None
    if samples_over_all_ranks:  # DeepSpeed's batch settings and loader count every rank (see .batch)
        dims = model.groups.dims
        ds_config = batch_settings_for_hybrid(ds_config, dims.world, dims.dp)
    if mpu is None:
        # DeepSpeed keeps the last engine's mpu in a module global and reads its groups whenever it gets none:
        # a dp engine built after a hybrid one in the same process would average over the old grid's dp group.
        import deepspeed.utils.groups

        deepspeed.utils.groups.mpu = None
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        config=ds_config,
        mpu=mpu,
        **kwargs,
    )
    if training_data is not None:
        loader = sample_loader(engine, training_data, model.groups.dims.world, model.groups.rank)
        engine.training_dataloader = loader
    return engine, engine_optimizer, loader, scheduler


def _check_parameters_belong(model: nn.Module, model_parameters: Any, optimizer: Any) -> None:
    """Parameters of the unsharded model (replaced by shards) would silently never be trained: refuse them."""
    mine = {id(p) for p in model.parameters()}
    given: list[torch.Tensor] = []
    if model_parameters is not None:
        for item in model_parameters:
            given += list(item["params"]) if isinstance(item, dict) else [item]
    if isinstance(optimizer, torch.optim.Optimizer):
        given += [p for group in optimizer.param_groups for p in group["params"]]
    if any(id(p) not in mine for p in given):
        raise ValueError(
            "model_parameters / optimizer hold parameters of the unsharded model, which sharding replaced: "
            "pass model_parameters=None and an optimizer callable (lambda params: torch.optim.Adam(params)), "
            "or build them from the returned engine.module"
        )


def _warn_if_backend_differs(grad_algorithm: str) -> None:
    import torch.distributed as dist

    expected = backend_for(grad_algorithm)
    actual = dist.get_backend()
    if expected == BUTTERFLY_BACKEND and actual != BUTTERFLY_BACKEND:
        warnings.warn(
            f'the ds_config asks for reducer "{grad_algorithm}", but torch.distributed already runs on "{actual}": '
            "DeepSpeed's allreduce stays there (call hybrid_ext.integrations.deepspeed.init_distributed first)",
            stacklevel=3,
        )
    elif expected == BUTTERFLY_BACKEND and grad_algorithm != "auto":
        set_for_process(HYBRID_EXT_ALGO=grad_algorithm)
