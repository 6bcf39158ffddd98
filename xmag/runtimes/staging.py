"""The pinned host buffer through which both GPU backends (torch on CUDA, TensorRT) copy tiles to the GPU."""

from __future__ import annotations

import numpy as np
import torch


class PinnedStaging:
    """Copies uint8 tiles to the GPU through one reusable page-locked (pinned) host buffer.

    From pinned memory the host-to-device copy runs asynchronously (non_blocking)
    on the current stream, and reusing one buffer saves pinning memory for every
    batch, which costs more than the copy. The buffer grows to the largest batch
    seen. The caller must wait for the stream (both GPU runtimes do, when they
    copy their result back) before the next call overwrites the buffer.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def to_device(self, tiles: np.ndarray, device: torch.device | str) -> torch.Tensor:
        if self._buffer is None or len(self._buffer) < len(tiles) or self._buffer.shape[1:] != tiles.shape[1:]:
            self._buffer = torch.empty(tiles.shape, dtype=torch.uint8, pin_memory=True)
        staged = self._buffer[: len(tiles)]
        staged.numpy()[...] = tiles
        return staged.to(device, non_blocking=True)
