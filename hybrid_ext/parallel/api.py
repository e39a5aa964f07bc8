"""``hybrid_ext.parallelize``: one call that switches a model to dp, mp or hybrid parallelism.

    model = hybrid_ext.parallelize(model, strategy="hybrid", reducer="butterfly")
    loss_fn(model(my_micro_batch), my_targets).backward()   # gradients reduced during backward
    optimizer.step()

- ``dp``: every layer replicated; gradients averaged over all ranks (data parallelism only).
- ``mp``: every rank passes the same global batch; Linear layers split by features, Conv2d by output channels;
  no gradient all-reduce (model parallelism alone).
- ``hybrid``: conv and other parameter-light layers data-parallel, Linear layers model-parallel over groups of
  ``mp_size`` ranks (default: all), replicated across world/mp_size such groups; a convolution a rule marks
  ``"mp"`` (or ``auto`` chooses) is split by output channels over the group as well.

``reducer`` picks the gradient all-reduce: ``butterfly`` (or ``auto``), ``rabenseifner``,
``recursive_doubling``, ``ring``, or ``native`` (the host framework's own). The plan is printable before
anything is sharded: ``print(hybrid_ext.parallel.make_plan(model, "hybrid"))``.

With ``host_reduces_data_parallel=True`` a host framework that averages every gradient over its data-parallel
group itself (DeepSpeed, given the grid's groups as its ``mpu``) does that part: hybrid-ext then averages
replicated (conv) gradients over the model-parallel group only and scales the shards' gradients by 1/mp_size, so
that the host's average over the dp = world/mp_size replicas completes them — avg over mp, then over dp, is the
average over all ranks; (Σ over the group's ranks / mp_size) averaged over dp is the sum over the shard's
replicas / world, as below.

Training modes (DDP's contract; see :mod:`hybrid_ext.parallel.reducer`): gradient accumulation over several
backward passes (each pass reduces its own contribution) and ``with model.no_sync():`` (no communication; the
next backward reduces everything accumulated). Buckets are reduced in the same order on every rank.

Dropout inside a sharded FC chain draws its own mask on every shard. BatchNorm layers are data-parallel: their
batch statistics are those of each rank's micro-batch, as under DDP, and their running statistics are made
identical on every replica after each training forward (``broadcast_buffers``, see
:mod:`hybrid_ext.parallel.replicated_buffers`). ``nn.SyncBatchNorm`` layers compute their statistics over the
ranks that hold different samples (:mod:`hybrid_ext.parallel.sync_batchnorm`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch
from torch import nn

from hybrid_ext.comm import Communicator, metrics
from hybrid_ext.parallel import clip_grad, optimizers, replicas, shards
from hybrid_ext.parallel import plan as plan_module
from hybrid_ext.parallel.dims import Groups, ParallelDims, torch_groups
from hybrid_ext.parallel.layers import BatchSplit, ChannelParallelConv2d, ColumnParallelLinear, RowParallelLinear
from hybrid_ext.parallel.reducer import GRAD_ALGORITHMS, GradientReducer, ReduceGroup
from hybrid_ext.parallel.replicated_buffers import (
    broadcast_from_first,
    replace_buffers_with_first_ranks,
    syncable_buffers,
)
from hybrid_ext.parallel.sync_batchnorm import convert_sync_batchnorm


class ParallelModel(nn.Module):
    """The model with its layers sharded or replicated per the plan; used like the original."""

    def __init__(
        self,
        module: nn.Module,
        plan: plan_module.PartitionPlan,
        groups: Groups,
        reducer: GradientReducer,
        host_reduces_data_parallel: bool = False,
        broadcast_buffers: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.groups = groups
        self.reducer = reducer
        self.strategy = plan.strategy
        self.host_reduces_data_parallel = host_reduces_data_parallel
        """True: the host framework averages gradients over the data-parallel group (see :func:`parallelize`)."""
        # Under mp every rank sees the same batch, so its buffers never differ.
        self.broadcast_buffers = broadcast_buffers and plan.strategy != "mp"
        """Make buffers (BatchNorm statistics) identical on every replica after each training forward."""

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        syncing = torch.is_grad_enabled() and self.reducer.sync_enabled
        if self.broadcast_buffers and self.training and syncing:
            replace_buffers_with_first_ranks(self.module, self.groups.world)
        return _arm_on_backward(out, self.reducer) if syncing and self.reducer.buckets else out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """As DDP's: backward passes inside communicate nothing; the first one after it reduces everything
        accumulated. Buffers are not broadcast inside either. Run the forward inside too."""
        with self.reducer.no_sync():
            yield

    def sync(self) -> None:
        """Finish the gradient reduction now (it also finishes by itself at the end of backward)."""
        self.reducer.finish()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """Clip every gradient by the norm of the whole model's gradient, shards included (FSDP's method; see
        :mod:`hybrid_ext.parallel.clip_grad`). Returns that norm, the same on every rank. Every rank calls it."""
        return clip_grad.clip_grad_norm_(self.parameters(), max_norm, norm_type, error_if_nonfinite)

    def check_replicas(self) -> None:
        """Raise :class:`~hybrid_ext.parallel.replicas.ReplicaDivergenceError` naming the first parameter whose
        replicas differ: whole parameters over all ranks, shards over their data-parallel group. Every rank calls
        it (check mode does, after optimizer steps)."""
        whole, sharded = replicas.split_parameters(self.module)
        replicas.check(whole, self.groups.world, "world")
        replicas.check(sharded, self.groups.dp, "data-parallel")

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state dict with its own shards, no communication (see
        :func:`~hybrid_ext.parallel.shards.sharded_state_dicts`); load it with :meth:`load_sharded_state_dict`."""
        with shards.sharded_state_dicts():
            return self.state_dict()

    def load_sharded_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        with shards.sharded_state_dicts():
            return self.load_state_dict(state, strict=strict)

    def __deepcopy__(self, memo: dict) -> ParallelModel:
        # A copy (an EMA's, say) computes with the same groups; gradients reduce through the original only.
        memo[id(self.groups)] = self.groups
        memo[id(self.reducer)] = GradientReducer([])
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def extra_repr(self) -> str:
        dims = self.groups.dims
        return f"strategy={self.strategy}, world={dims.world}, mp_size={dims.mp}, dp={dims.dp}"


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _model_device(model: nn.Module) -> torch.device:
    """The one device the model lives on (its parameters and buffers); a clear error if it spans several."""
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise ValueError(f"the model's parameters are on several devices {sorted(map(str, devices))}; move it to one")
    return devices.pop() if devices else torch.device("cpu")


