"""Encoder and head runtimes behind one interface each: torch modules or ONNX artifacts.

The pipeline only sees `TileEncoderRuntime.encode(uint8 NHWC) -> float32 (B, D)`
and `SlideHeadsRuntime.predict(features) -> {task: TaskOutput}`, so it runs the
same whether the models come from a checkpoint (torch) or a verified model
repository (onnxruntime; TensorRT joins in the service issue).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from xmag.errors import XmagError
from xmag.models.abmil import SlideHeads
from xmag.models.encoder import TileEncoder
from xmag.model_repo import ModelRepository, choose_encoder_artifact, detect_hardware

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TaskOutput:
    label: str
    probabilities: dict[str, float]
    attention: np.ndarray  # (N,) float32, sums to 1


class TileEncoderRuntime(Protocol):
    description: str  # e.g. "torch fp32 on cpu", "onnxruntime int8 (CPUExecutionProvider)"
    tile_size_px: int
    embed_dim: int

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, D) float32 class-token embeddings."""


class SlideHeadsRuntime(Protocol):
    class_names: dict[str, list[str]]

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        """One slide's (N, D) tile features -> the result of every task."""


def _task_output(class_names: list[str], probabilities: np.ndarray, attention: np.ndarray) -> TaskOutput:
    return TaskOutput(
        label=class_names[int(np.argmax(probabilities))],
        probabilities={name: float(p) for name, p in zip(class_names, probabilities)},
        attention=np.asarray(attention, dtype=np.float32),
    )


class TorchTileEncoder:
    """A TileEncoder run by torch, fp32 or under bf16 autocast."""

    def __init__(self, encoder: TileEncoder, precision: Precision = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.encoder = encoder.eval()
        self.precision = precision
        self.device = next(encoder.parameters()).device
        self.tile_size_px = encoder.tile_size_px
        self.embed_dim = encoder.embed_dim
        self.description = f"torch {precision} on {self.device.type}"

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(tiles).to(self.device)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return self.encoder(batch).float().cpu().numpy()


class TorchSlideHeads:
    """SlideHeads run by torch."""

    def __init__(self, heads: SlideHeads):
        self.heads = heads.eval()
        self.class_names = heads.class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        with torch.inference_mode():
            outputs = self.heads(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return {
            task: _task_output(self.class_names[task], torch.softmax(logits, -1).numpy(), attention.numpy())
            for task, (logits, attention) in outputs.items()
        }


def _onnx_session(path: Path, providers: tuple[str, ...]):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=list(providers))


class OnnxTileEncoder:
    """An exported encoder (uint8 NHWC in, embedding out) run by onnxruntime."""

    def __init__(self, onnx_path: Path, tile_size_px: int, embed_dim: int, providers=("CPUExecutionProvider",), label=""):
        self.session = _onnx_session(onnx_path, tuple(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        self.description = " ".join(filter(None, ["onnxruntime", label, f"({', '.join(self.session.get_providers())})"]))

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(tiles)})[0]


class OnnxSlideHeads:
    """One exported head per task (features in, probabilities and attention out) run by onnxruntime."""

    def __init__(self, head_paths: dict[str, Path], class_names: dict[str, list[str]], providers=("CPUExecutionProvider",)):
        self.sessions = {task: _onnx_session(path, tuple(providers)) for task, path in head_paths.items()}
        self.class_names = class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        features = np.ascontiguousarray(features, dtype=np.float32)
        results = {}
        for task, session in self.sessions.items():
            probabilities, attention = session.run(["probabilities", "attention"], {"features": features})
            results[task] = _task_output(self.class_names[task], probabilities, attention)
        return results


def runtimes_from_repository(repository: ModelRepository) -> tuple[TileEncoderRuntime, SlideHeadsRuntime]:
    """The best encoder for this machine and the heads of every task, from a verified repository."""
    manifest = repository.manifest
    # TensorRT plans are run by the service's engine, not in-process here, so the
    # choice is made as if TensorRT were absent: onnxruntime on the GPU or CPU.
    choice = choose_encoder_artifact(repository, dataclasses.replace(detect_hardware(), tensorrt_version=None))
    if choice.runtime != "onnxruntime":
        raise XmagError(
            f"no encoder artifact of {repository.root} runs in-process on this machine (onnxruntime is missing); "
            "pass the checkpoint with --weights to run it in torch"
        )
    encoder = OnnxTileEncoder(
        repository.path_of(choice.artifact, ".onnx"),
        manifest.encoder.tile_size_px,
        manifest.encoder.embed_dim,
        choice.providers,
        label=choice.artifact.precision,
    )
    heads = OnnxSlideHeads(
        {task.name: repository.path_of(manifest.artifact(task.head_artifact), ".onnx") for task in manifest.tasks},
        {task.name: task.class_names for task in manifest.tasks},
    )
    return encoder, heads
