"""The TensorRT backend: the export stage's FP16 engine run on a CUDA stream, and TensorRT 10 in the core.

`TensorRTTileEncoder` runs the engine. The export stage builds and checks
engines (`export/tensorrt_build.py`) and this runtime serves them. Both need
the same import check, engine loading and error types, and the core imports
nothing from `export/`, so they live here. TensorRT is imported only inside
these functions: where it (or the GPU it needs) is missing they raise
`TensorRTUnavailableError` with what to install, and nothing else breaks.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from xmag.contract import EMBEDDING_OUTPUT, TILES_INPUT
from xmag.errors import XmagError
from xmag.runtimes.protocols import check_tiles
from xmag.runtimes.staging import PinnedStaging

# Engines are built with TensorRT 10's precision API (BuilderFlag.FP16, per-layer
# precision, OBEY_PRECISION_CONSTRAINTS), which TensorRT 11 removed in favour of
# strongly typed networks; and an engine runs only under the TensorRT release
# that built it. So building and running both hold to this major version.
SUPPORTED_TENSORRT_MAJOR = 10

TENSORRT_INSTALL_HINT = (
    "Building, checking or running TensorRT FP16 engines needs an NVIDIA GPU with its "
    "CUDA runtime and the TensorRT 10 Python package: on a GPU machine run "
    '`pip install "tensorrt>=10,<11"` (plain `pip install tensorrt` now brings '
    "TensorRT 11, which this code does not support), or work inside NVIDIA's "
    "TensorRT or Triton Inference Server container. The ONNX artifacts do not need "
    "TensorRT: onnxruntime serves them as they are."
)


class TensorRTUnavailableError(XmagError):
    """TensorRT (or the GPU it needs) is not available on this machine."""

    code = "tensorrt_unavailable"


class TensorRTEngineError(XmagError):
    """TensorRT rejected the ONNX model, failed to build it, or cannot run an engine file."""

    code = "tensorrt_engine_error"


class TensorRTBatchSizeError(TensorRTEngineError):
    """A batch is outside the engine's optimisation profile (its smallest to largest batch)."""

    code = "tensorrt_batch_size"


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or TensorRTUnavailableError saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as error:
        # OSError: the Python package is there but its CUDA libraries cannot be loaded.
        raise TensorRTUnavailableError(f"TensorRT cannot be imported ({error}). {TENSORRT_INSTALL_HINT}") from error
    major = int(tensorrt.__version__.split(".")[0])
    if major != SUPPORTED_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is installed, but this code uses the "
            f"TensorRT {SUPPORTED_TENSORRT_MAJOR} API. {TENSORRT_INSTALL_HINT}"
        )
    return tensorrt


def require_cuda_gpu() -> tuple[int, int]:
    """The compute capability of the current GPU; TensorRTUnavailableError when torch sees none."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            f"TensorRT is installed, but torch {torch.__version__} sees no CUDA GPU "
            f"(torch CUDA build: {torch.version.cuda or 'none, a CPU-only build'}). "
            f"{TENSORRT_INSTALL_HINT}"
        )
    return torch.cuda.get_device_capability()


def load_engine(trt: ModuleType, plan_path: Path):
    """Deserialise an engine file; TensorRTEngineError when this GPU or TensorRT cannot run it."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        major, minor = require_cuda_gpu()
        raise TensorRTEngineError(
            f"TensorRT {trt.__version__} cannot load {plan_path} on this GPU (compute capability "
            f"{major}.{minor}). An engine runs only on the GPU compute capability and TensorRT "
            "version that built it (both are in its file name, model.sm<cc>.trt<version>.plan). "
            "Rebuild the engine here, or run it where it was built."
        )
    return engine


