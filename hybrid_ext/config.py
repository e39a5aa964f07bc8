"""Every ``HYBRID_EXT_*`` environment variable, declared once; the only module that reads them.

Each :class:`Knob` has a name, a kind (``choice``, ``bool``, ``int``, ``path``), a default, its allowed values and
one line of doc. :func:`get` reads the environment at every call (tests set variables after import; launched
ranks inherit them), so a job may change a knob between calls. Code that wants a value for this process passes it
here instead of writing ``os.environ``: :func:`override` for a block, :func:`set_for_process` until changed. Both
sit above the environment and are seen by every thread (collectives run on a worker thread). Bad values raise
``ValueError`` naming the variable and what it takes.

    from hybrid_ext import config
    config.get("HYBRID_EXT_TUNE")                      # "on" unless the environment says otherwise
    with config.override(HYBRID_EXT_ALGO="ring"):      # this process, this block
        ...

``hybrid-ext config --markdown`` renders the reference page (``docs/configuration.md``); without the flag it
prints each knob's value here.

This module imports nothing of hybrid_ext: every layer may read it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_ON_OFF = tuple((word, "on") for word in TRUE[:-1]) + tuple((word, "off") for word in FALSE[:-1])


@dataclass(frozen=True)
class Knob:
    """One environment variable: how to read it and what it does.

    An empty or unset variable means ``default``. ``choice`` and ``bool`` values are read case-insensitively;
    ``aliases`` are other spellings of a choice (``1`` for ``on``).
    """

    name: str
    kind: str  # choice | bool | int | path
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    minimum: int | None = None
    default_doc: str = ""  # the default as the reference page shows it, where it is computed

    def parse(self, raw: str | None) -> Any:
        """The value ``raw`` (the variable's text, None when unset) stands for."""
        text = (raw or "").strip()
        if self.kind in ("choice", "bool"):
            text = text.lower()
        if not text:
            return self.default
        if self.kind == "choice":
            text = dict(self.aliases).get(text, text)
            if text in self.choices:
                return text
        elif self.kind == "bool":
            if text in TRUE or text in FALSE:
                return text in TRUE
        elif self.kind == "int":
            try:
                number = int(text)
            except ValueError:
                number = None
            if number is not None and (self.minimum is None or number >= self.minimum):
                return number
        elif self.kind == "path":
            return Path(text).expanduser()
        raise ValueError(f"{self.name}={text!r}: {self.takes()}")

    def takes(self) -> str:
        """What the variable accepts, in words."""
        if self.kind == "choice":
            return f"choose {', '.join(self.choices)}"
        if self.kind == "bool":
            return f"use {', '.join(TRUE)} or {', '.join(FALSE)}"
        if self.kind == "int":
            return "give an integer" + (f" >= {self.minimum}" if self.minimum is not None else "")
        return "give a path"


_KNOBS = (
    Knob("HYBRID_EXT_ALGO", "choice", "auto",
         "Allreduce schedule for every `auto` / `butterfly` request (like `NCCL_ALGO`; an explicit algorithm "
         "argument is kept): `butterfly` limits the choice to the butterflies, `native` runs the group's own "
         "allreduce where it has one.",
         choices=("auto", "butterfly", "recursive_doubling", "rabenseifner", "ring", "native")),
    Knob("HYBRID_EXT_AUTO_TABLE", "path", None,
         "Where `strategy=\"auto\"` writes, from rank 0, the layer times its ranks agreed on, as a calibration "
         "file (`hybrid-ext plan --calibration` reads it and predicts what they chose from); each plan replaces "
         "the last."),
    Knob("HYBRID_EXT_CACHE", "path", None,
         "Directory of the saved cost model, the tuner's choices and the built Horovod wheel.",
         default_doc="`${XDG_CACHE_HOME:-~/.cache}/hybrid-ext`"),
    Knob("HYBRID_EXT_CHECK", "bool", False,
         "Check mode: ranks agree on each collective (kind, op, dtype, shape, name) before running it and name "
         "the first that differs; replicated parameters are compared after optimizer steps."),
    Knob("HYBRID_EXT_CHECK_REPLICAS_EVERY", "int", 50,
         "In check mode, compare replicated parameters after the first optimizer step and every this many after it.",
         minimum=1),
    Knob("HYBRID_EXT_CLUSTER_DIR", "path", Path("/run/hybrid-ext-cluster"),
         "State directory of the emulated cluster (`hybrid-ext cluster`); the default is a tmpfs, gone after a "
         "reboot as the cluster's namespaces are."),
    Knob("HYBRID_EXT_COST_MODEL", "path", None,
         "The saved cost-model calibration (`hybrid-ext bench allreduce --calibrate` writes it).",
         default_doc="`$HYBRID_EXT_CACHE/cost_model.json`"),
    Knob("HYBRID_EXT_DEEPSPEED_REDUCTION", "choice", "hybrid-ext",
         "Who reduces a DeepSpeed engine's gradient buckets on the butterfly backend: hybrid-ext (buckets reduced "
         "in place, copies included) or DeepSpeed's own method.",
         choices=("hybrid-ext", "deepspeed")),
    Knob("HYBRID_EXT_HEAP", "choice", "steady",
         "The glibc heap of ranks hybrid-ext starts and of `hybrid-ext plan`'s profile: `steady` keeps freed "
         "memory for the next step (no chunk-level mmap), `default` leaves glibc's behaviour (large blocks mapped "
         "afresh, their pages zeroed again, as often as its moving threshold decides).",
         choices=("steady", "default")),
    Knob("HYBRID_EXT_HOROVOD_GPU", "choice", "auto",
         "Build the Horovod wheel with NCCL GPU operations: `on`, `off`, or `auto` (when this torch is a CUDA "
         "build and sees a GPU).",
         choices=("auto", "on", "off"), aliases=_ON_OFF),
    Knob("HYBRID_EXT_NATIVE", "bool", True,
         "Whether `auto` may run the group's own allreduce (gloo's or NCCL's) among its candidates."),
    Knob("HYBRID_EXT_RESULT_DIR", "path", None,
         "Where ranks started by hybrid-ext's launchers save their results (the launchers set it for their ranks)."),
    Knob("HYBRID_EXT_SEGMENT_BYTES", "int", None,
         "Bytes per segment of a pipelined hierarchical allreduce; 0 runs its stages one after another.",
         minimum=0, default_doc="512 KiB × ranks per host × hosts"),
    Knob("HYBRID_EXT_SHM_KERNELS", "choice", "auto",
         "The loops of the one-host shared-memory allreduce: `auto` (C, built on first use with the system "
         "compiler, else Python), `c` (fail if it cannot be built), `python` (torch ops; same results, slower).",
         choices=("auto", "c", "python")),
    Knob("HYBRID_EXT_TRANSPORT", "choice", "auto",
         "How ranks exchange messages: `auto` (shared memory within a host, the group's send/recv between hosts), "
         "`shm` (shared memory only), `torch` (send/recv everywhere).",
         choices=("auto", "shm", "torch")),
    Knob("HYBRID_EXT_TUNE", "choice", "on",
         "The tuner: `on` times candidate schedules once and saves the fastest, `off` uses the cost model alone, "
         "`fresh` tunes again ignoring saved choices.",
         choices=("on", "off", "fresh"), aliases=_ON_OFF),
    Knob("HYBRID_EXT_TUNED", "path", None,
         "The file of the tuner's saved choices.",
         default_doc="`$HYBRID_EXT_CACHE/tuned.json`"),
    Knob("HYBRID_EXT_WIRE_DTYPE", "choice", "input",
         "The dtype 16-bit and float32 reductions travel in by default (`input`: their own; accumulation is float32).",
         choices=("input", "float32", "float16", "bfloat16")),
)  # fmt: skip
KNOBS: Mapping[str, Knob] = {knob.name: knob for knob in _KNOBS}

# Values set in code, above the environment: [0] holds set_for_process's, each open override() adds one on top.
_layers: list[dict[str, str]] = [{}]
_lock = threading.Lock()


def knob(name: str) -> Knob:
    """The declaration of ``name``; KeyError (listing the known names) for any other."""
    try:
        return KNOBS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a hybrid-ext setting; known: {', '.join(KNOBS)}") from None


def raw(name: str) -> str | None:
    """The text ``name`` has now: from the innermost override, else set_for_process, else the environment."""
    knob(name)
    if len(_layers) > 1 or _layers[0]:  # values set in code (rare): look under the lock
        with _lock:
            for layer in reversed(_layers):
                if name in layer:
                    return layer[name]
    return _environment(name)


def _environment(name: str) -> str | None:
    """``os.environ.get(name)``, at a tenth of its cost where the platform allows.

    Collectives read several knobs per call (a 1 KiB allreduce takes tens of microseconds in all); ``os.environ``
    encodes the key and decodes the value each time. On POSIX its bytes mapping (``os.environ._data``, which every
    change through ``os.environ`` updates) answers directly.
    """
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or type(data) is not dict:
        return os.environ.get(name)
    value = data.get(_ENCODED.get(name) or _ENCODED.setdefault(name, os.fsencode(name)))
    return None if value is None else os.fsdecode(value)


_ENCODED: dict[str, bytes] = {}
_PARSED: dict[tuple[str, str | None], Any] = {}  # (name, text) -> value: parsing once per distinct text


def get(name: str) -> Any:
    """The value of ``name`` now (see the module docstring): str for a choice, bool, int or None, Path or None."""
    text = raw(name)
    key = (name, text)
    try:
        return _PARSED[key]
    except KeyError:
        value = _PARSED[key] = knob(name).parse(text)  # a bad value raises here, every time, and is not kept
        return value


def cache_dir() -> Path:
    """Where hybrid-ext keeps what it saves: ``HYBRID_EXT_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/hybrid-ext``."""
    return get("HYBRID_EXT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "hybrid-ext"


def _as_text(name: str, value: Any) -> str:
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    knob(name).parse(text)  # a bad value fails where it is set, not at some later call
    return text


def _checked(values: Mapping[str, Any]) -> dict[str, str | None]:
    return {name: None if value is None else _as_text(name, value) for name, value in values.items()}


@contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set knobs for this process (every thread) within a ``with`` block; blocks nest, the innermost wins.

    Values are given as in the environment or typed (``True``, ``0``, a ``Path``); ``None`` leaves a knob to the
    layers below. ``ValueError`` for a bad value, ``KeyError`` for an unknown name.
    """
    layer = {name: text for name, text in _checked(values).items() if text is not None}
    with _lock:
        _layers.append(layer)
    try:
        yield
    finally:
        with _lock:
            # By identity: blocks opened on different threads may close out of order.
            del _layers[next(i for i in range(len(_layers) - 1, 0, -1) if _layers[i] is layer)]


def set_for_process(**values: Any) -> None:
    """Set knobs for the rest of this process (every thread), above the environment; ``None`` clears one."""
    checked = _checked(values)
    with _lock:
        for name, text in checked.items():
            if text is None:
                _layers[0].pop(name, None)
            else:
                _layers[0][name] = text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The configuration reference page (``docs/configuration.md``)."""
    lines = [
        "# Configuration",
        "",
        "hybrid-ext reads these environment variables (and no others of its own). Each is read when it is used, so a",
        "job may change one between calls; an empty variable means its default. Ranks started by hybrid-ext's",
        "launchers inherit them, and the multi-host recipes forward every `HYBRID_EXT_*` variable to the other",
        "hosts. Code sets them for its own process through `hybrid_ext.config` instead of `os.environ`:",
        '`with config.override(HYBRID_EXT_ALGO="ring"):` for a block, `config.set_for_process(...)` until changed.',
        "A bad value raises `ValueError` naming the variable and what it takes.",
        "",
        "<!-- Generated from hybrid_ext/config.py by `hybrid-ext config --markdown`; do not edit. -->",
        "",
        "| Variable | Type | Default | Allowed | What it does |",
        "|---|---|---|---|---|",
    ]
    for k in _KNOBS:
        if k.default_doc:
            default = k.default_doc
        elif k.default is None:
            default = "unset"
        elif k.kind == "bool":
            default = "`1`" if k.default else "`0`"
        else:
            default = f"`{k.default}`"
        if k.kind == "choice":
            allowed = ", ".join(f"`{c}`" for c in k.choices)
            if k.aliases:
                allowed += " (also " + ", ".join(f"`{a}`" for a, _ in k.aliases) + ")"
        elif k.kind == "bool":
            allowed = ", ".join(f"`{w}`" for w in TRUE) + " / " + ", ".join(f"`{w}`" for w in FALSE)
        elif k.kind == "int":
            allowed = "an integer" + (f" ≥ {k.minimum}" if k.minimum is not None else "")
        else:
            allowed = "a path"
        lines.append(f"| `{k.name}` | {k.kind} | {_cell(default)} | {_cell(allowed)} | {_cell(k.doc)} |")
    return "\n".join(lines) + "\n"


def describe() -> str:
    """Each knob's value here, one line each, with the text that set it (an override or the environment)."""
    lines = []
    for k in _KNOBS:
        text = raw(k.name)
        value = k.parse(text)
        shown = k.default_doc.strip("`") if value is None and k.default_doc else ("unset" if value is None else value)
        lines.append(f"{k.name}={shown}" + ("" if text is None else f"  (set: {text!r})"))
    return "\n".join(lines) + "\n"
