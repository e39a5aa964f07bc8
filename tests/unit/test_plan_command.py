"""``hybrid-ext plan`` in one process: its figures, its JSON, its calibration files and its errors."""

from __future__ import annotations

import json

import pytest

from hybrid_ext import launch, plan_command
from hybrid_ext.cli import main

pytestmark = pytest.mark.timeout(180)

SMALL = ["--model", "digits_alexnet", "--micro-batch", "2", "--size", "16", "--profile-steps", "1", "--device", "cpu"]


def test_dp_hybrid_and_mp_side_by_side(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", *SMALL, "--np", "4", "--mp-size", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "digits_alexnet (16×16), 4 ranks, micro-batch 2" in printed
    result = json.loads(out.read_text())
    rows = {e["strategy"]: e for e in result["strategies"]}
    assert list(rows) == ["dp", "hybrid", "mp", "auto"] and [rows[s]["mp_size"] for s in rows][:3] == [1, 2, 2]
    # auto: the least predicted step of its candidates, among them dp and hybrid (every chain sharded) at mp_size 2
    assert rows["auto"]["step_ms"] <= min(rows["dp"]["step_ms"], rows["hybrid"]["step_ms"])
    assert (rows["auto"]["chose"], rows["auto"]["mp_size"]) in {("dp", 1), ("hybrid", 2)}
    assert f"auto:{rows['auto']['chose']}" in printed and f"auto chose {rows['auto']['plan']}" in printed
    # what auto splits, and whether the strategy's own plan is it (so that a run of the strategy measures it)
    assert set(rows["auto"]) >= {"sharded_chains", "split_convolutions", "same_as_strategy"}
    assert rows["auto"]["same_as_strategy"] == (
        not rows["auto"]["split_convolutions"]
        and len(rows["auto"]["sharded_chains"]) == (rows["auto"]["chose"] != "dp")
    )
    for entry in rows.values():
        assert entry["step_ms"] == pytest.approx(entry["compute_ms"] + entry["exposed_communication_ms"])
        assert entry["samples_per_s"] == pytest.approx(4 * 2 / (entry["step_ms"] / 1e3))
        assert f"{entry['bytes_per_rank']:,}" in printed
    # digits_alexnet holds ~3.2 M of its ~3.3 M parameters in its FC layers: sharding them sends far fewer bytes.
    assert rows["hybrid"]["bytes_per_rank"] < rows["dp"]["bytes_per_rank"] / 2
    assert {layer["style"] for layer in rows["hybrid"]["layers"]} == {"dp", "column", "row", "column_last"}


def test_a_saved_calibration_plans_the_same_model_only(tmp_path, capsys):
    saved = tmp_path / "digits.json"
    assert (
        main(["plan", *SMALL, "--np", "2", "--save-calibration", str(saved), "--json", str(tmp_path / "a.json")]) == 0
    )
    assert main(["plan", *SMALL, "--np", "2", "--calibration", str(saved), "--json", str(tmp_path / "b.json")]) == 0
    measured, loaded = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert [e["step_ms"] for e in loaded["strategies"]] == pytest.approx([e["step_ms"] for e in measured["strategies"]])
    capsys.readouterr()
    other = [a if a != "16" else "24" for a in SMALL]  # another input size: other shapes
    assert main(["plan", *other, "--np", "2", "--calibration", str(saved)]) == 2
    assert "is for another model: layer '0' has input shape (3, 24, 24) here" in capsys.readouterr().err


def test_impossible_mp_size_is_named(capsys):
    assert main(["plan", *SMALL, "--np", "4", "--mp-size", "3"]) == 2
    assert "mp_size=3 does not divide the world size 4" in capsys.readouterr().err


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--model", "resnet1000", "--np", "2"])
    assert "invalid choice: 'resnet1000'" in capsys.readouterr().err


@pytest.mark.usefixtures("isolated_cost_models")  # no link calibrated on this machine counts
def test_hosts_and_their_link_rate(tmp_path):
    one, two, slow = (tmp_path / f"{name}.json" for name in ("one", "two", "slow"))
    common = [*SMALL, "--np", "4", "--calibration"]
    assert main(["plan", *SMALL, "--np", "4", "--save-calibration", str(tmp_path / "c.json"), "--json", str(one)]) == 0
    assert main(["plan", *common, str(tmp_path / "c.json"), "--hosts", "2", "--json", str(two)]) == 0
    assert main(["plan", *common, str(tmp_path / "c.json"), "--hosts", "2", "--nic", "1mbit", "--json", str(slow)]) == 0
    assert "not calibrated between hosts" in json.loads(two.read_text())["link"]["source"]
    assert json.loads(one.read_text())["link"] is None
    one, two, slow = ({e["strategy"]: e for e in json.loads(f.read_text())["strategies"]} for f in (one, two, slow))
    assert one["dp"]["bytes_per_host_link"] == 0 < two["dp"]["bytes_per_host_link"]
    # dp's gradients cross the link; at 1 Mbit/s that dominates, and hybrid sends far fewer bytes across
    assert slow["dp"]["step_ms"] > two["dp"]["step_ms"]
    assert slow["hybrid"]["bytes_per_host_link"] < slow["dp"]["bytes_per_host_link"] / 2
    assert slow["hybrid"]["samples_per_s"] > slow["dp"]["samples_per_s"]


@pytest.mark.usefixtures("isolated_cost_models")
@pytest.mark.parametrize("nic", [[], ["--nic", "1gbit"]])
def test_messages_between_hosts_are_priced_by_the_links_calibration(tmp_path, nic):
    from hybrid_ext.comm import cost_model
    from hybrid_ext.comm.cost_model import CostModel

    table = tmp_path / "c.json"
    assert main(["plan", *SMALL, "--np", "4", "--save-calibration", str(table)]) == 0
    hybrid = {}
    for alpha in (1e-6, 10e-3):  # the link's calibration (bench allreduce --hosts 2 --calibrate), not gloo's own
        cost_model.save_model(cost_model.network_model_key("torch-gloo"), CostModel(alpha=alpha, beta=8e-9))
        out = tmp_path / f"{alpha}.json"
        assert main(["plan", *SMALL, "--np", "4", "--calibration", str(table), "--hosts", "2", *nic,
                     "--json", str(out)]) == 0  # fmt: skip
        result = json.loads(out.read_text())
        assert result["link"]["alpha_s"] == alpha and result["link"]["source"] == "calibrated (network/torch-gloo)"
        hybrid[alpha] = next(e for e in result["strategies"] if e["strategy"] == "hybrid")
    slow, fast = hybrid[10e-3], hybrid[1e-6]
    assert slow["compute_ms"] == pytest.approx(fast["compute_ms"])
    # hybrid's activation exchanges cross hosts at every sharded layer: each message to the other host costs α
    assert slow["exposed_communication_ms"] > fast["exposed_communication_ms"] + 5 * 10


def test_bad_host_layouts_are_named(capsys):
    assert main(["plan", *SMALL, "--np", "4", "--hosts", "3"]) == 2
    assert "--np 4 ranks do not spread evenly over --hosts 3" in capsys.readouterr().err
    assert main(["plan", *SMALL, "--np", "4", "--nic", "1gbit"]) == 2
    assert "give --hosts too" in capsys.readouterr().err


def test_ranks_sharing_cores_compute_slower(tmp_path):
    import torch

    threads = torch.get_num_threads()
    calibration, alone, shared = tmp_path / "c.json", tmp_path / "alone.json", tmp_path / "shared.json"
    assert main(["plan", *SMALL, "--np", "4", "--cores", "4", "--save-calibration", str(calibration),
                 "--json", str(alone)]) == 0  # fmt: skip
    assert torch.get_num_threads() == threads  # profiled on one thread, then put back
    assert main(["plan", *SMALL, "--np", "4", "--cores", "2", "--calibration", str(calibration),
                 "--json", str(shared)]) == 0  # fmt: skip
    alone, shared = (json.loads(f.read_text()) for f in (alone, shared))
    assert (alone["compute_scale"], shared["compute_scale"]) == (1.0, 2.0)  # 4 ranks of 1 thread on 4 or 2 cores
    assert alone["cores_busy"] and shared["cores_busy"]  # every core computes: no idle one for the gradients
    spare = tmp_path / "spare.json"
    assert main(["plan", *SMALL, "--np", "4", "--cores", "8", "--calibration", str(calibration),
                 "--json", str(spare)]) == 0  # fmt: skip
    assert not json.loads(spare.read_text())["cores_busy"]
    # Emulated hosts share one machine's cores: half a core per host for its 2 ranks is σ = 4.
    emulated = tmp_path / "emulated.json"
    assert main(["plan", *SMALL, "--np", "4", "--hosts", "2", "--cores", "0.5", "--calibration", str(calibration),
                 "--json", str(emulated)]) == 0  # fmt: skip
    assert json.loads(emulated.read_text())["compute_scale"] == 4.0
    for a, s in zip(alone["strategies"], shared["strategies"], strict=True):
        # auto may choose another plan where messages cost the ranks more of a core: only the same plan compares
        if a["strategy"] != "auto" or a["plan"] == s["plan"]:
            assert s["compute_ms"] == pytest.approx(2 * a["compute_ms"])


def test_cores_must_be_positive(capsys):
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit):
            main(["plan", *SMALL, "--np", "2", "--cores", bad])
        assert "--cores: expected a positive number" in capsys.readouterr().err