def torch_dtype_of(trt: ModuleType, trt_dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type, for the torch tensors used as engine buffers."""
    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if trt_dtype not in dtypes:
        raise TensorRTEngineError(f"the engine has a tensor of type {trt_dtype}, which has no torch buffer type here")
    return dtypes[trt_dtype]


class TensorRTTileEncoder:
    """A serialised TensorRT 10 engine of the encoder (the export stage's `.plan`), on its own CUDA stream.

    The engine is deserialised once and run through one execution context, so
    an instance serves one thread at a time (the service's encoder stage is one
    thread). Any batch size within the engine's optimisation profile is
    accepted (`min_batch_size` to `max_batch_size`); others raise
    TensorRTBatchSizeError. Torch CUDA tensors are the engine's buffers, and
    tiles travel as uint8 through pinned memory. Without TensorRT or a CUDA GPU
    the constructor raises TensorRTUnavailableError.
    """

    backend = "tensorrt"
    precision = "fp16"  # the export stage builds FP16 engines (normalisation and softmax kept in FP32)

    def __init__(
        self,
        plan_path: str | Path,
        tile_size_px: int,
        embed_dim: int,
        *,
        input_name: str = TILES_INPUT,
        output_name: str = EMBEDDING_OUTPUT,
    ):
        trt = import_tensorrt()
        require_cuda_gpu()
        engine = load_engine(trt, Path(plan_path))
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        if inputs != [input_name] or output_name not in names:
            raise TensorRTEngineError(
                f"{plan_path} is not a tile encoder engine: it has inputs {inputs} and tensors {names}, "
                f"expected the one input {input_name!r} and the output {output_name!r}"
            )
        if engine.get_tensor_dtype(input_name) != trt.uint8:
            raise TensorRTEngineError(f"{plan_path} takes {engine.get_tensor_dtype(input_name)} tiles, not uint8")
        min_shape, _, max_shape = (tuple(shape) for shape in engine.get_tensor_profile_shape(input_name, 0))
        output_width = tuple(engine.get_tensor_shape(output_name))[-1]
        if max_shape[1:] != (tile_size_px, tile_size_px, 3) or output_width != embed_dim:
            raise TensorRTEngineError(
                f"{plan_path} encodes tiles of shape {max_shape[1:]} into {output_width} values; "
                f"this model's are ({tile_size_px}, {tile_size_px}, 3) into {embed_dim}"
            )
        self.min_batch_size, self.max_batch_size = int(min_shape[0]), int(max_shape[0])
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        self.description = "tensorrt fp16 on cuda"
        self._engine = engine
        self._context = engine.create_execution_context()
        self._input_name, self._output_name = input_name, output_name
        self._output_dtypes = {
            name: torch_dtype_of(trt, engine.get_tensor_dtype(name)) for name in names if name != input_name
        }
        # Our own stream: TensorRT warns that the default stream costs extra synchronisation.
        self._stream = torch.cuda.Stream()
        self._staging = PinnedStaging()

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        check_tiles(tiles, self.tile_size_px)
        if not self.min_batch_size <= len(tiles) <= self.max_batch_size:
            raise TensorRTBatchSizeError(
                f"a batch of {len(tiles)} tiles is outside the TensorRT engine's optimisation profile "
                f"({self.min_batch_size} to {self.max_batch_size} tiles): send smaller batches, or rebuild the "
                "engine with a larger --trt-max-batch"
            )
        # Everything below is queued on our stream; allocations made under it belong to it.
        with torch.cuda.stream(self._stream):
            device_tiles = self._staging.to_device(tiles, "cuda")
            if not self._context.set_input_shape(self._input_name, tuple(device_tiles.shape)):
                raise TensorRTEngineError(f"the engine rejects input shape {tuple(device_tiles.shape)}")
            self._context.set_tensor_address(self._input_name, device_tiles.data_ptr())
            outputs = {}
            for name, dtype in self._output_dtypes.items():
                outputs[name] = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise TensorRTEngineError("TensorRT failed to run the engine; its log above says why")
            # A blocking copy on our stream: it waits for the engine, and for the input copy before it.
            embeddings = outputs[self._output_name].float().cpu()
        return embeddings.numpy()
