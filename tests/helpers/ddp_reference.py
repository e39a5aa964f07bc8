"""DDP's exactness reference: a small model, 4 SGD steps on each rank's batches under DDP (the ``butterfly``
backend, or the comm hook), and the same 4 steps in one process on the global batch.

Shared by tests/multiprocess/test_torch_integration.py (spawned gloo ranks) and tests/helpers/torchrun_worker.py
(ranks under torchrun, on one host or across an emulated cluster's hosts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hybrid_ext
from hybrid_ext.integrations.torch import ButterflyHookState, butterfly_hook


def model() -> torch.nn.Module:
    """Two Linear layers, seeded: the same initial weights on every rank."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train_ddp(rank: int, p: int, use_hook: bool, device: torch.device | None = None) -> dict:
    """4 steps under DDP on the default group (``use_hook``: reduced by the butterfly comm hook), on ``device``
    (default: the CPU)."""
    hybrid_ext.set_check(True)
    device = torch.device("cpu") if device is None else device
    # Small buckets: several reductions per backward, overlapping it.
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(model().to(device), device_ids=device_ids, bucket_cap_mb=0.001)
    if use_hook:
        ddp.register_comm_hook(ButterflyHookState(algorithm="auto"), butterfly_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    with hybrid_ext.metrics.capture() as records:
        for _ in range(4):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(ddp(x.to(device)), y.to(device)).backward()
            optimizer.step()
    return {
        "params": [p.detach().to("cpu", copy=True) for p in ddp.module.parameters()],
        "backend": dist.get_backend(),
        "butterfly_calls": len(records),
        "transports": sorted({r.transport for r in records}),
    }


def reference_params(p: int) -> list[torch.Tensor]:
    """The same 4 steps in one process on the global batch (DDP averages the ranks' mean losses)."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gens = [torch.Generator().manual_seed(r) for r in range(p)]
    for _ in range(4):
        batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for g in gens]
        optimizer.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(net(x), y) for x, y in batches) / p
        loss.backward()
        optimizer.step()
    return [p.detach() for p in net.parameters()]
