"""The online tuner behind ``auto``: every rank tries the same candidates in the same order and keeps the same
winner (the fastest counted from the last rank's arrival), and saved choices are used only when every rank read the
same one (ranks as threads in lockstep). Real ranks reducing correctly throughout, trials included:
tests/multiprocess/test_tuner_ranks.py."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import replace

import pytest

from hybrid_ext.comm import choose
from hybrid_ext.comm import tuner as tuning
from hybrid_ext.comm.tuner import ChoiceStore, Tuner, trials_for

CANDIDATES = ("recursive_doubling", "rabenseifner", "ring")


class LockstepGroup:
    """``agree_max`` for P threads standing in for P ranks: each call is a collective over all of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=10)
        self._values: list[list[float] | None] = [None] * size
        self.calls = 0

    def agree_max(self, rank: int):
        def collective(values: list[float]) -> list[float]:
            self._values[rank] = list(values)
            self._barrier.wait()
            result = [max(column) for column in zip(*self._values)]
            if rank == 0:
                self.calls += 1
            self._barrier.wait()  # nobody overwrites its row before everyone has read the table
            return result

        return collective


def _run_ranks(size: int, body) -> list:
    group = LockstepGroup(size)
    results: list = [None] * size
    errors: list = []

    def run(rank: int) -> None:
        try:
            results[rank] = body(rank, group.agree_max(rank))
        except BaseException as exc:
            errors.append(exc)
            group._barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return results


def _trial_order(nbytes: int, candidates=CANDIDATES) -> list[str]:
    """The candidates of a key's trial calls, in order (the same on every rank)."""
    trials = trials_for(nbytes)
    return [candidates[tuning.trial_candidate(k, trials, len(candidates))] for k in range(trials * len(candidates))]


def test_candidates_take_turns_in_bursts_so_each_is_timed_warm():
    rd, rab, ring = CANDIDATES
    assert _trial_order(1024) == ([rd] * 3 + [rab] * 3 + [ring] * 3) * 3  # 9 trials: three rounds of three
    assert _trial_order(4 << 20) == [rd] * 5 + [rab] * 5 + [ring] * 5  # 5 trials: one round
    assert _trial_order(64 << 20) == [rd] * 3 + [rab] * 3 + [ring] * 3
    for nbytes in (1024, 4 << 20, 64 << 20):  # every candidate gets all its trials
        assert all(_trial_order(nbytes).count(name) == trials_for(nbytes) for name in CANDIDATES)


def _tune(rank, agree, seconds_of, store, mode="on", nbytes=1 << 20):
    """Drive one rank's tuner as the communicator does; return (schedules run, choice)."""
    tuner = Tuner("test", agree, store=store, mode=mode)
    ran = []
    for _ in range(trials_for(nbytes) * len(CANDIDATES) + 3):
        name, trial = tuner.pick("auto", nbytes, CANDIDATES)
        ran.append(name)
        if trial:
            tuner.record("auto", nbytes, seconds_of(rank, name))
    return ran, tuner.decided()[("auto", tuning.size_class(nbytes))]


def test_every_rank_runs_the_same_trials_and_keeps_the_fastest_after_the_last_arrival(tmp_path):
    # Every rank of a collective finishes when the last one's input is in: a rank's time is its wait for the last
    # arrival plus the schedule's own. Here rank 0 reached the recursive-doubling trials 8 s ahead of the others
    # (the backward's skew), so the slowest rank's time would rank them last; counted from the last arrival (the
    # shortest rank's time) they are the fastest.
    own = {"recursive_doubling": 1.0, "rabenseifner": 3.0, "ring": 2.0}
    waited = {0: {"recursive_doubling": 8.0}, 1: {"ring": 0.5}, 2: {"rabenseifner": 0.2}}
    store = ChoiceStore(tmp_path / "tuned.json")
    results = _run_ranks(3, lambda rank, agree: _tune(rank, agree, lambda r, n: own[n] + waited[r].get(n, 0.0), store))
    runs = {tuple(ran) for ran, _ in results}
    assert len(runs) == 1, "ranks ran different schedules"
    ran = results[0][0]
    trials = trials_for(1 << 20)
    assert ran[: trials * 3] == _trial_order(1 << 20)
    assert set(ran[trials * 3 :]) == {"recursive_doubling"}
    assert {choice for _, choice in results} == {"recursive_doubling"}


def test_a_schedule_slow_on_one_rank_is_slow_for_all_and_loses(tmp_path):
    # A rank that computes a schedule slowly holds every rank up: all of them see its time, the last arrival too.
    times = {"recursive_doubling": 9.0, "rabenseifner": 3.0, "ring": 2.5}
    store = ChoiceStore(tmp_path / "tuned.json")
    results = _run_ranks(3, lambda rank, agree: _tune(rank, agree, lambda r, n: times[n] + 0.1 * r, store))
    assert {choice for _, choice in results} == {"ring"}


