"""Online refinement of ``auto``: the first calls of each size class try every candidate schedule (and the group's
native allreduce, where it has one), and every rank keeps the one that was fastest once the last rank had arrived.

Why: the α-β-γ model (:mod:`hybrid_ext.comm.cost_model`) cannot see what decides the winner on a real machine —
ranks sharing cores, a NIC's true rate, how the ranks of a host share it, where reductions stall. NCCL's tuner
plugins and AutoCCL measure instead; so does this.

How the ranks stay in agreement (a split decision would run different schedules on different ranks: a hang):

- Collectives reach a communicator in the same order on every rank, so every rank sees the same sequence of
  (request, size class) keys; the k-th call of a key runs the candidate :func:`trial_candidate` names for the first
  ``trials_for(nbytes) · len(candidates)`` calls — the same candidate on every rank, with no message. Candidates
  take turns in bursts of consecutive calls (three rounds of three for cheap calls): the first call after a switch
  pays for waking the other route (another gloo context's threads, say), which the calls that follow — as training
  repeats one size — do not.
- After the last trial each rank contributes its own timings to one small max-allreduce (of their negations): every
  rank then holds the same table — the shortest rank's time of each trial — and takes the same argmin (ties:
  candidate order). The shortest is the last rank to arrive: no rank's output is done before every rank's input
  is in, so the last arrival's time is the collective's, and the others' add how long they waited for it. Ranks
  reach a gradient bucket apart by their backward's skew (tens of ms where ranks share cores), which the slowest
  rank's time would count as the schedule's: it kept recursive doubling for 32 MB buckets on one host where
  rabenseifner is 1.6× faster.
- A choice saved by an earlier run (``~/.cache/hybrid-ext/tuned.json``, see :func:`choices_path`) is used only
  when every rank of the group read the same one (one tiny allreduce of its index and its negation); otherwise the
  key is tuned again.

``HYBRID_EXT_TUNE``: ``on`` (default), ``off`` (the model alone: the same schedule for the same size on every run,
what bitwise-reproducible runs need), ``fresh`` (tune again, ignoring saved choices; the new ones are saved).
An explicit algorithm or ``HYBRID_EXT_ALGO`` bypasses the tuner.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_ext import config

TUNE_ENV = "HYBRID_EXT_TUNE"
CHOICES_ENV = "HYBRID_EXT_TUNED"  # where saved choices live (default: the cache directory's tuned.json)
# Part of every saved choice's key: choices scored otherwise (before: by the slowest rank's time) are tuned again.
SCORED_BY = "after-last-arrival"
MAX_CANDIDATES = 7  # three flat schedules, as many hierarchical ones across hosts, and the group's native allreduce


def trials_for(nbytes: int) -> int:
    """Timed calls per candidate: more where calls are cheap and noise is large beside them (the same on every rank).

    With 5 or more, a candidate's score is the median of its trials (the last arrival's time of each); with 3, the
    best (the first call of a schedule pays its warm-up: buffers, pages).
    """
    if nbytes < 1 << 20:
        return 9
    return 5 if nbytes < 16 << 20 else 3


_trial_calls = 0  # timed trial calls this process has made, all groups: benchmarks warm up until it stops growing


def trial_calls() -> int:
    return _trial_calls


def trial_burst(trials: int) -> int:
    """Consecutive calls a candidate gets per turn: three rounds where there are 9 trials, else one round."""
    return trials // 3 if trials >= 9 else trials


def trial_candidate(call: int, trials: int, candidates: int) -> int:
    """Which candidate the ``call``-th trial call (from 0) of a key runs (see the module docstring)."""
    burst = trial_burst(trials)
    return (call % (burst * candidates)) // burst


def tune_mode() -> str:
    return config.get(TUNE_ENV)


def size_class(nbytes: int) -> int:
    """Power-of-two size classes: 1 KiB and 1.9 KiB share one, 2 KiB starts the next."""
    return max(int(nbytes), 0).bit_length()


def choices_path() -> Path:
    return config.get(CHOICES_ENV) or config.cache_dir() / "tuned.json"


class ChoiceStore:
    """Saved choices, one JSON object ``{key: algorithm}``; written under a lock, merged with other writers'."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or choices_path()

    def load(self) -> dict[str, str]:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: tune again (the choice is only ever a speed matter)
        if not isinstance(saved, dict):
            return {}
        return {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)}

    def save(self, key: str, algorithm: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of one host save at once
                saved = self.load()
                saved[key] = algorithm
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache costs the next run its trials, nothing else


@dataclass
class _Key:
    candidates: tuple[str, ...]
    trials: int
    times: list[float] = field(default_factory=list)  # this rank's time of each trial call, in order
    choice: str | None = None


class Tuner:
    """One group's tuning state (see the module docstring); used from the group's ordered thread only.

    ``agree_max(values)`` returns the element-wise maximum of ``values`` over the group's ranks (a collective
    every rank calls at the same point). ``signature`` names the group's setting in saved choices (transport,
    size, host layout, this host).
    """

    def __init__(
        self,
        signature: str,
        agree_max: Callable[[list[float]], list[float]],
        store: ChoiceStore | None = None,
        mode: str | None = None,
    ) -> None:
        self.signature = f"{socket.gethostname()}|{signature}"
        self.agree_max = agree_max
        self.mode = mode or tune_mode()
        self.store = store if store is not None else ChoiceStore()
        self._saved = self.store.load() if self.mode == "on" else {}
        self._keys: dict[tuple[str, int], _Key] = {}

    def _saved_key(self, request: str, cls: int) -> str:
        return f"{self.signature}|{request}|class{cls}|{SCORED_BY}"

    def pick(
        self,
        request: str,
        nbytes: int,
        candidates: Sequence[str],
        plausible: Callable[[], Sequence[bool]] | None = None,
    ) -> tuple[str, bool]:
        """(schedule to run, whether this call is a timed trial) for a ``request`` of ``nbytes``.

        ``plausible()`` (one flag per candidate, e.g. from the cost model; asked on a key's first call only) narrows
        the trials to the candidates every rank finds plausible — agreed in the first call's message, so ranks
        whose models differ still try the same.
        """
        candidates = tuple(candidates)
        if len(candidates) == 1:
            return candidates[0], False
        cls = size_class(nbytes)
        state = self._keys.get((request, cls))
        if state is None:
            saved = self._saved.get(self._saved_key(request, cls))
            index = candidates.index(saved) + 1 if saved in candidates else 0
            flags = [1.0 if p else 0.0 for p in plausible()] if plausible is not None else [1.0] * len(candidates)
            # One message: the max of (index, -index) says whether all saved the same; the max of -flag is minus
            # the lowest flag: a candidate stays only if every rank finds it plausible.
            agreed = self.agree_max([float(index), float(-index), *(-f for f in flags)])
            kept = tuple(c for c, negated in zip(candidates, agreed[2:]) if negated == -1.0) or candidates
            state = self._keys[(request, cls)] = _Key(kept, trials_for(nbytes))
            if len(kept) == 1:
                state.choice = kept[0]  # nothing to try
            if index and agreed[0] == -agreed[1]:  # every rank saved the same choice
                state.choice = saved
        if state.choice is not None:
            return state.choice, False
        return state.candidates[trial_candidate(len(state.times), state.trials, len(state.candidates))], True

    def record(self, request: str, nbytes: int, seconds: float) -> str | None:
        """This rank's time of a trial call; after the last trial, the choice every rank makes (else None)."""
        global _trial_calls
        _trial_calls += 1
        cls = size_class(nbytes)
        state = self._keys[(request, cls)]
        state.times.append(float(seconds))
        if len(state.times) < state.trials * len(state.candidates):
            return None
        # The same table on every rank: the last arrival's time of each trial (see the module docstring).
        after_last_arrival = [-t for t in self.agree_max([-t for t in state.times])]
        per_candidate: dict[str, list[float]] = {}
        for index, seconds in enumerate(after_last_arrival):
            name = state.candidates[trial_candidate(index, state.trials, len(state.candidates))]
            per_candidate.setdefault(name, []).append(seconds)
        score = min if state.trials < 5 else statistics.median
        best = {name: score(times) for name, times in per_candidate.items()}
        state.choice = min(state.candidates, key=lambda name: (best[name], state.candidates.index(name)))
        if self.mode in ("on", "fresh"):
            self.store.save(self._saved_key(request, cls), state.choice)
        return state.choice

    def tuning(self, request: str, nbytes: int) -> bool:
        """Whether calls of ``request`` at ``nbytes`` are still trials (or have not started)."""
        state = self._keys.get((request, size_class(nbytes)))
        return state is None or state.choice is None

    def decided(self) -> dict[tuple[str, int], str]:
        """The choices made so far: {(request, size class): schedule}."""
        return {key: state.choice for key, state in self._keys.items() if state.choice is not None}
