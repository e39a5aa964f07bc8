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
    return RunSummary(
        name=path.name,
        hparams=_hparams(acc),
        eval_accuracy=accuracy[-1][1] if accuracy else float("nan"),
        samples_per_sec=steady("perf/samples_per_sec"),
        step_time_ms=steady("perf/step_time_ms"),
        comm_time_ms=steady("comm/time_ms"),
        bytes_per_step=statistics.median([v for _, v in series("comm/bytes_per_step")] or [float("nan")]),
        loss=series("train/loss"),
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
        "| run | test accuracy | samples/s | step ms | comm ms/step | MB sent/rank/step | speed-up vs dp+native |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        speedup = f"{r.samples_per_sec / base.samples_per_sec:.2f}×" if base else "-"
        lines.append(
            f"| {r.name} | {r.eval_accuracy * 100:.1f} % | {r.samples_per_sec:.1f} | {r.step_time_ms:.1f} | "
            f"{r.comm_time_ms:.1f} | {r.bytes_per_step / 1e6:.2f} | {speedup} |"
        )
    return "\n".join(lines)


def plot(runs: list[RunSummary], png: Path) -> list[Path]:
    """Two PNGs: training loss vs step per run, and samples/s per run."""
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
    return [loss_png, speed_png]


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