def test_the_best_trial_counts_so_one_slow_first_call_does_not_decide(tmp_path):
    calls: dict[str, int] = {}

    def seconds(rank, name):
        calls[(rank, name)] = calls.get((rank, name), 0) + 1
        first = calls[(rank, name)] == 1
        return {"recursive_doubling": 5.0 if first else 1.0, "rabenseifner": 2.0, "ring": 3.0}[name]

    results = _run_ranks(2, lambda r, a: _tune(r, a, seconds, ChoiceStore(tmp_path / "t.json")))
    assert {choice for _, choice in results} == {"recursive_doubling"}


def test_a_saved_choice_is_used_only_when_every_rank_saved_the_same(tmp_path):
    times = {"recursive_doubling": 3.0, "rabenseifner": 1.0, "ring": 2.0}
    store = ChoiceStore(tmp_path / "tuned.json")
    first = _run_ranks(2, lambda r, a: _tune(r, a, lambda _r, n: times[n], store))
    assert {choice for _, choice in first} == {"rabenseifner"}
    assert list(json.loads(store.path.read_text()).values()) == ["rabenseifner"]

    # Next run: the saved choice runs from the first call, no trials.
    again = _run_ranks(2, lambda r, a: _tune(r, a, lambda _r, n: 99.0, store))
    assert all(set(ran) == {"rabenseifner"} for ran, _ in again)

    # One rank's file says something else (another host's cache): every rank tunes again, together.
    other = ChoiceStore(tmp_path / "other.json")
    other.path.write_text(json.dumps({k: "ring" for k in json.loads(store.path.read_text())}))
    stores = [store, other]
    mixed = _run_ranks(2, lambda r, a: _tune(r, a, lambda _r, n: times[n], stores[r]))
    trials = trials_for(1 << 20)
    assert all(ran[: trials * 3] == _trial_order(1 << 20) for ran, _ in mixed)
    assert {choice for _, choice in mixed} == {"rabenseifner"}


def test_choices_saved_under_the_slowest_rank_scoring_are_tuned_again(tmp_path):
    # A cache written before trials counted from the last arrival: its keys lack the scoring, so none is reused.
    store = ChoiceStore(tmp_path / "tuned.json")
    cls = tuning.size_class(1 << 20)
    store.path.write_text(json.dumps({f"{socket.gethostname()}|test|auto|class{cls}": "ring"}))
    times = {"recursive_doubling": 3.0, "rabenseifner": 1.0, "ring": 2.0}
    results = _run_ranks(2, lambda r, a: _tune(r, a, lambda _r, n: times[n], store))
    trials = trials_for(1 << 20)
    assert all(ran[: trials * 3] == _trial_order(1 << 20) for ran, _ in results)
    assert {choice for _, choice in results} == {"rabenseifner"}
    saved = json.loads(store.path.read_text())
    assert saved[f"{socket.gethostname()}|test|auto|class{cls}|{tuning.SCORED_BY}"] == "rabenseifner"


