"""The main job in miniature: a 2-rank, few-step demo writes every tag, logs all-rank averages, compares back."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from hybrid_ext.train import compare
from hybrid_ext.train.loop import TrainConfig, train
from hybrid_ext.train.run_log import HPARAMS, TAGS, sharded_over

from helpers import ROOT


def _demo_rank(rank: int, world: int, config: TrainConfig) -> dict:
    return train(config)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    from hybrid_ext.launch import spawn

    base = TrainConfig(logdir=str(logdir), epochs=1, max_steps=3, micro_batch=8, progress=False)
    results = {}
    for strategy, reducer in (("hybrid", "butterfly"), ("dp", "native")):
        results[(strategy, reducer)] = spawn(_demo_rank, 2, replace(base, strategy=strategy, reducer=reducer))
    return logdir, results


def test_every_tag_and_the_hparams_are_written(demo_runs):
    logdir, _ = demo_runs
    runs = {p.name: p for p in compare.find_runs([logdir])}
    assert set(runs) == {"hybrid-butterfly-np2", "dp-native-np2"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in runs.values():
        acc = EventAccumulator(str(path))
        acc.Reload()
        assert set(TAGS) <= set(acc.Tags()["scalars"])
        assert len(acc.Scalars("train/loss")) == 3
        summary = compare.read_run(path)
        assert set(HPARAMS) <= set(summary.hparams)
        assert summary.hparams["world_size"] == 2 and summary.hparams["framework"] == "torch"
        assert summary.hparams["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


def test_mp_size_is_what_the_layers_are_sharded_over(demo_runs):
    logdir, _ = demo_runs
    assert compare.read_run(logdir / "dp-native-np2").hparams["mp_size"] == 1  # dp shards nothing
    assert compare.read_run(logdir / "hybrid-butterfly-np2").hparams["mp_size"] == 2
    assert sharded_over("dp", 4) == 1 and sharded_over("mp", 4) == 4 and sharded_over("hybrid", 2) == 2


def test_logged_loss_is_the_average_over_all_ranks(demo_runs):
    logdir, results = demo_runs
    ranks = results[("hybrid", "butterfly")]
    logged = compare.read_run(logdir / "hybrid-butterfly-np2").loss
    for step, value in logged:
        mean = sum(r["own_losses"][step] for r in ranks) / len(ranks)
        assert value == pytest.approx(mean, rel=1e-5)
    assert ranks[0]["own_losses"] != ranks[1]["own_losses"]  # the ranks really saw different samples


def test_compare_reads_the_runs_back(demo_runs, tmp_path):
    logdir, results = demo_runs
    out = subprocess.run(
        [sys.executable, "-m", "hybrid_ext", "compare", str(logdir), "--png", str(tmp_path / "c.png"),
         "--markdown", str(tmp_path / "c.md")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "hybrid-butterfly-np2" in out.stdout and "dp-native-np2" in out.stdout
    assert "1.00×" in out.stdout  # dp + native is the baseline of the speed-up column
    assert (tmp_path / "c-loss.png").stat().st_size > 0 and (tmp_path / "c-samples_per_sec.png").exists()
    for kind in ("time_to_accuracy", "step_split"):  # MLPerf's measure, and where a step's time goes
        assert (tmp_path / f"c-{kind}.png").stat().st_size > 0
    final = results[("hybrid", "butterfly")][0]["final/eval_accuracy"]
    table = (tmp_path / "c.md").read_text()
    assert f"{final * 100:.1f} %" in table
    device = results[("hybrid", "butterfly")][0]["device"]  # "cpu" or "cuda:<rank 0's GPU>"
    assert "| device |" in table and f"| {device.split(':')[0]} |" in table  # which device each run used


@pytest.mark.multiprocess
def test_torchrun_recipe_logs_by_the_same_contract(tmp_path):

    from hybrid_ext.launch import run_torchrun

    recipe = ROOT / "recipes" / "torch" / "train_cnn.py"
    results = run_torchrun(
        [str(recipe), "--strategy", "hybrid", "--reducer", "butterfly", "--max-steps", "2", "--epochs", "1",
         "--micro-batch", "8", "--logdir", str(tmp_path)],
        2,
    )  # fmt: skip
    assert [r["run"] for r in results] == ["hybrid-butterfly-np2"] * 2
    summary = compare.read_run(tmp_path / "hybrid-butterfly-np2")
    assert summary.hparams["framework"] == "torchrun" and len(summary.loss) == 2


def _recipe_configs(monkeypatch, *flags: str) -> dict:
    """Each recipe's parsed TrainConfig (and the DeepSpeed one's ds_config) for the same command-line flags."""
    import importlib.util

    recipes = ROOT / "recipes"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    configs = {}
    for name, extra in (("torch", ()), ("horovod", ()), ("deepspeed", ("--deepspeed_config", "hybrid-butterfly.json"))):
        pytest.importorskip(name)
        spec = importlib.util.spec_from_file_location(f"{name}_recipe", recipes / name / "train_cnn.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extra = tuple(str(recipes / name / e) if e.endswith(".json") else e for e in extra)
        monkeypatch.setattr(sys, "argv", ["train_cnn.py", *extra, *flags, "--device", "cpu"])
        configs[name] = module.parse_args()
    return configs


@pytest.mark.timeout(120)
def test_the_three_recipes_share_one_default_and_the_larger_models_are_one_flag_away(monkeypatch):
    def described(config):
        return config.model, config.data, config.epochs, config.lr, config.size, config.micro_batch

    for flags, expected in (((), ("digits_alexnet", None, 5, 1e-3, 32, 16)), (("--model", "alexnet"), None)):
        configs = _recipe_configs(monkeypatch, *flags)
        torchrun, _ = configs["torch"]
        (horovod,) = configs["horovod"]
        deepspeed, ds_config, _ = configs["deepspeed"]
        assert described(torchrun) == described(horovod) == described(deepspeed)
        assert ds_config["optimizer"]["params"]["lr"] == deepspeed.lr  # the recipe's, not the file's
        if expected is not None:
            assert described(torchrun) == expected
        else:
            assert torchrun.model == "alexnet" and torchrun.size >= 63 and torchrun.lr == 1e-4
