"""Algorithm choice: the cost model, the HYBRID_EXT_ALGO override, calibration, and the bench tool's parsing."""

from __future__ import annotations

import json

import pytest

from hybrid_ext.bench import allreduce as bench
from hybrid_ext.comm import cost_model
from hybrid_ext.comm.cost_model import CostModel

pytestmark = pytest.mark.usefixtures("isolated_cost_models")


def test_latency_bound_sizes_pick_recursive_doubling_and_large_pick_rabenseifner():
    model = CostModel(alpha=100e-6, beta=1e-9, gamma=1e-9)
    assert model.choose(1024, 8) == "recursive_doubling"
    assert model.choose(64 << 20, 8) == "rabenseifner"
    assert model.choose(1024, 8, ("ring",)) == "ring"


def test_ring_wins_large_messages_when_the_fold_costs_more_than_its_latency():
    # P = 6: the butterflies fold (+2n bytes) while the ring does not.
    model = CostModel(alpha=1e-6, beta=1e-9, gamma=1e-9)
    assert model.choose(256 << 20, 6) == "ring"


def test_terms_match_the_documented_formulas():
    model = CostModel()
    assert model.terms("rabenseifner", 800, 8) == (6.0, 2 * 7 / 8 * 800, 7 / 8 * 800)
    assert model.terms("recursive_doubling", 800, 8) == (3.0, 2400.0, 2400.0)
    assert model.terms("ring", 800, 5) == (8.0, 2 * 4 / 5 * 800, 4 / 5 * 800)
    # P = 6 folds onto 4: two more messages, 2n more bytes, n more reduced.
    assert model.terms("recursive_doubling", 100, 6) == (4.0, 400.0, 300.0)
    assert model.terms("ring", 0, 8) == (0.0, 0.0, 0.0)


def test_environment_overrides_auto_and_butterfly_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_ALGO", "ring")
    assert cost_model.resolve("auto", 1024, 8) == "ring"
    assert cost_model.resolve("butterfly", 1024, 8) == "ring"
    assert cost_model.resolve("rabenseifner", 1024, 8) == "rabenseifner"
    monkeypatch.setenv("HYBRID_EXT_ALGO", "butterfly")
    assert cost_model.resolve("auto", 64 << 20, 6, "shm") in cost_model.BUTTERFLIES
    monkeypatch.setenv("HYBRID_EXT_ALGO", "tree")
    with pytest.raises(ValueError, match="HYBRID_EXT_ALGO='tree'"):
        cost_model.resolve("auto", 1024, 8)


class _Layout:
    """A stand-in transport: only what the communicator reads to plan (no exchanges happen here)."""

    name = "shm+torch-gloo"

    def __init__(self, rank: int, hosts: tuple[int, ...] | None) -> None:
        self.rank, self.size, self.timeout = rank, 4, 10.0
        if hosts is not None:  # a transport that knows its hosts routes between them (HostRoutes)
            self.hosts, self.local, self.network = hosts, None, self


@pytest.mark.parametrize("inter", ["recursive_doubling", "rabenseifner", "ring"])
def test_a_named_schedule_between_hosts_is_planned_as_named_and_flat_on_one_host(inter):
    from hybrid_ext.comm.communicator import Communicator

    name = f"hierarchical/{inter}"
    assert cost_model.resolve(name, 1024, 4) == name
    for count in (1, 1000, 1 << 20):  # below and above the size from which auto goes hierarchical
        across = Communicator(_Layout(2, (0, 0, 1, 1)))._allreduce_plan(name, count, 4 * count)[0]
        assert across.algorithm == name
        assert count < 4 or {s.phase.split()[0] for s in across.steps} == {"host", "hosts"}
        assert Communicator(_Layout(2, None))._allreduce_plan(name, count, 4 * count)[0].algorithm == inter
    with pytest.raises(ValueError, match="unknown allreduce algorithm 'hierarchical/tree'"):
        cost_model.resolve("hierarchical/tree", 1024, 4)


