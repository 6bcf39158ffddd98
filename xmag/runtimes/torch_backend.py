"""The torch backend: the encoder in fp32 or under bf16 or fp16 autocast, on the CPU or a CUDA GPU, and the heads."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from xmag.models.abmil import SlideHeads
from xmag.models.encoder import TileEncoder
from xmag.runtimes.protocols import EncoderBackendUnavailableError, TaskOutput, check_tiles, task_output
from xmag.runtimes.staging import PinnedStaging
from xmag.vocabulary import TORCH_PRECISIONS, TorchPrecision

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchTileEncoder:
    """A TileEncoder run by torch: fp32, or under bf16 or fp16 autocast, on the CPU or a CUDA GPU.

    The encoder is moved to `device` once, here (in place, as `nn.Module.to`
    does). On CUDA the tiles travel as uint8 through pinned memory and are
    normalised on the GPU. fp16 is refused on the CPU, which has no fast fp16
    kernels; use bf16 there.
    """

    backend = "torch"

    def __init__(self, encoder: TileEncoder, precision: TorchPrecision = "fp32", device: str | torch.device = "cpu"):
        device = torch.device(device)
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {TORCH_PRECISIONS}, got {precision!r}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("fp16 runs on CUDA GPUs only: CPUs have no fast fp16 kernels; on the CPU use bf16 or fp32")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EncoderBackendUnavailableError(
                f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda or 'none, a CPU-only build'})"
            )
        self.encoder = encoder.eval().to(device)
        self.precision = precision
        self.device = device
        self.tile_size_px = encoder.tile_size_px
        self.embed_dim = encoder.embed_dim
        self.description = f"torch {precision} on {device.type}"
        self._staging = PinnedStaging() if device.type == "cuda" else None

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        if self._staging is None:
            batch = torch.from_numpy(tiles)
        else:
            check_tiles(tiles, self.tile_size_px)
            batch = self._staging.to_device(tiles, self.device)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])
            if self.precision in _AUTOCAST_DTYPES
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            embeddings = self.encoder(batch)
        return embeddings.float().cpu().numpy()


class TorchSlideHeads:
    """SlideHeads run by torch."""

    def __init__(self, heads: SlideHeads):
        self.heads = heads.eval()
        self.class_names = heads.class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        with torch.inference_mode():
            outputs = self.heads(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return {
            task: task_output(self.class_names[task], torch.softmax(logits, -1).numpy(), attention.numpy())
            for task, (logits, attention) in outputs.items()
        }