def _check_devices(model: nn.Module, world: Communicator) -> torch.device:
    device = _model_device(model)
    kinds = world.row_counts({"cpu": 0, "cuda": 1}.get(device.type, 2), device="cpu", name="model device types")
    if len(set(kinds)) > 1:
        names = {0: "cpu", 1: "cuda", 2: "other"}
        raise ValueError(f"the model is not on the same device type on every rank: {[names[k] for k in kinds]}")
    return device


class _ArmReducer(torch.autograd.Function):
    """Identity; its backward makes sure the reducer's end-of-backward work runs even on a rank where no
    reduced parameter gets a gradient (DDP's ``_DDPSink`` plays this part)."""

    @staticmethod
    def forward(ctx, reducer: GradientReducer, x: torch.Tensor):
        ctx.reducer = reducer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.reducer.arm()
        return None, grad


def _arm_on_backward(out, reducer: GradientReducer):
    if isinstance(out, torch.Tensor):
        return _ArmReducer.apply(reducer, out) if out.requires_grad else out
    if isinstance(out, tuple | list):
        return type(out)(_arm_on_backward(o, reducer) for o in out)
    if isinstance(out, dict):
        return {k: _arm_on_backward(v, reducer) for k, v in out.items()}
    return out


def parallelize(
    model: nn.Module,
    strategy: str = "hybrid",
    reducer: str = "butterfly",
    mp_size: int | None = None,
    rules: dict[str, str] | None = None,
    groups: Groups | None = None,
    bucket_mb: float = 25.0,
    sync_initial_weights: bool = True,
    example_input: torch.Tensor | None = None,
    host_reduces_data_parallel: bool = False,
    blocking_reduction: bool = False,
    broadcast_buffers: bool = True,
    auto_strategies: tuple[str, ...] = ("dp", "hybrid"),
) -> ParallelModel:
    """Shard or replicate ``model``'s layers across the ranks (see the module docstring) and return it wrapped.

    Every rank calls it, with the same model. Parameters keep their objects (sharded ones hold their shard), so an
    optimizer built before the wrap keeps working; ``.module`` is the model itself.

    Args:
        model (nn.Module): the model, on one device (CPU or one CUDA device per rank).
        strategy (str): ``"hybrid"`` (default: conv layers data-parallel, Linear layers model-parallel), ``"dp"``,
            ``"mp"``, or ``"auto"`` (needs ``example_input``, a micro-batch as each rank passes it): each Linear
            chain sharded or replicated, convolutions split by channels where that pays, and ``mp_size`` (if not
            given), chosen for the least step predicted from
            the layers profiled on every rank (see :mod:`hybrid_ext.parallel.auto_plan`; only as good as those
            predictions).
        reducer (str): the gradient all-reduce: ``"butterfly"`` (default) or ``"auto"``, ``"rabenseifner"``,
            ``"recursive_doubling"``, ``"ring"``, or ``"native"`` (the host framework's own allreduce).
        mp_size (int or None): ranks in each model-parallel group (default: all ranks).
        rules (dict or None): module path pattern (``fnmatch``) → style, overriding the plan's choice for the
            modules it matches (see :func:`hybrid_ext.parallel.plan.plan_by_rules`).
        groups (Groups or None): the process grid; default: built from torch.distributed's default group (call
            ``init_process_group`` first). The Horovod and DeepSpeed integrations pass their own.
        bucket_mb (float): gradient bucket size in MiB (default 25, as DDP's ``bucket_cap_mb``).
        sync_initial_weights (bool): broadcast the first rank's parameters and buffers first (default True).
        example_input (torch.Tensor or None): lets the plan measure parameters per FLOP (see
            :func:`hybrid_ext.parallel.plan.plan_by_rules`); needed by ``strategy="auto"``.
        host_reduces_data_parallel (bool): leave the reduction over the data-parallel group to the host framework
            (see the module docstring).
        blocking_reduction (bool): reduce each parameter's gradient on its own, before it is accumulated into
            ``.grad`` — for hosts that read gradients in their own per-parameter hooks during backward (DeepSpeed
            ZeRO-2); see :mod:`hybrid_ext.parallel.reducer`.
        broadcast_buffers (bool): make buffers (BatchNorm running statistics) identical on every replica after each
            training forward, from the first rank (DDP's option of that name; see
            :mod:`hybrid_ext.parallel.replicated_buffers`). Default True.
        auto_strategies (tuple of str): what ``strategy="auto"`` weighs: ``("dp", "hybrid")`` (default; every
            rank passes its own micro-batch), or with ``"mp"`` where the script passes every rank the same global
            batch when ``model.plan.strategy == "mp"`` (decide the batch after the wrap).

    Returns:
        ParallelModel: the wrapped model; gradients are reduced during ``backward`` (``no_sync()`` as DDP's).

    Raises:
        ValueError: an unknown ``strategy``, ``reducer`` or rule style; a rule that matches no module; an
            ``mp_size`` that is not a positive integer, does not divide the world size or disagrees with
            ``groups``; a layer the plan cannot shard; parameters on several devices, or on different device types
            on different ranks.
        RuntimeError: torch.distributed is not initialized and no ``groups`` were given.
    """
    if reducer not in GRAD_ALGORITHMS:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {', '.join(GRAD_ALGORITHMS)}")
    if mp_size is not None and (isinstance(mp_size, bool) or not isinstance(mp_size, int) or mp_size < 1):
        raise ValueError(f"mp_size must be a positive integer (or None: all ranks), got {mp_size!r}")
    if strategy == "auto":  # the plan with the least predicted step, agreed by every rank (see auto_plan)
        from hybrid_ext.parallel import auto_plan

        plan = auto_plan.plan_on_ranks(
            model, example_input, groups, mp_size, rules, reducer, int(bucket_mb * (1 << 20)), auto_strategies
        )
        strategy = plan.strategy
        mp_size = plan.mp_size if groups is None else None
    else:
        plan = plan_module.plan_by_rules(model, strategy, rules, example_input)
    if groups is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first, or pass groups")
        from hybrid_ext.comm import communicator

        world = dist.get_world_size()
        dims = ParallelDims(world, world if mp_size is None else mp_size)
        plan_module.check_shardable(model, plan, dims.mp)  # before any collective
        # Ranks compare device kinds over the default group's CPU communicator: communicators of different devices
        # (what the groups below would give ranks that disagree) could not meet.
        device = _check_devices(model, communicator(None, torch.device("cpu")))
        # Communicators follow the parameters' device; a plan that splits nothing needs no model-parallel group.
        groups = torch_groups(dims, device, own_mp=any(style != "dp" for style in plan.styles.values()))
    else:
        if mp_size is not None and mp_size != groups.dims.mp:
            raise ValueError(f"mp_size={mp_size} disagrees with the groups given (mp={groups.dims.mp})")
        plan_module.check_shardable(model, plan, groups.dims.mp)  # before any collective
        _check_devices(model, groups.world)
    if sync_initial_weights:
        initial = [t for t in [*model.parameters(), *syncable_buffers(model)] if t.dtype.is_floating_point]
        broadcast_from_first(initial, groups.world, piece_bytes=int(bucket_mb * (1 << 20)))

    # Statistics over the ranks that hold different samples: all of them, except under mp (the same batch).
    before = dict(model.named_parameters())
    convert_sync_batchnorm(model, None if strategy == "mp" else groups.world)
    split = BatchSplit()
    sharded: set[int] = set()
    modules = dict(model.named_modules())
    for path, style in plan.styles.items():
        module = modules[path]
        if style in ("column", "column_last"):
            new = ColumnParallelLinear(module, groups.mp, split, strategy, last=style == "column_last")
        elif style == "row":
            new = RowParallelLinear(module, groups.mp, split, strategy)
        elif style == "channel":
            new = ChannelParallelConv2d(module, groups.mp, split, strategy)
        else:
            continue
        _set_submodule(model, path, new)
        sharded.update(
            id(p) for p in (new.weight, getattr(new, "bias", None)) if p is not None and hasattr(p, "shard_dim")
        )

    _retire_dropped(before, model)
    replicated = [p for p in model.parameters() if id(p) not in sharded]
    shard_params = [p for p in model.parameters() if id(p) in sharded]
    algorithm = "butterfly" if reducer in ("butterfly", "auto") else reducer
    native = (groups.native or _torch_native_allreduce(groups)) if reducer == "native" else None
    world = groups.dims.world
    if strategy == "mp":
        reduce_groups: list[ReduceGroup] = []  # every rank computes the same loss: nothing to combine
    elif host_reduces_data_parallel:  # the host then averages everything over dp = world / mp ranks
        reduce_groups = [
            ReduceGroup("replicated", replicated, groups.mp, "avg", 1.0, algorithm, native and native("mp")),
            ReduceGroup("fc-shards", shard_params, None, "sum", 1.0 / groups.dims.mp, algorithm),
        ]
    elif strategy == "dp":
        reduce_groups = [
            ReduceGroup("replicated", replicated, groups.world, "avg", 1.0, algorithm, native and native("world"))
        ]
    else:
        # A shard no other rank holds (mp_size = world) is only scaled: no bucket, no copy through one.
        shard_replicas = groups.dp if groups.dims.dp > 1 else None
        shard_native = native("dp") if native and shard_replicas is not None else None
        reduce_groups = [
            ReduceGroup("replicated", replicated, groups.world, "avg", 1.0, algorithm, native and native("world")),
            ReduceGroup("fc-shards", shard_params, shard_replicas, "sum", 1.0 / world, algorithm, shard_native),
        ]
    grad_reducer = GradientReducer(
        reduce_groups,
        bucket_bytes=int(bucket_mb * (1 << 20)),
        blocking=blocking_reduction,
        parameter_order=list(model.parameters()),
    )
    for param in model.parameters():  # host frameworks' optimizers must not reduce these again (see Horovod's)
        param.reduced_by_hybrid_ext = True
    optimizers.install()
    if shard_params:
        clip_grad.route_torch_clip_grad_norm()
        model.register_state_dict_pre_hook(replicas.check_before_state_dict)
    parallel = ParallelModel(model, plan, groups, grad_reducer, host_reduces_data_parallel, broadcast_buffers)
    optimizers.watch(parallel)
    return parallel


