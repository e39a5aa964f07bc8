"""A DDP training script with its DDP line swapped for ``parallelize`` trains exactly as it did
(tests/helpers/ddp_style_train.py under torchrun): every logged loss, evaluation, the final and EMA weights and the
optimizer's state — and a run resumed from the script's own checkpoint, or from the DDP run's, ends where the
uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrid_ext.launch import run_torchrun

from helpers import HELPERS

SCRIPT = str(HELPERS / "ddp_style_train.py")
EPOCHS = 3
ENV = {"HYBRID_EXT_TUNE": "off"}  # the same schedules on every run: resumed runs sum in the same order

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]


def _run(tmp_path: Path, name: str, wrap: str, epochs: int = EPOCHS, resume: Path | None = None) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    argv = [SCRIPT, "--wrap", wrap, "--out", str(out), "--epochs", str(epochs)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    return run_torchrun(argv, 2, env=ENV, timeout=240)


def _close(got, expected, what: str) -> None:
    if isinstance(expected, dict):
        assert set(got) == set(expected), what
        for key in expected:
            _close(got[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), what
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            _close(a, b, f"{what}[{i}]")
    elif torch.is_tensor(expected):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6, msg=what)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=2e-5, abs=1e-6), what
    else:
        assert got == expected, what


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp_style")
    out = {"ddp": _run(tmp, "ddp", "ddp"), "hybrid": _run(tmp, "hybrid", "hybrid")}
    # Interrupted after two epochs, then resumed from the checkpoint of the second (epoch index 1).
    _run(tmp, "hybrid-first", "hybrid", epochs=2)
    out["hybrid-resumed"] = _run(tmp, "hybrid-second", "hybrid", resume=tmp / "hybrid-first" / "model_1.pth")
    out["hybrid-from-ddp"] = _run(tmp, "from-ddp", "hybrid", resume=tmp / "ddp" / "model_1.pth")
    out["checkpoint"] = torch.load(tmp / "hybrid" / f"model_{EPOCHS - 1}.pth", weights_only=False)
    out["ddp-checkpoint"] = torch.load(tmp / "ddp" / f"model_{EPOCHS - 1}.pth", weights_only=False)
    return out


def test_the_one_line_swap_trains_as_ddp_did(runs):
    for rank, (ddp, hybrid) in enumerate(zip(runs["ddp"], runs["hybrid"], strict=True)):
        assert len(ddp["losses"]) == EPOCHS * 3
        _close(hybrid["losses"], ddp["losses"], f"rank {rank} losses")
        _close(hybrid["evaluations"], ddp["evaluations"], f"rank {rank} evaluations (model, EMA)")
        _close(hybrid["model"], ddp["model"], f"rank {rank} weights")
        _close(hybrid["ema"], ddp["ema"], f"rank {rank} EMA")
        _close(hybrid["optimizer"], ddp["optimizer"], f"rank {rank} optimizer")


def test_the_saved_checkpoint_is_ddps(runs):
    _close(runs["checkpoint"], runs["ddp-checkpoint"], "checkpoint")


@pytest.mark.parametrize("resumed", ["hybrid-resumed", "hybrid-from-ddp"])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(runs, resumed):
    for rank, (whole, second) in enumerate(zip(runs["ddp"], runs[resumed], strict=True)):
        _close(second["losses"], whole["losses"][-3:], f"rank {rank} losses of the last epoch")
        _close(second["model"], whole["model"], f"rank {rank} weights")
        _close(second["ema"], whole["ema"], f"rank {rank} EMA")
        _close(second["optimizer"], whole["optimizer"], f"rank {rank} optimizer")
