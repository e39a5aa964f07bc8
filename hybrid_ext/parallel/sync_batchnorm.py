"""``nn.SyncBatchNorm`` under the partitioner: batch statistics over the ranks that hold different samples.

torch's ``SyncBatchNorm`` refuses CPU tensors and syncs over a torch.distributed group; ``parallelize`` swaps
each one for :class:`SampleSyncBatchNorm`, which reduces over a hybrid-ext communicator — every rank under
``dp`` and ``hybrid`` (conv layers are data-parallel over all ranks), none under ``mp`` (every rank holds the
same batch, so local statistics are already the global ones). Same parameters, buffers and state-dict keys.

Math (N samples·positions over the group, per channel): mean = Σx/N, var = Σx²/N − mean² (sums in float64),
y = (x − mean)/√(var + ε)·γ + β. Backward, with x̂ the normalised input and g = ∂loss/∂y on this rank:
∂x = γ/√(var + ε) · (g − Σ_all g/N − x̂·Σ_all g·x̂/N); ∂γ = Σ_local g·x̂ and ∂β = Σ_local g, which the gradient
reducer averages over the ranks (the same convention as torch's SyncBatchNorm under DDP). Running statistics
use the unbiased global variance, as ``nn.BatchNorm`` does on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_ext.comm import Communicator


def _allreduce_sum(comm: Communicator, t: torch.Tensor, name: str) -> torch.Tensor:
    comm.allreduce([t], name=name)
    return t


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm: Communicator, eps: float):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        wide = x.double()
        local_count = x.numel() // x.shape[1]
        stats = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_tensor([local_count])])
        _allreduce_sum(comm, stats, "sync batchnorm stats")
        channels = x.shape[1]
        count = stats[-1].item()
        mean = stats[:channels] / count
        var = (stats[channels : 2 * channels] / count - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.comm, ctx.count, ctx.dims, ctx.shape = comm, count, dims, shape
        unbiased_var = var * (count / max(count - 1, 1))
        ctx.mark_non_differentiable(mean, unbiased_var)
        return y, mean, unbiased_var

    @staticmethod
    def backward(ctx, grad, _mean_grad, _var_grad):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local_dy = grad.sum(dims)
        local_dy_xhat = (grad * xhat).sum(dims)
        sums = torch.cat([local_dy, local_dy_xhat]).double()
        _allreduce_sum(ctx.comm, sums, "sync batchnorm grad sums")
        channels = xhat.shape[1]
        mean_dy = (sums[:channels] / ctx.count).to(grad.dtype).view(shape)
        mean_dy_xhat = (sums[channels:] / ctx.count).to(grad.dtype).view(shape)
        scale = invstd.view(shape) if weight is None else (weight * invstd).view(shape)
        grad_x = scale * (grad - mean_dy - xhat * mean_dy_xhat)
        if weight is None:
            return grad_x, None, None, None, None
        return grad_x, local_dy_xhat, local_dy, None, None


class SampleSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` whose statistics are reduced over ``comm`` (None: local batch norm)."""

    comm: Communicator | None

    @classmethod
    def replacing(cls, module: nn.SyncBatchNorm, comm: Communicator | None) -> SampleSyncBatchNorm:
        """The same layer (its very parameters, buffers and hooks), syncing over ``comm``."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.comm = comm
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / self.num_batches_tracked.item()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not (use_batch_stats and self.comm is not None and self.comm.size > 1):
            return F.batch_norm(
                x,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        y, mean, unbiased_var = _SyncBatchNorm.apply(x, self.weight, self.bias, self.comm, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)
        return y


def convert_sync_batchnorm(model: nn.Module, comm: Communicator | None) -> int:
    """Swap every ``nn.SyncBatchNorm`` in ``model`` for a :class:`SampleSyncBatchNorm` over ``comm``; count them."""
    swapped = 0
    for path, module in list(model.named_modules()):
        if path and isinstance(module, nn.SyncBatchNorm) and not isinstance(module, SampleSyncBatchNorm):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, SampleSyncBatchNorm.replacing(module, comm))
            swapped += 1
    return swapped
