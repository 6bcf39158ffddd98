"""What the pipeline and the service see of a runtime: one protocol for the encoder, one for the heads.

Every backend implements one or both, checks its tiles with `check_tiles`,
and raises `EncoderBackendUnavailableError` when it cannot run here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from xmag.contract import TILES_DTYPE
from xmag.errors import XmagError


class EncoderBackendUnavailableError(XmagError):
    """The encoder backend or precision asked for cannot run here, or none that can gives correct embeddings."""

    code = "encoder_backend_unavailable"


@dataclass(frozen=True)
class TaskOutput:
    label: str
    probabilities: dict[str, float]
    attention: np.ndarray  # (N,) float32, sums to 1


class TileEncoderRuntime(Protocol):
    # Read-only properties, so that an implementation may narrow them (e.g. `precision: TorchPrecision`).
    # e.g. "torch bf16 on cpu", "onnxruntime int8 (CPUExecutionProvider)", "tensorrt fp16 on cuda"
    @property
    def description(self) -> str: ...

    @property
    def backend(self) -> str: ...  # "torch", "onnxruntime", "tensorrt" or "triton"

    @property
    def precision(self) -> str: ...  # "fp32", "bf16", "fp16" or "int8"

    @property
    def tile_size_px(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, D) float32 class-token embeddings."""


class SlideHeadsRuntime(Protocol):
    class_names: dict[str, list[str]]

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        """One slide's (N, D) tile features -> the result of every task."""


def task_output(class_names: list[str], probabilities: np.ndarray, attention: np.ndarray) -> TaskOutput:
    return TaskOutput(
        label=class_names[int(np.argmax(probabilities))],
        probabilities={name: float(p) for name, p in zip(class_names, probabilities, strict=False)},
        attention=np.asarray(attention, dtype=np.float32),
    )


def check_tiles(tiles: np.ndarray, tile_size_px: int) -> None:
    """ValueError unless `tiles` is a (B, S, S, 3) uint8 array: GPU buffers are filled byte for byte."""
    expected = f"uint8 RGB tiles of shape (B, {tile_size_px}, {tile_size_px}, 3) (NHWC)"
    if tiles.dtype != TILES_DTYPE:
        raise ValueError(f"expected {expected}, got dtype {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[1:] != (tile_size_px, tile_size_px, 3):
        raise ValueError(f"expected {expected}, got shape {tiles.shape}")
