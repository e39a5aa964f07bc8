"""Per-layer shapes and compute times of one training step, measured on this process's device or loaded from a file.

A *layer table* holds, for every module that is a leaf or owns parameters, the shapes of its input and output per
sample (the batch dimension left out), their element size, whether its input needs a gradient in training (then
its backward also computes the input's gradient, and a sharded layer sends that gradient), and — for leaves — its
forward and backward seconds at the micro-batch ``b`` it was profiled with, and the part of them that does not
grow with the rows (reading and writing the weights: most of a large Linear layer's time at small batches).

Measurement: one training-mode forward pass of the whole model records every layer's input; each leaf is then
timed on its own, on that input: forward, then backward of ``ones`` from its output; in rounds, every timing once
per round, one warm-up round and ``steps`` timed ones, each timing's median kept (a spell of noise then costs one
sample of several layers, which the median drops, not every sample of one). Every leaf is timed again on its input
repeated ``rows_factor`` times; the line through the two points gives its fixed part, so a step model can scale it
to the rows a strategy gives the layer (a sharded layer sees its group's gathered batch, every layer under mp the
global one). The fixed part is negative where a layer grows faster than its rows: on a CPU, large tensors outgrow
the caches, and on glibc's default heap they may come fresh from the kernel at every step, each page zeroed at
first touch (digits_alexnet's first convolution's, ReLU's and pooling's backward took 2.7–5.7× their proportional
time at 4× the rows; on the steady heap of :mod:`hybrid_ext.launch.heap`, which ``hybrid-ext plan`` profiles on,
about 1×).
A convolution a plan can split by its output channels is also timed as a copy holding half of them, and the line
through the two gives the part a shard keeps whatever its share of the channels (a quarter of a convolution's
channels takes more than a quarter of its time; a Linear's shards, timed alone, are within a few % of
proportional, and are not timed).

Timing each layer alone, rather than hooking the whole step, keeps in-place layers (``ReLU(inplace=True)``) and
autograd untouched; it leaves out what the step shares between layers: the whole model is timed too, and what it
takes beyond its leaves (residual additions, reshapes) is kept as the table's glue, its fixed part found as a leaf's
(the whole model timed again at ``rows_factor`` times the rows, where memory allows). The optimizer's update is
timed apart, per parameter element: SGD with momentum on a scratch parameter (what ``hybrid-ext bench train`` runs;
Adam's update costs a few times more); so is a strided copy (the re-layout around a gather along channels), per
byte, and the gradient reducer's own work per byte of gradient (:mod:`hybrid_ext.parallel.reducer` copies each
incoming gradient into its bucket and writes the reduced bucket back into ``.grad``: two passes over the gradient,
whatever the collective), timed on the real reducer over a group of one, on a parameter as large as the model's
largest (within :data:`BUCKET_PROBE_ELEMENTS`). Nothing is left behind: gradients, buffers (BatchNorm statistics),
random number generators and train/eval modes are as before.

A calibration file (:func:`save_calibration`) carries the table to another machine, e.g. per-layer times
measured on a GPU to plan a GPU cluster; :func:`load_calibration` refuses a file whose layers (paths, kinds,
shapes) differ from the model's, naming the first difference.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

CALIBRATION_FORMAT = 7
# Format 1 has no fixed parts, glue or optimizer time, format 2 no fixed part of the glue and no copy rate, format 3
# no reducer rate, format 4 no rate of the reducer's scaling alone, format 5 no part fixed in the channels: read as
# 0 (times ∝ rows and channels, copies free); before format 7 only leaves with parameters were timed at two batches
# and no fixed part was negative (the others read as ∝ rows).
READABLE_FORMATS = (1, 2, 3, 4, 5, 6, 7)
ROWS_FACTOR = 4  # the second micro-batch every leaf is timed at, as a multiple of the first
OPTIMIZER_PROBE_ELEMENTS = 1 << 22  # the scratch parameter the optimizer's update is timed on (at most)
COPY_PROBE_SHAPE = (16, 64, 64, 64)  # 16 MiB of float32, moved channels-first as a gather along channels does
BUCKET_PROBE_ELEMENTS = (1 << 20, 1 << 24)  # the fewest and most elements the reducer's rate is timed on (float32:
# 4 and 64 MiB; fewer would spread its fixed cost per backward, the hooks and the end-of-backward call, over bytes)


def _at_rows(measured_s: float, fixed_s: float, scale: float) -> float:
    """A time measured at some rows, of which ``fixed_s`` does not grow with them, at ``scale`` times the rows; one
    growing faster than its rows (``fixed_s`` < 0) proportional below the measured rows."""
    if fixed_s < 0.0 and scale < 1.0:
        return measured_s * scale
    return fixed_s + (measured_s - fixed_s) * scale


@dataclass(frozen=True)
class LayerRecord:
    """One layer: shapes per sample, and (leaves only) seconds at the table's micro-batch."""

    path: str
    kind: str  # the module's class name
    input_shape: tuple[int, ...]  # per sample
    output_shape: tuple[int, ...]  # per sample
    itemsize: int  # bytes per element of the output (activations and their gradients travel at this size)
    input_requires_grad: bool  # backward computes (and a sharded layer sends) the input's gradient
    leaf: bool
    forward_s: float = 0.0
    backward_s: float = 0.0
    forward_fixed_s: float = 0.0  # of forward_s, the part that does not grow with the rows (< 0: grows faster)
    backward_fixed_s: float = 0.0
    # Of forward_s / backward_s, the part a shard of a convolution's output channels takes whatever its share of
    # them (the line through the whole layer's time and a copy's with half its channels, at none).
    forward_channel_fixed_s: float = 0.0
    backward_channel_fixed_s: float = 0.0

    def seconds_at(self, rows: float, micro_batch: int) -> tuple[float, float]:
        """(forward, backward) seconds at ``rows`` rows, the table measured at ``micro_batch``: fixed + per row."""
        return (
            _at_rows(self.forward_s, self.forward_fixed_s, rows / micro_batch),
            _at_rows(self.backward_s, self.backward_fixed_s, rows / micro_batch),
        )

    def shard_share(self, style: str, fraction: float) -> tuple[float, float]:
        """(forward, backward): the share of the whole layer's time a shard of ``style`` holding ``fraction`` of
        its features takes: a channel shard the part fixed in its channels plus ``fraction`` of the rest; a Linear's
        shard ``fraction`` (a Linear split either way, timed alone, is within a few % of proportional)."""
        if fraction >= 1.0 or style != "channel":
            return fraction, fraction
        fixed = (self.forward_channel_fixed_s, self.backward_channel_fixed_s)
        return tuple(
            (f + (whole - f) * fraction) / whole if whole > 0 else fraction
            for f, whole in zip(fixed, (self.forward_s, self.backward_s), strict=True)
        )

    def shard_seconds_at(self, rows: float, micro_batch: int, style: str, fraction: float) -> tuple[float, float]:
        """(forward, backward) seconds of a shard of ``style`` holding ``fraction`` of the layer's features at
        ``rows`` rows: its share of the layer's time at those rows, where a layer that grows faster than its rows
        (a negative fixed part) does so by the size of its tensors — a shard's are the whole layer's at ``rows`` ×
        ``fraction`` rows, so its growth beyond proportional is the whole layer's there."""
        shares = self.shard_share(style, fraction)
        out = []
        for measured, fixed, share in zip(
            (self.forward_s, self.backward_s), (self.forward_fixed_s, self.backward_fixed_s), shares, strict=True
        ):
            beyond = max(0.0, -fixed * (rows * fraction / micro_batch - 1.0))  # 0 where fixed ≥ 0
            out.append(_at_rows(measured, max(fixed, 0.0), rows / micro_batch) * share + beyond)
        return out[0], out[1]

    def shape_key(self) -> tuple:
        """What must agree between a calibration file and the model it is used for."""
        return (self.path, self.kind, self.input_shape, self.output_shape, self.itemsize, self.input_requires_grad)


