"""A plain DeepSpeed training script — with one line changed, it reduces gradients with the butterfly.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 recipes/deepspeed/plain_example.py \
        --deepspeed_config recipes/deepspeed/plain_example.json

Everything below is ordinary DeepSpeed: ``deepspeed.add_config_arguments``, ``deepspeed.initialize``,
``engine.backward``, ``engine.step``. The only hybrid-ext line is the marked ``init_distributed`` call, which
replaces ``deepspeed.init_distributed()``: DeepSpeed's whole job — ``deepspeed.comm``, the engine's gradient
allreduce, ZeRO — then runs on the ``butterfly`` torch.distributed backend (all_reduce through the butterfly,
everything else through gloo / NCCL). Switching strategy instead is a config edit: see ``train_cnn.py``.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_ext.integrations import deepspeed as hx_deepspeed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    # deepspeed.init_distributed()                     # plain DeepSpeed
    hx_deepspeed.init_distributed(reducer="butterfly")  # the one changed line

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())

    rank = deepspeed.comm.get_rank()
    g = torch.Generator().manual_seed(rank)
    teacher = torch.randn(20, 4, generator=torch.Generator().manual_seed(123))
    losses = []
    for _ in range(args.steps):
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 20, generator=g)
        y = (x @ teacher).argmax(1)
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if rank == 0:
        print(f"backend {torch.distributed.get_backend()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    _report(losses, [p.detach().clone() for p in engine.module.parameters()])


def _report(losses: list[float], weights: list[torch.Tensor]) -> None:
    """Hand the outcome to hybrid-ext's test harness (a no-op outside it)."""
    import hybrid_ext
    from hybrid_ext.launch import report_result

    butterfly_calls = sum(
        t.calls for (collective, _), t in hybrid_ext.metrics.totals().items() if collective == "allreduce"
    )
    report_result(
        {
            "backend": torch.distributed.get_backend(),
            "losses": losses,
            "weights": weights,
            "butterfly_allreduces": butterfly_calls,
        }
    )


if __name__ == "__main__":
    main()
