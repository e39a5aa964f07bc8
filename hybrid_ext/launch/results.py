"""How ranks hand their results back to the process that started them: one file per rank (``torch.save``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hybrid_ext import config

RESULT_DIR_ENV = "HYBRID_EXT_RESULT_DIR"


def report_result(result: Any, rank: int | None = None) -> None:
    """Hand this rank's result back to :func:`run_horovodrun` / :func:`run_deepspeed` (no-op outside them)."""
    directory = config.get(RESULT_DIR_ENV)
    if directory is None:
        return
    if rank is None:
        rank = current_rank()
    save_result(directory / f"rank{rank}.result", result)


def current_rank() -> int:
    """This process's global rank as set by whichever launcher started it (Horovod, torchrun, DeepSpeed)."""
    for var in ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    raise RuntimeError("no launcher rank variable set (HOROVOD_RANK, RANK, OMPI_COMM_WORLD_RANK)")


def save_result(path: Path, obj: Any) -> None:
    import torch

    tmp = path.with_suffix(".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_result(workdir: Path, rank: int) -> Any:
    import torch

    return torch.load(workdir / f"rank{rank}.result", weights_only=False)