def _retire_dropped(before: dict[str, nn.Parameter], model: nn.Module) -> None:
    """Mark parameters the model no longer holds, so an optimizer built before the wrap that steps them fails."""
    kept = {id(p) for p in model.parameters()}
    for name, param in before.items():
        if id(param) not in kept:
            param.retired_by_hybrid_ext = name


def _torch_native_allreduce(groups: Groups):
    """torch.distributed's allreduce over one of the groups, as a handle (reducer="native")."""
    import torch.distributed as dist

    from hybrid_ext.comm import Handle

    def for_group(kind: str):
        group = groups.handles[kind]

        def reduce(tensors: list[torch.Tensor], op: str) -> Handle:
            import concurrent.futures

            # The reducer hands one flat bucket: reduced in place (a copy of it would allocate and fault in pages).
            alone = len(tensors) == 1 and tensors[0].is_contiguous()
            flat = tensors[0].view(-1) if alone else torch.cat([t.reshape(-1) for t in tensors])
            size = dist.get_world_size(group)
            start = time.perf_counter()
            work = dist.all_reduce(flat, group=group, async_op=True)
            future: concurrent.futures.Future = concurrent.futures.Future()

            def finish(_):
                metrics.record_native_allreduce(
                    dist.get_backend(group), groups.rank, size, flat, time.perf_counter() - start
                )
                if not alone:
                    offset = 0
                    for t in tensors:
                        t.copy_(flat[offset : offset + t.numel()].view_as(t))
                        offset += t.numel()
                if op == "avg":
                    for t in tensors:
                        t.div_(size)
                future.set_result(tensors)

            work.get_future().then(finish)
            return Handle(future)

        return reduce

    return for_group