@dataclass
class LayerTable:
    """Every layer of a model at micro-batch ``micro_batch``, in the order the forward pass reaches them."""

    micro_batch: int
    device: str
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    optimizer_s_per_element: float = 0.0  # SGD with momentum's update, seconds per parameter element
    # The whole model's forward and backward beyond the sum of its leaves' (residual additions, reshapes, the
    # autograd bookkeeping between layers), at micro_batch.
    glue_forward_s: float = 0.0
    glue_backward_s: float = 0.0
    # Of the glue, the part that does not grow with the rows (the whole model timed at two batches, as the leaves).
    glue_forward_fixed_s: float = 0.0
    glue_backward_fixed_s: float = 0.0
    # A strided copy into a new tensor (what a gather along channels does to put the shards in place), seconds per
    # byte copied.
    copy_s_per_byte: float = 0.0
    # The gradient reducer's copies (into its bucket, back into .grad), seconds per gradient byte.
    bucket_s_per_byte: float = 0.0
    # Its scaling of a gradient no other rank holds (one pass, no bucket), seconds per gradient byte.
    scale_s_per_byte: float = 0.0

    def glue_at(self, rows: float) -> tuple[float, float]:
        """(forward, backward) seconds of the glue at ``rows`` rows: fixed + per row, as a leaf's."""
        return (
            _at_rows(self.glue_forward_s, self.glue_forward_fixed_s, rows / self.micro_batch),
            _at_rows(self.glue_backward_s, self.glue_backward_fixed_s, rows / self.micro_batch),
        )

    def compute_s(self, path: str) -> float:
        record = self.layers[path]
        return record.forward_s + record.backward_s


