"""Receive buffers reused across a group's collectives (one per device and dtype, grown on demand)."""

from __future__ import annotations

import torch


class ScratchPool:
    """One scratch tensor per (device, dtype), at least as large as the largest request so far."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, elements: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < elements:
            buf = torch.empty(elements, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf
