"""A Triton Python-backend model that runs an exported ONNX graph with onnxruntime on the CPU.

The tests' Triton is the one bundled in nvidia-pytriton, which has only the
Python backend; Triton's onnxruntime backend, which serves the exported
repository unchanged (`platform: "onnxruntime_onnx"`), is not bundled. This
stands in for it: `tests/triton_support.py` copies it beside an exported
`model.onnx` and swaps the platform for `backend: "python"` in its
config.pbtxt, keeping the name, tensors and batching. It reads the tensor
names from the model's configuration, so it serves an encoder or a head.
"""

import json
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton's Python-backend interface: `initialize` once per instance, `execute` per batch of requests."""

    def initialize(self, args: dict) -> None:
        """Open `model.onnx` of this model version (the directory this file was copied into)."""
        config = json.loads(args["model_config"])
        onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests: list) -> list:
        """One response per request; each request is run on its own, as it came from the client."""
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            results = self.session.run(self.output_names, feeds)
            outputs = [pb_utils.Tensor(name, result) for name, result in zip(self.output_names, results, strict=False)]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
