"""Ranks of the Horovod restart tests (tests/cluster/test_restarts.py).

    horovodrun -np 2 -H localhost:2 --gloo python tests/helpers/horovod_elastic_worker.py reset
    horovodrun -np 4 --min-np 2 --host-discovery-script D --gloo \
        python tests/helpers/horovod_elastic_worker.py elastic DIR 12 4

``reset``: hvd.Butterfly, then Horovod reset twice — ``hvd.shutdown(); hvd.init()``, and the reset
``hvd.elastic.run`` makes between attempts — each followed by hvd.Butterfly again; reports whether the side
channel, communicator and partitioner grid were made anew, whether the old channel was closed, and the results.

``elastic DIR STEPS REMOVE_AT``: ``hvd.elastic.run`` training of the small CNN with
``DistributedOptimizer(op=hvd.Butterfly)`` and a ``TorchState`` committed every step. At step ``REMOVE_AT`` the
ranks on node1 take their host out of the discovery script's output (``DIR/removed``) and SIGKILL themselves;
the ranks left restore the last commit and go on. Every step, the loss on the whole sample pool (each rank's
share, averaged with hvd.Butterfly). Nothing here asserts: the test checks what the surviving ranks report.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

sys.path.insert(0, str(Path(__file__).parent))

import hybrid_ext
import hybrid_ext.integrations.horovod as hxh
from hybrid_ext.launch import report_result

POOL = 32  # samples; each step every rank takes its contiguous share of all of them


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def reset() -> dict:
    import horovod.torch.elastic

    hvd.init()
    hxh.register()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(hvd.rank()))
    hvd.allreduce(x, op=hvd.Butterfly)
    cpu = torch.device("cpu")
    channel, comm, groups = hxh.side_channel(), hxh.communicator_for(hvd.global_process_set, cpu), hxh.horovod_groups()
    out = {}
    resets = {
        "hvd.shutdown+hvd.init": lambda: (hvd.shutdown(), hvd.init()),
        "hvd.elastic reset": horovod.torch.elastic._reset,  # what hvd.elastic.run calls between attempts
    }
    for how, do_reset in resets.items():
        do_reset()
        ours = hvd.allreduce(x, op=hvd.Butterfly)
        new = hxh.side_channel(), hxh.communicator_for(hvd.global_process_set, cpu), hxh.horovod_groups()
        out[how] = {
            "new_channel": new[0] is not channel,
            "new_communicator": new[1] is not comm,
            "new_groups": new[2] is not groups,
            "old_channel_closed": getattr(channel, "closed", False),
            "error": _rel(ours, hvd.allreduce(x, op=hvd.Average)),
        }
        channel, comm, groups = new
    return out


def _pool() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(POOL, 3, 16, 16, generator=g), torch.randint(0, 10, (POOL,), generator=g)


def elastic(workdir: Path, steps: int, remove_at: int) -> dict | None:
    from parallel_reference import small_cnn

    host = socket.gethostname()
    hvd.init()
    hxh.register()
    (workdir / f"pid-{host}-{hvd.local_rank()}").write_text(str(os.getpid()))
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Butterfly)
    xs, ys = _pool()
    losses: dict[int, tuple[int, float]] = {}  # step -> (world size, loss on the pool before the step)
    resets: list[int] = []  # the world size after each reset
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0)
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])

    interruptions: list[tuple[str, int, float]] = []  # (exception, step, seconds since the start)
    start = time.monotonic()

    @hvd.elastic.run
    def train(state):
        try:
            _train(state)
        except (HorovodInternalError, HostsUpdatedInterrupt) as exc:  # hvd.elastic.run restores / resets
            interruptions.append((f"{type(exc).__name__}: {exc}"[:300], state.step, time.monotonic() - start))
            raise

    def _train(state):
        while state.step < steps:
            if state.step == remove_at and host == "node1":
                if hvd.local_rank() == 0:
                    (workdir / "removed").write_text(f"node1 removed at step {state.step}")
                while not (workdir / "removed").exists():
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            share = POOL // hvd.size()
            x, y = xs[hvd.rank() * share : (hvd.rank() + 1) * share], ys[hvd.rank() * share : (hvd.rank() + 1) * share]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses[state.step] = (hvd.size(), hvd.allreduce(loss.detach().reshape(1), op=hvd.Butterfly).item())
            state.step += 1
            state.commit()

    with hybrid_ext.metrics.capture() as records:
        train(state)
    return {
        "host": host,
        "rank": hvd.rank(),
        "size": hvd.size(),
        "losses": losses,
        "resets": resets,
        "interruptions": interruptions,
        "seconds": time.monotonic() - start,
        "params": [p.detach().clone() for p in model.parameters()],
        "channel_size": hxh.side_channel().size,
        # (world size, transport) of every Butterfly reduction: 4 ranks over shm + gloo, then 2 over shm
        "reductions": sorted({(r.world_size, r.transport) for r in records}),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = reset() if sys.argv[1] == "reset" else elastic(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    report_result(result, hvd.rank())
