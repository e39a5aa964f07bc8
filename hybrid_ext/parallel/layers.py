"""Sharded layers: column- and row-parallel Linear, output-channel-parallel Conv2d.

Y = X·Aᵀ + b with A of shape [out, in] (torch's layout).

- :class:`ColumnParallelLinear` holds rows ``out_s`` of A (and of b): Y_s = X·A_sᵀ + b_s, the output features
  of shard s. In the hybrid strategy its input is this rank's samples, gathered along the batch over the
  model-parallel group first (Krizhevsky's scheme: the FC layers see the group's whole batch).
- :class:`RowParallelLinear` holds columns ``in_s`` of A: the partial product X_s·A_sᵀ is summed over the group
  (reduce-scatter along the batch in the hybrid strategy, all-reduce under model parallelism alone), and
  only then is b added, once.
- :class:`ChannelParallelConv2d` holds output channels ``c_s``: under model parallelism alone its outputs are
  gathered along channels; under hybrid it gathers the group's samples, as a column-parallel Linear does, and an
  all-to-all returns each rank its own samples with every channel.

Shard sizes differ by at most one (any feature count works, no padding). The layers keep the original layer's
parameter objects, now holding their shards (:mod:`hybrid_ext.parallel.shards`: optimizers built before the wrap
keep working), and their state dicts hold full tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_ext.comm import Communicator
from hybrid_ext.parallel import mappings
from hybrid_ext.parallel.shards import ShardedStateDictMixin, shard_in_place


@dataclass
class BatchSplit:
    """Samples per rank of the model-parallel group, set by the first gather of each forward pass."""

    counts: tuple[int, ...] = field(default_factory=tuple)


def _group_input(x: torch.Tensor, comm: Communicator, split: BatchSplit, strategy: str) -> torch.Tensor:
    """The input of a layer split by its outputs: under hybrid the group's samples gathered (their counts kept in
    ``split``), under mp the same batch, its gradient summed over the group."""
    if strategy == "hybrid":
        split.counts = mappings.batch_counts(x, comm)
        return mappings.gather_batch(x, comm, split.counts)
    return mappings.copy_to_group(x, comm)


def _all_outputs(
    y: torch.Tensor, comm: Communicator, split: BatchSplit, strategy: str, sizes: tuple[int, ...], dim: int
) -> torch.Tensor:
    """This rank's samples with every output (features or channels along ``dim``) from the shards of ``sizes``: an
    all-to-all under hybrid, an all-gather under mp."""
    if strategy == "hybrid":
        return mappings.exchange_rows_for_features(y, comm, split.counts, sizes, dim=dim)
    return mappings.gather_dim(y, comm, dim, sizes)


class ColumnParallelLinear(ShardedStateDictMixin, nn.Module):
    """Output features split over the model-parallel group (see the module docstring).

    ``strategy``: ``"hybrid"`` (each rank passes its own samples) or ``"mp"`` (every rank passes the same
    batch). ``last``: this layer ends a chain, so its output is assembled into all features again — under
    ``hybrid`` by an all-to-all that hands every rank its own samples, under ``mp`` by an all-gather.
    """

    def __init__(self, linear: nn.Linear, comm: Communicator, split: BatchSplit, strategy: str, last: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.comm, self.split, self.strategy, self.last = comm, split, strategy, last
        self.sizes = mappings.shard_sizes(linear.out_features, comm.size)
        self.weight = shard_in_place(linear.weight, 0, comm)
        if linear.bias is not None:
            self.bias = shard_in_place(linear.bias, 0, comm)
        else:
            self.register_parameter("bias", None)
        self.sharded_params = {"weight": 0, "bias": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(_group_input(x, self.comm, self.split, self.strategy), self.weight, self.bias)
        return _all_outputs(y, self.comm, self.split, self.strategy, self.sizes, -1) if self.last else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(shard {self.comm.rank}: {self.sizes[self.comm.rank]}), last={self.last}, strategy={self.strategy}"
        )


class RowParallelLinear(ShardedStateDictMixin, nn.Module):
    """Input features split over the model-parallel group; the bias is added once, after the sum."""

    def __init__(self, linear: nn.Linear, comm: Communicator, split: BatchSplit, strategy: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.comm, self.split, self.strategy = comm, split, strategy
        self.sizes = mappings.shard_sizes(linear.in_features, comm.size)
        self.weight = shard_in_place(linear.weight, 1, comm)
        # The bias is whole on every rank: it is added to this rank's own samples (a data-parallel parameter).
        self.bias = linear.bias
        self.sharded_params = {"weight": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.strategy == "hybrid":
            y = mappings.scatter_batch(partial, self.comm, self.split.counts)
        else:
            y = mappings.reduce_from_group(partial, self.comm)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (shard {self.comm.rank}: {self.sizes[self.comm.rank]}), "
            f"out_features={self.out_features}, strategy={self.strategy}"
        )


class ChannelParallelConv2d(ShardedStateDictMixin, nn.Module):
    """Output channels split over the model-parallel group.

    ``strategy="mp"`` (every rank passes the same batch): the output's channels are gathered after the convolution.
    ``strategy="hybrid"`` (each rank passes its own samples): as a column-parallel Linear that ends a chain, the
    input is gathered along the batch over the group, each rank convolves the group's samples into its channels,
    and an all-to-all hands every rank its own samples with every channel — a convolution whose weights outweigh
    its activations then moves the activations, not the weights' gradients, across the group.
    """

    def __init__(self, conv: nn.Conv2d, comm: Communicator, split: BatchSplit | None = None, strategy: str = "mp"):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("grouped convolutions cannot be split by output channels here; mark them 'dp'")
        if strategy not in ("mp", "hybrid"):
            raise ValueError(f"strategy must be 'mp' or 'hybrid', got {strategy!r}")
        self.comm, self.split, self.strategy = comm, split or BatchSplit(), strategy
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.sizes = mappings.shard_sizes(conv.out_channels, comm.size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        if self.padding_mode != "zeros":
            raise ValueError(f"padding_mode={self.padding_mode!r} is not supported for channel-parallel convs")
        self.weight = shard_in_place(conv.weight, 0, comm)
        if conv.bias is not None:
            self.bias = shard_in_place(conv.bias, 0, comm)
        else:
            self.register_parameter("bias", None)
        self.sharded_params = {"weight": 0, "bias": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _group_input(x, self.comm, self.split, self.strategy)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return _all_outputs(y, self.comm, self.split, self.strategy, self.sizes, 1)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels} "
            f"(shard {self.comm.rank}: {self.sizes[self.comm.rank]}), strategy={self.strategy}"
        )
