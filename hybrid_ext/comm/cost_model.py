"""Which allreduce algorithm to run: an α-β-γ cost model, calibrated on the machine, overridable by environment.

Per rank, with α seconds per message, β seconds per byte sent, γ seconds per byte reduced, n bytes, P ranks,
P' the largest power of two <= P (see :mod:`hybrid_ext.comm.schedule` for the algorithms):

=====================  ==============  =====================  ====================
algorithm              messages (× α)  bytes sent (× β)       bytes reduced (× γ)
=====================  ==============  =====================  ====================
recursive_doubling     log2 P'         n·log2 P'              n·log2 P'
rabenseifner           2·log2 P'       2·(P'-1)/P'·n          (P'-1)/P'·n
ring                   2·(P-1)         2·(P-1)/P·n            (P-1)/P·n
fold (P != P')         +2              +2n                    +n
native                 2·(P-1)         2·(P-1)/P·n            (P-1)/P·n
=====================  ==============  =====================  ====================

``native`` is the group's own allreduce (gloo's, NCCL's, Horovod's; :class:`~hybrid_ext.comm.transports.contract.
NativeCollectives`), modelled as the ring those backends run for large messages, with constants of its own
(``native/<its name>``): it runs as one call in the backend's C++ threads, not as steps through a transport. It has
no built-in constants — the backend's algorithm is its own — so the model weighs it only once ``--calibrate`` has
measured it on this machine; the online tuner (:mod:`hybrid_ext.comm.tuner`) always tries it.

Names a user may pass as ``algorithm``:

- ``"auto"``: the cheapest of all three by the model, and of the group's native allreduce where it has one;
- ``"butterfly"``: the cheaper of the two butterflies (recursive doubling, Rabenseifner);
- ``"hierarchical"`` / ``"hierarchical/<algorithm>"``: on a group that spans hosts, the hierarchical allreduce
  (:mod:`hybrid_ext.comm.hierarchy`) with the schedule between hosts chosen by the model or named; on one host
  the flat schedule (there the flat schedules are the hierarchy);
- an algorithm's own name, or ``"native"`` (the group's own allreduce).

``HYBRID_EXT_ALGO=<name>`` overrides ``auto`` and ``butterfly`` everywhere (like ``NCCL_ALGO``); an explicit
algorithm name passed by the caller is kept. ``HYBRID_EXT_ALGO=native`` runs the group's own allreduce wherever
the group has one (elsewhere the model chooses among the schedules). ``hybrid-ext bench allreduce --calibrate``
measures α, β, γ and saves them, per transport, where :func:`default_model` finds them
(``~/.cache/hybrid-ext/cost_model.json``, or the file named by ``HYBRID_EXT_COST_MODEL``). Message costs differ by an
order of magnitude between transports (shared memory vs TCP), so each transport has its own constants.
The link between hosts has its own too (``network/<transport>``, :func:`network_model`): ``--calibrate`` across
hosts (``--hosts H``) fits them to the hierarchical rows, so a message to another host is not priced as one
through the same transport inside a host (loopback).

Inside a host a message's bytes are CPU work: the constants hold the share of a core each rank had while they
were measured (``sharing``, ranks × threads / cores, at least 1; ``--calibrate`` records it), and
:func:`at_sharing` prices the same bytes where ranks share cores otherwise. α is not rescaled: with every core
busy, a message waits for its peer's turn on a core, which the measured α already holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hybrid_ext import config
from hybrid_ext.comm.schedule import ALGORITHMS, largest_power_of_two_at_most

ALGO_ENV = "HYBRID_EXT_ALGO"
MODEL_ENV = "HYBRID_EXT_COST_MODEL"
HIERARCHICAL_PREFIX = "hierarchical/"  # hierarchical/<schedule between hosts>: the plan's own name
NETWORK_PREFIX = "network/"  # network/<transport>: the link between hosts, calibrated across hosts
NATIVE = "native"  # the group's own allreduce (see NativeCollectives in hybrid_ext.comm.transports.contract)
DIRECT = "direct"  # one host: every rank reduces its slice from every rank's shared memory (transports.shm_allreduce)
NATIVE_ENV = "HYBRID_EXT_NATIVE"  # on (default) | off: whether auto may run the group's own allreduce
CHOICES = (
    "auto", "butterfly", "hierarchical", *ALGORITHMS, *(HIERARCHICAL_PREFIX + a for a in ALGORITHMS), NATIVE, DIRECT,
)  # fmt: skip
BUTTERFLIES = ("recursive_doubling", "rabenseifner")
# TCP over Ethernet at MTU 1500: 1538 bytes on the wire (preamble and gap, header, check sequence) carry 1448 of
# payload (IPv4 and TCP headers with timestamps take the rest), so a link's rate moves 6 % fewer bytes of messages.
TCP_WIRE_BYTES_PER_PAYLOAD = 1538 / 1448


@dataclass(frozen=True)
class CostModel:
    """Seconds per message (alpha), per byte sent (beta), per byte reduced (gamma); for a link between hosts also
    the CPU seconds its bytes cost the hosts (cpu_per_byte: the kernel's work at both ends, per byte sent), which
    ranks computing on every core lose while the bytes move."""

    alpha: float = 150e-6
    beta: float = 0.6e-9
    gamma: float = 0.4e-9
    cpu_per_byte: float = 0.0
    sharing: float = 0.0  # ranks per core while β and γ were measured (0: not known, never rescaled)

    def terms(self, algorithm: str, nbytes: int, p: int) -> tuple[float, float, float]:
        """(messages, bytes sent, bytes reduced) per rank on the critical path."""
        if p <= 1 or nbytes == 0:
            return (0.0, 0.0, 0.0)
        if algorithm in ("ring", NATIVE):
            return (2.0 * (p - 1), 2.0 * (p - 1) / p * nbytes, (p - 1) / p * nbytes)
        p2 = largest_power_of_two_at_most(p)
        steps = math.log2(p2)
        fold = (2.0, 2.0 * nbytes, float(nbytes)) if p != p2 else (0.0, 0.0, 0.0)
        if algorithm == "recursive_doubling":
            core = (steps, nbytes * steps, nbytes * steps)
        elif algorithm == "rabenseifner":
            core = (2 * steps, 2.0 * (p2 - 1) / p2 * nbytes, (p2 - 1) / p2 * nbytes)
        else:
            raise ValueError(f"no cost formula for {algorithm!r}")
        return tuple(a + b for a, b in zip(core, fold))  # type: ignore[return-value]

    def predict(self, algorithm: str, nbytes: int, p: int) -> float:
        messages, sent, reduced = self.terms(algorithm, nbytes, p)
        return self.alpha * messages + self.beta * sent + self.gamma * reduced

    def choose(self, nbytes: int, p: int, candidates: tuple[str, ...] = ALGORITHMS) -> str:
        return min(candidates, key=lambda a: (self.predict(a, nbytes, p), candidates.index(a)))


def at_sharing(model: CostModel, sharing: float) -> CostModel:
    """``model``'s constants where each core is shared ``sharing`` ways (ranks × threads / cores, at least 1): β
    and γ, a rank's CPU per byte, scaled from the sharing they were measured at (unchanged where it is unknown)."""
    if model.sharing <= 0:
        return model
    factor = max(1.0, sharing) / model.sharing
    return replace(model, beta=model.beta * factor, gamma=model.gamma * factor, sharing=max(1.0, sharing))


def beta_at_line_rate(bytes_per_second: float) -> float:
    """β of messages over TCP on a link of ``bytes_per_second`` on the wire (a NIC's rate, as ``--nic`` gives it)."""
    return TCP_WIRE_BYTES_PER_PAYLOAD / bytes_per_second


def network_model_key(network: str) -> str:
    """The name the link between hosts is kept under (its transport's own constants stay under the bare name)."""
    return f"{NETWORK_PREFIX}{network}"


def native_model_key(native: str) -> str:
    """The name a native allreduce's constants are kept under (beside the transports')."""
    return f"{NATIVE}/{native}"


def model_path() -> Path:
    return config.get(MODEL_ENV) or config.cache_dir() / "cost_model.json"


# Built-in constants per transport, from `hybrid-ext bench allreduce --np 8 --calibrate [--transport torch]` on a
# 2-core x86-64 machine (α is high there: 8 ranks share 2 cores, sharing 4). A saved calibration replaces them.
BUILTIN: dict[str, CostModel] = {
    "shm": CostModel(alpha=650e-6, beta=0.9e-9, gamma=2.2e-9, sharing=4.0),
    "torch-gloo": CostModel(alpha=3.5e-3, beta=1.0e-9, gamma=2.2e-9, sharing=4.0),
}

_models: dict[str, CostModel] | None = None


def _load_models() -> dict[str, CostModel]:
    global _models
    if _models is None:
        _models = dict(BUILTIN)
        path = model_path()
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                for transport, values in saved.items():
                    if isinstance(values, dict):
                        _models[transport] = CostModel(
                            **{k: float(values[k]) for k in ("alpha", "beta", "gamma")},
                            cpu_per_byte=float(values.get("cpu_per_byte", 0.0)),  # saved before it was measured
                            sharing=float(values.get("sharing", 0.0)),  # saved before it was recorded: unknown
                        )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                _models = None
                source = f"{MODEL_ENV}={str(path)!r}" if config.get(MODEL_ENV) else f"the cost model {str(path)!r}"
                raise ValueError(
                    f"{source} is not a saved calibration ({{transport: {{alpha, beta, gamma}}}}): {exc!r}; "
                    "recreate it with `hybrid-ext bench allreduce --calibrate`"
                ) from None
    return _models


def default_model(transport: str = "") -> CostModel:
    """The model for a transport: its saved calibration, else the built-in constants."""
    models = _load_models()
    # A routed transport ("shm+torch-gloo") is bounded by its network part.
    return models.get(transport) or models.get(transport.rsplit("+", 1)[-1]) or CostModel()


def save_model(transport: str, model: CostModel, path: Path | None = None) -> Path:
    """Store ``model`` as the calibration of ``transport`` (other transports' calibrations are kept)."""
    path = path or model_path()
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[transport] = asdict(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    global _models
    _models = None
    return path


def network_calibrated(network: str) -> bool:
    """Whether the link between hosts over ``network`` has been calibrated (else :func:`network_model` falls back)."""
    return network_model_key(network) in _load_models()


def network_model(network: str) -> CostModel:
    """The constants of a message to another host over ``network``: the link's calibration across hosts, else the
    transport's own (:func:`default_model`)."""
    return _load_models().get(network_model_key(network)) or default_model(network)


def native_model(native: str) -> CostModel | None:
    """The calibrated constants of a native allreduce (see the module docstring), or None if none were saved."""
    return _load_models().get(native_model_key(native))


def native_enabled() -> bool:
    """Whether the group's own allreduce may run (``HYBRID_EXT_NATIVE=off`` keeps hybrid-ext to its schedules)."""
    return config.get(NATIVE_ENV)


def forced() -> bool:
    """Whether ``HYBRID_EXT_ALGO`` pins one flat schedule for every ``auto`` / ``butterfly`` call."""
    return config.get(ALGO_ENV) not in ("auto", "butterfly")


def requested_algorithm(default: str = "auto") -> str:
    """The allreduce schedule a backend's own allreduce (the ``butterfly`` backend's, DeepSpeed's gradients) asks
    for: ``HYBRID_EXT_ALGO`` where it names one, else ``default`` (read at every call, so a job may switch it
    between calls)."""
    algorithm = config.get(ALGO_ENV)
    if algorithm == "auto":
        return default
    return "auto" if algorithm == NATIVE else algorithm  # native: auto, which picks it where the group has one


def resolve(
    algorithm: str,
    nbytes: int,
    p: int,
    transport: str = "",
    model: CostModel | None = None,
    native: str | None = None,
) -> str:
    """The concrete schedule to run for a requested ``algorithm`` name (or ``"native"``).

    ``native``: the name of the group's own allreduce where it has one (and may run this call): then ``auto`` weighs
    it against the schedules by its calibrated constants, if any, and ``HYBRID_EXT_ALGO=native`` picks it.
    """
    if algorithm not in CHOICES:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose one of {', '.join(CHOICES)}")
    if algorithm.startswith("hierarchical"):  # needs the group's host layout: the communicator plans it
        return algorithm
    if algorithm in ("auto", "butterfly"):
        forced = config.get(ALGO_ENV)
        if forced not in ("auto", "butterfly"):
            if forced != NATIVE:
                return forced
            if native is not None:
                return NATIVE
            forced = ""  # no native allreduce on this group: the model chooses among the schedules
        butterflies_only = algorithm == "butterfly" or forced == "butterfly"
        candidates = BUTTERFLIES if butterflies_only else ALGORITHMS
        model = model or default_model(transport)
        chosen = model.choose(nbytes, p, candidates)
        measured = native_model(native) if native is not None and not butterflies_only else None
        if measured is not None and measured.predict(NATIVE, nbytes, p) < model.predict(chosen, nbytes, p):
            return NATIVE
        return chosen
    return algorithm
