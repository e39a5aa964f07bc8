"""Buffers of replicated layers (BatchNorm running statistics) kept identical on every data-parallel replica.

Each replica updates its BatchNorm running statistics from its own micro-batch, so replicas drift apart and a
checkpoint would hold one rank's numbers. DDP broadcasts rank 0's buffers before each forward
(``broadcast_buffers=True``); hybrid-ext broadcasts them from the first rank right *after* each training-mode
forward instead, so that they are identical whenever anyone looks (checkpoints, evaluation, the next step)
and carry the same values DDP's next forward would use. Like DDP, it skips forwards without gradients and
forwards inside ``no_sync()`` (no communication there); the next synchronising forward catches up.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_ext.comm import Communicator


def broadcast_from_first(tensors: list[torch.Tensor], comm: Communicator, piece_bytes: int = 25 << 20) -> None:
    """Overwrite ``tensors`` with the group's first rank's values: a sum to which the other ranks add zeros
    (exact: x + 0 = x), in collectives of at most ``piece_bytes`` (small tensors together, large ones in slices).

    In pieces because a communicator's receive buffers keep the size of the largest collective it ran: one
    collective of the whole model would hold two more copies of it on every rank for the rest of training.
    """
    if comm.size == 1 or not tensors:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for (dtype, device), group in by_kind.items():
            limit = max(1, piece_bytes // dtype.itemsize)
            work = torch.empty(min(limit, sum(t.numel() for t in group)), dtype=dtype, device=device)  # reused
            pieces = _Pieces(work, comm, f"broadcast from first rank, {dtype}")
            for t in group:
                flat = t.detach().reshape(-1)  # t's own memory where contiguous, else a copy written back below
                for start in range(0, flat.numel(), limit):
                    pieces.add(flat, start, min(start + limit, flat.numel()))
                if flat.data_ptr() != t.data_ptr() or not t.is_contiguous():
                    pieces.send()
                    t.copy_(flat.view_as(t))
            pieces.send()


class _Pieces:
    """Slices of tensors gathered in one reused buffer, each collective the first rank's values, zeros from the
    others; sent when the next slice would not fit, or when asked."""

    def __init__(self, work: torch.Tensor, comm: Communicator, name: str) -> None:
        self.work, self.comm, self.name = work, comm, name
        self.pending: list[tuple[torch.Tensor, int, int]] = []  # (a tensor's flat values, start, stop)
        self.filled = 0
        self.sent = 0

    def add(self, flat: torch.Tensor, start: int, stop: int) -> None:
        if self.filled + stop - start > self.work.numel():
            self.send()
        self.pending.append((flat, start, stop))
        self.filled += stop - start

    def send(self) -> None:
        if not self.pending:
            return
        work = self.work[: self.filled]
        if self.comm.rank != 0:
            work.zero_()
        offset = 0
        for flat, start, stop in self.pending:
            if self.comm.rank == 0:
                work[offset : offset + stop - start].copy_(flat[start:stop])
            offset += stop - start
        self.comm.allreduce([work], name=f"{self.name}, piece {self.sent}")
        offset = 0
        for flat, start, stop in self.pending:
            flat[start:stop].copy_(work[offset : offset + stop - start])
            offset += stop - start
        self.pending, self.filled, self.sent = [], 0, self.sent + 1


SYNCABLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def syncable_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a reduction can carry (floating point and integer; e.g. ``num_batches_tracked``)."""
    return [b for b in model.buffers() if b.dtype in SYNCABLE]


def replace_buffers_with_first_ranks(model: nn.Module, comm: Communicator) -> None:
    """Give every rank the first rank's buffers, as new tensors on the other ranks (see the module docstring)."""
    if comm.size == 1:
        return
    slots = [(m, name) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    unique: dict[int, torch.Tensor] = {}
    for module, name in slots:
        buffer = module._buffers[name]
        if buffer.dtype in SYNCABLE:
            unique.setdefault(id(buffer), buffer)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in unique.values():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    fresh: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for group in by_dtype.values():
            work = [b.detach().clone() if comm.rank == 0 else torch.zeros_like(b) for b in group]
            comm.allreduce(work, name=f"replicated buffers ({group[0].dtype})")
            fresh.update((id(b), w) for b, w in zip(group, work))
    if comm.rank == 0:
        return  # its own values, unchanged
    for module, name in slots:
        new = fresh.get(id(module._buffers[name]))
        if new is not None:
            module._buffers[name] = new
