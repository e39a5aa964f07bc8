"""One rank of the DeepSpeed smoke job (``deepspeed --module hybrid_ext.tools.smoke_deepspeed_worker``).

Run by ``hybrid-ext smoke`` (:mod:`hybrid_ext.tools.smoke`), which checks the numbers each rank reports.
"""

from __future__ import annotations

from hybrid_ext.launch import report_result


def main() -> None:
    """One rank of the DeepSpeed smoke job: deepspeed.comm all_reduce and one engine step (ZeRO 0, gloo)."""
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    rank, size = ds_comm.get_rank(), ds_comm.get_world_size()
    t = torch.full((3,), float(rank + 1))
    ds_comm.all_reduce(t)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.full((8, 4), float(rank + 1))
    loss = engine(x).sum()
    engine.backward(loss)
    engine.step()
    report_result(
        {"rank": rank, "size": size, "allreduce": t.tolist(), "weight": engine.module.weight.detach().clone()}
    )


if __name__ == "__main__":
    main()