def test_calibration_is_saved_per_transport_and_used(tmp_path):
    cost_model.save_model("shm", CostModel(alpha=1.0, beta=0.0, gamma=0.0))
    cost_model.save_model("torch-gloo", CostModel(alpha=1e-9, beta=1.0, gamma=1.0))
    saved = json.loads((tmp_path / "cost_model.json").read_text())
    assert set(saved) == {"shm", "torch-gloo"}
    # Only latency costs: fewest messages wins even for huge messages.
    assert cost_model.resolve("auto", 1 << 30, 8, "shm") == "recursive_doubling"
    # Only bandwidth costs: least traffic wins even for tiny messages.
    assert cost_model.resolve("auto", 64, 8, "torch-gloo") == "rabenseifner"
    assert cost_model.default_model("unknown-transport") == CostModel()


def test_a_links_cpu_per_byte_is_saved_and_files_without_it_read_as_free(tmp_path):
    cost_model.save_model("network/torch-gloo", CostModel(alpha=1e-3, beta=8e-9, gamma=0.0, cpu_per_byte=0.9e-9))
    assert cost_model.network_model("torch-gloo").cpu_per_byte == pytest.approx(0.9e-9)
    older = {"network/torch-gloo": {"alpha": 1e-3, "beta": 8e-9, "gamma": 0.0}}  # saved before it was measured
    (tmp_path / "cost_model.json").write_text(json.dumps(older))
    cost_model.save_model("shm", CostModel())  # re-reads the file
    assert cost_model.network_model("torch-gloo") == CostModel(alpha=1e-3, beta=8e-9, gamma=0.0, cpu_per_byte=0.0)


def test_constants_measured_with_ranks_sharing_cores_are_rescaled_to_the_sharing_they_price():
    measured = CostModel(alpha=650e-6, beta=0.9e-9, gamma=2.2e-9, sharing=4.0)  # 8 ranks on 2 cores
    half = cost_model.at_sharing(measured, 2.0)  # 4 ranks on 2 cores: each has twice the core
    assert (half.alpha, half.beta, half.gamma, half.sharing) == pytest.approx((650e-6, 0.45e-9, 1.1e-9, 2.0))
    # fewer ranks than cores: one core each, never faster than that
    assert cost_model.at_sharing(measured, 0.5) == cost_model.at_sharing(measured, 1.0)
    assert cost_model.at_sharing(measured, 1.0).beta == pytest.approx(0.225e-9)
    unknown = CostModel(alpha=1e-4, beta=1e-9, gamma=1e-9)  # saved before the sharing was recorded
    assert cost_model.at_sharing(unknown, 2.0) == unknown
    assert cost_model.BUILTIN["shm"].sharing == 4.0  # the built-in constants' run: 8 ranks on 2 cores


def test_the_sharing_is_saved_with_the_constants_and_files_without_it_read_as_unknown(tmp_path):
    rows = []
    for algorithm in ("recursive_doubling", "rabenseifner", "native"):
        for size in (1 << 10, 1 << 16, 1 << 20, 1 << 24):
            seconds = CostModel(alpha=300e-6, beta=1e-9, gamma=2e-9).predict(algorithm, size, 8)
            rows.append(bench.BenchRow(size, algorithm, 8, seconds * 1e3, 0, 0, None, algorithm))
    said = bench.save_calibrations(rows, "shm", "gloo", sharing=4.0)
    assert "(4 ranks per core)" in said[0]
    assert cost_model.default_model("shm").sharing == 4.0
    assert cost_model.native_model("torch-gloo").sharing == 4.0
    (tmp_path / "cost_model.json").write_text(json.dumps({"shm": {"alpha": 1e-3, "beta": 8e-9, "gamma": 0.0}}))
    cost_model.save_model("torch-gloo", CostModel())  # re-reads the file
    assert cost_model.default_model("shm").sharing == 0.0


def test_calibrate_recovers_known_constants():
    truth = CostModel(alpha=300e-6, beta=1e-9, gamma=2e-9)
    rows = []
    for algorithm in ("recursive_doubling", "rabenseifner"):
        for size in (1 << 10, 1 << 16, 1 << 20, 1 << 24):
            seconds = truth.predict(algorithm, size, 8)
            rows.append(bench.BenchRow(size, algorithm, 8, seconds * 1e3, 0, 0, None, algorithm))
    fitted = bench.calibrate(rows)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert fitted.beta == pytest.approx(truth.beta, rel=1e-6)
    assert fitted.gamma == pytest.approx(truth.gamma, rel=1e-6)


