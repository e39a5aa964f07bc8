"""strategy="auto" weighing mp: only when asked (it changes what each rank passes), at mp_size = world."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import hybrid_ext
from hybrid_ext import plan_command
from hybrid_ext.cli import main
from hybrid_ext.parallel.auto_plan import choose_plan
from hybrid_ext.parallel.layer_profile import layer_shapes
from hybrid_ext.parallel.plan import plan_by_rules
from hybrid_ext.parallel.step_model import predict_step

from helpers.parallel_reference import small_cnn

pytestmark = pytest.mark.timeout(120)

B = 4
ALL = ("dp", "hybrid", "mp")


def _weight_bound_table():
    """small_cnn with every leaf taking 1 s forward and 2 s backward whatever its rows (all of it fixed: reading its
    weights): a layer split four ways then costs a quarter, so mp — every layer split — predicts the least step."""
    model = small_cnn()
    table = layer_shapes(model, torch.randn(B, 3, 16, 16))
    table.layers = {
        path: replace(r, forward_s=1.0, backward_s=2.0, forward_fixed_s=1.0, backward_fixed_s=2.0) if r.leaf else r
        for path, r in table.layers.items()
    }
    return model, table


def test_mp_is_a_candidate_when_asked_and_its_step_is_predict_steps():
    model, table = _weight_bound_table()
    chosen = choose_plan(model, table, 4, B, strategies=ALL)
    assert chosen.strategy == "mp" and chosen.mp_size == 4
    mp_plan = plan_by_rules(model, "mp")
    assert chosen.styles == mp_plan.styles and "channel" in chosen.styles.values()
    expected = predict_step(model, table, mp_plan.styles, "mp", 4, 4, B).step_s
    assert chosen.prediction.step_s == pytest.approx(expected)
    assert chosen.alternatives[0].strategy == "mp" and "global batch" in chosen.alternatives[0].label
    assert {c.strategy for c in chosen.alternatives} == set(ALL)
    assert "strategy=auto: mp" in str(chosen)


def test_by_default_auto_keeps_each_rank_passing_its_own_micro_batch():
    model, table = _weight_bound_table()
    chosen = choose_plan(model, table, 4, B)
    assert chosen.strategy in ("dp", "hybrid")
    assert all(c.strategy != "mp" for c in chosen.alternatives)
    only_dp = choose_plan(model, table, 4, B, strategies=("dp",))
    assert only_dp.strategy == "dp" and len(only_dp.alternatives) == 1


def test_mp_only_at_mp_size_world_and_where_every_layer_splits():
    model, table = _weight_bound_table()
    halves = choose_plan(model, table, 4, B, mp_sizes=[2], strategies=ALL)  # mp runs over all ranks only
    assert all(c.strategy != "mp" for c in halves.alternatives)
    # small_cnn ends in 10 classes: 16 ranks cannot split them (nor hybrid's last layer), so only dp remains
    wide = choose_plan(model, table, 16, B, mp_sizes=[16], strategies=ALL)
    assert wide.strategy == "dp"
    with pytest.raises(ValueError, match="no plan of mp fits this model on 16 ranks"):
        choose_plan(model, table, 16, B, mp_sizes=[16], strategies=("mp",))


@pytest.mark.parametrize("strategies", [(), ("dp", "zero"), ("auto",)])
def test_unknown_strategies_are_named(strategies):
    model, table = _weight_bound_table()
    with pytest.raises(ValueError, match="strategies must name some of dp, hybrid, mp"):
        choose_plan(model, table, 4, B, strategies=strategies)


def test_parallelize_names_bad_auto_strategies_before_any_collective():
    with pytest.raises(ValueError, match="auto_strategies"):
        hybrid_ext.parallelize(
            small_cnn(), strategy="auto", example_input=torch.randn(2, 3, 16, 16), auto_strategies=("pipeline",)
        )


def test_plan_command_auto_weighs_what_it_is_told(tmp_path, capsys):
    args = ["plan", "--model", "digits_alexnet", "--np", "2", "--micro-batch", "2", "--size", "16"]
    args += ["--device", "cpu", "--profile-steps", "1"]
    out = tmp_path / "plan.json"
    assert main([*args, "--auto-strategies", "dp,hybrid,mp", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    by = {e["strategy"]: e for e in result["strategies"]}
    fastest = min(("dp", "hybrid", "mp"), key=lambda s: by[s]["step_ms"])
    assert by["auto"]["step_ms"] <= by[fastest]["step_ms"] * (1 + 1e-9)
    with pytest.raises(SystemExit):
        main([*args, "--auto-strategies", "dp,pipeline"])
    assert "expected some of dp,hybrid,mp" in capsys.readouterr().err
    assert plan_command._strategy_list("mp, dp") == ("mp", "dp")


@pytest.mark.parametrize("hosts", [("a", "a", "b", "b"), ("a", "a", "a", "a")])
def test_auto_plans_for_the_hosts_its_ranks_are_on(hosts):
    """Four in-process ranks labelled with hosts: parallelize(strategy="auto")'s plan prices what crosses hosts (the
    bytes leaving a host's link) where they span two, and nothing where they share one."""
    from types import SimpleNamespace

    from hybrid_ext.comm import Communicator
    from hybrid_ext.comm.transports.loopback import run_ranks
    from hybrid_ext.parallel.auto_plan import links_of, plan_on_ranks
    from hybrid_ext.parallel.dims import ParallelDims

    def rank(transport):
        torch.manual_seed(0)
        world = Communicator(transport)
        groups = SimpleNamespace(world=world, dims=ParallelDims(4, 2))
        plan = plan_on_ranks(small_cnn(), torch.randn(B, 3, 16, 16), groups, None, None, "butterfly", 25 << 20)
        return links_of(world.topology), plan.prediction.host_link_bytes

    results = run_ranks(rank, 4, hosts=hosts, timeout=100)
    links, crossing = results[0]
    if len(set(hosts)) > 1:
        assert links.hosts == hosts and crossing > 0
    else:
        assert links.hosts is None and crossing == 0
    assert len(set(results)) == 1  # one plan on every rank


