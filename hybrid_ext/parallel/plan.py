"""The partition plan: which layer runs how — a dict from module path to style, printable before anything moves.

Styles:

- ``dp``      replicated; its gradients are averaged over every rank (conv layers, normalisation, small layers);
- ``column``  a Linear split by output features (model-parallel);
- ``row``     a Linear split by input features, following a ``column`` layer (model-parallel);
- ``column_last``  a ``column`` layer that ends a chain and assembles all features again;
- ``channel`` a Conv2d split by output channels: every one under ``mp``; under ``hybrid`` those a rule marks
  ``"mp"`` (or ``strategy="auto"`` chooses), each on its own: the group's samples gathered in, every rank's own
  samples with all channels handed back.

Automatic choice (the paper's split): Linear layers hold most of the parameters and little compute per
parameter (one multiply-add per weight per sample, against H·W for a convolution), so they are sharded;
everything else is data-parallel. Given an example input, the choice is measured rather than assumed: a Linear
that is applied at many positions per sample (parameters per multiply-add < ``MIN_PARAMS_PER_FLOP``) stays
data-parallel. Consecutive Linear layers of one ``nn.Sequential``, with only elementwise layers
between them, form a chain and alternate column / row, so that activations stay sharded between them
(Krizhevsky 2014); a chain of odd length ends ``column_last``. A Linear outside such a chain is a chain of one.
Under ``mp`` convolutions are split by output channels too; under ``hybrid`` only where a rule says so.
``rules`` (glob patterns on module paths → ``"dp"``, ``"mp"``, ``"column"``, ``"row"``) override the automatic
choice.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

STRATEGIES = ("dp", "mp", "hybrid")
RULE_STYLES = ("dp", "mp", "column", "row")

# Layers that act on each feature (or sample) on its own: they may sit between sharded Linear layers.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
)


@dataclass
class PartitionPlan:
    """How :func:`hybrid_ext.parallelize` splits a model: each parameterised layer's style, printable before it is
    applied (not to be confused with :class:`hybrid_ext.comm.schedule.Plan`, one rank's steps of a collective)."""

    strategy: str
    styles: dict[str, str] = field(default_factory=dict)  # module path -> style, in module order
    parameters: dict[str, int] = field(default_factory=dict)  # module path -> parameter count

    def describe(self) -> str:
        width = max((len(p) for p in self.styles), default=10)
        lines = [f"hybrid-ext plan (strategy={self.strategy})"]
        total = {"sharded": 0, "replicated": 0}
        for path, style in self.styles.items():
            count = self.parameters.get(path, 0)
            total["replicated" if style == "dp" else "sharded"] += count
            lines.append(f"  {path:<{width}}  {style:<12} {count:>12,} params")
        lines.append(f"  sharded: {total['sharded']:,} params; replicated: {total['replicated']:,} params")
        return "\n".join(lines)

    __str__ = describe


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _rule_for(path: str, rules: dict[str, str]) -> str | None:
    for pattern, style in rules.items():
        if fnmatch.fnmatchcase(path, pattern):
            return style
    return None


MIN_PARAMS_PER_FLOP = 0.25  # shard a layer only if it uses each weight at most ~4 times per sample


def params_per_flop(model: nn.Module, example_input) -> dict[str, float]:
    """Parameters / multiply-adds per sample of every Linear and Conv2d, measured on ``example_input``.

    A Linear applied once per sample scores 1; one applied at T positions (a sequence) scores 1/T; a
    convolution producing an H×W map scores 1/(H·W). Runs one forward pass without gradients, in eval mode,
    that leaves no trace: BatchNorm statistics (every buffer), the random number generators and every
    module's train / eval mode are as before.
    """
    scores: dict[str, float] = {}
    hooks = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):

            def record(mod, args, out, path=path):
                positions = out[0].numel() // out.shape[-1 if isinstance(mod, nn.Linear) else 1]
                macs = mod.weight.numel() * positions
                scores[path] = mod.weight.numel() / max(macs, 1)

            hooks.append(module.register_forward_hook(record))
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()  # no BatchNorm update, no dropout mask
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:  # a custom module may still have written one
                buffer.copy_(saved)
    return scores


