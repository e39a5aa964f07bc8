"""The ``"hybrid_ext"`` section of a ds_config: which reduction and which parallel strategy a DeepSpeed job uses.

    {
      "train_micro_batch_size_per_gpu": 16,
      "zero_optimization": {"stage": 1},
      "hybrid_ext": {"reducer": "butterfly", "strategy": "hybrid", "mp_size": 2}
    }

:func:`split_config` reads the ds_config (a dict, a JSON file, or ``args.deepspeed_config``), takes the section
out and validates it; DeepSpeed gets the rest unchanged, so every one of its own settings keeps its meaning.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hybrid_ext.parallel.api import GRAD_ALGORITHMS
from hybrid_ext.parallel.plan import STRATEGIES

SECTION = "hybrid_ext"


@dataclass(frozen=True)
class HybridSection:
    """The ``"hybrid_ext"`` section, validated. A ds_config without one means ``HybridSection()``."""

    reducer: str = "butterfly"
    """How gradients are all-reduced: ``butterfly`` / ``auto`` / ``rabenseifner`` / ``recursive_doubling`` /
    ``ring`` (the ``butterfly`` torch.distributed backend with that algorithm) or ``native`` (DeepSpeed's own
    backend for the accelerator: gloo on CPU, NCCL on CUDA)."""
    strategy: str = "dp"
    """``dp``: DeepSpeed's own data parallelism, model unchanged. ``mp``: every layer split over the ranks.
    ``hybrid``: conv layers data-parallel, FC layers sharded over groups of ``mp_size`` ranks."""
    mp_size: int | None = None
    """Ranks per model-parallel group (``mp`` / ``hybrid``; default: all). Must divide the world size."""

    @classmethod
    def from_dict(cls, raw: Any) -> HybridSection:
        example = '{"reducer": "butterfly", "strategy": "hybrid", "mp_size": 2}'
        if not isinstance(raw, dict):
            raise ValueError(f'the ds_config "{SECTION}" section must be an object such as {example}, got {raw!r}')
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f'unknown key(s) {unknown} in the ds_config "{SECTION}" section; allowed: {allowed}')
        section = cls(**raw)
        if section.reducer not in GRAD_ALGORITHMS:
            choices = ", ".join(GRAD_ALGORITHMS)
            raise ValueError(f'"{SECTION}.reducer" must be one of {choices}; got {section.reducer!r}')
        if section.strategy not in STRATEGIES:
            raise ValueError(f'"{SECTION}.strategy" must be one of {", ".join(STRATEGIES)}; got {section.strategy!r}')
        mp_size = section.mp_size
        if mp_size is not None and (isinstance(mp_size, bool) or not isinstance(mp_size, int) or mp_size < 1):
            raise ValueError(f'"{SECTION}.mp_size" must be a positive integer or null; got {mp_size!r}')
        if section.strategy == "dp" and mp_size not in (None, 1):
            raise ValueError(
                f'"{SECTION}.mp_size" is {mp_size}, but strategy "dp" has no model parallelism: '
                'use strategy "hybrid" or "mp", or drop mp_size'
            )
        return section


def load_config(config: str | Path | dict) -> dict:
    """A ds_config as a fresh dict (the caller's own dict is never modified)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"ds_config {str(config)!r} is not a file")
    with open(path) as f:
        return json.load(f)


def split_config(config: str | Path | dict | None = None, args: Any = None) -> tuple[dict, HybridSection | None]:
    """Take the ``"hybrid_ext"`` section out of a ds_config.

    Args:
        config (str, Path, dict or None): the ds_config, a dict or a JSON path.
        args: DeepSpeed's ``args``; its ``deepspeed_config`` is read when ``config`` is None.

    Returns:
        tuple[dict, HybridSection or None]: the ds_config without the section, and the section (None if absent).

    Raises:
        ValueError: no ds_config, or one both as ``config`` and ``args.deepspeed_config``; a bad section.
    """
    from_args = getattr(args, "deepspeed_config", None)
    if config is not None and from_args is not None:
        raise ValueError("a ds_config was given both as config= and as args.deepspeed_config: pass one")
    if config is None:
        config = from_args
    if config is None:
        raise ValueError("no ds_config: pass config= (a dict or a JSON path) or args.deepspeed_config")
    ds_config = load_config(config)
    raw = ds_config.pop(SECTION, None)
    return ds_config, None if raw is None else HybridSection.from_dict(raw)
