"""What DDP scripts do keeps working under ``parallelize``: optimizers built before the wrap, the usual checkpoints,
clipping with torch's function, EMA deep copies — and replicas that drift apart are named, never silent."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import hybrid_ext
from hybrid_ext.parallel.replicas import ReplicaDivergenceError

from helpers.parallel_reference import MICRO_BATCH, small_cnn

WORLD = 2
STEPS = 3
MAX_NORM = 0.05  # small enough that every step clips


def _batch(step: int, world: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(world * MICRO_BATCH, 3, 16, 16, generator=g), torch.randint(
        0, 10, (world * MICRO_BATCH,), generator=g
    )


def _reference(steps: int, clip: float | None = None) -> dict:
    """The plain model on the global batch: SGD with momentum (built as usual), optional clipping."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    norms = []
    for step in range(steps):
        x, y = _batch(step, WORLD)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        optimizer.step()
    return {
        "state": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "norms": norms,
    }


def _train(model, optimizer, rank: int, world: int, steps: int, clip=None) -> list[float]:
    norms = []
    for step in range(steps):
        x, y = _batch(step, world)
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            norms.append(float(clip(model)))
        optimizer.step()
    return norms


def _assert_states_equal(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), what
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


# ------------------------------------------------------------------ optimizer built before the wrap


def _optimizer_before_wrap_rank(rank: int, world: int) -> dict:
    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)  # before the wrap, as scripts do
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    before = [id(p) for p in plain.parameters()]
    model = hybrid_ext.parallelize(plain, strategy="hybrid", reducer="butterfly")
    kept = [id(p) for p in model.parameters()] == before
    _train(model, optimizer, rank, world, STEPS)
    scheduler.step()
    return {
        "kept": kept,
        "state": model.module.state_dict(),
        "momentum_entries": len(optimizer.state),
        "optimizer": optimizer.state_dict(),
    }


def test_an_optimizer_built_before_the_wrap_trains_every_layer(spawn_ranks):
    expected = _reference(STEPS)
    for rank, result in enumerate(spawn_ranks(_optimizer_before_wrap_rank, WORLD, timeout=240)):
        assert result["kept"], "parallelize must keep the model's parameter objects"
        assert result["momentum_entries"] == len(expected["optimizer"]["state"])
        _assert_states_equal(result["state"], expected["state"], f"rank {rank} weights")
        for index, entries in expected["optimizer"]["state"].items():  # full state, as over the plain model
            torch.testing.assert_close(
                result["optimizer"]["state"][index]["momentum_buffer"], entries["momentum_buffer"], rtol=1e-5, atol=1e-6
            )


def _retired_rank(rank: int, world: int) -> str:
    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid")
    stale = torch.nn.Parameter(torch.zeros(3))
    stale.retired_by_hybrid_ext = "7.weight"  # what parallelize marks a parameter it took out of the model
    optimizer = torch.optim.SGD([*model.parameters(), stale], lr=0.1)
    try:
        optimizer.step()
    except RuntimeError as error:
        return str(error)
    return "stepped"


def test_an_optimizer_over_parameters_the_model_dropped_fails_loudly(spawn_ranks):
    for message in spawn_ranks(_retired_rank, WORLD, timeout=120):
        assert "7.weight" in message and "after the wrap" in message


# ------------------------------------------------------------------ checkpoints the usual way


def _checkpoint_rank(rank: int, world: int, tmp: str) -> dict:
    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid", reducer="butterfly")
    model_without_ddp = model.module
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer, rank, world, 2)
    checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict()}  # every rank
    wrapped_keys = sorted(model.state_dict())
    if rank == 0:
        torch.save(checkpoint, f"{tmp}/checkpoint.pth")
    hybrid_ext.allreduce(torch.zeros(1))  # a barrier: the file is on disk

    # A fresh run resumes with the usual code: build, optimizer, wrap, load.
    resumed_plain = small_cnn()
    resumed_optimizer = torch.optim.SGD(resumed_plain.parameters(), lr=0.1, momentum=0.9)
    resumed = hybrid_ext.parallelize(resumed_plain, strategy="hybrid", reducer="butterfly")
    saved = torch.load(f"{tmp}/checkpoint.pth", map_location="cpu", weights_only=False)
    resumed.module.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _train_from(resumed, resumed_optimizer, rank, world, 2, STEPS)
    final = copy.deepcopy(resumed.module.state_dict())  # whole tensors are views of the parameters

    # A shard-shaped tensor is refused, with what to do instead.
    try:
        with torch.no_grad():
            bad = dict(saved["model"])
            bad["7.weight"] = model.module[7].weight.detach().clone()
        resumed.module.load_state_dict(bad)
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    sharded = model.sharded_state_dict()
    return {
        "checkpoint_shapes": {k: tuple(v.shape) for k, v in saved["model"].items()},
        "wrapped_keys": wrapped_keys,
        "final": final,
        "refused": refused,
        "sharded_shape": tuple(sharded["module.7.weight"].shape),
    }


def _train_from(model, optimizer, rank, world, start, stop):
    for step in range(start, stop):
        x, y = _batch(step, world)
        x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_the_usual_checkpoint_is_full_and_resumes(spawn_ranks, tmp_path):
    plain = small_cnn()
    expected_shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    expected = _reference(STEPS)
    for rank, result in enumerate(spawn_ranks(_checkpoint_rank, WORLD, str(tmp_path), timeout=240)):
        assert result["checkpoint_shapes"] == expected_shapes
        assert result["wrapped_keys"] == sorted(f"module.{k}" for k in expected_shapes)  # DDP's keys
        plain.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=False)["model"])  # loads plain
        _assert_states_equal(result["final"], expected["state"], f"rank {rank} resumed")
        assert "7.weight" in result["refused"] and "sharded_state_dicts" in result["refused"]
        assert result["sharded_shape"] == (50, 192)


