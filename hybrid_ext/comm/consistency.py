"""Cross-rank safety: make sure every rank entered the same collective with the same shape and dtype.

Ranks that disagree on a collective's size would otherwise deadlock or exchange garbage. In check mode
(``HYBRID_EXT_CHECK=1``, or :func:`set_check` — on in hybrid-ext's own tests) each collective is preceded by a
cheap fingerprint exchange: every rank contributes one row of a few integers (collective, op, dtype, element
count, number of tensors, shape hash, device type, the collective's number in its group's issue order, and the
caller's ``name=`` for it, if any) to a small table that is summed over the group with recursive doubling
(log2 P messages of P rows). A disagreement raises :class:`CollectiveMismatchError` on every rank, naming the
ranks and what each of them passed (each rank's own description of its call, exchanged once they disagree),
instead of hanging.

The sequence number catches a collective one rank skipped; it cannot tell apart two collectives of equal size
issued in opposite orders on two ranks (gradient buckets of one size, swapped). Their names can: collectives
given ``name=`` (as Horovod's are) are compared by name too, and a swap is reported with both names.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from hybrid_ext import config

CHECK_ENV = "HYBRID_EXT_CHECK"
FIELDS = ("collective", "op", "dtype", "elements", "tensors", "shape_hash", "device", "sequence", "name")

_CODES: dict[str, int] = {}
_NAMES: dict[int, str] = {}
_override: bool | None = None


class CollectiveMismatchError(RuntimeError):
    """Ranks called the same collective with different shapes, dtypes or ops."""


def check_enabled() -> bool:
    if _override is not None:
        return _override
    return config.get(CHECK_ENV)


def set_check(enabled: bool | None) -> None:
    """Turn check mode on or off for this process.

    In check mode every collective first compares its op, dtype, sizes, order and name across the ranks, and
    raises :class:`CollectiveMismatchError` naming what each rank passed instead of mixing their data.

    Args:
        enabled (bool or None): on, off, or None to follow ``HYBRID_EXT_CHECK`` again.
    """
    global _override
    _override = enabled


def _code(name: str) -> int:
    # A stable small integer per name, the same on every rank (crc32, not Python's salted hash).
    code = zlib.crc32(name.encode()) & 0x7FFFFFFF
    _NAMES[code] = name
    return code


def fingerprint(
    collective: str, op: str, tensors: Sequence[torch.Tensor], sequence: int = 0, name: str | None = None
) -> list[int]:
    """One rank's row: what it is about to run.

    ``sequence``: the collective's number in its group's issue order; ``name``: the caller's name for it (0: none).
    """
    shapes = ";".join(f"{tuple(t.shape)}" for t in tensors)
    dtypes = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
    devices = ",".join(sorted({t.device.type for t in tensors}))
    return [
        _code(collective),
        _code(op),
        _code(dtypes),
        sum(t.numel() for t in tensors),
        len(tensors),
        zlib.crc32(shapes.encode()) & 0x7FFFFFFF,
        _code(devices),
        sequence,
        _code(name) if name else 0,
    ]


def describe(row: Sequence[int]) -> str:
    fields = dict(zip(FIELDS, (int(v) for v in row)))
    name = _NAMES.get(fields["collective"], "?")
    dtype = _NAMES.get(fields["dtype"], "a different dtype")
    op = _NAMES.get(fields["op"], "a different op")
    device = _NAMES.get(fields["device"], "another device")
    label = "" if not fields["name"] else f", name={_NAMES.get(fields['name'], 'unknown here')!r}"
    return (
        f"{name}(op={op}{label}) of {fields['tensors']} tensor(s), {fields['elements']} elements of {dtype} "
        f"on {device}, collective #{fields['sequence']} of its group"
    )


def disagree(table: torch.Tensor) -> bool:
    """Whether the rows of the summed table (one per rank) differ."""
    rows = table.tolist()
    return any(row != rows[0] for row in rows)


LABEL_BYTES = 256  # each rank's own description of its call, exchanged only once ranks disagree


def encode_label(row: Sequence[int]) -> list[int]:
    """This rank's description of its own row, as bytes: it alone knows its names, ops and dtypes by name."""
    return list(describe(row).encode()[:LABEL_BYTES])


def decode_labels(labels: torch.Tensor) -> list[str]:
    return [bytes(v for v in row if v).decode(errors="replace") for row in labels.tolist()]


def verify(table: torch.Tensor, own_shapes: str, labels: Sequence[str] | None = None) -> None:
    """Raise if the rows of the summed table (one per rank) differ; ``labels``: each rank's own description."""
    rows = [tuple(int(v) for v in row) for row in table.tolist()]
    if all(row == rows[0] for row in rows):
        return
    groups: dict[tuple, list[int]] = {}
    for rank, row in enumerate(rows):
        groups.setdefault(row, []).append(rank)
    lines = [
        f"  ranks {ranks}: {labels[ranks[0]] if labels else describe(row)}"
        for row, ranks in sorted(groups.items(), key=lambda kv: kv[1])
    ]
    raise CollectiveMismatchError(
        "ranks called a collective with different arguments (this rank passed shapes "
        f"{own_shapes}):\n" + "\n".join(lines)
    )
