"""Bad input at every public entry point: a clear error naming the argument (and the ranks, across ranks), raised
before any communication, with the caller's tensor unchanged. One table; every row runs on one 2-rank job.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hybrid_ext
from hybrid_ext import launch


def t4() -> torch.Tensor:
    return torch.arange(4.0)


def _fresh_group_allreduce(t):
    hybrid_ext.allreduce(t, group=dist.new_group([0, 1]))  # set-up reads HYBRID_EXT_TRANSPORT


def _parallelize(**kw):
    return lambda t: hybrid_ext.parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), **kw)


# (id, call taking the caller's tensor, environment for the call, exception, text the message must hold)
CASES = [
    ("tensor-type", lambda t: hybrid_ext.allreduce("x"), {}, TypeError, "tensor must be a torch.Tensor, got str"),
    ("tensors-item", lambda t: hybrid_ext.allreduce_coalesced([t, 3]), {}, TypeError, "tensors[1] must be a"),
    ("dtype-complex", lambda t: hybrid_ext.allreduce(t.to(torch.complex64)), {}, TypeError, "unsupported dtype"),
    ("dtype-bool", lambda t: hybrid_ext.allreduce(t > 1), {}, TypeError, "unsupported dtype torch.bool"),
    ("mixed-dtypes", lambda t: hybrid_ext.allreduce_coalesced([t, t.double()]), {}, TypeError, "share dtype"),
    ("sparse", lambda t: hybrid_ext.allreduce(t.to_sparse()), {}, TypeError, "only dense (strided)"),
    ("device-meta", lambda t: hybrid_ext.allreduce(t.to("meta")), {}, TypeError, "is on meta"),
    ("op-name", lambda t: hybrid_ext.allreduce(t, op="prod"), {}, ValueError, "unsupported op 'prod'"),
    ("op-type", lambda t: hybrid_ext.allreduce(t, op=dist.ReduceOp.SUM), {}, ValueError, "unsupported op"),
    ("op-avg-int", lambda t: hybrid_ext.allreduce(t.long(), op="avg"), {}, TypeError, "'avg' needs a floating"),
    ("algorithm", lambda t: hybrid_ext.allreduce(t, algorithm="tree"), {}, ValueError, "algorithm 'tree'"),
    ("wire-name", lambda t: hybrid_ext.allreduce(t, wire_dtype="int8"), {}, ValueError, "wire_dtype='int8'"),
    ("wire-int", lambda t: hybrid_ext.allreduce(t, wire_dtype=torch.int32), {}, TypeError, "cannot travel as"),
    ("wire-type", lambda t: hybrid_ext.allreduce(t, wire_dtype=5), {}, TypeError, "wire_dtype must be"),
    ("group-type", lambda t: hybrid_ext.allreduce(t, group="world"), {}, TypeError, "group must be a torch"),
    ("name-type", lambda t: hybrid_ext.allreduce(t, name=3), {}, TypeError, "name must be a str"),
    ("gather-algorithm", lambda t: hybrid_ext.allgather(t, algorithm="tree"), {}, ValueError, "allgather algorithm"),
    ("gather-scalar", lambda t: hybrid_ext.allgather(t.sum()), {}, ValueError, "at least one dimension"),
    ("gather-counts-len", lambda t: hybrid_ext.allgather(t, counts=(4,)), {}, ValueError, "needs 2 non-negative"),
    ("gather-counts-own", lambda t: hybrid_ext.allgather(t, counts=(1, 1)), {}, ValueError, "gives rank"),
    ("scatter-counts-len", lambda t: hybrid_ext.reduce_scatter(t, counts=(4,)), {}, ValueError, "needs 2 non-negative"),
    ("scatter-counts-sum", lambda t: hybrid_ext.reduce_scatter(t, counts=(1, 1)), {}, ValueError, "add up to 2 rows"),
    ("scatter-counts-type", lambda t: hybrid_ext.reduce_scatter(t, counts="22"), {}, TypeError, "counts must be a"),
    (
        "scatter-algorithm",
        lambda t: hybrid_ext.reduce_scatter(t, counts=(2, 2), algorithm="x"),
        {},
        ValueError,
        "scatter",
    ),
    # Cross-rank: each rank's call is fine alone; check mode names the ranks and what each passed.
    (
        "ranks-disagree",
        lambda t: hybrid_ext.allreduce(t, op="max" if dist.get_rank() else "sum"),
        {"HYBRID_EXT_CHECK": "1"},
        hybrid_ext.CollectiveMismatchError,
        "ranks [1]: allreduce(op=max",
    ),
    # Environment variables.
    ("env-wire", lambda t: hybrid_ext.allreduce(t), {"HYBRID_EXT_WIRE_DTYPE": "int8"}, ValueError, "WIRE_DTYPE='int8'"),
    ("env-algo", lambda t: hybrid_ext.allreduce(t), {"HYBRID_EXT_ALGO": "tree"}, ValueError, "HYBRID_EXT_ALGO='tree'"),
    ("env-check", lambda t: hybrid_ext.allreduce(t), {"HYBRID_EXT_CHECK": "maybe"}, ValueError, "CHECK='maybe'"),
    ("env-transport", _fresh_group_allreduce, {"HYBRID_EXT_TRANSPORT": "pigeon"}, ValueError, "TRANSPORT='pigeon'"),
    # The partitioner.
    ("parallelize-strategy", _parallelize(strategy="diagonal"), {}, ValueError, "unknown strategy 'diagonal'"),
    ("parallelize-reducer", _parallelize(reducer="abacus"), {}, ValueError, "unknown reducer 'abacus'"),
    ("parallelize-mp-size", _parallelize(strategy="hybrid", mp_size=3), {}, ValueError, "mp_size=3 does not divide"),
    ("parallelize-mp-size-type", _parallelize(mp_size="2"), {}, ValueError, "mp_size must be a positive integer"),
    ("parallelize-rule-style", _parallelize(rules={"0": "sideways"}), {}, ValueError, "'sideways' is not one of"),
    ("parallelize-rule-match", _parallelize(rules={"fc9": "mp"}), {}, ValueError, "matches no module"),
]


def _table_rank(rank: int, p: int) -> dict:
    import os

    from hybrid_ext.comm import consistency, cost_model

    out = {}
    for case_id, call, env, _, _ in CASES:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        consistency.set_check(None)  # follow the environment
        cost_model._models = None
        tensor = t4()
        try:
            call(tensor)
            out[case_id] = ("no error", "", True)
        except Exception as exc:
            out[case_id] = (type(exc).__name__, str(exc), torch.equal(tensor, t4()))
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out


@pytest.fixture(scope="module")
def job():
    return launch.spawn(_table_rank, 2, timeout=180)


@pytest.mark.parametrize(("case_id", "call", "env", "error", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_and_leaves_the_tensor_unchanged(job, case_id, call, env, error, text):
    for rank, result in enumerate(job):
        kind, message, unchanged = result[case_id]
        assert kind == error.__name__, f"rank {rank}: {kind}: {message}"
        assert text in message, f"rank {rank}: {message}"
        assert unchanged, f"rank {rank}: the caller's tensor changed"


def test_a_cost_model_file_that_is_not_a_calibration_names_the_variable(tmp_path, monkeypatch):
    from hybrid_ext.comm import cost_model

    bad = tmp_path / "model.json"
    bad.write_text(json.dumps({"shm": {"alpha": "fast"}}))
    monkeypatch.setenv("HYBRID_EXT_COST_MODEL", str(bad))
    monkeypatch.setattr(cost_model, "_models", None)
    with pytest.raises(ValueError, match=r"HYBRID_EXT_COST_MODEL=.* is not a saved calibration"):
        cost_model.resolve("auto", 1024, 4, "shm")
    monkeypatch.setattr(cost_model, "_models", None)


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["bench", "allreduce", "--np", "0"], "argument --np: expected a positive integer, got 0"),
        (["demo", "--epochs", "two"], "argument --epochs: expected a positive integer, got 'two'"),
        (["bench", "allreduce", "--transport", "pigeon"], "argument --transport: invalid choice: 'pigeon'"),
        (["bench", "allreduce", "--np", "2", "--sizes", "1Q"], "--sizes '1Q': expected sizes such as"),
        (["bench", "train", "--model", "lenet"], "argument --model: invalid choice: 'lenet'"),
    ],
)
def test_bad_command_line_flags_are_named(argv, text):
    # A subprocess: the CLI exits (argparse), and must fail before it starts any rank.
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_ext", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert text in result.stderr, result.stderr[-2000:]


def test_the_deepspeed_section_names_the_bad_key_or_value():
    from hybrid_ext.integrations.deepspeed.config import HybridSection

    for raw, text in (
        ([], "must be an object"),
        ({"reduce": "butterfly"}, "unknown key(s) ['reduce']"),
        ({"reducer": "abacus"}, '"hybrid_ext.reducer" must be one of'),
        ({"strategy": "diagonal"}, '"hybrid_ext.strategy" must be one of'),
        ({"mp_size": 0}, '"hybrid_ext.mp_size" must be a positive integer'),
        ({"mp_size": "2"}, '"hybrid_ext.mp_size" must be a positive integer'),
    ):
        with pytest.raises(ValueError) as caught:
            HybridSection.from_dict(raw)
        assert text in str(caught.value), (raw, str(caught.value))
