"""One rank of the Horovod smoke job (``horovodrun ... python -m hybrid_ext.tools.smoke_horovod_worker``).

Run by ``hybrid-ext smoke`` (:mod:`hybrid_ext.tools.smoke`), which checks the numbers each rank reports.
"""

from __future__ import annotations

from hybrid_ext.launch import report_result


def main() -> None:
    """One rank of the Horovod smoke job: allreduce, alltoall with splits, one DistributedOptimizer step."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    summed = hvd.allreduce(torch.full((3,), float(rank + 1)), op=hvd.Sum)
    # Rank r sends (j + 1) elements of value r to rank j.
    splits = torch.arange(1, size + 1, dtype=torch.int32)
    send = torch.full((int(splits.sum()),), float(rank))
    received, received_splits = hvd.alltoall(send, splits=splits)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    x = torch.full((8, 4), float(rank + 1))
    model(x).sum().backward()
    optimizer.step()
    report_result(
        {
            "rank": rank,
            "size": size,
            "allreduce": summed.tolist(),
            "alltoall": received.tolist(),
            "alltoall_splits": received_splits.tolist(),
            "weight": model.weight.detach().clone(),
        }
    )


if __name__ == "__main__":
    main()
