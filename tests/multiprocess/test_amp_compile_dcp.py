"""Training as people run it: autocast (bf16; fp16 with GradScaler), torch.compile, and DCP checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hybrid_ext

from helpers.parallel_reference import MICRO_BATCH, MODELS, global_batch

STEPS = 3


def _batch(rank: int, world: int, step: int, strategy: str):
    _, shape, classes = MODELS["small_cnn"]
    x, y = global_batch(world * STEPS, shape, classes)
    x, y = x[step * world * MICRO_BATCH :], y[step * world * MICRO_BATCH :]
    x, y = x[: world * MICRO_BATCH], y[: world * MICRO_BATCH]
    if strategy == "reference":
        return x, y
    mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return x[mine], y[mine]


def _train(model, rank, world, strategy, precision, compile_backend=None):
    """STEPS steps of SGD under ``precision`` (fp32 / bf16 / fp16 with a GradScaler); the losses and final state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "fp16" else None
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    losses = []
    for step in range(STEPS):
        x, y = _batch(rank, world, step, strategy)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(run(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total = loss.detach().float().clone()
        if strategy != "reference":
            hybrid_ext.allreduce(total, op="avg", group=model.groups.world)
        losses.append(total.item())
    return losses


def _parallel_rank(rank: int, world: int, strategy: str, precision: str, compile_backend: str | None) -> dict:
    build = MODELS["small_cnn"][0]
    model = hybrid_ext.parallelize(build(), strategy=strategy)
    with hybrid_ext.metrics.capture() as records:
        losses = _train(model, rank, world, strategy, precision, compile_backend)
    wires = sorted({(r.collective, r.dtype) for r in records})
    return {"losses": losses, "state": hybrid_ext.full_state_dict(model), "wires": wires}


def _reference(world: int, precision: str) -> dict:
    model = MODELS["small_cnn"][0]()
    losses = _train(model, 0, world, "reference", precision)
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


# bf16 / fp16 differ from the reference by the order of reductions over the batch, not by more.
TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=3e-2, atol=3e-3), "fp16": dict(rtol=1e-2, atol=1e-3)}


@pytest.mark.parametrize(
    ("strategy", "precision"), [("hybrid", "bf16"), ("dp", "bf16"), ("hybrid", "fp16")], ids=lambda v: str(v)
)
def test_autocast_training_matches_the_single_process_run(spawn_ranks, strategy, precision):
    world = 2
    expected = _reference(world, precision)
    results = spawn_ranks(_parallel_rank, world, strategy, precision, None, timeout=300)
    for result in results:
        assert result["losses"] == pytest.approx(expected["losses"], rel=TOLERANCE[precision]["rtol"] * 2)
        for key, value in expected["state"].items():
            torch.testing.assert_close(result["state"][key], value, **TOLERANCE[precision], msg=key)
    if strategy == "hybrid":  # 16-bit activations and their gradients travel as 16-bit
        wire = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        assert ("allgather", wire) in results[0]["wires"] and ("reduce_scatter", wire) in results[0]["wires"]


@pytest.mark.timeout(900)
def test_a_compiled_parallel_model_trains_like_the_eager_one(spawn_ranks):
    eager = spawn_ranks(_parallel_rank, 2, "hybrid", "fp32", None, timeout=300)
    compiled = spawn_ranks(_parallel_rank, 2, "hybrid", "fp32", "aot_eager", timeout=800)
    for a, b in zip(eager, compiled):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
        for key, value in a["state"].items():
            torch.testing.assert_close(b["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def _dcp_save_rank(rank: int, world: int, strategy: str, mp_size: int | None, path: str) -> dict:
    from hybrid_ext.parallel import dcp

    model = hybrid_ext.parallelize(MODELS["small_cnn"][0](), strategy=strategy, mp_size=mp_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _batch(rank, world, 0, strategy)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    dcp.save(model, path, optimizer)
    return {
        "state": hybrid_ext.full_state_dict(model),
        "optimizer": hybrid_ext.full_optimizer_state_dict(model, optimizer),
    }


def _dcp_load_rank(rank: int, world: int, strategy: str, mp_size: int | None, path: str) -> dict:
    from hybrid_ext.parallel import dcp

    model = hybrid_ext.parallelize(MODELS["small_cnn"][0](), strategy=strategy, mp_size=mp_size)
    for p in model.parameters():  # nothing of the saved run is left
        torch.nn.init.normal_(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _batch(rank, world, 0, strategy)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # DCP loads into existing optimizer state
    dcp.load(model, path, optimizer)
    return {
        "state": hybrid_ext.full_state_dict(model),
        "optimizer": hybrid_ext.full_optimizer_state_dict(model, optimizer),
    }


def test_dcp_checkpoints_load_across_strategies_and_world_sizes(spawn_ranks, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = spawn_ranks(_dcp_save_rank, 4, "hybrid", 2, path)[0]
    for strategy, world, mp_size in (("dp", 3, None), ("hybrid", 2, None)):
        for loaded in spawn_ranks(_dcp_load_rank, world, strategy, mp_size, path):
            for key, value in saved["state"].items():
                torch.testing.assert_close(loaded["state"][key], value, rtol=0, atol=0, msg=key)
            momentum = {k: v["momentum_buffer"] for k, v in saved["optimizer"]["state"].items()}
            for k, v in loaded["optimizer"]["state"].items():
                torch.testing.assert_close(v["momentum_buffer"], momentum[k], rtol=0, atol=0)