def _recorded_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: module
        for path, module in model.named_modules()
        if path and (not list(module.children()) or any(True for _ in module.parameters(recurse=False)))
    }


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _capture_inputs(model: nn.Module, example_input: torch.Tensor) -> tuple[dict, dict]:
    """(path -> the module's first call's (copied args, output shape per sample, output element size), the
    recorded modules); one training forward that leaves no trace."""
    calls: dict[str, tuple] = {}
    hooks = []
    for path, module in _recorded_modules(model).items():

        def record(mod, args, out, path=path):
            output = first_tensor(out)
            if path not in calls and first_tensor(args) is not None and output is not None:
                # Copies: a later in-place layer would rewrite these tensors.
                kept = tuple(a.detach().clone().requires_grad_(a.requires_grad) if _is_tensor(a) else a for a in args)
                calls[path] = (kept, tuple(output.shape[1:]), output.element_size())

        hooks.append(module.register_forward_hook(record))
    try:
        with _RestoredAfterwards(model):
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, _recorded_modules(model)


class _RestoredAfterwards:
    """Restore gradients, buffers, random number generators and modes after profiling."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        model = self.model
        self.modes = {m: m.training for m in model.modules()}
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grads = [(p, p.grad) for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        model.train()
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        for module, training in self.modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        for param, grad in self.grads:
            param.grad = grad
        return False


def first_tensor(value) -> torch.Tensor | None:
    """The first tensor in a module's output or arguments (nested in tuples and lists), or None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in (first_tensor(v) for v in value) if t is not None), None)
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_leaf_once(module: nn.Module, args: tuple) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one run of ``module`` on copies of ``args``."""
    # A fresh non-leaf copy per run: an in-place layer may write its input, and a leaf that needs a gradient may
    # not be written in place.
    fresh = []
    for a in args:
        if isinstance(a, torch.Tensor):
            copy = a.detach().clone().requires_grad_(a.requires_grad)
            fresh.append(copy.clone() if a.requires_grad else copy)
        else:
            fresh.append(a)
    device = next((a.device for a in fresh if isinstance(a, torch.Tensor)), torch.device("cpu"))
    _synchronize(device)
    began = time.perf_counter()
    out = first_tensor(module(*fresh))
    _synchronize(device)
    forwarded = time.perf_counter()
    if out is not None and out.requires_grad:
        out.backward(torch.ones_like(out))
    _synchronize(device)
    return forwarded - began, time.perf_counter() - forwarded


def _time_in_rounds(probes: dict, steps: int, optional: frozenset = frozenset()) -> dict:
    """Each probe's (forward, backward) seconds, medians of ``steps`` rounds after one warm-up round; a round runs
    every probe once, in order, so a burst of noise (another process, a page-zeroing spell) lands on one sample of
    many layers, which the median drops, rather than on every sample of one. ``probes``: key -> (module, a
    function giving its arguments, untimed); an ``optional`` probe whose run finds no device memory is left out."""
    samples: dict = {key: [] for key in probes}
    for run in range(steps + 1):
        for key, (module, arguments) in probes.items():
            if key not in samples:
                continue
            try:
                timed = _time_leaf_once(module, arguments())
            except torch.OutOfMemoryError:
                if key not in optional:
                    raise
                del samples[key]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if run:
                samples[key].append(timed)
    return {
        key: (statistics.median(f for f, _ in runs), statistics.median(b for _, b in runs))
        for key, runs in samples.items()
    }


def _half_channels(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` with half its output channels, for a convolution a plan can split by them (one group,
    zero padding, two channels or more); else None."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    if module.out_channels < 2:
        return None
    return nn.Conv2d(
        module.in_channels, module.out_channels // 2, module.kernel_size, module.stride, module.padding,
        module.dilation, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype,
    )  # fmt: skip


def _fixed_in_channels(
    out_channels: int, at_half: tuple[float, float], whole: tuple[float, float]
) -> tuple[float, float]:
    """(forward, backward) seconds of a convolution's time that a shard of its ``out_channels`` keeps whatever its
    share of them: the line through the whole layer's time and that of a copy with half its channels (``at_half``,
    :func:`_half_channels`), at none."""
    factor = out_channels / (out_channels // 2)
    # within the whole layer's time: noise may time the copy slower than the whole, and no shard takes longer
    return tuple(min(_fixed_part(h, w, factor), w) for h, w in zip(at_half, whole, strict=True))


def _repeated_rows(args: tuple, factor: int) -> tuple:
    """``args`` with every tensor's rows (dim 0) repeated ``factor`` times: the layer's input at a larger batch."""
    return tuple(
        a.detach().repeat(factor, *([1] * (a.dim() - 1))).requires_grad_(a.requires_grad)
        if isinstance(a, torch.Tensor) and a.dim() > 0
        else a
        for a in args
    )


def _fixed_part(at_one: float, at_factor: float, factor: float, superlinear: bool = False) -> float:
    """The intercept of the line through (1, ``at_one``) and (``factor``, ``at_factor``), at most ``at_one``
    (timing noise must not make a layer cheaper at more rows or channels) and at least 0 unless ``superlinear``
    (rows, where a layer may grow faster than them: a negative intercept)."""
    intercept = min((factor * at_one - at_factor) / (factor - 1), at_one)
    return intercept if superlinear else max(intercept, 0.0)


def _median_seconds(work, device: torch.device, steps: int, prepare=lambda: None) -> float:
    """The median seconds of ``work()`` over ``steps`` runs after one warm-up, each after an untimed ``prepare()``
    (whose result ``work`` gets)."""
    times = []
    for run in range(steps + 1):
        prepared = prepare()
        _synchronize(device)
        began = time.perf_counter()
        work(prepared)
        _synchronize(device)
        if run:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _time_copy(device: torch.device, steps: int) -> float:
    """Seconds per byte of a strided copy into a new tensor (median of ``steps`` after one warm-up)."""
    probe = torch.ones(COPY_PROBE_SHAPE, device=device)
    seconds = _median_seconds(lambda _: probe.movedim(1, 0).contiguous(), device, steps)
    return seconds / (probe.numel() * probe.element_size())


def _time_reducer(elements: int, device: torch.device, steps: int) -> tuple[float, float]:
    """Seconds per gradient byte the reducer adds to a backward pass (median of ``steps`` after one warm-up), through
    a bucket and where it only scales: a parameter's backward timed with it reducing over a group of one (its
    buckets' path: the scale is not 1), and with no group (``comm=None``: hybrid's FC shards at mp_size = world),
    against the same without it."""
    from hybrid_ext.comm import Communicator
    from hybrid_ext.comm.transports.loopback import LoopbackGroup, LoopbackTransport
    from hybrid_ext.parallel.reducer import GradientReducer, ReduceGroup

    fewest, most = BUCKET_PROBE_ELEMENTS
    count = max(fewest, min(elements, most))
    factor = torch.full((count,), 2.0, device=device)
    alone = Communicator(LoopbackTransport(LoopbackGroup(1), 0), device)

    def backward_s(weight: nn.Parameter) -> float:
        def loss():
            weight.grad = None  # as optimizer.zero_grad() leaves it
            return (weight * factor).sum()

        return _median_seconds(lambda value: value.backward(), device, steps, prepare=loss)

    def extra_s_per_byte(comm: Communicator | None) -> float:
        weight = nn.Parameter(torch.zeros(count, device=device))
        reducer = GradientReducer([ReduceGroup("probe", [weight], comm, "sum", 0.5)])
        try:
            reduced = backward_s(weight)
        finally:
            reducer.remove()
        return max(0.0, reduced - plain) / (count * weight.element_size())

    plain = backward_s(nn.Parameter(torch.zeros(count, device=device)))
    return extra_s_per_byte(alone), extra_s_per_byte(None)


def _time_optimizer(elements: int, device: torch.device, steps: int) -> float:
    """Seconds per parameter element of one SGD-with-momentum update (median of ``steps`` after one warm-up)."""
    count = max(1, min(elements, OPTIMIZER_PROBE_ELEMENTS))
    weight = torch.nn.Parameter(torch.zeros(count, device=device))
    weight.grad = torch.ones_like(weight)
    optimizer = torch.optim.SGD([weight], lr=0.01, momentum=0.9)
    return _median_seconds(lambda _: optimizer.step(), device, steps) / count


def profile_layers(
    model: nn.Module, example_input: torch.Tensor, steps: int = 3, rows_factor: int = ROWS_FACTOR
) -> LayerTable:
    """Shapes of every layer and the compute seconds of every leaf at micro-batch ``len(example_input)``: whole,
    and (every leaf timed again at ``rows_factor`` times the rows) the part fixed in the rows; and the
    optimizer's update per parameter element."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rows_factor < 2:
        raise ValueError(f"rows_factor must be >= 2, got {rows_factor}")
    calls, modules = _capture_inputs(model, example_input)
    table = LayerTable(int(example_input.shape[0]), str(example_input.device))
    leaf_modules = {path: m for path, m in modules.items() if path in calls and not list(m.children())}
    probes: dict = {}
    for path, module in leaf_modules.items():
        args = calls[path][0]
        probes["at", path] = (module, lambda args=args: args)
        probes["more", path] = (module, lambda args=args: _repeated_rows(args, rows_factor))
        half = _half_channels(module)
        if half is not None:
            probes["half", path] = (half, lambda args=args: args)
    probes["at", ""] = (model, lambda: (example_input,))
    # where the device has no memory for it, the glue is taken as growing with the rows
    probes["more", ""] = (model, lambda: _repeated_rows((example_input,), rows_factor))
    with _RestoredAfterwards(model):
        timed = _time_in_rounds(probes, steps, optional=frozenset({("more", "")}))
        for path, module in modules.items():
            if path not in calls:
                continue  # not called in this forward pass
            args, output_shape, itemsize = calls[path]
            first = first_tensor(args)
            leaf = path in leaf_modules
            forward_s, backward_s = timed["at", path] if leaf else (0.0, 0.0)
            forward_fixed, backward_fixed = 0.0, 0.0
            channel_fixed = (0.0, 0.0)
            if leaf:
                forward_more, backward_more = timed["more", path]
                forward_fixed = _fixed_part(forward_s, forward_more, rows_factor, superlinear=True)
                backward_fixed = _fixed_part(backward_s, backward_more, rows_factor, superlinear=True)
                if ("half", path) in timed:
                    whole = (forward_s, backward_s)
                    channel_fixed = _fixed_in_channels(module.out_channels, timed["half", path], whole)
            table.layers[path] = LayerRecord(
                path=path,
                kind=type(module).__name__,
                input_shape=tuple(first.shape[1:]),
                output_shape=output_shape,
                itemsize=itemsize,
                input_requires_grad=bool(first.requires_grad),
                leaf=leaf,
                forward_s=forward_s,
                backward_s=backward_s,
                forward_fixed_s=forward_fixed,
                backward_fixed_s=backward_fixed,
                forward_channel_fixed_s=channel_fixed[0],
                backward_channel_fixed_s=channel_fixed[1],
            )
        whole_forward, whole_backward = timed["at", ""]
        more = timed.get(("more", ""))
    leaves = [r for r in table.layers.values() if r.leaf]
    table.glue_forward_s = max(0.0, whole_forward - sum(r.forward_s for r in leaves))
    table.glue_backward_s = max(0.0, whole_backward - sum(r.backward_s for r in leaves))
    if more is not None:  # the glue at rows_factor × the rows: the whole model's beyond its leaves' (fitted) times
        rows = rows_factor * table.micro_batch
        at_more = [r.seconds_at(rows, table.micro_batch) for r in leaves]
        glue_forward_more = max(0.0, more[0] - sum(f for f, _ in at_more))
        glue_backward_more = max(0.0, more[1] - sum(b for _, b in at_more))
        table.glue_forward_fixed_s = _fixed_part(table.glue_forward_s, glue_forward_more, rows_factor)
        table.glue_backward_fixed_s = _fixed_part(table.glue_backward_s, glue_backward_more, rows_factor)
    elements = sum(p.numel() for p in model.parameters())
    table.optimizer_s_per_element = _time_optimizer(elements, example_input.device, steps) if elements else 0.0
    table.copy_s_per_byte = _time_copy(example_input.device, steps)
    largest = max((p.numel() for p in model.parameters()), default=0)
    if largest:
        table.bucket_s_per_byte, table.scale_s_per_byte = _time_reducer(largest, example_input.device, steps)
    return table


