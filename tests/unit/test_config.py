"""hybrid_ext.config: declarations, parsing, overrides, the generated reference page, and that no other module
reads a HYBRID_EXT_* variable from the environment."""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import pytest

from hybrid_ext import config

from helpers import ROOT

SCANNED = ("hybrid_ext", "integrations", "recipes")  # the package, its integrations, the user-facing scripts
PREFIX = "HYBRID_EXT_"


@pytest.fixture
def clean_env(monkeypatch):
    for name in config.KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


# ------------------------------------------------------------------ declarations and parsing


def test_defaults(clean_env):
    assert config.get("HYBRID_EXT_ALGO") == "auto"
    assert config.get("HYBRID_EXT_CHECK") is False
    assert config.get("HYBRID_EXT_CHECK_REPLICAS_EVERY") == 50
    assert config.get("HYBRID_EXT_NATIVE") is True
    assert config.get("HYBRID_EXT_SEGMENT_BYTES") is None
    assert config.get("HYBRID_EXT_TUNE") == "on"
    assert config.get("HYBRID_EXT_TRANSPORT") == "auto"
    assert config.get("HYBRID_EXT_WIRE_DTYPE") == "input"
    assert config.get("HYBRID_EXT_DEEPSPEED_REDUCTION") == "hybrid-ext"
    assert config.get("HYBRID_EXT_CLUSTER_DIR") == Path("/run/hybrid-ext-cluster")
    assert config.get("HYBRID_EXT_RESULT_DIR") is None
    assert config.cache_dir() == Path("~/.cache/hybrid-ext").expanduser()


def test_every_knob_is_declared_whole():
    for knob in config.KNOBS.values():
        assert knob.name.startswith(PREFIX) and knob.doc, knob
        assert knob.kind in ("choice", "bool", "int", "path"), knob
        if knob.kind == "choice":
            assert knob.default in knob.choices, knob
            assert all(meant in knob.choices for _, meant in knob.aliases), knob
        assert knob.parse(None) == knob.default == knob.parse("  "), knob  # unset and empty mean the default


def test_values_are_parsed_by_type(clean_env, monkeypatch, tmp_path):
    cases = {
        "HYBRID_EXT_TUNE": {"1": "on", " OFF ": "off", "no": "off", "Fresh": "fresh"},
        "HYBRID_EXT_CHECK": {"yes": True, "ON": True, "0": False, "false": False},
        "HYBRID_EXT_NATIVE": {"off": False, "1": True},
        "HYBRID_EXT_HOROVOD_GPU": {"1": "on", "0": "off", "auto": "auto"},
        "HYBRID_EXT_SEGMENT_BYTES": {"0": 0, "16384": 16384},
        "HYBRID_EXT_CHECK_REPLICAS_EVERY": {"7": 7},
        "HYBRID_EXT_ALGO": {"Ring": "ring", "native": "native"},
        "HYBRID_EXT_TUNED": {str(tmp_path / "t.json"): tmp_path / "t.json", "~/t.json": Path("~/t.json").expanduser()},
    }
    for name, values in cases.items():
        for text, expected in values.items():
            monkeypatch.setenv(name, text)
            assert config.get(name) == expected, (name, text)
    monkeypatch.setenv("HYBRID_EXT_CACHE", str(tmp_path))
    assert config.cache_dir() == tmp_path


@pytest.mark.parametrize("name", [k.name for k in config.KNOBS.values() if k.kind != "path"])
def test_a_bad_value_names_the_variable_and_what_it_takes(monkeypatch, name):
    knob = config.knob(name)
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(ValueError, match=f"{name}='bogus'") as error:
        config.get(name)
    for allowed in knob.choices:
        assert allowed in str(error.value)


def test_integers_below_the_minimum_are_refused(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_SEGMENT_BYTES", "-1")
    with pytest.raises(ValueError, match=r"HYBRID_EXT_SEGMENT_BYTES='-1': give an integer >= 0"):
        config.get("HYBRID_EXT_SEGMENT_BYTES")
    monkeypatch.setenv("HYBRID_EXT_CHECK_REPLICAS_EVERY", "0")
    with pytest.raises(ValueError, match="HYBRID_EXT_CHECK_REPLICAS_EVERY='0'"):
        config.get("HYBRID_EXT_CHECK_REPLICAS_EVERY")


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="HYBRID_EXT_ALGORITHM"):
        config.get("HYBRID_EXT_ALGORITHM")
    with pytest.raises(KeyError, match="HYBRID_EXT_NOPE"), config.override(HYBRID_EXT_NOPE="1"):
        pass


