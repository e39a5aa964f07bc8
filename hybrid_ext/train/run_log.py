"""The logging contract every recipe follows, so that any two runs compare in TensorBoard and `hybrid-ext compare`.

Rank 0 writes, to ``<logdir>/<strategy>-<reducer>-np<N>/``, with these tags in every run (torchrun, horovodrun,
deepspeed, the demo):

=========================  ==========================================================================
``train/loss``             loss averaged over all ranks (not rank 0's own)
``train/accuracy``         training accuracy over all ranks' samples
``eval/accuracy``          test accuracy over the whole test set (each epoch)
``perf/samples_per_sec``   global samples per second of the step
``perf/step_time_ms``      wall time of the step (slowest rank)
``comm/time_ms``           time spent in hybrid-ext collectives in the step (overlaps compute)
``comm/bytes_per_step``    bytes rank 0 sent in the step
``comm/messages_per_step`` messages rank 0 sent in the step
=========================  ==========================================================================

plus a TensorBoard HParams entry (strategy, reducer, world size, mp_size, model, batch size, framework, device) with
the final metrics, so TensorBoard's HParams table lists the runs side by side. ``mp_size`` is the number of ranks
each layer is sharded over: 1 under dp (see :func:`sharded_over`).
"""

from __future__ import annotations

from pathlib import Path

TAGS = (
    "train/loss",
    "train/accuracy",
    "eval/accuracy",
    "perf/samples_per_sec",
    "perf/step_time_ms",
    "comm/time_ms",
    "comm/bytes_per_step",
    "comm/messages_per_step",
)
HPARAMS = ("strategy", "reducer", "world_size", "mp_size", "model", "batch_size", "framework", "device")
FINAL_METRICS = ("final/eval_accuracy", "final/samples_per_sec", "final/step_time_ms", "final/comm_bytes_per_step")


def sharded_over(strategy: str, mp_group_size: int) -> int:
    """The ``mp_size`` hyper-parameter of a run: 1 under dp, whose model-parallel group (all ranks by default)
    shards nothing, else the model-parallel group's size."""
    return 1 if strategy == "dp" else mp_group_size


def run_name(strategy: str, reducer: str, world: int) -> str:
    return f"{strategy}-{reducer}-np{world}"


class RunLogger:
    """Writes the contract's tags on rank 0; a no-op on other ranks."""

    def __init__(self, logdir: str | Path, hparams: dict, rank: int) -> None:
        missing = [k for k in HPARAMS if k not in hparams]
        if missing:
            raise ValueError(f"hparams lack {missing}")
        self.hparams = dict(hparams)
        self.rank = rank
        self.path = Path(logdir) / run_name(hparams["strategy"], hparams["reducer"], hparams["world_size"])
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.path))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        unknown = [k for k in values if k not in TAGS]
        if unknown:
            raise ValueError(f"{unknown} are not tags of the logging contract {TAGS}")
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), step)

    def finish(self, final: dict[str, float]) -> None:
        """Write the HParams entry with the final metrics into this run's own directory, and close."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: float(final[k]) for k in FINAL_METRICS}
        experiment, start, end = hparams({k: self.hparams[k] for k in HPARAMS}, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, 0)
        self.writer.close()
