"""A recipe asked for ``--device cuda`` on a machine without CUDA refuses by name and exits, in a process of its own
(the table behind it: tests/unit/test_device.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import ROOT

RECIPES = ROOT / "recipes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["torch/train_cnn.py", "deepspeed/train_cnn.py"], ids=lambda s: s.split("/")[0])
def test_a_recipe_asked_for_cuda_here_says_so_and_exits(script):
    command = [sys.executable, str(RECIPES / script), "--device", "cuda"]
    if script.startswith("deepspeed"):
        command += ["--deepspeed_config", str(RECIPES / "deepspeed" / "dp-native.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110)
    assert done.returncode == 2, done.stderr
    assert "argument --device" in done.stderr and "no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr
