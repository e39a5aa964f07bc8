"""``hybrid-ext compare RUNS_DIR...``: the comparison table and plots, from TensorBoard event files alone.

Reads every run directory written by the logging contract (:mod:`hybrid_ext.train.run_log`) — the demo's,
or a torchrun / horovodrun / deepspeed recipe's — with TensorBoard's own event reader.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunSummary:
    name: str
    hparams: dict
    eval_accuracy: float
    samples_per_sec: float
    step_time_ms: float
    comm_time_ms: float
    bytes_per_step: float
    loss: list[tuple[int, float]]
    accuracy_by_time: list[tuple[float, float]]  # (seconds since the run's first logged event, test accuracy)


def _hparams(accumulator) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            out = {}
            for key, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                out[key] = getattr(value, kind) if kind else None
            return out
    return {}


def read_run(path: Path) -> RunSummary:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags else []

    def steady(tag: str) -> float:
        values = [v for _, v in series(tag)]
        values = values[1:] or values  # the first step pays warm-up
        return statistics.median(values) if values else float("nan")

    accuracy = series("eval/accuracy")
    # Wall-clock time of each evaluation, from the run's first logged event (MLPerf's time-to-accuracy).
    first = min((e.wall_time for tag in tags for e in acc.Scalars(tag)), default=0.0)
    by_time = [(e.wall_time - first, e.value) for e in acc.Scalars("eval/accuracy")] if accuracy else []
    return RunSummary(
        name=path.name,
        hparams=_hparams(acc),
        eval_accuracy=accuracy[-1][1] if accuracy else float("nan"),
        samples_per_sec=steady("perf/samples_per_sec"),
        step_time_ms=steady("perf/step_time_ms"),
        comm_time_ms=steady("comm/time_ms"),
        bytes_per_step=statistics.median([v for _, v in series("comm/bytes_per_step")] or [float("nan")]),
        loss=series("train/loss"),
        accuracy_by_time=by_time,
    )


def find_runs(dirs: list[str | Path]) -> list[Path]:
    runs = set()
    for d in map(Path, dirs):
        for event_file in d.rglob("events.out.tfevents.*"):
            runs.add(event_file.parent)
    return sorted(runs)


def _baseline(runs: list[RunSummary]) -> RunSummary | None:
    for run in runs:
        if run.hparams.get("strategy") == "dp" and run.hparams.get("reducer") == "native":
            return run
    return None


def table_markdown(runs: list[RunSummary]) -> str:
    base = _baseline(runs)
    lines = [
        "| run | device | test accuracy | samples/s | step ms | comm ms/step | MB sent/rank/step "
        "| speed-up vs dp+native |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        speedup = f"{r.samples_per_sec / base.samples_per_sec:.2f}×" if base else "-"
        lines.append(
            f"| {r.name} | {r.hparams.get('device', '-')} | {r.eval_accuracy * 100:.1f} % | {r.samples_per_sec:.1f} | "
            f"{r.step_time_ms:.1f} | {r.comm_time_ms:.1f} | {r.bytes_per_step / 1e6:.2f} | {speedup} |"
        )
    return "\n".join(lines)


def plot(runs: list[RunSummary], png: Path) -> list[Path]:
    """Four PNGs: training loss vs step, samples/s, test accuracy vs wall-clock time, and each run's step split
    into time in collectives and the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    loss_png = png.with_name(png.stem + "-loss.png")
    speed_png = png.with_name(png.stem + "-samples_per_sec.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.loss:
            steps, values = zip(*r.loss)
            ax.plot(steps, values, label=r.name)
    ax.set(xlabel="step", ylabel="train/loss (all ranks)", title="Training loss", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([r.name for r in runs], [r.samples_per_sec for r in runs], color="tab:blue")
    ax.set(xlabel="samples / s (median step)", title="Throughput")
    fig.tight_layout()
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)
    return [loss_png, speed_png, _plot_time_to_accuracy(runs, png), _plot_step_split(runs, png)]


def _plot_time_to_accuracy(runs: list[RunSummary], png: Path) -> Path:
    import matplotlib.pyplot as plt

    out = png.with_name(png.stem + "-time_to_accuracy.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.accuracy_by_time:
            seconds, accuracy = zip(*r.accuracy_by_time)
            ax.plot(seconds, [a * 100 for a in accuracy], marker="o", label=r.name)
    ax.set(xlabel="wall-clock seconds since the run's first step", ylabel="test accuracy (%)",
           title="Time to accuracy")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_step_split(runs: list[RunSummary], png: Path) -> Path:
    import matplotlib.pyplot as plt

    out = png.with_name(png.stem + "-step_split.png")
    names = [r.name for r in runs]
    # Collectives overlap backward, so their time is not all added to the step: show it capped at the step.
    comm = [min(r.comm_time_ms, r.step_time_ms) for r in runs]
    rest = [r.step_time_ms - c for r, c in zip(runs, comm)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(names, rest, color="tab:green", label="rest of the step (compute not hidden behind collectives)")
    ax.barh(names, comm, left=rest, color="tab:orange", label="in hybrid-ext collectives (overlaps backward)")
    ax.set(xlabel="ms per step (median)", title="Where a step's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare(dirs: list[str | Path], png: str | Path | None = None, markdown: str | Path | None = None) -> str:
    paths = find_runs(dirs)
    if not paths:
        raise SystemExit(f"no TensorBoard event files under {', '.join(map(str, dirs))}")
    runs = [read_run(p) for p in paths]
    table = table_markdown(runs)
    if markdown:
        Path(markdown).write_text(table + "\n")
    if png:
        plot(runs, Path(png))
    return table


def main(args) -> int:
    print(compare(args.runs, args.png, args.markdown))
    return 0
