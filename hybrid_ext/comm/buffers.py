"""Receive buffers reused across a group's collectives (one per device and dtype, grown on demand)."""

from __future__ import annotations

import torch


class ScratchPool:
    """One scratch tensor per (device, dtype, role, pinned), at least as large as the largest request so far.

    ``role`` keeps apart buffers one collective uses at once (the receive buffer, the wire staging buffers).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype, str, bool], torch.Tensor] = {}

    def get(
        self, elements: int, dtype: torch.dtype, device: torch.device, role: str = "recv", pinned: bool = False
    ) -> torch.Tensor:
        """``pinned``: page-locked host memory, which CUDA copies to and from asynchronously (needs CUDA)."""
        key = (device, dtype, role, pinned)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < elements:
            buf = torch.empty(elements, dtype=dtype, device=device, pin_memory=pinned)
            self._buffers[key] = buf
        return buf