@pytest.mark.parametrize(("text", "nbytes"), [("1K", 1024), ("64KiB", 65536), ("16M", 16 << 20), ("4096", 4096)])
def test_bench_sizes_parse(text, nbytes):
    assert bench.parse_size(text) == nbytes
    assert bench.parse_size(bench.format_size(nbytes)) == nbytes


def _host_result(host: str, times: list[float], sent: list[int] | None, plan: int) -> dict:
    key = (1 << 20, "auto")
    native = (1 << 20, "native")
    return {
        "times": {key: times, native: [t * 2 for t in times]},
        "chosen": {key: "hierarchical/rabenseifner", native: "gloo"},
        "transport": "shm+torch-gloo",
        "host": host,
        "sent": {key: sent, native: sent} if sent else {},
        "plan_sent": {key: plan},
        "inner": 2,
    }


def test_bench_rows_report_the_busiest_hosts_counted_bytes_beside_the_plans():
    n = 1 << 20
    results = [
        _host_result("node0", [0.010, 0.012, 0.011], [2 * n + 100, 2 * n + 300, 2 * n + 200], n // 2),
        _host_result("node0", [0.011, 0.013, 0.012], [2 * n + 100, 2 * n + 300, 2 * n + 200], n // 2),
        _host_result("node1", [0.010, 0.010, 0.010], [int(2.2 * n)] * 3, n // 2),
        _host_result("node1", [0.009, 0.009, 0.009], [int(2.2 * n)] * 3, n // 2),
    ]
    rows = {row.algorithm: row for row in bench.rows_from(results, [n], ["auto", "native"])}
    auto = rows["auto"]
    assert auto.hosts == 2
    assert auto.nic_bytes == pytest.approx(1.1 * n, rel=1e-6)  # node1's median per call (2 calls per round)
    assert auto.plan_nic_bytes == n  # both ranks of a host: n/2 each
    assert auto.median_ms == pytest.approx(12.0)  # the slowest rank per round, median over rounds
    assert rows["native"].plan_nic_bytes is None
    table = bench.format_table(list(rows.values()))
    assert "host NIC/n" in table and "1.10" in table and "1.00" in table


def test_bench_rows_on_one_host_have_no_host_columns():
    results = [_host_result("node0", [0.01] * 3, None, 0) for _ in range(2)]
    rows = bench.rows_from(results, [1 << 20], ["auto", "native"])
    assert all(row.hosts is None and row.nic_bytes is None for row in rows)
    assert "host NIC/n" not in bench.format_table(rows)


def test_the_link_bound_is_two_h_minus_one_over_h_bytes_per_host():
    assert bench.link_bound_seconds(64 << 20, 2, 125e6) == pytest.approx((64 << 20) / 125e6)
    assert bench.link_bound_seconds(64 << 20, 4, 125e6) == pytest.approx(1.5 * (64 << 20) / 125e6)


# ------------------------------------------------------------------ the group's native allreduce


@pytest.mark.timeout(30)
def test_native_is_modelled_as_the_backends_ring_with_constants_of_its_own():
    assert CostModel().terms("native", 800, 5) == CostModel().terms("ring", 800, 5)
    assert "native" in cost_model.CHOICES
    assert cost_model.native_model("torch-gloo") is None  # no built-in constants: the backend's algorithm is its own
    cost_model.save_model("native/torch-gloo", CostModel(alpha=1.0, beta=0.0, gamma=0.0))
    assert cost_model.native_model("torch-gloo") == CostModel(alpha=1.0, beta=0.0, gamma=0.0)
    assert cost_model.default_model("torch-gloo") == cost_model.BUILTIN["torch-gloo"]  # kept apart


@pytest.mark.timeout(30)
def test_auto_weighs_the_native_allreduce_where_the_group_has_one():
    cost_model.save_model("shm", CostModel(alpha=1e-3, beta=1e-9, gamma=1e-9))
    assert cost_model.resolve("auto", 1 << 20, 4, "shm", native="torch-gloo") != "native"  # not calibrated yet
    cost_model.save_model("native/torch-gloo", CostModel(alpha=1e-6, beta=1e-9, gamma=1e-9))
    assert cost_model.resolve("auto", 1 << 20, 4, "shm", native="torch-gloo") == "native"
    assert cost_model.resolve("auto", 1 << 20, 4, "shm") != "native"  # no native on this group
    assert cost_model.resolve("butterfly", 1 << 20, 4, "shm", native="torch-gloo") in cost_model.BUTTERFLIES
    assert cost_model.resolve("ring", 1 << 20, 4, "shm", native="torch-gloo") == "ring"  # named: kept
    cost_model.save_model("native/torch-gloo", CostModel(alpha=1.0, beta=1e-9, gamma=1e-9))
    assert cost_model.resolve("auto", 1 << 20, 4, "shm", native="torch-gloo") != "native"  # dearer: a schedule


@pytest.mark.timeout(30)
def test_the_environment_pins_native_where_the_group_has_one(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_ALGO", "native")
    assert cost_model.forced()
    assert cost_model.resolve("auto", 1024, 4, "shm", native="torch-gloo") == "native"
    assert cost_model.resolve("auto", 1024, 4, "shm") in cost_model.ALGORITHMS  # none here: the model's schedule
    assert cost_model.resolve("rabenseifner", 1024, 4, "shm", native="torch-gloo") == "rabenseifner"


@pytest.mark.timeout(30)
def test_calibration_fits_the_native_allreduce_from_its_own_rows():
    truth = CostModel(alpha=80e-6, beta=0.5e-9, gamma=0.25e-9)
    rows = [
        bench.BenchRow(size, "native", 4, truth.predict("native", size, 4) * 1e3, 0, 0, 1.0, "gloo")
        for size in (1 << 10, 1 << 16, 1 << 20, 1 << 24)
    ]
    fitted = bench.calibrate_native(rows)
    for size in (1 << 12, 1 << 22):
        assert fitted.predict("native", size, 4) == pytest.approx(truth.predict("native", size, 4), rel=1e-6)
    assert bench.calibrate_native(rows[:2]) is None  # too few sizes to fit three constants


@pytest.mark.timeout(30)
def test_bench_rows_say_when_auto_ran_the_native_allreduce():
    from hybrid_ext.comm.metrics import CollectiveRecord

    def record(algorithm, transport):
        return CollectiveRecord("allreduce", algorithm, transport, 0, 2, 256, "float32", 1024, 1024, 2, 1e-4)

    assert bench._ran(record("native", "torch-gloo")) == "native/gloo"
    assert bench._ran(record("native", "horovod")) == "native/horovod"
    assert bench._ran(record("ring", "shm")) == "ring"


def _rows_priced_by_the_step_model(truth: CostModel, sizes, hosts: int = 2, world: int = 4) -> list:
    """Bench rows across hosts whose times are what the step model prices: the slowest rank's hierarchical
    all-reduce, its messages inside a host at the transport's constants and those between hosts at ``truth``."""
    from hybrid_ext.parallel.step_model import transfer_split
    from hybrid_ext.parallel.step_traffic import Links, allreduce_transfer

    links = Links("shm", hosts=bench.hosts_of_ranks(world, hosts), network="torch-gloo")
    rows = []
    for schedule in ("hierarchical/recursive_doubling", "hierarchical/rabenseifner"):
        for size in sizes:
            seconds = max(
                sum(transfer_split(allreduce_transfer("b", "gradients", schedule, size // 4, 4,
                                                      links.group(list(range(world)), r)), links, None, truth))
                for r in range(world)
            )  # fmt: skip
            rows.append(bench.BenchRow(size, schedule, world, seconds * 1e3, 0, 0, None, schedule, hosts=hosts))
    return rows


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("hosts", "world"), [(2, 4), (3, 6), (2, 5)])  # 5 over 2 hosts: 3 + 2, as launched
def test_the_link_between_hosts_is_calibrated_from_the_hierarchical_rows(hosts, world):
    truth = CostModel(alpha=700e-6, beta=cost_model.beta_at_line_rate(125e6), gamma=2.2e-9)  # 1 Gbit/s of TCP
    rows = _rows_priced_by_the_step_model(truth, (8, 1 << 10, 1 << 14, 1 << 20, 1 << 22), hosts, world)
    rows.append(bench.BenchRow(1 << 20, "native", world, 1.0, 0, 0, 1.0, "gloo", hosts=hosts))
    # The link's rate known (--nic): α from the small rows; not known: β from the large ones too.
    shaped = bench.calibrate_network(rows, "shm+torch-gloo", bytes_per_second=125e6)
    assert (shaped.alpha, shaped.beta) == (pytest.approx(truth.alpha, rel=1e-6), pytest.approx(truth.beta))
    fitted = bench.calibrate_network(rows, "shm+torch-gloo")
    assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert fitted.beta == pytest.approx(truth.beta, rel=1e-6)
    # No hierarchical rows, or a run on one host: nothing to fit.
    assert bench.calibrate_network([r for r in rows if r.chosen == "gloo"], "shm+torch-gloo") is None
    assert bench.calibrate_network(rows, "shm") is None
    # Only large rows: nothing times α, and none is claimed.
    assert bench.calibrate_network([r for r in rows if r.size_bytes > (64 << 10)], "shm+torch-gloo") is None


def test_ranks_spread_over_hosts_as_the_launcher_spreads_them():
    assert bench.hosts_of_ranks(4, 2) == (0, 0, 1, 1)
    assert bench.hosts_of_ranks(5, 2) == (0, 0, 0, 1, 1)
    assert bench.hosts_of_ranks(7, 3) == (0, 0, 0, 1, 1, 2, 2)


@pytest.mark.timeout(30)
def test_the_link_between_hosts_is_saved_apart_from_its_transport_and_used():
    from hybrid_ext.comm import choose
    from hybrid_ext.comm.topology import Topology

    truth = CostModel(alpha=2e-3, beta=cost_model.beta_at_line_rate(125e6), gamma=2.2e-9)
    rows = _rows_priced_by_the_step_model(truth, (8, 1 << 12, 1 << 16, 1 << 20, 1 << 22))
    rows += [bench.BenchRow(r.size_bytes, "rabenseifner", 4, r.median_ms, 0, 0, None, "rabenseifner", hosts=2)
             for r in rows]  # fmt: skip
    one_host_gloo = cost_model.default_model("torch-gloo")
    said = bench.save_calibrations(rows, "shm+torch-gloo", "gloo", bytes_per_second=125e6, link_cpu_per_byte=0.9e-9)
    line = "between hosts: α=2000.0 µs, β=8.497 ns/B (the link's rate), the hosts' CPU 0.900 ns/B"
    assert any(line in said_line for said_line in said), said
    fitted = cost_model.network_model("torch-gloo")
    assert (fitted.alpha, fitted.beta, fitted.gamma) == pytest.approx((truth.alpha, truth.beta, truth.gamma))
    assert fitted.cpu_per_byte == pytest.approx(0.9e-9)  # measured apart (bench.link_cpu), kept as given
    assert cost_model.default_model("torch-gloo") == one_host_gloo  # gloo on one host keeps its own constants
    assert cost_model.network_model("torch-nccl") == cost_model.default_model("torch-nccl")  # none saved: its own
    # The hierarchical allreduce's choice prices the part between hosts by the link's constants.
    topology = Topology(4, "shm+torch-gloo", (0, 0, 1, 1), "shm", "torch-gloo")
    between = truth.predict("recursive_doubling", 512, 2)
    within = cost_model.default_model("shm").predict("ring", 1024, 2)
    assert choose.predicted("hierarchical/recursive_doubling", 1024, topology) == pytest.approx(within + between)


def test_a_line_rate_carries_the_tcp_payload_that_iperf_shows_on_gigabit_ethernet():
    payload_bits_per_second = 8 / cost_model.beta_at_line_rate(1e9 / 8)
    assert payload_bits_per_second == pytest.approx(941.5e6, rel=1e-3)  # iperf's 941 Mbit/s over 1 Gbit/s
