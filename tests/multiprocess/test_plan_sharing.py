"""``hybrid-ext plan --measure-sharing``: σ timed with every rank of the layout computing at once on this machine."""

from __future__ import annotations

import json

import pytest

from hybrid_ext.cli import main

SMALL = ["--model", "digits_alexnet", "--micro-batch", "2", "--size", "16", "--profile-steps", "2", "--device", "cpu"]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_measured_sharing_scales_the_compute(tmp_path, capsys):
    measured, ruled = tmp_path / "measured.json", tmp_path / "ruled.json"
    calibration = tmp_path / "layers.json"
    assert main(["plan", *SMALL, "--np", "4", "--json", str(ruled), "--save-calibration", str(calibration)]) == 0
    args = ["plan", *SMALL, "--np", "4", "--calibration", str(calibration), "--measure-sharing"]
    assert main([*args, "--json", str(measured)]) == 0
    assert "measured: 4 ranks at once against one alone" in capsys.readouterr().out
    by_rule, timed = json.loads(ruled.read_text()), json.loads(measured.read_text())
    assert timed["compute_scale_source"].startswith("measured")
    # Four ranks on this machine's cores: at least as slow as one alone, and not absurdly slower.
    assert 1.0 <= timed["compute_scale"] < 20.0
    dp = {r["strategy"]: r for r in by_rule["strategies"]}["dp"]
    dp_timed = {r["strategy"]: r for r in timed["strategies"]}["dp"]
    # The same layer times (the calibration), only σ differs: dp's compute scales by the ratio of the two σ.
    ratio = timed["compute_scale"] / by_rule["compute_scale"]
    assert dp_timed["compute_ms"] == pytest.approx(dp["compute_ms"] * ratio, rel=1e-6)
