"""A Horovod training script as Horovod's own examples write it; the butterfly is two lines (marked below).

    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/plain_example.py             # hvd.Butterfly
    horovodrun -np 4 -H localhost:4 --gloo python recipes/horovod/plain_example.py --op average

Trains a small MLP on scikit-learn's bundled digits with ``hvd.DistributedOptimizer``; every option of it
(``--backward-passes``, ``--predivide``, ``--fp16``) keeps its Horovod meaning under ``hvd.Butterfly``.
"""

from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hybrid_ext.integrations.horovod as hxh  # (1) the import
from hybrid_ext.launch import report_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["butterfly", "average"], default="butterfly")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backward-passes", type=int, default=1)
    parser.add_argument("--predivide", type=float, default=1.0)
    parser.add_argument("--fp16", action="store_true", help="compress gradients to fp16 on the wire")
    args = parser.parse_args()

    hvd.init()
    hxh.register()  # (2) adds hvd.Butterfly
    torch.manual_seed(0)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    shard = torch.arange(hvd.rank(), len(y), hvd.size())  # each rank its own part of the data
    x_train, y_train = x[shard], y[shard]

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        op=hvd.Butterfly if args.op == "butterfly" else hvd.Average,  # the one line that changes
        backward_passes_per_step=args.backward_passes,
        gradient_predivide_factor=args.predivide,
        compression=hvd.Compression.fp16 if args.fp16 else hvd.Compression.none,
    )

    steps = len(y_train) // (args.batch_size * args.backward_passes)
    for epoch in range(args.epochs):
        for step in range(steps):
            optimizer.zero_grad()
            for micro in range(args.backward_passes):
                start = (step * args.backward_passes + micro) * args.batch_size
                xb, yb = x_train[start : start + args.batch_size], y_train[start : start + args.batch_size]
                F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = hvd.allreduce((model(x).argmax(1) == y).float().mean(), name="accuracy").item()
        if hvd.rank() == 0:
            print(f"epoch {epoch}: accuracy {accuracy * 100:.1f} % (op={args.op})")
    report_result({"params": [p.detach() for p in model.parameters()], "accuracy": accuracy}, hvd.rank())


if __name__ == "__main__":
    main()
