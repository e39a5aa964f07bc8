"""Which schedule a collective runs: functions of the request, its size and the group's :class:`Topology`.

Nothing here touches a transport or keeps state; besides their arguments they read only the knobs that steer the
choice (``HYBRID_EXT_ALGO``, ``HYBRID_EXT_TUNE``). The communicator holds what is stateful — the tuner
(:mod:`hybrid_ext.comm.tuner`), which times candidates and remembers the winners, and its memo of decided calls — and
asks :func:`allreduce` on each call it has not decided yet.

``auto`` / ``butterfly`` / ``hierarchical`` allreduces are the tuner's to pick among :func:`candidates` (those
the cost model finds :func:`plausible`); with ``HYBRID_EXT_TUNE=off`` or a forced algorithm the cost model alone
decides (hierarchical from :data:`HIERARCHY_MIN_BYTES` where the group spans hosts). All-gathers and
reduce-scatters are not tuned (:func:`block_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_ext import config
from hybrid_ext.comm import cost_model
from hybrid_ext.comm.cost_model import DIRECT, HIERARCHICAL_PREFIX, NATIVE
from hybrid_ext.comm.hierarchy import equal_hosts
from hybrid_ext.comm.schedule import ALGORITHMS
from hybrid_ext.comm.topology import Topology
from hybrid_ext.comm.tuner import tune_mode

# Below this, a group that spans hosts runs the flat schedules: latency-bound messages gain nothing from staging
# through shared memory first (recursive doubling already crosses hosts in its later, fewer steps).
HIERARCHY_MIN_BYTES = 64 << 10
# The tuner tries only candidates the cost model puts within this factor of its best: the model misjudges close
# calls (what trials settle), not a ring's 2(P-1) messages for 1 KiB or recursive doubling's log2 P copies of 1 GiB.
TRIAL_WITHIN = 2.5
HIERARCHICAL = "hierarchical"  # block_schedule's answer where each block leaves its host once


@dataclass(frozen=True)
class Tune:
    """The tuner picks: ``request`` names the call to it (the key its timings and choices are kept under), among
    ``candidates``."""

    request: str
    candidates: tuple[str, ...]


def tuned(algorithm: str) -> bool:
    """Whether the tuner picks the schedule for a request of ``algorithm``."""
    return algorithm in ("auto", "butterfly", "hierarchical") and not cost_model.forced() and tune_mode() != "off"


def allreduce(
    algorithm: str,
    nbytes: int,
    topology: Topology,
    *,
    native: str | None = None,
    native_allowed: bool = True,
    direct: bool = False,
    direct_allowed: bool = False,
    tune: bool = True,
) -> str | Tune:
    """What runs for an allreduce of ``nbytes`` (on the wire) requested as ``algorithm``.

    Args:
        algorithm (str): the caller's request: ``auto``, ``butterfly``, ``hierarchical``, a schedule's name,
            ``hierarchical/<schedule>``, ``native`` or ``direct``.
        nbytes (int): the vector's size in its wire dtype.
        topology (Topology): the group's.
        native (str or None): the name of the group's own allreduce, None where it has none (or it is off).
        native_allowed (bool): whether this call may run it (not where the caller compresses the wire).
        direct (bool): whether the group has the one-host direct allreduce.
        direct_allowed (bool): whether this call may run it (CPU tensors of a dtype and op it takes).
        tune (bool): False: what the cost model picks where the tuner would (the planner's traffic model).

    Returns:
        str or Tune: the schedule's name (``native``, ``direct``, a flat schedule or ``hierarchical/<schedule>``),
        or :class:`Tune` where the tuner picks.

    Raises:
        ValueError: ``native`` requested of a group without one, or ``direct`` of a call that may not run it.
    """
    native_runs = native if (native is not None and native_allowed and nbytes > 0) else None
    direct_runs = direct_allowed and nbytes > 0
    if algorithm == DIRECT:
        if not direct_allowed:
            raise ValueError(
                f"algorithm='direct' needs the ranks on one host's shared memory, CPU tensors of a supported "
                f"dtype and no compressed wire dtype (transport {topology.transport!r})"
            )
        return DIRECT
    if algorithm == NATIVE:
        if native is None:
            raise ValueError(
                f"algorithm='native': the group of transport {topology.transport!r} has no allreduce of its own"
            )
        return NATIVE
    if algorithm.startswith(HIERARCHICAL_PREFIX):  # named: the caller's schedule between hosts
        return algorithm if topology.spans_hosts else algorithm.removeprefix(HIERARCHICAL_PREFIX)
    if algorithm == "hierarchical" and not topology.spans_hosts:
        algorithm = "auto"  # one host: the flat schedules are the hierarchy
    if tune and tuned(algorithm):
        # Calls that may not run native or direct (a compressed wire, scaled 16-bit values) are tuned apart: their
        # candidates differ.
        narrowed = (native is not None and native_runs is None) or (direct and not direct_runs)
        request = f"{algorithm}|schedules" if narrowed else algorithm
        return Tune(request, candidates(algorithm, topology, native_runs is not None, direct_runs))
    if topology.spans_hosts and (
        algorithm == "hierarchical"
        or (algorithm in ("auto", "butterfly") and nbytes >= HIERARCHY_MIN_BYTES and not cost_model.forced())
    ):
        between = "butterfly" if algorithm == "butterfly" else "auto"
        inter = cost_model.resolve(
            between, nbytes // topology.lanes, topology.host_count, topology.network,
            model=cost_model.network_model(topology.network),
        )  # fmt: skip
        return f"{HIERARCHICAL_PREFIX}{inter}"
    return cost_model.resolve(algorithm, nbytes, topology.size, topology.transport, native=native_runs)


def candidates(algorithm: str, topology: Topology, native: bool = False, direct: bool = False) -> tuple[str, ...]:
    """What the tuner tries for a request of ``algorithm``: flat schedules, hierarchical ones where the group spans
    hosts, and for ``auto`` the group's native allreduce and the one-host direct one where they may run."""
    if config.get(cost_model.ALGO_ENV) == "butterfly":
        algorithm = "butterfly" if algorithm == "auto" else algorithm
    flat = cost_model.BUTTERFLIES if algorithm == "butterfly" else ALGORITHMS
    stacked = tuple(f"{HIERARCHICAL_PREFIX}{name}" for name in flat) if topology.spans_hosts else ()
    if algorithm == "hierarchical":
        return stacked
    extra = ((DIRECT,) if direct else ()) + ((NATIVE,) if native else ())
    return flat + stacked + (extra if algorithm == "auto" else ())


def predicted(name: str, nbytes: int, topology: Topology) -> float:
    """The cost model's seconds for schedule ``name`` (flat: as if every link were the group's slowest)."""
    if not name.startswith(HIERARCHICAL_PREFIX):
        return cost_model.default_model(topology.transport).predict(name, nbytes, topology.size)
    lanes = topology.lanes
    within = cost_model.default_model(topology.local or "shm").predict("ring", nbytes, lanes)  # reduce-scatter + gather
    between = cost_model.network_model(topology.network).predict(
        name.removeprefix(HIERARCHICAL_PREFIX), nbytes // lanes, topology.host_count
    )
    return within + between


def plausible(names: tuple[str, ...], nbytes: int, topology: Topology) -> list[bool]:
    """For each candidate, whether the tuner should time it: the cost model puts it within :data:`TRIAL_WITHIN`
    of its best; the backend's own allreduce and the direct one are outside the model and always tried."""
    modelled = [predicted(name, nbytes, topology) for name in names if name not in (NATIVE, DIRECT)]
    best = min(modelled, default=0.0)
    return [name in (NATIVE, DIRECT) or predicted(name, nbytes, topology) <= TRIAL_WITHIN * best for name in names]


def block_schedule(gather: bool, algorithm: str, nbytes: int, topology: Topology) -> str:
    """The all-gather (``gather``) or reduce-scatter schedule for ``algorithm`` over ``nbytes`` in all: ``auto``
    (and ``hierarchical``) send each block out of its host once on a group of equal hosts — from
    :data:`HIERARCHY_MIN_BYTES`, where bytes matter more than the extra message — and run the flat butterfly
    otherwise; a named flat schedule runs as named."""
    if algorithm not in ("auto", "hierarchical"):
        return algorithm
    large = algorithm == "hierarchical" or nbytes >= HIERARCHY_MIN_BYTES
    if topology.hosts is not None and equal_hosts(topology.hosts) and large:
        return HIERARCHICAL
    return "recursive_doubling" if gather else "recursive_halving"


__all__ = [
    "HIERARCHY_MIN_BYTES",
    "TRIAL_WITHIN",
    "Tune",
    "allreduce",
    "block_schedule",
    "candidates",
    "plausible",
    "predicted",
    "tuned",
]