def plan_by_rules(
    model: nn.Module, strategy: str, rules: dict[str, str] | None = None, example_input=None
) -> PartitionPlan:
    """Decide every parameterised layer's style (see the module docstring). Nothing is changed.

    With ``example_input`` (a batch the model accepts), a Linear is sharded only if it has at least
    ``MIN_PARAMS_PER_FLOP`` parameters per multiply-add per sample: a Linear applied at many positions (a
    sequence, a feature map) is compute-heavy and stays data-parallel, as convolutions do.

    ``strategy="auto"`` is :func:`hybrid_ext.parallel.make_plan`'s, which plans its candidates with this.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} or auto")
    rules = dict(rules or {})
    for pattern, style in rules.items():
        if style not in RULE_STYLES:
            raise ValueError(f"rule {pattern!r}: {style!r} is not one of {', '.join(RULE_STYLES)}")
    modules = dict(model.named_modules())
    for pattern, style in rules.items():
        matched = [p for p in modules if p and fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            raise ValueError(f"rule {pattern!r} matches no module; module paths look like {list(modules)[1:4]}")
        for path in matched:
            if style in ("column", "row") and not isinstance(modules[path], nn.Linear):
                raise ValueError(
                    f"rule {pattern!r} asks for {style!r} on {path} ({type(modules[path]).__name__}); "
                    "only nn.Linear layers can be split by features"
                )
            if style == "mp" and not isinstance(modules[path], (nn.Linear, nn.Conv2d)):
                raise ValueError(
                    f"rule {pattern!r} asks for 'mp' on {path} ({type(modules[path]).__name__}); "
                    "hybrid-ext can shard nn.Linear and nn.Conv2d layers only"
                )

    plan = PartitionPlan(strategy)
    scores = params_per_flop(model, example_input) if example_input is not None else {}
    wants_mp: dict[str, bool] = {}
    for path, module in modules.items():
        if not path or _own_params(module) == 0:
            continue
        plan.parameters[path] = _own_params(module)
        rule = _rule_for(path, rules)
        if strategy == "dp":
            wants_mp[path] = False
        elif rule is not None:
            wants_mp[path] = rule != "dp"
        elif isinstance(module, nn.Linear):
            wants_mp[path] = scores.get(path, 1.0) >= MIN_PARAMS_PER_FLOP
        else:
            wants_mp[path] = strategy == "mp" and isinstance(module, nn.Conv2d) and module.groups == 1
        plan.styles[path] = "dp"

    for chain in _linear_chains(modules, {p for p, mp in wants_mp.items() if mp}):
        forced = [_rule_for(p, rules) for p in chain]
        for index, path in enumerate(chain):
            style = "column" if index % 2 == 0 else "row"
            if forced[index] in ("column", "row"):
                style = forced[index]
            plan.styles[path] = style
        if plan.styles[chain[-1]] == "column":
            plan.styles[chain[-1]] = "column_last"
        _check_chain(chain, [plan.styles[p] for p in chain], modules)
    for path, mp in wants_mp.items():
        if mp and isinstance(modules[path], nn.Conv2d):
            if modules[path].groups != 1:
                raise ValueError(
                    f"{path!r} ({modules[path]}) is a grouped convolution (groups={modules[path].groups}): it cannot "
                    "be split by output channels; keep it data-parallel"
                )
            plan.styles[path] = "channel"
    return plan


def _check_chain(chain: list[str], styles: list[str], modules: dict[str, nn.Module]) -> None:
    expected = ["column" if i % 2 == 0 else "row" for i in range(len(chain))]
    if len(chain) % 2:
        expected[-1] = "column_last"
    if styles == expected:
        return
    if styles[0] == "row":  # the chain was cut before it: name what cut it
        before = _preceding_sibling(chain[0], modules)
        if before is not None and not isinstance(modules[before], nn.Linear):
            raise ValueError(
                f"{chain[0]!r} is asked to be 'row' but follows {before!r} ({type(modules[before]).__name__}), which "
                "is not elementwise: only elementwise layers (ReLU, GELU, Dropout, ...) can sit inside a sharded FC "
                "chain, between a column-parallel Linear and the row-parallel one after it. Drop the rule, or move "
                f"{before!r} out of the chain"
            )
    raise ValueError(
        f"the Linear chain {chain} must alternate column/row starting with column (got {styles}); "
        "a row-parallel layer needs the sharded output of a column-parallel one"
    )


def _preceding_sibling(path: str, modules: dict[str, nn.Module]) -> str | None:
    """The module just before ``path`` in its parent ``nn.Sequential`` (None if there is none)."""
    parent_path, _, name = path.rpartition(".")
    parent = modules.get(parent_path)
    if not isinstance(parent, nn.Sequential):
        return None
    names = [n for n, _ in parent.named_children()]
    index = names.index(name)
    if index == 0:
        return None
    return f"{parent_path}.{names[index - 1]}" if parent_path else names[index - 1]


def check_shardable(model: nn.Module, plan: PartitionPlan, mp_size: int) -> None:
    """Refuse, naming the layer, a plan whose shards would be empty: a split dimension smaller than ``mp_size``.

    Runs before anything is sharded or communicated (every rank reaches the same verdict on its own)."""
    if mp_size == 1:
        return
    modules = dict(model.named_modules())
    for path, style in plan.styles.items():
        module = modules[path]
        if style in ("column", "column_last"):
            count, what = module.out_features, "output feature"
        elif style == "row":
            count, what = module.in_features, "input feature"
        elif style == "channel":
            count, what = module.out_channels, "output channel"
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"{path!r} ({module}): padding_mode={module.padding_mode!r} cannot be split by channels; "
                    f"keep it data-parallel with rules={{{path!r}: 'dp'}}"
                )
        else:
            continue
        if count < mp_size:
            raise ValueError(
                f"{path!r} ({type(module).__name__}, {module.extra_repr()}) has {count} {what}"
                f"{'s' if count != 1 else ''}, fewer than mp_size={mp_size} ranks to split them over; keep it "
                f"data-parallel with rules={{{path!r}: 'dp'}}, or use a smaller mp_size"
            )


def _linear_chains(modules: dict[str, nn.Module], sharded: set[str]) -> list[list[str]]:
    """Runs of sharded Linear layers, consecutive inside one nn.Sequential (elementwise layers may sit between)."""
    chains: list[list[str]] = []
    placed: set[str] = set()
    for path, module in modules.items():
        if not isinstance(module, nn.Sequential):
            continue
        current: list[str] = []
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, nn.Linear) and child_path in sharded:
                current.append(child_path)
            elif isinstance(child, ELEMENTWISE) and current:
                continue
            else:
                if current:
                    chains.append(current)
                current = []
        if current:
            chains.append(current)
    for chain in chains:
        placed.update(chain)
    # A sharded Linear elsewhere (a custom forward): a chain of one, which takes and returns per-rank samples.
    chains += [[p] for p in sharded if isinstance(modules[p], nn.Linear) and p not in placed]
    return chains