def test_ranks_whose_hosts_saved_different_links_price_them_alike(monkeypatch):
    """Each rank reads its own host's saved constants (here: the link's α grows with the rank): auto agrees on the
    largest of each, so every rank prices a message alike."""
    import threading

    from hybrid_ext.comm import Communicator, cost_model
    from hybrid_ext.comm.cost_model import CostModel
    from hybrid_ext.comm.transports.loopback import run_ranks
    from hybrid_ext.parallel.auto_plan import agree_on_links, links_of

    own = threading.local()
    monkeypatch.setattr(
        cost_model, "network_model", lambda network: CostModel(1e-3 * (1 + own.rank), 8e-9, 1e-9, 1e-10 * own.rank)
    )

    def rank(transport):
        own.rank = transport.rank
        world = Communicator(transport)
        return agree_on_links(links_of(world.topology), world)

    results = run_ranks(rank, 4, hosts=("a", "a", "b", "b"), timeout=60)
    local, link = results[0]
    assert all(r == results[0] for r in results)
    assert (link.alpha, link.beta, link.cpu_per_byte) == pytest.approx((4e-3, 8e-9, 3e-10))
    assert local == cost_model.default_model("loopback")  # the transport inside a host: the same file everywhere


def test_the_ranks_price_messages_at_the_most_shared_hosts_cores(monkeypatch):
    """Three ranks of one thread on a host of 2 cores and one on another: every rank prices a message's CPU work at
    1.5 ranks per core, with no core idle for it; ranks on a GPU compute there, so their cores are not busy."""
    from hybrid_ext.comm import Communicator, host_cores
    from hybrid_ext.comm.transports.loopback import run_ranks
    from hybrid_ext.parallel.auto_plan import agree_on_sharing, links_of

    monkeypatch.setattr(host_cores, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    def rank(transport):
        world = Communicator(transport)
        links = links_of(world.topology)
        return agree_on_sharing(links, world, on_cpu=True), agree_on_sharing(links, world, on_cpu=False)

    results = run_ranks(rank, 4, hosts=("a", "a", "a", "b"), timeout=60)
    assert all(r == ((1.5, True), (1.5, False)) for r in results), results


def test_auto_writes_the_times_its_ranks_agreed_on_and_they_predict_the_same_choice(tmp_path):
    """HYBRID_EXT_AUTO_TABLE: rank 0 saves the agreed table; choose_plan on that file, for the same ranks and
    links, makes the ranks' very choice (how a choice made in a job is predicted again afterwards)."""
    from types import SimpleNamespace

    from hybrid_ext import config
    from hybrid_ext.comm import Communicator
    from hybrid_ext.comm.transports.loopback import run_ranks
    from hybrid_ext.parallel.auto_plan import agree_on_links, agree_on_sharing, links_of, plan_on_ranks
    from hybrid_ext.parallel.dims import ParallelDims
    from hybrid_ext.parallel.layer_profile import load_calibration

    saved, x = tmp_path / "agreed.json", torch.randn(B, 3, 16, 16)

    def rank(transport):
        torch.manual_seed(0)
        world = Communicator(transport)
        groups = SimpleNamespace(world=world, dims=ParallelDims(2, 2))
        plan = plan_on_ranks(small_cnn(), x, groups, None, None, "butterfly", 25 << 20)
        links = links_of(world.topology)
        return plan.styles, links, agree_on_links(links, world), agree_on_sharing(links, world, on_cpu=True)

    with config.override(HYBRID_EXT_AUTO_TABLE=str(saved)):
        results = run_ranks(rank, 2, timeout=100)
    styles, links, (constants, network_constants), (cpu_sharing, cores_busy) = results[0]
    table = load_calibration(saved, small_cnn(), x)
    again = choose_plan(
        small_cnn(), table, 2, B, [2], "butterfly", 25 << 20, links, constants=constants,
        network_constants=network_constants, cpu_sharing=cpu_sharing, cores_busy=cores_busy,
    )  # fmt: skip
    assert again.styles == styles and table.micro_batch == B


def test_the_ranks_agree_on_every_time_the_table_holds():
    """agree_on_times takes the median over the ranks of every time of every record and of the table, those a newer
    calibration format adds included (a field left out would be each rank's own: plans that differ)."""
    from dataclasses import fields

    from hybrid_ext.parallel.auto_plan import agree_on_times
    from hybrid_ext.parallel.layer_profile import LayerRecord, LayerTable

    class OtherRankSlower:  # a world of two whose other rank measured every time 2 s longer
        def row_counts(self, count, device, name):
            return [count, count]

        def median_over_ranks(self, values, name):
            return [v + 1.0 for v in values]

    table = layer_shapes(small_cnn(), torch.randn(1, 3, 16, 16))
    agreed = agree_on_times(table, OtherRankSlower())
    timed = [f.name for f in fields(LayerRecord) if f.name.endswith("_s")]
    assert {"forward_s", "backward_fixed_s", "forward_channel_fixed_s"} <= set(timed)
    assert all(getattr(r, f) == getattr(table.layers[p], f) + 1.0 for p, r in agreed.layers.items() for f in timed)
    rates = [f.name for f in fields(LayerTable) if f.name not in ("micro_batch", "device", "layers")]
    assert all(getattr(agreed, f) == getattr(table, f) + 1.0 for f in rates)
    assert (agreed.micro_batch, agreed.device) == (table.micro_batch, table.device)
    assert list(agreed.layers) == list(table.layers)