def test_layers_prints_each_strategy_layer_by_layer(capsys):
    assert main(["plan", *SMALL, "--np", "2", "--layers"]) == 0
    printed = capsys.readouterr().out
    for strategy in ("dp", "hybrid", "mp"):
        assert f"predicted step (strategy={strategy}, world=2" in printed
    assert "column_last" in printed and "replicated.bucket0  gradients" in printed


def test_measured_sharing_counts_each_step_at_its_slowest_rank(monkeypatch):
    # A synchronous step lasts as long as its slowest rank: σ is the median over steps of the slowest rank's time,
    # against the median step of one process alone (both spawned alike; here the spawns are stand-ins).
    alone = [1.0, 1.1, 0.9, 1.0, 1.0]
    together = [[2.0, 2.0, 2.0, 2.0, 2.0], [2.5, 1.5, 3.0, 1.5, 2.6], [1.5, 2.8, 1.5, 2.7, 1.5]]
    spawned = []

    def fake_spawn(fn, world, model_spec, example, steps, *, threads, timeout):
        spawned.append((world, steps, threads))
        return [alone] if world == 1 else together

    monkeypatch.setattr(launch, "spawn", fake_spawn)
    sigma = plan_command.measured_sharing("digits_alexnet", 3, object(), threads=1, steps=2)
    assert spawned == [(1, plan_command.SHARING_STEPS, 1), (3, plan_command.SHARING_STEPS, 1)]
    # The slowest per step: 2.5, 2.8, 3.0, 2.7, 2.6. Each rank's median step would say 2.0, 2.5 and 1.5.
    assert sigma == pytest.approx(2.7)


@pytest.mark.parametrize(("measured", "kept"), [(1.5, 2.0), (2.6, 2.6)])
def test_measured_sharing_is_at_least_the_cores_share(tmp_path, monkeypatch, measured, kept):
    # Four busy ranks on two cores cannot each compute faster than half as fast as one alone: a measure below
    # that is noise, and the share is kept; one above it counts (memory bandwidth, caches).
    monkeypatch.setattr(plan_command, "measured_sharing", lambda *args, **kwargs: measured)
    out = tmp_path / "plan.json"
    args = ["plan", *SMALL, "--np", "4", "--cores", "2", "--measure-sharing", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["compute_scale"] == pytest.approx(kept)
    assert ("below the cores' share" in result["compute_scale_source"]) == (measured < 2.0)