def layer_shapes(model: nn.Module, example_input: torch.Tensor) -> LayerTable:
    """The table's shapes only (no timing): what the traffic of a plan depends on."""
    calls, modules = _capture_inputs(model, example_input)
    table = LayerTable(int(example_input.shape[0]), str(example_input.device))
    for path, module in modules.items():
        if path not in calls:
            continue
        args, output_shape, itemsize = calls[path]
        first = first_tensor(args)
        table.layers[path] = LayerRecord(
            path,
            type(module).__name__,
            tuple(first.shape[1:]),
            output_shape,
            itemsize,
            bool(first.requires_grad),
            not list(module.children()),
        )
    return table


def save_calibration(table: LayerTable, path: str | Path) -> Path:
    path = Path(path)
    payload = {
        "format": CALIBRATION_FORMAT,
        "micro_batch": table.micro_batch,
        "device": table.device,
        "optimizer_s_per_element": table.optimizer_s_per_element,
        "glue_forward_s": table.glue_forward_s,
        "glue_backward_s": table.glue_backward_s,
        "glue_forward_fixed_s": table.glue_forward_fixed_s,
        "glue_backward_fixed_s": table.glue_backward_fixed_s,
        "copy_s_per_byte": table.copy_s_per_byte,
        "bucket_s_per_byte": table.bucket_s_per_byte,
        "scale_s_per_byte": table.scale_s_per_byte,
        "layers": [asdict(record) for record in table.layers.values()],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_calibration(path: str | Path, model: nn.Module, example_input: torch.Tensor) -> LayerTable:
    """The table saved in ``path``, checked against ``model`` on ``example_input`` (same layers and shapes)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format {payload.get('format')!r}, expected one of {READABLE_FORMATS}")
        records = [
            LayerRecord(**{**r, "input_shape": tuple(r["input_shape"]), "output_shape": tuple(r["output_shape"])})
            for r in payload["layers"]
        ]
        table = LayerTable(
            int(payload["micro_batch"]),
            str(payload["device"]),
            {r.path: r for r in records},
            float(payload.get("optimizer_s_per_element", 0.0)),
            float(payload.get("glue_forward_s", 0.0)),
            float(payload.get("glue_backward_s", 0.0)),
            float(payload.get("glue_forward_fixed_s", 0.0)),
            float(payload.get("glue_backward_fixed_s", 0.0)),
            float(payload.get("copy_s_per_byte", 0.0)),
            float(payload.get("bucket_s_per_byte", 0.0)),
            float(payload.get("scale_s_per_byte", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a hybrid-ext layer calibration: {exc}; write one with "
            "hybrid_ext.parallel.layer_profile.save_calibration"
        ) from None
    expected = layer_shapes(model, example_input[:1])
    _check_same_layers(path, table, expected)
    return table


def _check_same_layers(path: Path, table: LayerTable, expected: LayerTable) -> None:
    """Raise naming the first layer where the file and the model differ."""
    names = ("path", "kind", "input shape", "output shape", "element size", "input needs a gradient")
    for saved, own in zip(table.layers.values(), expected.layers.values()):
        for name, a, b in zip(names, saved.shape_key(), own.shape_key()):
            if a != b:
                raise ValueError(
                    f"calibration {str(path)!r} is for another model: layer {own.path!r} has {name} {b!r} here, "
                    f"{a!r} in the file (layer {saved.path!r}); profile this model again"
                )
    if len(table.layers) != len(expected.layers):
        longer, shorter = (table, expected) if len(table.layers) > len(expected.layers) else (expected, table)
        extra = list(longer.layers)[len(shorter.layers)]
        where = "only in the file" if longer is table else "only in the model"
        raise ValueError(
            f"calibration {str(path)!r} is for another model: {len(table.layers)} layers in the file, "
            f"{len(expected.layers)} in the model (first {where}: {extra!r}); profile this model again"
        )