# ------------------------------------------------------------------ clipping


def _clip_rank(rank: int, world: int, how: str) -> dict:
    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    model = hybrid_ext.parallelize(plain, strategy="hybrid", reducer="butterfly")
    if how == "torch":
        clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)  # noqa: E731
    else:
        clip = lambda m: m.clip_grad_norm_(MAX_NORM)  # noqa: E731
    norms = _train(model, optimizer, rank, world, STEPS, clip)
    return {"norms": norms, "state": model.module.state_dict()}


@pytest.mark.parametrize("how", ["torch", "model"])
def test_clipping_uses_the_whole_models_norm(spawn_ranks, how):
    expected = _reference(STEPS, clip=MAX_NORM)
    for rank, result in enumerate(spawn_ranks(_clip_rank, WORLD, how, timeout=240)):
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-5), f"rank {rank}"
        _assert_states_equal(result["state"], expected["state"], f"rank {rank}")


def _drift_rank(rank: int, world: int, where: str) -> str:
    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid", reducer="butterfly")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, optimizer, rank, world, 1)
    with torch.no_grad():
        model.module[3].weight.add_(1e-3 * rank)  # a replicated conv weight, changed on one rank only
    try:
        if where == "checkpoint":
            model.module.state_dict()
        else:
            hybrid_ext.set_check(True)
            _train(model, optimizer, rank, world, 1)
    except ReplicaDivergenceError as error:
        return str(error)
    return "not caught"


@pytest.mark.parametrize("where", ["checkpoint", "check-mode step"])
def test_replicas_that_drift_apart_are_named(spawn_ranks, where):
    env = {"HYBRID_EXT_CHECK_REPLICAS_EVERY": "1"}  # check mode compares after every step
    for message in spawn_ranks(_drift_rank, WORLD, where, timeout=120, env=env):
        assert "'3.weight'" in message and "[[0], [1]]" in message


# ------------------------------------------------------------------ copies


def _ema_rank(rank: int, world: int) -> dict:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    model = hybrid_ext.parallelize(plain, strategy="hybrid", reducer="butterfly")
    ema = AveragedModel(model.module, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for step in range(STEPS):
        _train_from(model, optimizer, rank, world, step, step + 1)
        ema.update_parameters(model)
    x, _ = _batch(99, world)
    x = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
    ema.eval()
    with torch.no_grad():
        out = ema(x)
    wrapper_copy = copy.deepcopy(model)
    wrapper_copy.eval()
    with torch.no_grad():
        same = torch.equal(wrapper_copy(x), model.eval()(x))
    try:
        pickle.dump(model, io.BytesIO())
        pickled = "pickled"
    except TypeError as error:
        pickled = str(error)
    return {"ema_state": ema.module.state_dict(), "ema_out": out, "copy_forward_equal": same, "pickled": pickled}


def test_ema_deep_copies_work(spawn_ranks):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    ema = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for step in range(STEPS):
        x, y = _batch(step, WORLD)
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
        ema.update_parameters(plain)
    x, _ = _batch(99, WORLD)
    with torch.no_grad():
        expected_out = ema.eval()(x)
    for rank, result in enumerate(spawn_ranks(_ema_rank, WORLD, timeout=240)):
        _assert_states_equal(result["ema_state"], ema.module.state_dict(), f"rank {rank} EMA")
        torch.testing.assert_close(
            result["ema_out"], expected_out[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], rtol=1e-5, atol=1e-6
        )
        assert result["copy_forward_equal"]
        assert "cannot be pickled" in result["pickled"] and "state_dict()" in result["pickled"]


def _state_dict_ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, style: str) -> None:
    """timm's EMAs: they write into the EMA copy's state-dict tensors in place (V2 one by one, V3 with foreach)."""
    with torch.no_grad():
        ema_values = [v for v in ema.state_dict().values() if v.is_floating_point()]
        model_values = [v for v in model.state_dict().values() if v.is_floating_point()]
        if style == "v2":
            for ema_v, model_v in zip(ema_values, model_values, strict=True):
                ema_v.copy_(decay * ema_v + (1.0 - decay) * model_v)
        else:
            torch._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)


def _state_dict_ema_rank(rank: int, world: int, style: str) -> dict:
    model = hybrid_ext.parallelize(small_cnn(), strategy="hybrid", reducer="butterfly")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = copy.deepcopy(model.module)
    for step in range(STEPS):
        _train_from(model, optimizer, rank, world, step, step + 1)
        _state_dict_ema_update(ema, model.module, 0.5, style)
    return {"ema": ema.state_dict()}


@pytest.mark.parametrize("style", ["v2", "v3"])
def test_emas_that_write_into_state_dict_tensors_update_the_shards(spawn_ranks, style):
    plain = small_cnn()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    ema = copy.deepcopy(plain)
    for step in range(STEPS):
        x, y = _batch(step, WORLD)
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
        _state_dict_ema_update(ema, plain, 0.5, style)
    for rank, result in enumerate(spawn_ranks(_state_dict_ema_rank, WORLD, style, timeout=240)):
        _assert_states_equal(result["ema"], ema.state_dict(), f"rank {rank} {style} EMA")