def test_fresh_ignores_saved_choices_and_an_unreadable_file_means_tuning(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text("{not json")
    store = ChoiceStore(path)
    assert store.load() == {}
    times = {"recursive_doubling": 1.0, "rabenseifner": 2.0, "ring": 3.0}
    results = _run_ranks(2, lambda r, a: _tune(r, a, lambda _r, n: times[n], store, mode="fresh"))
    trials = trials_for(1 << 20)
    assert all(ran[: trials * 3] == _trial_order(1 << 20) for ran, _ in results)
    assert list(json.loads(path.read_text()).values()) == ["recursive_doubling"]


def test_trials_cover_only_what_every_rank_finds_plausible(tmp_path):
    plausible = {0: (True, True, False), 1: (False, True, True), 2: (True, True, True)}
    times = {"recursive_doubling": 1.0, "rabenseifner": 2.0, "ring": 0.5}

    def body(rank, agree):
        tuner = Tuner("test", agree, store=ChoiceStore(tmp_path / f"{rank}.json"), mode="fresh")
        ran = []
        for _ in range(trials_for(4096) + 2):
            name, trial = tuner.pick("auto", 4096, CANDIDATES, lambda: plausible[rank])
            ran.append(name)
            if trial:
                tuner.record("auto", 4096, times[name])
        return ran

    results = _run_ranks(3, body)
    assert all(ran == ["rabenseifner"] * (trials_for(4096) + 2) for ran in results)  # the one all three keep: no trials

    # Nothing in common (models that disagree completely): every candidate is tried.
    plausible = {0: (True, False, False), 1: (False, True, False), 2: (False, False, True)}
    results = _run_ranks(3, body)
    assert all(ran[:9] == _trial_order(4096)[:9] for ran in results)


def test_cheap_calls_get_more_trials_and_their_median_decides(tmp_path):
    assert trials_for(1024) > trials_for(4 << 20) > trials_for(64 << 20) >= 3
    calls: dict = {}

    def seconds(rank, name):  # recursive doubling is fast once, slow after: the median sees through it
        calls[(rank, name)] = calls.get((rank, name), 0) + 1
        if name == "recursive_doubling":
            return 0.1 if calls[(rank, name)] == 2 else 5.0
        return {"rabenseifner": 2.0, "ring": 3.0}[name]

    results = _run_ranks(2, lambda r, a: _tune(r, a, seconds, ChoiceStore(tmp_path / "t.json"), nbytes=4096))
    assert {choice for _, choice in results} == {"rabenseifner"}


def test_size_classes_are_tuned_apart():
    assert tuning.size_class(1024) == tuning.size_class(2047) != tuning.size_class(2048)


def test_bad_tune_setting_is_named(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_TUNE", "sometimes")
    with pytest.raises(ValueError, match="HYBRID_EXT_TUNE='sometimes'"):
        tuning.tune_mode()


# ------------------------------------------------------------------ the group's native allreduce as a candidate


class _OneHost:
    """A stand-in transport: only what the communicator reads to choose (no exchanges happen here)."""

    name, rank, size, timeout = "shm", 0, 4, 10.0


class _StandInNative:
    name = "torch-gloo"

    def allreduce(self, tensor, op):  # never called: these tests only choose
        raise AssertionError("chosen, not run")


def _choose_repeatedly(comm, times: dict[str, float], nbytes: int, calls: int, **kwargs) -> list[str]:
    """Drive a one-rank communicator's choice as its allreduce does, with made-up trial times."""
    ran = []
    for _ in range(calls):
        name, trial_of = comm._allreduce_choice("auto", nbytes // 4, nbytes, **kwargs)
        ran.append(name)
        if trial_of is not None:
            comm._tuner.record(trial_of, nbytes, times[name])
    return ran


@pytest.fixture
def tuned(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_TUNE", "fresh")  # the suite's default is off
    monkeypatch.delenv("HYBRID_EXT_ALGO", raising=False)


def _one_rank_communicator(tmp_path, native=None):
    from hybrid_ext.comm.communicator import Communicator

    comm = Communicator(_OneHost(), native=native)
    comm._tuner = Tuner("test", lambda values: values, store=ChoiceStore(tmp_path / "tuned.json"), mode="fresh")
    return comm


@pytest.mark.timeout(30)
def test_auto_tries_the_native_allreduce_even_where_the_model_calls_it_slow_and_keeps_it_when_fastest(
    tmp_path, monkeypatch, tuned
):
    from hybrid_ext.comm import cost_model

    monkeypatch.setenv("HYBRID_EXT_COST_MODEL", str(tmp_path / "cost_model.json"))
    cost_model._models = None
    cost_model.save_model("native/torch-gloo", cost_model.CostModel(alpha=10.0, beta=1e-3, gamma=1e-3))
    try:
        comm = _one_rank_communicator(tmp_path, _StandInNative())
        times = {"recursive_doubling": 3.0, "rabenseifner": 2.0, "ring": 2.5, "native": 1.0}
        nbytes = 64 << 10
        ran = _choose_repeatedly(comm, times, nbytes, 60)
        assert "native" in ran[: 4 * trials_for(nbytes)]
        assert set(ran[-5:]) == {"native"}

        # The native allreduce slower than a schedule: tried, not kept.
        comm = _one_rank_communicator(tmp_path, _StandInNative())
        times["native"] = 5.0
        ran = _choose_repeatedly(comm, times, nbytes, 60)
        assert "native" in ran and set(ran[-5:]) == {"rabenseifner"}
    finally:
        cost_model._models = None


@pytest.mark.timeout(30)
def test_native_is_no_candidate_where_it_may_not_run_or_the_group_has_none(tmp_path, tuned):
    times = {"recursive_doubling": 3.0, "rabenseifner": 2.0, "ring": 2.5, "native": 1.0}
    comm = _one_rank_communicator(tmp_path, _StandInNative())
    # A compressed wire dtype: tuned apart, among the schedules alone.
    assert "native" not in _choose_repeatedly(comm, times, 4096, 40, native_allowed=False)
    one_host, two_hosts = comm.topology, replace(comm.topology, hosts=(0, 0, 1, 1), local="shm")
    assert choose.candidates("butterfly", one_host, True) == ("recursive_doubling", "rabenseifner")
    assert choose.candidates("hierarchical", two_hosts, True) == tuple(f"hierarchical/{a}" for a in CANDIDATES)
    assert "native" not in _choose_repeatedly(_one_rank_communicator(tmp_path), times, 4096, 40)


@pytest.mark.timeout(30)
def test_native_can_be_switched_off(tmp_path, tuned, monkeypatch):
    times = {"recursive_doubling": 3.0, "rabenseifner": 2.0, "ring": 2.5, "native": 1.0}
    monkeypatch.setenv("HYBRID_EXT_NATIVE", "off")
    comm = _one_rank_communicator(tmp_path, _StandInNative())
    assert comm.native is None and "native" not in _choose_repeatedly(comm, times, 4096, 40)
    monkeypatch.setenv("HYBRID_EXT_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="HYBRID_EXT_NATIVE='sometimes'"):
        _one_rank_communicator(tmp_path, _StandInNative())
