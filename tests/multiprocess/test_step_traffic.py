"""The step model's bytes against one real step: every collective's record and every byte on the transport, exact.

Ranks run one training step of ``small_cnn`` (gloo processes, shared memory between them) while counting what each
sends through its transport; the parent predicts, without processes, what each rank sends
(:func:`hybrid_ext.parallel.step_traffic.step_transfers`). The online tuner is off here (tests/conftest.py), so
``auto`` runs the cost model's choice, the one the prediction names.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch.nn.functional as F

import hybrid_ext
from hybrid_ext.parallel import make_plan
from hybrid_ext.parallel.layer_profile import layer_shapes
from hybrid_ext.parallel.step_traffic import Links, step_transfers

from helpers.parallel_reference import MICRO_BATCH, MODELS, global_batch

pytestmark = pytest.mark.timeout(240)


def _record_key(collective: str, algorithm: str, size: int, elements: int, nbytes: int) -> tuple:
    return (collective, algorithm, size, elements, nbytes)


def _measured_step(
    rank: int, world: int, strategy: str, mp_size: int | None, bucket_mb: float, reducer: str, rules=None
) -> dict:
    """One training step on this rank: the metrics' records, and every byte this rank's transports sent."""
    os.environ["HYBRID_EXT_CHECK"] = "0"  # check mode's own agreement messages are not the step's traffic
    build, shape, classes = MODELS["small_cnn"]
    model = hybrid_ext.parallelize(
        build(), strategy=strategy, reducer=reducer, mp_size=mp_size, bucket_mb=bucket_mb, rules=rules
    )
    x, y = global_batch(world, shape, classes)
    if strategy != "mp":
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    groups = model.groups
    kinds = {type(c.transport) for c in (groups.world, groups.mp, groups.dp)}
    sent: list[int] = []
    originals = {kind: (kind.exchange, kind.exchange_reduce) for kind in kinds}

    def counting(method):
        def wrapped(self, send, send_to, *rest):
            if send is not None:
                sent.append(send.numel() * send.element_size())
            return method(self, send, send_to, *rest)

        return wrapped

    for kind, (exchange, exchange_reduce) in originals.items():
        kind.exchange, kind.exchange_reduce = counting(exchange), counting(exchange_reduce)
    try:
        with hybrid_ext.metrics.capture() as records:
            F.cross_entropy(model(x), y).backward()
    finally:
        for kind, (exchange, exchange_reduce) in originals.items():
            kind.exchange, kind.exchange_reduce = exchange, exchange_reduce
    return {
        "records": [_record_key(r.collective, r.algorithm, r.world_size, r.elements, r.bytes_sent) for r in records],
        "transports": sorted({r.transport for r in records} | {c.transport.name for c in (groups.world,)}),
        "sent": sum(sent),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "strategy, world, mp_size, bucket_mb, reducer, rules",
    [
        ("dp", 2, None, 25.0, "butterfly", None),
        ("dp", 4, None, 0.01, "butterfly", None),  # several buckets
        ("hybrid", 2, None, 25.0, "butterfly", None),
        ("hybrid", 4, None, 25.0, "butterfly", None),
        ("hybrid", 4, 2, 0.01, "butterfly", None),
        ("mp", 2, None, 25.0, "butterfly", None),
        ("mp", 4, None, 25.0, "butterfly", None),
        ("hybrid", 3, None, 25.0, "ring", None),  # uneven shards (100 = 33 + 33 + 34), a folded butterfly for counts
        ("hybrid", 2, None, 25.0, "butterfly", {"3": "mp"}),  # a convolution split by channels too
        ("hybrid", 3, None, 0.01, "butterfly", {"0": "mp", "3": "mp", "7": "dp", "10": "dp", "12": "dp"}),
        ("hybrid", 4, 2, 25.0, "butterfly", {"0": "mp", "3": "mp"}),
    ],
)
def test_predicted_bytes_equal_measured(spawn_ranks, strategy, world, mp_size, bucket_mb, reducer, rules):
    results = spawn_ranks(_measured_step, world, strategy, mp_size, bucket_mb, reducer, rules)
    build, shape, classes = MODELS["small_cnn"]
    model = build()
    plan = make_plan(model, strategy, rules)
    x, _ = global_batch(world, shape, classes)
    table = layer_shapes(model, x[:1])
    for rank, measured in enumerate(results):
        assert measured["transports"] == ["shm"], measured["transports"]
        predicted = step_transfers(
            model,
            table,
            plan.styles,
            strategy,
            world,
            mp_size or world,
            rank,
            MICRO_BATCH,
            grad_algorithm=reducer,
            bucket_bytes=int(bucket_mb * (1 << 20)),
            links=Links("shm"),
        )
        recorded = [
            _record_key(t.collective, t.algorithm, t.group_size, t.elements, t.bytes_sent)
            for t in predicted
            if t.recorded
        ]
        assert Counter(recorded) == Counter(measured["records"]), f"rank {rank}"
        assert sum(t.bytes_sent for t in predicted) == measured["sent"], f"rank {rank}"
        assert measured["sent"] > 0