def test_algorithm_choices_are_the_schedules_and_the_requests():
    from hybrid_ext.comm.cost_model import NATIVE
    from hybrid_ext.comm.schedule import ALGORITHMS

    assert set(config.knob("HYBRID_EXT_ALGO").choices) == {"auto", "butterfly", *ALGORITHMS, NATIVE}


# ------------------------------------------------------------------ values set in code


def test_override_nests_restores_and_beats_the_environment(clean_env, monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_ALGO", "ring")
    with config.override(HYBRID_EXT_ALGO="rabenseifner", HYBRID_EXT_CHECK=True):
        assert config.get("HYBRID_EXT_ALGO") == "rabenseifner" and config.get("HYBRID_EXT_CHECK") is True
        with config.override(HYBRID_EXT_ALGO="butterfly", HYBRID_EXT_CHECK=None):  # None: the layer below decides
            assert config.get("HYBRID_EXT_ALGO") == "butterfly" and config.get("HYBRID_EXT_CHECK") is True
        assert config.get("HYBRID_EXT_ALGO") == "rabenseifner"
    assert config.get("HYBRID_EXT_ALGO") == "ring" and config.get("HYBRID_EXT_CHECK") is False
    with pytest.raises(RuntimeError), config.override(HYBRID_EXT_SEGMENT_BYTES=0):
        assert config.get("HYBRID_EXT_SEGMENT_BYTES") == 0
        raise RuntimeError
    assert config.get("HYBRID_EXT_SEGMENT_BYTES") is None  # restored on an exception too


def test_a_bad_value_set_in_code_fails_where_it_is_set(monkeypatch):
    monkeypatch.setenv("HYBRID_EXT_TUNE", "off")
    with pytest.raises(ValueError, match="HYBRID_EXT_TUNE='sometimes'"), config.override(HYBRID_EXT_TUNE="sometimes"):
        pass
    with pytest.raises(ValueError, match="HYBRID_EXT_TUNE='sometimes'"):
        config.set_for_process(HYBRID_EXT_TUNE="sometimes")
    assert config.raw("HYBRID_EXT_TUNE") == "off"  # nothing was left set


def test_values_set_in_code_reach_other_threads(clean_env):
    seen = []
    config.set_for_process(HYBRID_EXT_TRANSPORT="torch")
    try:
        with config.override(HYBRID_EXT_WIRE_DTYPE="bfloat16"):
            worker = threading.Thread(
                target=lambda: seen.append((config.get("HYBRID_EXT_TRANSPORT"), config.get("HYBRID_EXT_WIRE_DTYPE")))
            )
            worker.start()
            worker.join()
        assert config.get("HYBRID_EXT_TRANSPORT") == "torch"  # until cleared
        with config.override(HYBRID_EXT_TRANSPORT="shm"):  # an override sits above it
            assert config.get("HYBRID_EXT_TRANSPORT") == "shm"
    finally:
        config.set_for_process(HYBRID_EXT_TRANSPORT=None)
    assert seen == [("torch", "bfloat16")]
    assert config.get("HYBRID_EXT_TRANSPORT") == "auto"


def test_readers_follow_the_configuration(clean_env):
    from hybrid_ext.comm import cost_model, tuner
    from hybrid_ext.comm.cost_model import requested_algorithm

    assert requested_algorithm() == "auto" and not cost_model.forced()
    with config.override(HYBRID_EXT_ALGO="ring", HYBRID_EXT_TUNE="fresh"):
        assert requested_algorithm() == "ring" and cost_model.forced() and tuner.tune_mode() == "fresh"
        assert cost_model.resolve("auto", 1024, 8) == "ring"
    with config.override(HYBRID_EXT_ALGO="native"):
        assert requested_algorithm() == "auto"  # the backend asks for auto, which picks the group's own allreduce
        assert cost_model.resolve("auto", 1024, 8, native="gloo") == "native"


# ------------------------------------------------------------------ the reference page


def test_the_reference_page_is_generated_from_the_declarations():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config.markdown(), "regenerate it: hybrid-ext config --markdown > docs/configuration.md"
    for name in config.KNOBS:
        assert f"| `{name}` |" in page


# ------------------------------------------------------------------ nobody else reads the environment


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _string_constants(tree: ast.AST) -> dict[str, str]:
    """Names assigned a HYBRID_EXT_* string anywhere in a module (``ALGO_ENV = "HYBRID_EXT_ALGO"``)."""
    found = {}
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        value = getattr(node, "value", None)
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.startswith(PREFIX):
            found.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return found


def environment_reads(source: str, constants: dict[str, str]) -> list[str]:
    """``line: code`` for each read of a HYBRID_EXT_* variable from the environment in ``source``.

    A variable is named by a string literal (an f-string's start too) or by a constant in ``constants`` (a bare
    name or a module attribute, ``cost_model.ALGO_ENV``). Reads: ``os.environ.get/pop/setdefault(name)``,
    ``os.getenv(name)``, ``os.environ[name]`` (not as an assignment target) and ``name in os.environ``.
    """
    tree = ast.parse(source)
    constants = {**constants, **_string_constants(tree)}

    def knob(node: ast.AST | None) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value.startswith(PREFIX)
        if isinstance(node, ast.JoinedStr):
            return bool(node.values) and knob(node.values[0])
        if isinstance(node, ast.Name):
            return node.id in constants
        if isinstance(node, ast.Attribute):
            return node.attr in constants
        return False

    reads = []
    for node in ast.walk(tree):
        read = False
        if isinstance(node, ast.Call) and node.args and knob(node.args[0]):
            func = node.func
            read = (
                isinstance(func, ast.Attribute)
                and func.attr in ("get", "pop", "setdefault")
                and _is_environ(func.value)
            ) or (
                isinstance(func, (ast.Attribute, ast.Name))
                and getattr(func, "attr", getattr(func, "id", None)) == "getenv"
            )
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            read = _is_environ(node.value) and knob(node.slice)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            read = knob(node.left) and any(_is_environ(c) for c in node.comparators)
        if read:
            reads.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return reads


def _scanned_sources() -> dict[str, str]:
    files = sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_the_scan_finds_reads_in_every_form():
    source = """
import os
from os import environ, getenv
from hybrid_ext.comm import cost_model
ALGO_ENV = "HYBRID_EXT_ALGO"
os.environ.get(ALGO_ENV, "auto")
os.environ["HYBRID_EXT_TUNE"]
getenv("HYBRID_EXT_CHECK")
"HYBRID_EXT_CACHE" in environ
os.environ.get(cost_model.MODEL_ENV)
os.environ[ALGO_ENV] = "ring"
env = {"HYBRID_EXT_TUNE": "off"}
"""
    reads = environment_reads(source, {"MODEL_ENV": "HYBRID_EXT_COST_MODEL"})
    assert [r.split(":")[0] for r in reads] == ["6", "7", "8", "9", "10"], reads  # writes for children are fine


def test_only_config_reads_hybrid_ext_variables_from_the_environment():
    sources = _scanned_sources()
    constants = {}
    for source in sources.values():
        constants.update(_string_constants(ast.parse(source)))
    reads = {
        path: found
        for path, source in sources.items()
        if path != "hybrid_ext/config.py" and (found := environment_reads(source, constants))
    }
    assert not reads, f"read HYBRID_EXT_* through hybrid_ext.config instead: {reads}"


def test_every_hybrid_ext_variable_named_in_the_code_is_declared():
    named = {
        (name, path)
        for path, source in _scanned_sources().items()
        for name in re.findall(r"\b(HYBRID_EXT_[A-Z0-9_]*[A-Z0-9])\b", source)
    }
    undeclared = sorted((name, path) for name, path in named if name not in config.KNOBS)
    assert not undeclared, f"declare these in hybrid_ext/config.py: {undeclared}"
