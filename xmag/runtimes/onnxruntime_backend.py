"""The onnxruntime backend: the exported encoder and heads, on the CPU or onnxruntime's GPU providers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmag.runtimes.protocols import TaskOutput, task_output


def _onnx_session(path: Path, providers: tuple[str, ...]):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=list(providers))


class OnnxTileEncoder:
    """An exported encoder (uint8 NHWC in, embedding out) run by onnxruntime on the given providers."""

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        tile_size_px: int,
        embed_dim: int,
        providers=("CPUExecutionProvider",),
        precision: str = "fp32",
    ):
        self.session = _onnx_session(onnx_path, tuple(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        # The providers the session really uses: onnxruntime drops the ones it cannot start.
        self.description = f"onnxruntime {precision} ({', '.join(self.session.get_providers())})"

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(tiles)})[0]


class OnnxSlideHeads:
    """One exported head per task (features in, probabilities and attention out) run by onnxruntime."""

    def __init__(
        self, head_paths: dict[str, Path], class_names: dict[str, list[str]], providers=("CPUExecutionProvider",)
    ):
        self.sessions = {task: _onnx_session(path, tuple(providers)) for task, path in head_paths.items()}
        self.class_names = class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        features = np.ascontiguousarray(features, dtype=np.float32)
        results = {}
        for task, session in self.sessions.items():
            probabilities, attention = session.run(["probabilities", "attention"], {"features": features})
            results[task] = task_output(self.class_names[task], probabilities, attention)
        return results
